"""Where a domain's cgroup lives: the mounted hierarchies, the partition and the group name.

Naming (see docs/cgroups.md):

* default: ``/vmconfine/<instance segment>/<name>``, the original QEMU-driver layout
  (``libvirt/qemu/$VMNAME``) with vmconfine's name; the instance segment is ``qemu`` for the
  system instance, ``qemu-embed-<8 hex of sha256(root)>`` for an embed root (so two roots never
  collide) and ``qemu-<user>`` for a session instance;
* an explicit partition (``<resource><partition>`` in the XML, else ``cgroup_partition`` set in
  qemu.conf) uses libvirt's non-systemd rules: each partition component gets a ``.partition``
  suffix (except a top-level ``machine``, ``system`` or ``user``) and the group is
  ``<machine name>.vmconfine-qemu`` with the machine name ``qemu-<name>`` /
  ``qemu-embed-<hash>-<name>`` / ``qemu-<user>-<name>``.

Components are escaped as libvirt does (a leading ``_`` when a name starts with ``cgroup.``,
``_``, ``.`` or ``<controller>.``). The path is nested under the cgroup vmconfine itself runs
in, per hierarchy (``/`` for a system service, so the layout is then absolute).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import ConfigError

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain

#: libvirt's controllers (``virCgroupController``) plus ``pids``, which vmconfine also places.
KNOWN_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio",
                     "net_cls", "perf_event", "name=systemd", "pids")
#: Controllers used when ``cgroup_controllers`` is unset (libvirt's autodetected set).
AUTODETECT = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "net_cls",
              "perf_event")
#: v1 controller name -> its cgroup v2 name, where they differ.
V2_NAMES = {"blkio": "io"}
UNIFIED = "unified"  # key of the cgroup v2 hierarchy in :attr:`Hierarchies.mounts`
DEFAULT_ROOT = "vmconfine"


@dataclass
class Hierarchies:
    """Mounted cgroup hierarchies: v1 controller -> mount point, and the cgroup2 mount."""

    v1: dict[str, str] = field(default_factory=dict)
    v2: str | None = None
    v2_controllers: set[str] = field(default_factory=set)
    self_v1: dict[str, str] = field(default_factory=dict)  # controller -> own placement
    self_v2: str = "/"

    @property
    def empty(self) -> bool:
        return not self.v1 and self.v2 is None


def _unescape_mount(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def detect(proc: Path = Path("/proc")) -> Hierarchies:
    """Read the cgroup mounts (``/proc/self/mountinfo``) and this process's placement."""
    h = Hierarchies()
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _source, *opts = right.split()
        mount_point = _unescape_mount(left.split()[4])
        if fstype == "cgroup2" and h.v2 is None:
            h.v2 = mount_point
        elif fstype == "cgroup":
            for opt in (opts[0] if opts else "").split(","):
                if opt in KNOWN_CONTROLLERS and opt not in h.v1:
                    h.v1[opt] = mount_point
    if h.v2 is not None:
        try:
            h.v2_controllers = set(Path(h.v2, "cgroup.controllers").read_text().split())
        except OSError:
            h.v2_controllers = set()
    try:
        own = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        own = []
    for line in own:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _num, ctrls, path = parts
        if ctrls == "":
            h.self_v2 = path or "/"
            continue
        for ctrl in ctrls.split(","):
            h.self_v1[ctrl] = path or "/"
    return h


def needs_escape(name: str) -> bool:
    """libvirt's virCgroupPartitionNeedsEscaping."""
    if name.startswith(("cgroup.", "_", ".")):
        return True
    return any(name.startswith(f"{c}.") for c in _controller_names())


def _controller_names() -> list[str]:
    names = [c for c in KNOWN_CONTROLLERS if not c.startswith("name=")]
    try:
        for line in Path("/proc/cgroups").read_text().splitlines():
            if line and not line.startswith("#"):
                names.append(line.split()[0])
    except OSError:
        pass
    return names


def escape(name: str) -> str:
    return f"_{name}" if needs_escape(name) else name


def partition_suffix(path: str) -> str:
    """libvirt's virCgroupSetPartitionSuffix: ``/machine/foo`` -> ``/machine/foo.partition``."""
    tokens = path.split("/")
    out = []
    for i, tok in enumerate(tokens):
        if i == 1 and tok in ("machine", "system", "user"):
            out.append(tok)
            continue
        if tok and "." not in tok:
            tok = f"{tok}.partition"
        out.append(escape(tok) if tok else tok)
    return "/".join(out)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def instance_segment(instance: Instance) -> str:
    """``qemu`` / ``qemu-embed-<hash8>`` / ``qemu-<user>``: keeps instances apart."""
    if instance.kind == "embed" and instance.root is not None:
        digest = hashlib.sha256(str(instance.root).encode()).hexdigest()[:8]
        return f"qemu-embed-{digest}"
    if instance.kind == "session" or not instance.privileged:
        return f"qemu-{_user_name(instance.caller_uid)}"
    return "qemu"


def machine_name(instance: Instance, name: str) -> str:
    """libvirt's machine name (without the domain id), filtered to ``[A-Za-z0-9-]``."""
    seg = instance_segment(instance)
    clean = re.sub(r"[^A-Za-z0-9-]+", "-", name)
    clean = re.sub(r"-{2,}", "-", clean)
    out = f"{seg}-{clean}"[:64]
    return out.rstrip("-.")


def resource_partition(domain: Domain) -> str | None:
    """``<resource><partition>`` of the domain XML, if any."""
    root = getattr(domain, "root", None)
    if root is None:
        return None
    text = root.findtext("resource/partition")
    return text.strip() if text and text.strip() else None


def _config_partition(config: Any) -> str | None:
    source = getattr(config, "source", None)
    value = getattr(config, "cgroup_partition", None)
    if not value or source is None or source("cgroup_partition") == "default":
        return None
    return str(value)


def group_path(instance: Instance, domain: Domain, config: Any) -> str:
    """The domain's cgroup path relative to vmconfine's own cgroup (``/vmconfine/qemu/vm1``)."""
    name = domain.name
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"domain name {name!r} cannot be used as a cgroup name; rename it")
    explicit = resource_partition(domain) or _config_partition(config)
    if explicit is None:
        return f"/{DEFAULT_ROOT}/{instance_segment(instance)}/{escape(name)}"
    if not explicit.startswith("/"):
        raise ConfigError(f"Resource partition '{explicit}' must start with '/'")
    if ".." in explicit.split("/"):
        raise ConfigError(f"Resource partition '{explicit}' must not contain '..'")
    partition = partition_suffix(explicit.rstrip("/")) if explicit != "/" else ""
    group = escape(f"{machine_name(instance, name)}.vmconfine-qemu")
    return f"{partition}/{group}"


def join(mount: str, own: str, rel: str) -> str:
    """``mount`` + vmconfine's own placement ``own`` + ``rel``, normalised."""
    return os.path.normpath(f"{mount}/{own.strip('/')}/{rel.strip('/')}")


def components(mount: str, own: str, rel: str) -> list[str]:
    """The directories from the first component of ``rel`` down to the leaf (parents first)."""
    base = os.path.normpath(f"{mount}/{own.strip('/')}")
    out = []
    cur = base
    for part in [p for p in rel.split("/") if p]:
        cur = f"{cur}/{part}"
        out.append(cur)
    return out
