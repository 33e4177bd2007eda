"""The device rule model: which device nodes a domain's QEMU may open, and how.

One :class:`DeviceRule` per allowed device (or device range), in libvirt's
``qemuSetupDevicesCgroup`` order, each remembering the path it came from and its *origin* (what
in the domain needs it: ``acl``, ``disk:vda``, ``hostdev:usb:001:004``...). Hotplug adds or
drops the rules of one origin; :func:`effective` merges what is left by device, so a node still
needed by another origin (``/dev/vfio/vfio`` for a second VFIO device) stays allowed.

Both backends consume the same effective set: v1 writes :meth:`DeviceRule.text` lines
(``c 1:3 rw``, ``c 136:* rw``, ``b 7:0 r``) to ``devices.allow``; v2 compiles it to a BPF
program (:mod:`vmconfine_cgroups.bpf`).

Only character and block devices make rules; a path that does not exist or is not a device is
skipped (a regular image file needs no device rule).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.plugin.devacl import DEFAULT_DEVICE_ACL, acl_list

if TYPE_CHECKING:
    from vmconfine.domain import Chardev, Disk, Domain, Hostdev

log = logging.getLogger(__name__)

#: The list the original QEMU-driver documentation shows (kept for reference and docs only).
HISTORICAL_DEVICE_ACL = (*DEFAULT_DEVICE_ACL, "/dev/kqemu", "/dev/rtc", "/dev/hpet",
                         "/dev/net/tun")
PTY_MAJOR = 136
VFIO_CONTAINER = "/dev/vfio/vfio"
TPM_DEFAULT_PATH = "/dev/tpm0"
ACCESS_ORDER = "rwm"

#: ``os.stat``; unit tests swap in a fake device table.
_stat = os.stat


def norm_access(access: str) -> str:
    """Access letters in libvirt's order (``"wr"`` → ``"rw"``); refuses other letters."""
    bad = set(access) - set(ACCESS_ORDER)
    if bad:
        raise ValueError(f"invalid device access {access!r}")
    return "".join(ch for ch in ACCESS_ORDER if ch in access)


@dataclass(frozen=True)
class DeviceRule:
    """One allowed device or device range.

    ``type`` is ``c`` or ``b`` (``a`` = both); ``major`` / ``minor`` None mean ``*``.
    """

    type: str
    major: int | None
    minor: int | None
    access: str
    path: str = ""
    origin: str = ""

    def __post_init__(self) -> None:
        if self.type not in ("a", "b", "c"):
            raise ValueError(f"invalid device type {self.type!r}")
        object.__setattr__(self, "access", norm_access(self.access))

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        return (self.type, self.major, self.minor)

    def text(self) -> str:
        """libvirt's rule string: ``c 1:3 rw``, ``c 136:* rw``, ``a *:* rwm``."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {self.access}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRule:
        return cls(str(data["type"]), data.get("major"), data.get("minor"),
                   str(data.get("access", "")), str(data.get("path", "")),
                   str(data.get("origin", "")))

    @classmethod
    def parse(cls, text: str, origin: str = "") -> DeviceRule:
        """Parse a rule string (``c 1:3 rw``) as written to / read from devices.list."""
        parts = text.split()
        if parts == ["a"]:
            return cls("a", None, None, "rwm", origin=origin)
        if len(parts) != 3 or ":" not in parts[1]:
            raise ValueError(f"invalid device rule {text!r}")
        major_s, minor_s = parts[1].split(":", 1)
        major = None if major_s == "*" else int(major_s)
        minor = None if minor_s == "*" else int(minor_s)
        return cls(parts[0], major, minor, parts[2], origin=origin)


def device_rule(path: str, access: str, origin: str) -> DeviceRule | None:
    """The rule for device node ``path`` (symlinks followed, as libvirt's stat does), or None
    when it does not exist or is not a character/block device."""
    try:
        st = _stat(path)
    except OSError as exc:
        log.debug("cgroups: %s skipped (%s)", path, exc.strerror)
        return None
    if stat.S_ISCHR(st.st_mode):
        dtype = "c"
    elif stat.S_ISBLK(st.st_mode):
        dtype = "b"
    else:
        return None
    return DeviceRule(dtype, os.major(st.st_rdev), os.minor(st.st_rdev), access, path, origin)


def effective(rules: Iterable[DeviceRule]) -> list[DeviceRule]:
    """Merge rules per device (access bits OR-ed), keeping first-appearance order.

    This is the set the kernel ends up holding (v1 merges identical exceptions the same way),
    so it is what both backends apply and what verification compares against.
    """
    merged: dict[tuple[str, int | None, int | None], DeviceRule] = {}
    for rule in rules:
        prev = merged.get(rule.key)
        if prev is None:
            merged[rule.key] = replace(rule, origin="")
        else:
            merged[rule.key] = replace(prev, access=norm_access(prev.access + rule.access))
    return list(merged.values())


def rule_lines(rules: Iterable[DeviceRule]) -> list[str]:
    return [r.text() for r in effective(rules)]


# -- origins ------------------------------------------------------------------------------------
def disk_origin(disk: Disk) -> str:
    top = disk.source.path if disk.source is not None else None
    return f"disk:{disk.target or top or '?'}"


def chardev_origin(chardev: Chardev) -> str:
    return f"chardev:{chardev.path or chardev.kind}"


def hostdev_origin(hostdev: Hostdev) -> str:
    if hostdev.type == "usb":
        if hostdev.bus is not None and hostdev.device is not None:
            return f"hostdev:usb:{int(hostdev.bus):03d}:{int(hostdev.device):03d}"
        return f"hostdev:usb:{hostdev.vendor or 0:04x}:{hostdev.product or 0:04x}"
    if hostdev.type == "pci":
        return f"hostdev:pci:{pci_address(hostdev)}"
    return f"hostdev:{hostdev.type}"


# -- per-device rule builders ---------------------------------------------------------------------
def disk_rules(disk: Disk) -> list[DeviceRule]:
    """The top layer rw (r when ``<readonly/>``), every backing layer r; local paths only."""
    out: list[DeviceRule] = []
    if disk.source is None or disk.type not in ("file", "block"):
        return out
    origin = disk_origin(disk)
    for depth, src in enumerate(disk.chain()):
        if not src.path or getattr(src, "type", "file") not in ("file", "block"):
            continue
        access = "rw" if depth == 0 and not disk.readonly else "r"
        rule = device_rule(src.path, access, origin)
        if rule is not None:
            out.append(rule)
    return out


def pci_address(hostdev: Hostdev) -> str:
    return (f"{int(hostdev.domain or 0):04x}:{int(hostdev.bus or 0):02x}:"
            f"{int(hostdev.slot or 0):02x}.{int(hostdev.function or 0):x}")


def _usb_path(hostdev: Hostdev, sysfs: Path) -> str | None:
    bus, dev = hostdev.bus, hostdev.device
    if bus is None or dev is None:
        if hostdev.vendor is None or hostdev.product is None:
            return None
        for d in sorted(sysfs.glob("*")) if sysfs.is_dir() else []:
            try:
                vendor = int((d / "idVendor").read_text(), 16)
                product = int((d / "idProduct").read_text(), 16)
                if (vendor, product) == (hostdev.vendor, hostdev.product):
                    bus = int((d / "busnum").read_text())
                    dev = int((d / "devnum").read_text())
                    break
            except (OSError, ValueError):
                continue
        else:
            return None
    return f"/dev/bus/usb/{int(bus):03d}/{int(dev):03d}"


def hostdev_paths(hostdev: Hostdev, sysfs_root: Path = Path("/sys")) -> list[str]:
    """Device nodes a hostdev needs: the USB node, or the VFIO group node plus the container."""
    if hostdev.mode != "subsystem":
        return []
    if hostdev.type == "usb":
        path = _usb_path(hostdev, sysfs_root / "bus" / "usb" / "devices")
        return [path] if path else []
    if hostdev.type == "pci" and hostdev.driver in (None, "vfio"):
        link = sysfs_root / "bus" / "pci" / "devices" / pci_address(hostdev) / "iommu_group"
        paths = []
        try:
            paths.append(f"/dev/vfio/{os.path.basename(os.readlink(link))}")
        except OSError:
            log.debug("cgroups: %s has no IOMMU group", pci_address(hostdev))
        paths.append(VFIO_CONTAINER)
        return paths
    return []


def hostdev_rules(hostdev: Hostdev, sysfs_root: Path = Path("/sys")) -> list[DeviceRule]:
    origin = hostdev_origin(hostdev)
    out = []
    for path in hostdev_paths(hostdev, sysfs_root):
        rule = device_rule(path, "rw", origin)
        if rule is not None:
            out.append(rule)
    return out


def domain_rules(domain: Domain, config: Any, *, devnodes: Sequence[str] = (),
                 sysfs_root: Path = Path("/sys")) -> list[DeviceRule]:
    """Every device rule of ``domain``, in libvirt's qemuSetupDevicesCgroup order.

    ``devnodes`` are the device nodes the resource model says this QEMU opens (role
    ``devnode``: e.g. /dev/kvm for type='kvm'); they are allowed rw like the ACL.
    """
    rules: list[DeviceRule] = []

    def add(path: str | None, access: str, origin: str) -> None:
        if path:
            rule = device_rule(path, access, origin)
            if rule is not None:
                rules.append(rule)

    loader = domain.os.loader
    if loader is not None:
        add(loader.path, "r" if loader.readonly else "rw", "loader")
    add(domain.os.nvram, "rw", "nvram")
    for disk in domain.disks:
        rules.extend(disk_rules(disk))
    if any(c.type == "pty" for c in domain.chardevs):
        rules.append(DeviceRule("c", PTY_MAJOR, None, "rw", "/dev/pts/*", "pty"))
    for path in acl_list(config):
        add(path, "rw", "acl")
    for path in devnodes:
        add(path, "rw", "devnode")
    for chardev in domain.chardevs:
        if chardev.type == "dev":
            add(chardev.path, "rw", chardev_origin(chardev))
    for tpm in getattr(domain, "tpms", []):
        if tpm.backend == "passthrough":
            add(tpm.device_path or TPM_DEFAULT_PATH, "rw", "tpm")
    for hostdev in domain.hostdevs:
        rules.extend(hostdev_rules(hostdev, sysfs_root))
    for inp in domain.inputs:
        if inp.evdev:
            add(inp.evdev, "rw", "input")
    for rng in getattr(domain, "rngs", []):
        if rng.backend_model == "random":
            add(rng.path or "/dev/urandom", "rw", "rng")
    return rules


def rules_to_json(rules: Iterable[DeviceRule]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rules]


def rules_from_json(data: Iterable[dict[str, Any]]) -> list[DeviceRule]:
    return [DeviceRule.from_json(d) for d in data]


def without_origin(rules: Iterable[DeviceRule], origin: str) -> list[DeviceRule]:
    return [r for r in rules if r.origin != origin]


def v1_transition(old: Iterable[DeviceRule], new: Iterable[DeviceRule]) -> list[tuple[str, str]]:
    """Writes turning v1 allow-list ``old`` into ``new``: ``[("deny"|"allow", line), ...]``.

    Removed devices (and removed access bits) are denied first, then new ones allowed, so a
    change never widens access in between.
    """
    old_eff = {r.key: r for r in effective(old)}
    new_eff = {r.key: r for r in effective(new)}
    writes: list[tuple[str, str]] = []
    for key, rule in old_eff.items():
        gone = "".join(ch for ch in rule.access if ch not in new_eff.get(key, rule).access) \
            if key in new_eff else rule.access
        if gone:
            writes.append(("deny", replace(rule, access=gone).text()))
    for key, rule in new_eff.items():
        added = "".join(ch for ch in rule.access if ch not in old_eff[key].access) \
            if key in old_eff else rule.access
        if added:
            writes.append(("allow", replace(rule, access=added).text()))
    return writes
