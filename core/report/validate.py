"""``vmconfine host-validate``: can this host run confined QEMU the way qemu.conf asks?

Like libvirt's virt-host-validate, for what vmconfine needs: the QEMU account, ``/dev/kvm``,
the emulators, cgroup hierarchies and device filtering, Landlock, SELinux and AppArmor, the
Python bindings, xattr support and the permissions of the instance directories. One
:class:`Check` per line, PASS / WARN / FAIL with the fix; nothing on the host is changed (xattr
support is probed with reads).

Also here, shared with the confinement report: who QEMU runs as (:class:`QemuIds`) and whether
the kernel's permission checks would let it reach a path (:func:`dac_denial`).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import importlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.errors import VmconfineError
from vmconfine.perms import R, W, X, can_access, describe_mode, has_acl, user_group_hint
from vmconfine.plugin.stack import Stack
from vmconfine.qemu.capabilities import find_emulators

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.launch.connection import Connection

SYS_LANDLOCK_CREATE_RULESET = 444
SELINUX_FS = Path("/sys/fs/selinux")
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")
APPARMOR_PROFILES = Path("/sys/kernel/security/apparmor/profiles")
V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio",
                            "net_cls", "net_prio", "perf_event", "pids", "hugetlb", "rdma",
                            "misc"})


# ------------------------------------------------------------------------------------------------
# who QEMU runs as, and what the kernel's permission checks let it reach
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuIds:
    """The uid, gid and groups QEMU runs with; ``privileged`` = it keeps root's capabilities."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    privileged: bool = False

    @property
    def label(self) -> str:
        return f"+{self.uid}:+{self.gid}"

    def who(self) -> str:
        groups = ",".join(str(g) for g in self.groups) or "none"
        return f"QEMU's user {self.label} (groups {groups})"

    def hint(self) -> str:
        """``user:group`` names for ``chown`` suggestions (numbers when there are no names)."""
        return user_group_hint(self.uid, self.gid)


def _account_id(spec: str, db: str) -> int | None:
    if spec.startswith("+"):
        return int(spec[1:]) if spec[1:].isdigit() else None
    try:
        return pwd.getpwnam(spec).pw_uid if db == "user" else grp.getgrnam(spec).gr_gid
    except KeyError:
        return int(spec) if spec.isdigit() else None


def ids_from_config(instance: Instance) -> QemuIds | None:
    """QEMU's ids for ``instance`` from qemu.conf (the caller's for an unprivileged instance);
    None when the configured user or group does not exist."""
    if not instance.privileged:
        return QemuIds(os.getuid(), os.getgid(), tuple(sorted(set(os.getgroups()))))
    cfg = instance.config
    uid, gid = _account_id(cfg.user, "user"), _account_id(cfg.group, "group")
    if uid is None or gid is None:
        return None
    groups = {gid}
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        pass  # an id without a passwd entry gets no supplementary groups
    privileged = uid == 0 and not cfg.clear_emulator_capabilities
    return QemuIds(uid, gid, tuple(sorted(groups)), privileged)


def mode_allows(st: os.stat_result, ids: QemuIds, want: int) -> bool:
    """Would ``ids`` get ``want`` (R/W/X mask) on this inode by its owner and mode bits?"""
    return can_access(st, ids.uid, ids.gid, ids.groups, want, privileged=ids.privileged)


def _parents(path: str) -> list[str]:
    out = []
    d = os.path.dirname(os.path.normpath(path))
    while True:
        out.append(d)
        if d == "/":
            break
        d = os.path.dirname(d)
    return list(reversed(out))


def dac_denial(path: str, ids: QemuIds, want: int, *, owner: tuple[int, int] | None = None,
               ) -> tuple[str, str, str] | None:
    """``(message, fix, culprit path)`` when ``ids`` could not reach ``path`` for ``want``: a
    directory on the way it cannot search (of the path as written and as resolved), or the
    file's own mode (judged with ``owner`` when DAC gives it that owner first). None when the
    mode bits allow it, the path is missing, or an ACL decides."""
    real = os.path.realpath(path)
    seen: set[str] = set()
    for d in [*_parents(path), *_parents(real)]:
        if d in seen:
            continue
        seen.add(d)
        try:
            st = os.stat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and not mode_allows(st, ids, X) and not has_acl(d):
            return (f"{ids.who()} cannot search directory {d} ({describe_mode(st)}) on the way "
                    f"to {path}", f"chmod o+x {d} (or chown {ids.hint()} {d})", d)
    try:
        st = os.stat(real)
    except OSError:
        return None
    if owner is not None:
        st = os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, owner[0], owner[1],
                             st.st_size, int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))
    if mode_allows(st, ids, want) or has_acl(real):
        return None
    what = "read and write" if want & W else "read"
    state = "once chowned, " if owner is not None else ""
    if owner is not None:
        fix = f"chmod u+{'rw' if want & W else 'r'} {real}"
    else:
        fix = f"chown {ids.hint()} {real}, or chmod it so that user can {what} it"
    return (f"{ids.who()} cannot {what} {real} ({state}{describe_mode(st)})", fix, real)


def xattr_support(path: str, name: str) -> bool | None:
    """Does the file system holding ``path`` store ``name`` xattrs? (a read-only probe; None
    when ``path`` is missing or the answer is unknown)."""
    target = path
    while not os.path.exists(target) and target not in ("/", ""):
        target = os.path.dirname(target)
    try:
        os.getxattr(target, name)
        return True
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return True
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        return None


# ------------------------------------------------------------------------------------------------
# host-validate
# ------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One line of ``host-validate``."""

    status: str  # PASS | WARN | FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self, width: int = 34) -> str:
        text = f"{self.status:<4}  {self.name:<{width}} {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def _ok(name: str, detail: str) -> Check:
    return Check("PASS", name, detail)


def _configured(conn: Connection, name: str) -> bool:
    return name in (conn.instance.config.security_driver or [])


def check_account(conn: Connection) -> list[Check]:
    inst = conn.instance
    cfg = inst.config
    if not inst.privileged:
        return [_ok("QEMU account", f"QEMU runs as you (uid {os.getuid()}), an unprivileged "
                    "instance")]
    out = []
    for key, db in (("user", "user"), ("group", "group")):
        spec = getattr(cfg, key)
        found = _account_id(spec, db)
        src = cfg.source(key)
        if found is None:
            out.append(Check("FAIL", f"QEMU {key} exists", f"{key} '{spec}' ({src}) does not "
                             "exist", f"create it (scripts/setup.sh creates vmconfine-qemu), or "
                             f"set {key} in {inst.config_path} to an existing one or +ID"))
        else:
            out.append(_ok(f"QEMU {key} exists", f"{spec} = {found}"))
    return out


def check_kvm(conn: Connection, ids: QemuIds | None) -> Check:
    name = "/dev/kvm usable by QEMU"
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return Check("WARN", name, "/dev/kvm does not exist: only <domain type='qemu'> (TCG) "
                     "guests can run", "load the kvm module (modprobe kvm_intel or kvm_amd)")
    if ids is None:
        return Check("WARN", name, "not checked: the QEMU account does not exist")
    if mode_allows(st, ids, R | W) or has_acl("/dev/kvm"):
        return _ok(name, f"{describe_mode(st)}, {ids.label} may open it read-write")
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return Check("FAIL", name, f"{ids.who()} cannot open /dev/kvm ({describe_mode(st)})",
                 f"add the QEMU user to group {group} (usermod -aG {group} "
                 f"{ids.hint().split(':')[0]})")


def check_emulators(conn: Connection) -> Check:

    search = list(conn.instance.config.emulator_search_path)
    found = find_emulators(search)
    if not found:
        return Check("FAIL", "QEMU emulators", f"no qemu-system-* in {':'.join(search)}",
                     "apt-get install qemu-system-x86, or set emulator_search_path")
    return _ok("QEMU emulators", ", ".join(p for p, _arch in found))


def _cgroup_mounts() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2 = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = right.split()
        if not fields:
            continue
        mp = left.split()[4]
        if fields[0] == "cgroup2" and v2 is None:
            v2 = mp
        elif fields[0] == "cgroup" and len(fields) > 2:
            for opt in fields[2].split(","):
                if opt in V1_CONTROLLERS or opt.startswith("name="):
                    v1.setdefault(opt, mp)
    return v1, v2


def check_cgroups(conn: Connection) -> list[Check]:
    v1, v2 = _cgroup_mounts()
    if not v1 and v2 is None:
        return [Check("WARN", "cgroup hierarchies", "no cgroup file system is mounted: domains "
                      "get no cgroup and no device filtering", "mount cgroup2 on /sys/fs/cgroup")]
    kinds = []
    if v1:
        kinds.append(f"v1 ({', '.join(sorted(v1))})")
    if v2:
        try:
            ctrls = Path(v2, "cgroup.controllers").read_text().split()
        except OSError:
            ctrls = []
        kinds.append(f"v2 at {v2} ({', '.join(ctrls) or 'no controllers'})")
    out = [_ok("cgroup hierarchies", "; ".join(kinds))]
    name = "cgroup device filtering"
    if not conn.instance.privileged:
        out.append(Check("WARN", name, "unprivileged instance: devices are not filtered "
                         "(needs root)"))
    elif v2 is not None:
        out.append(_ok(name, f"cgroup v2 BPF device programs on {v2}"
                       + (f" (v1 devices controller at {v1['devices']} also mounted)"
                          if "devices" in v1 else "")))
    elif "devices" in v1:
        out.append(_ok(name, f"cgroup v1 devices controller at {v1['devices']}"))
    else:
        out.append(Check("WARN", name, "no devices controller and no cgroup2 mount",
                         "mount cgroup2 or the v1 devices controller"))
    return out


def landlock_abi() -> tuple[int, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 0:
        return 0, os.strerror(ctypes.get_errno())
    return int(abi), ""


def check_landlock(conn: Connection) -> Check:
    abi, why = landlock_abi()
    if abi > 0:
        return _ok("Landlock", f"ABI {abi}")
    enforce = getattr(conn.instance.config, "landlock_mode", "best-effort") == "enforce"
    status = "FAIL" if _configured(conn, "landlock") and enforce else "WARN"
    return Check(status, "Landlock", f"not available ({why})",
                 "boot a kernel with Landlock in CONFIG_LSM (lsm=...,landlock)")


def check_selinux(conn: Connection) -> list[Check]:
    wanted = _configured(conn, "selinux")
    bad = "FAIL" if wanted else "WARN"
    enforce = SELINUX_FS / "enforce"
    if not enforce.exists():
        return [Check(bad, "SELinux", "not enabled in this kernel (the selinux driver is "
                      "unavailable)", "boot with security=selinux" if wanted else "")]
    try:
        mode = "enforcing" if enforce.read_text().strip() == "1" else "permissive"
    except OSError as exc:
        mode = f"unknown ({exc.strerror})"
    out = [_ok("SELinux", mode)]
    try:
        selinux = importlib.import_module("selinux")
        paths = [selinux.selinux_virtual_domain_context_path(),
                 selinux.selinux_virtual_image_context_path()]
    except (ImportError, AttributeError, OSError):
        return [*out, Check(bad, "SELinux policy contexts", "cannot read (no selinux binding)",
                            "apt-get install python3-selinux")]
    missing = [p for p in paths if not os.access(p, os.R_OK)]
    if missing:
        out.append(Check(bad, "SELinux policy contexts", f"missing: {', '.join(missing)}",
                         "install a policy with virtualization contexts (selinux-policy-default)"))
    else:
        first = Path(paths[0]).read_text().split()
        out.append(_ok("SELinux policy contexts", first[0] if first else paths[0]))
    return out


def check_apparmor(conn: Connection) -> Check:
    wanted = _configured(conn, "apparmor")
    try:
        on = APPARMOR_ENABLED.read_text().strip() == "Y"
    except OSError:
        on = False
    if not on:
        return Check("FAIL" if wanted else "WARN", "AppArmor", "not enabled in this kernel "
                     "(the apparmor driver is unavailable)",
                     "boot with apparmor=1 security=apparmor" if wanted else "")
    try:
        count = len(APPARMOR_PROFILES.read_text().splitlines())
    except OSError as exc:
        return Check("FAIL" if wanted else "WARN", "AppArmor", f"enabled, but {APPARMOR_PROFILES}"
                     f" is unreadable ({exc.strerror})",
                     "mount -t securityfs securityfs /sys/kernel/security")
    if not os.access("/sbin/apparmor_parser", os.X_OK):
        return Check("FAIL" if wanted else "WARN", "AppArmor", "apparmor_parser is missing",
                     "apt-get install apparmor")
    return _ok("AppArmor", f"enabled, {count} profiles loaded")


def check_bindings(conn: Connection) -> list[Check]:
    cfg = conn.instance.config
    need_capng = conn.instance.privileged and cfg.clear_emulator_capabilities
    out = []
    for module, package, needed in (
        ("selinux", "python3-selinux", _configured(conn, "selinux")),
        ("LibAppArmor", "python3-libapparmor", False),
        ("capng", "python3-cap-ng", need_capng),
    ):
        name = f"Python binding {module}"
        try:
            importlib.import_module(module)
        except ImportError as exc:
            out.append(Check("FAIL" if needed else "WARN", name, f"not importable ({exc})",
                             f"apt-get install {package} (the venv needs "
                             "--system-site-packages)"))
            continue
        out.append(_ok(name, "importable"))
    return out


def check_xattrs(conn: Connection, image_dirs: list[str]) -> list[Check]:
    inst = conn.instance
    cfg = inst.config
    dirs = [str(inst.run_dir), str(inst.lib_dir), *image_dirs]
    out = []
    for d in dirs:
        names = []
        if inst.privileged and cfg.remember_owner:
            names.append((f"{cfg.remember_owner_xattr_prefix}.dac", "WARN",
                          "owners are remembered in the journal only; set remember_owner = 0 "
                          "or use a local file system"))
        names.append(("security.selinux", "FAIL" if _configured(conn, "selinux") else "WARN",
                      "mount it with context=... for SELinux"))
        for xname, bad, fix in names:
            ns = xname.split(".", 1)[0] + ".*"
            ok = xattr_support(d, xname)
            label = f"xattrs {ns} in {d}"
            if ok is True:
                out.append(_ok(label, "supported"))
            elif ok is False:
                out.append(Check(bad, label, "not supported by its file system", fix))
            else:
                out.append(Check("WARN", label, "could not be probed"))
    return out


def check_directories(conn: Connection, ids: QemuIds | None) -> list[Check]:
    inst = conn.instance
    if ids is None:
        return [Check("WARN", "instance directories", "not checked: the QEMU account does not "
                      "exist")]
    out = []
    for d in (inst.run_dir, inst.lib_dir, inst.cache_dir):
        path = str(d)
        target = path
        while not os.path.exists(target):
            target = os.path.dirname(target)
        denial = dac_denial(os.path.join(target, "x"), ids, R)
        name = f"searchable by QEMU: {path}"
        if denial is not None:
            out.append(Check("FAIL", name, denial[0], denial[1]))
        elif target != path:
            out.append(_ok(name, f"created at first start (under {target})"))
        else:
            out.append(_ok(name, describe_mode(os.stat(path))))
    return out


def check_drivers(conn: Connection) -> list[Check]:

    out = []
    for info, ok, why in Stack.probe_installed(conn.host):
        name = f"driver {info.name}"
        if ok:
            out.append(_ok(name, f"available{f' ({why})' if why else ''}"))
        else:
            out.append(Check("FAIL" if _configured(conn, info.name) else "WARN", name,
                             f"unavailable: {why}"))

    try:
        names = conn.stack.names()
        out.append(_ok("security stack", " -> ".join(names)))
    except VmconfineError as exc:
        out.append(Check("FAIL", "security stack", exc.message,
                         f"fix security_driver in {conn.instance.config_path}"))
    return out


def host_validate(conn: Connection, image_dirs: list[str] | None = None) -> list[Check]:
    """Every check, in display order."""
    ids = ids_from_config(conn.instance)
    checks = [*check_account(conn), check_kvm(conn, ids), check_emulators(conn)]
    checks += check_cgroups(conn)
    checks.append(check_landlock(conn))
    checks += check_selinux(conn)
    checks.append(check_apparmor(conn))
    checks += check_bindings(conn)
    checks += check_xattrs(conn, list(image_dirs or []))
    checks += check_directories(conn, ids)
    checks += check_drivers(conn)
    return checks


def render_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=20)
    return "\n".join(c.line(width) for c in checks) + "\n"
