"""The Landlock ruleset of one domain: derived from its resources and its emulator, then applied.

A :class:`Ruleset` is a plain value (JSON round-trip, stable digest). :func:`derive_ruleset`
builds the ruleset a kernel with the newest known ABI would enforce; :meth:`Ruleset.for_abi`
masks it down to what a given kernel supports (and says what is lost). :func:`apply_ruleset`
runs in the forked child: it opens every rule path with ``O_PATH``, adds the rules, calls
``landlock_restrict_self`` and closes every descriptor it opened, so none reaches QEMU.

How resources map to access rights (roles from :mod:`vmconfine.plugin.resources`):

* read-write files (top disks, nvram, writable loader, chardev pipes and devices, hostdev
  nodes):
  ``read_file write_file truncate`` (+ ``ioctl_dev`` when the path is a device node);
* read-only files (read-only disks, backing layers, kernel, initrd, dtb, read-only loader):
  ``read_file`` (+ ``ioctl_dev`` for device nodes, e.g. a CD-ROM drive);
* directories QEMU owns (the domain's runtime directory and its HOME): everything except
  execute, device creation and ``refer``;
* resources QEMU gets as file descriptors (``Resource.passed``: chardev sockets in
  ``mode='bind'``, chardev files and logs, the VNC socket): no rule at all. vmconfine creates
  and opens them before ``landlock_restrict_self``, and Landlock checks opens, not the use of
  a descriptor, so QEMU needs no ``make_sock``/``make_reg`` on any directory of the admin's;
  likewise the tap queues and vhost-net of network interfaces (no ``/dev/net/tun`` rule: the
  ``ioctl_dev`` right of a device file is fixed when it is opened, outside the sandbox);
* the emulator and its ELF interpreter: ``read_file execute``; its libraries, module libraries
  and the loader cache: ``read_file``; QEMU's firmware and module directories: ``read_file
  read_dir``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError
from vmconfine_landlock import syscalls

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource
    from vmconfine.qemu.emulator import EmulatorFiles

RO_FILE = frozenset({"read_file"})
RW_FILE = frozenset({"read_file", "write_file", "truncate"})
EXEC_FILE = frozenset({"read_file", "execute"})
RO_DIR = frozenset({"read_file", "read_dir"})
RW_DIR = RO_DIR | RW_FILE | {
    "remove_dir", "remove_file", "make_dir", "make_reg", "make_sock", "make_fifo", "make_sym",
}
PTS_DIR = frozenset({"read_file", "write_file", "ioctl_dev"})
#: a directory QEMU creates a listening socket in (spice-server binds the path itself)
SOCK_DIR = frozenset({"make_sock"})

#: Handled at the newest ABI: every filesystem right (deny by default), both TCP rights, both
#: scopes, and audit logging of QEMU's denials (not of vmconfine's own pre-exec self-test).
ALL_FS = frozenset(syscalls.FS_ACCESS)
ALL_NET = frozenset(syscalls.NET_ACCESS)
ALL_SCOPES = frozenset(syscalls.SCOPES)
FLAGS = frozenset({"log_same_exec_off", "log_new_exec_on"})

#: Interface types that QEMU implements with user-mode networking (slirp): guest TCP
#: connections become host connect() calls to any address and port. (Tap-backed interfaces
#: reach QEMU as descriptors vmconfine opened: no rule for /dev/net/tun or /dev/vhost-net.)
SLIRP_INTERFACES = ("user",)
#: The host time zone, read by QEMU for an RTC in local time.
LOCALTIME = "/etc/localtime"


@dataclass(frozen=True)
class PathRule:
    """Allow ``access`` on the file or directory hierarchy at ``path`` (a real path)."""

    path: str
    access: frozenset[str]
    is_dir: bool = False
    roles: tuple[str, ...] = ()
    optional: bool = False  #: a missing path is skipped instead of failing the start

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "access": sorted(self.access), "dir": self.is_dir,
                "roles": list(self.roles), "optional": self.optional}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathRule:
        return cls(d["path"], frozenset(d["access"]), bool(d["dir"]), tuple(d["roles"]),
                   bool(d["optional"]))


@dataclass(frozen=True)
class NetRule:
    """Allow ``access`` (bind_tcp / connect_tcp) on TCP ``port``."""

    port: int
    access: frozenset[str]
    roles: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "access": sorted(self.access), "roles": list(self.roles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetRule:
        return cls(int(d["port"]), frozenset(d["access"]), tuple(d["roles"]))


@dataclass(frozen=True)
class Ruleset:
    """What ``landlock_restrict_self`` will enforce on QEMU."""

    abi: int
    handled_fs: frozenset[str]
    handled_net: frozenset[str] = frozenset()
    scoped: frozenset[str] = frozenset()
    flags: frozenset[str] = frozenset()
    path_rules: tuple[PathRule, ...] = ()
    net_rules: tuple[NetRule, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    # ---- value semantics ------------------------------------------------------------------
    def to_dict(self, *, notes: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "abi": self.abi,
            "handled_fs": sorted(self.handled_fs),
            "handled_net": sorted(self.handled_net),
            "scoped": sorted(self.scoped),
            "flags": sorted(self.flags),
            "path_rules": [r.to_dict() for r in self.path_rules],
            "net_rules": [r.to_dict() for r in self.net_rules],
        }
        if notes:
            out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ruleset:
        return cls(
            abi=int(d["abi"]), handled_fs=frozenset(d["handled_fs"]),
            handled_net=frozenset(d["handled_net"]), scoped=frozenset(d["scoped"]),
            flags=frozenset(d["flags"]),
            path_rules=tuple(PathRule.from_dict(r) for r in d["path_rules"]),
            net_rules=tuple(NetRule.from_dict(r) for r in d["net_rules"]),
            notes=tuple(d.get("notes", ())),
        )

    def digest(self) -> str:
        """SHA-256 of what is enforced (rules are kept sorted, so order never matters)."""
        text = json.dumps(self.to_dict(notes=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def label(self) -> str:
        """The seclabel: ``landlock:abiN:`` and the first 12 hex digits of the digest."""
        return f"landlock:abi{self.abi}:{self.digest()[:12]}"

    def rule_for(self, path: str) -> PathRule | None:
        return next((r for r in self.path_rules if r.path == path), None)

    # ---- kernel ABI ------------------------------------------------------------------------
    def for_abi(self, abi: int) -> Ruleset:
        """This ruleset as a kernel with ``abi`` can enforce it (newer ABIs: the newest known)."""
        notes = list(self.notes)
        if abi > syscalls.MAX_KNOWN_ABI:
            notes.append(f"kernel Landlock ABI {abi} is newer than vmconfine knows; "
                         f"using ABI {syscalls.MAX_KNOWN_ABI}")
            abi = syscalls.MAX_KNOWN_ABI
        fs = self.handled_fs & syscalls.fs_rights(abi)
        net = self.handled_net & syscalls.net_rights(abi)
        scoped = self.scoped & syscalls.scopes(abi)
        flags = self.flags & syscalls.restrict_flags(abi)
        lost = {
            "refer": "cross-directory rename/link is always denied (ABI 1 behaviour)",
            "truncate": "truncation is not restricted (needs ABI 3)",
            "ioctl_dev": "device ioctls are not restricted (needs ABI 5)",
        }
        for right, text in lost.items():
            if right in self.handled_fs and right not in fs:
                notes.append(f"ABI {abi}: {text}")
        if self.handled_net and not net:
            notes.append(f"ABI {abi}: TCP bind/connect are not restricted (needs ABI 4)")
        if self.scoped and not scoped:
            notes.append(f"ABI {abi}: signals and abstract unix sockets are not scoped "
                         "(needs ABI 6)")
        if self.flags and not flags:
            notes.append(f"ABI {abi}: denials are not audited (needs ABI 7)")
        rules = []
        for r in self.path_rules:
            access = r.access & fs
            if access:
                rules.append(replace(r, access=access))
        nrules = []
        for n in self.net_rules if net else ():
            access = n.access & net
            if access:
                nrules.append(replace(n, access=access))
        return Ruleset(abi, fs, net, scoped, flags, tuple(rules), tuple(nrules), tuple(notes))


# --------------------------------------------------------------------------------------------
# Derivation
# --------------------------------------------------------------------------------------------


class _Builder:
    """Collects rules, merging rules for the same path (union of rights and roles)."""

    def __init__(self) -> None:
        self.paths: dict[str, PathRule] = {}
        self.ports: dict[int, NetRule] = {}
        self.notes: list[str] = []

    def path(self, path: str, access: Iterable[str], role: str, *, is_dir: bool = False,
             optional: bool = False) -> None:
        real = os.path.realpath(path)
        access = frozenset(access)
        old = self.paths.get(real)
        if old is None:
            self.paths[real] = PathRule(real, access, is_dir, (role,), optional)
            return
        roles = old.roles if role in old.roles else (*old.roles, role)
        self.paths[real] = PathRule(real, old.access | access, old.is_dir or is_dir, roles,
                                    old.optional and optional)

    def port(self, port: int, access: str, role: str) -> None:
        old = self.ports.get(port)
        if old is None:
            self.ports[port] = NetRule(port, frozenset({access}), (role,))
            return
        roles = old.roles if role in old.roles else (*old.roles, role)
        self.ports[port] = NetRule(port, old.access | {access}, roles)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def add_resource(b: _Builder, res: Resource) -> None:
    """The rule(s) for one resource QEMU opens (none for a resource QEMU gets as an fd:
    Landlock checks opens, and vmconfine opened it before ``restrict_self``)."""
    if not res.path or res.passed:
        return
    st = _stat(res.path)
    if st is None and res.create and not res.is_dir:
        # QEMU creates it (the SPICE socket outside the domain's home): the directory lets
        # it make a socket, and nothing else
        b.path(os.path.dirname(os.path.normpath(res.path)), SOCK_DIR, res.role, is_dir=True)
        return
    is_dir = res.is_dir or (st is not None and stat.S_ISDIR(st.st_mode))
    is_dev = st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
    if is_dir:
        b.path(res.path, RW_DIR if res.writable else RO_DIR, res.role, is_dir=True)
        return
    access = RW_FILE if res.writable else RO_FILE
    if is_dev:
        access = access | {"ioctl_dev"}
    b.path(res.path, access, res.role, optional=res.role == "devnode")


def add_emulator(b: _Builder, emu: EmulatorFiles) -> None:
    """The emulator binary, its loader, libraries, modules and firmware directories."""
    b.path(emu.executable, EXEC_FILE, "emulator")
    if emu.interpreter:
        b.path(emu.interpreter, EXEC_FILE, "interpreter")
    for lib in emu.libraries:
        b.path(lib, RO_FILE, "library")
    for lib in emu.module_libraries:
        b.path(lib, RO_FILE, "module-library")
    if emu.loader_cache:
        b.path(emu.loader_cache, RO_FILE, "loader-cache")
    for d in emu.module_dirs:
        b.path(d, RO_DIR, "module-dir", is_dir=True)
    for d in emu.data_dirs:
        b.path(d, RO_DIR, "firmware-dir", is_dir=True)
    b.notes.extend(emu.notes)


def _port_number(service: str | None) -> int | None:
    if not service:
        return None
    if service.isdigit():
        return int(service)
    try:
        return socket.getservbyname(service, "tcp")
    except OSError:
        return None


def add_network(b: _Builder, domain: Domain) -> tuple[bool, bool]:
    """TCP port rules; returns whether bind and connect can be restricted at all."""
    restrict_bind = restrict_connect = True
    for g in domain.graphics:
        if g.socket or g.listen_type in ("socket", "none"):
            continue
        spice = getattr(g, "spice", None)
        if spice is not None:
            # SPICE ports are allocated (libvirt's allocator) before the ruleset is made
            ports = [(role, p, False) for role, p in (("spice", g.port),
                                                      ("spice-tls", spice.tls_port))
                     if p is not None and p > 0]
        else:  # a VNC autoport is allocated at start too; not yet (domxml-to-native): QEMU's
            ports = [("vnc" if g.type == "vnc" else g.type, g.port,
                      g.port is None or g.port <= 0)]
        if g.websocket is not None and g.websocket != 0:
            ports.append(("websocket", g.websocket, g.websocket < 0))
        for role, port, auto in ports:
            if auto or port is None or port <= 0:
                restrict_bind = False
                b.notes.append(f"TCP bind is not restricted: the {role} port is chosen by QEMU "
                               f"at start (autoport); give a fixed port to restrict binds")
            else:
                b.port(port, "bind_tcp", role)
    for c in domain.chardevs:
        if c.type != "tcp":
            continue
        port = _port_number(c.service)
        if port is None:
            b.notes.append(f"<{c.kind} type='tcp'> has no numeric port: it cannot be allowed")
            continue
        b.port(port, "bind_tcp" if c.mode == "bind" else "connect_tcp", f"{c.kind}-tcp")
    if any(i.type in SLIRP_INTERFACES for i in domain.interfaces):
        restrict_connect = False
        b.notes.append("TCP connect is not restricted: user-mode networking connects to any "
                       "host and port on the guest's behalf")
    return restrict_bind, restrict_connect


def add_extra_devices(b: _Builder, domain: Domain, resources: list[Resource]) -> None:
    """Device nodes implied by the devices but not listed as resources."""
    paths = {r.path for r in resources}
    if "/dev/ptmx" in paths:
        b.path("/dev/pts", PTS_DIR, "devnode", is_dir=True, optional=True)
    if getattr(domain, "clock_offset", "utc") == "localtime" and os.path.exists(LOCALTIME):
        b.path(LOCALTIME, RO_FILE, "timezone")
    for rng in getattr(domain, "rngs", []):
        path = getattr(rng, "path", None) or "/dev/urandom"
        if getattr(rng, "backend_model", None) == "random" and path not in paths:
            b.path(path, RO_FILE, "rng")


def derive_ruleset(domain: Domain, resources: list[Resource], emulator: EmulatorFiles | None,
                   *, home_dir: str | None = None) -> Ruleset:
    """The ruleset for the newest known ABI (call :meth:`Ruleset.for_abi` for a kernel)."""
    b = _Builder()
    for res in resources:
        add_resource(b, res)
    add_extra_devices(b, domain, resources)
    if home_dir:
        b.path(home_dir, RW_DIR, "home", is_dir=True, optional=True)
    if emulator is not None:
        add_emulator(b, emulator)
    restrict_bind, restrict_connect = add_network(b, domain)
    handled_net = set(ALL_NET)
    if not restrict_bind:
        handled_net.discard("bind_tcp")
    if not restrict_connect:
        handled_net.discard("connect_tcp")
    rules = []
    for r in sorted(b.paths.values(), key=lambda r: r.path):
        access = r.access if r.is_dir else r.access & syscalls.FILE_ONLY_ACCESS
        rules.append(replace(r, access=access))
    nrules = [replace(n, access=n.access & handled_net)
              for n in sorted(b.ports.values(), key=lambda n: n.port)]
    return Ruleset(
        abi=syscalls.MAX_KNOWN_ABI, handled_fs=ALL_FS, handled_net=frozenset(handled_net),
        scoped=ALL_SCOPES, flags=FLAGS, path_rules=tuple(rules),
        net_rules=tuple(n for n in nrules if n.access), notes=tuple(dict.fromkeys(b.notes)),
    )


#: a helper path's access (:class:`vmconfine.plugin.helper.HelperPath`) -> rights, for a file
#: and for a directory tree
HELPER_ACCESS = {
    "r": (RO_FILE, RO_DIR),
    "rw": (RW_FILE, RW_DIR),
    "rx": (EXEC_FILE, RO_DIR | {"execute"}),
}


def helper_ruleset(helper: Helper) -> Ruleset:
    """The ruleset of a helper process (swtpm): exactly the paths it lists (its program,
    the system trees it reads, its state), no TCP, the same scopes as QEMU."""
    b = _Builder()
    for hp in helper.paths:
        file_access, dir_access = HELPER_ACCESS[hp.access]
        b.path(hp.path, dir_access if hp.tree else file_access, helper.name, is_dir=hp.tree)
    rules = tuple(replace(r, access=r.access if r.is_dir else r.access &
                          syscalls.FILE_ONLY_ACCESS)
                  for r in sorted(b.paths.values(), key=lambda r: r.path))
    return Ruleset(abi=syscalls.MAX_KNOWN_ABI, handled_fs=ALL_FS, handled_net=ALL_NET,
                   scoped=ALL_SCOPES, flags=FLAGS, path_rules=rules)


# --------------------------------------------------------------------------------------------
# Enforcement (forked child)
# --------------------------------------------------------------------------------------------


SELFTEST_PATH = "/"


def apply_ruleset(rs: Ruleset) -> dict[str, Any]:
    """Enforce ``rs`` on the calling process (no_new_privs must already be set).

    Every descriptor opened here is closed before returning (the ruleset fd and the rule
    paths' ``O_PATH`` fds are also close-on-exec). After ``landlock_restrict_self`` a
    self-test opens a path outside the ruleset and must get EACCES. Returns a report for the
    parent; raises :class:`DriverError` on any failure.
    """
    try:
        ruleset_fd = syscalls.create_ruleset(
            rs.abi, syscalls.fs_mask(rs.handled_fs), syscalls.net_mask(rs.handled_net),
            syscalls.scope_mask(rs.scoped))
    except OSError as err:
        raise DriverError(f"landlock: creating the ruleset failed: {err.strerror}") from err
    skipped: list[str] = []
    try:
        for rule in rs.path_rules:
            _add_path(ruleset_fd, rule, skipped)
        for nrule in rs.net_rules:
            try:
                syscalls.add_net_rule(ruleset_fd, nrule.port, syscalls.net_mask(nrule.access))
            except OSError as err:
                raise DriverError(f"landlock: adding the rule for TCP port {nrule.port} "
                                  f"failed: {err.strerror}") from err
        try:
            syscalls.restrict_self(ruleset_fd, syscalls.flags_mask(rs.flags))
        except OSError as err:
            hint = (" (no_new_privs is not set)" if err.errno == errno.EPERM else "")
            raise DriverError(f"landlock: landlock_restrict_self failed: {err.strerror}{hint}"
                              ) from err
    finally:
        os.close(ruleset_fd)
    return {"applied": True, "abi": rs.abi, "label": rs.label, "rules": len(rs.path_rules),
            "ports": len(rs.net_rules), "skipped": skipped, "selftest": selftest(rs)}


def _add_path(ruleset_fd: int, rule: PathRule, skipped: list[str]) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if rule.optional:
            skipped.append(rule.path)
            return
        raise DriverError(f"landlock: {rule.path} ({', '.join(rule.roles)}) does not exist; "
                          "create it or fix the domain XML") from None
    except OSError as err:
        raise DriverError(f"landlock: cannot open {rule.path} ({', '.join(rule.roles)}) as "
                          f"uid {os.getuid()}: {err.strerror}; make it and its parent "
                          "directories reachable by the QEMU user") from err
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        access = rule.access if is_dir else rule.access & syscalls.FILE_ONLY_ACCESS
        if access:
            syscalls.add_path_rule(ruleset_fd, fd, syscalls.fs_mask(access))
    except OSError as err:
        raise DriverError(f"landlock: adding the rule for {rule.path} failed: "
                          f"{err.strerror}") from err
    finally:
        os.close(fd)


def selftest(rs: Ruleset) -> str:
    """After restrict_self: reading a directory outside the ruleset must be denied.

    Returns ``"denied"`` (enforced), ``"skipped"`` (the probe path is allowed by a rule) or
    raises :class:`DriverError` when the kernel let the read through.
    """
    if any(r.path == SELFTEST_PATH for r in rs.path_rules if r.is_dir):
        return "skipped"
    try:
        fd = os.open(SELFTEST_PATH, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return "denied"
    os.close(fd)
    raise DriverError(f"landlock: the ruleset was applied but reading {SELFTEST_PATH} is "
                      "still allowed; the kernel is not enforcing it")
