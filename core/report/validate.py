"""``vmconfine host-validate``: can this host run confined QEMU the way qemu.conf asks?

Like libvirt's virt-host-validate, for what vmconfine needs. The core checks what every
instance needs whatever its drivers: ``/dev/kvm`` for QEMU's user, the emulators, the
permissions of the instance directories, the installed drivers and the stack. Every installed
driver adds its own lines through its ``host_checks`` hook (its kernel feature, bindings,
accounts, xattr support in the instance directories). One :class:`Check` per line, PASS /
WARN / FAIL with the fix; nothing on the host is changed.

Also here, shared with the confinement report: who QEMU runs as (:func:`qemu_ids`, asked of
the stack's ``qemu_identity`` hook).
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmconfine.errors import VmconfineError
from vmconfine.launch import netdev, swtpm
from vmconfine.perms import QemuIds, R, W, denial, describe_mode, has_acl
from vmconfine.plugin.stack import Driver, Stack, load_driver
from vmconfine.qemu.capabilities import find_emulators
from vmconfine.qemu.netdev import TUN_PATH, VHOST_PATH

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection
    from vmconfine.plugin.context import DomainContext

#: the layer name of the kernel's permission checks when no driver decides QEMU's ids
PERMISSIONS = "permissions"


# ------------------------------------------------------------------------------------------------
# who QEMU runs as
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """QEMU's ids, the driver that decides them (None: the caller's), and the capability
    policy (``"cleared"`` | ``"kept"``; None: the caller's)."""

    ids: QemuIds | None
    driver: str | None = None
    capabilities: str | None = None
    error: str = ""
    display: str = ""

    @property
    def layer(self) -> str:
        """The name problems of the kernel's permission checks are filed under."""
        return self.driver or PERMISSIONS

    @property
    def layer_text(self) -> str:
        """How a one-line diagnosis names the kernel's permission checks."""
        return self.display or self.driver or "file permissions"


def qemu_ids(stack: Stack, ctx: DomainContext | None) -> Identity:
    """Who QEMU runs as: the first driver of ``stack`` whose ``qemu_identity`` answers, else
    the caller. ``ids`` is None when that driver cannot resolve the account."""
    for d in stack.drivers:
        if not d.implements("qemu_identity"):
            continue
        try:
            got: dict[str, Any] | None = d.call("qemu_identity", host=stack.host, ctx=ctx)
        except VmconfineError as exc:
            return Identity(None, d.name, error=exc.message)
        if got is None:
            continue
        uid, gid = int(got["uid"]), int(got["gid"])
        caps = str(got.get("capabilities") or "cleared")
        groups = tuple(sorted({int(g) for g in got.get("groups") or []} | {gid}))
        return Identity(QemuIds(uid, gid, groups, uid == 0 and caps == "kept"), d.name, caps,
                        display=str(got.get("layer") or ""))
    return Identity(QemuIds.caller())


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


def _wanted(conn: Connection, name: str) -> bool:
    return name in (conn.instance.config.security_driver or [])


def check_kvm(ids: QemuIds | None) -> Check:
    name = "/dev/kvm usable by QEMU"
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return Check("WARN", name, "/dev/kvm does not exist: only <domain type='qemu'> (TCG) "
                     "guests can run", "load the kvm module (modprobe kvm_intel or kvm_amd)")
    if ids is None:
        return Check("WARN", name, "not checked: the QEMU account does not exist")
    found = denial("/dev/kvm", ids, R | W)
    if found is None or has_acl("/dev/kvm"):
        return _ok(name, f"{describe_mode(st)}, {ids.label} may open it read-write")
    return Check("FAIL", name, f"{ids.who()} cannot open /dev/kvm ({describe_mode(st)})",
                 found.fix)


def check_network(privileged: bool, *, tun: str = TUN_PATH, vhost: str = VHOST_PATH,
                  netlink: bool = True) -> list[Check]:
    """Tap-backed interfaces (bridge, network, ethernet, direct: vmconfine makes the device
    and opens it, docs/networking.md) and vhost-net."""
    name = "tap interfaces"
    if not netlink:
        taps = Check("FAIL", name, "the pyroute2 library is not installed",
                     "apt-get install python3-pyroute2 (or bash scripts/setup.sh)")
    elif not privileged:
        taps = Check("WARN", name, "this instance is not privileged: only <interface "
                     "type='user'> can be used", "use qemu:///system for bridged guests")
    elif not os.path.exists(tun):
        taps = Check("WARN", name, f"{tun} does not exist: only <interface type='user'> can "
                     "be used", "load the tun module (modprobe tun)")
    else:
        taps = _ok(name, f"{tun} present; QEMU gets the tap descriptors")
    if os.path.exists(vhost):
        accel = _ok("vhost-net", f"{vhost} present (virtio NICs of kvm guests)")
    else:
        accel = Check("WARN", "vhost-net", f"{vhost} does not exist: virtio NICs use QEMU's "
                      "own back end (slower)", "load the vhost_net module (modprobe vhost_net)")
    return [taps, accel]


def check_emulators(conn: Connection) -> Check:
    search = list(conn.instance.config.emulator_search_path)
    found = find_emulators(search)
    if not found:
        return Check("FAIL", "QEMU emulators", f"no qemu-system-* in {':'.join(search)}",
                     "apt-get install qemu-system-x86, or set emulator_search_path")
    return _ok("QEMU emulators", ", ".join(p for p, _arch in found))


def check_swtpm(conn: Connection) -> Check:
    """The TPM emulator's programs (only ``<tpm><backend type='emulator'>`` needs them) and,
    in a privileged instance, the account they run as (qemu.conf ``swtpm_user``)."""
    name = "TPM emulator (swtpm)"
    missing = [p for p in swtpm.PROGRAMS if shutil.which(p) is None]
    if missing:
        return Check("WARN", name, f"{', '.join(missing)} not found in PATH: domains with "
                     "<tpm><backend type='emulator'> cannot start",
                     "apt-get install swtpm swtpm-tools")
    user = conn.instance.config.swtpm_user
    if conn.instance.privileged and not user.startswith("+"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return Check("WARN", name, f"qemu.conf swtpm_user '{user}' does not exist",
                         "apt-get install swtpm-tools (creates tss), or set swtpm_user")
    return _ok(name, ", ".join(shutil.which(p) or p for p in swtpm.PROGRAMS))


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
        found = denial(os.path.join(target, "x"), ids, R)
        name = f"searchable by QEMU: {path}"
        if found is not None:
            out.append(Check("FAIL", name, found.message, found.fix))
        elif target != path:
            out.append(_ok(name, f"created at first start (under {target})"))
        else:
            out.append(_ok(name, describe_mode(os.stat(path))))
    return out


def check_driver_hosts(conn: Connection, drivers: list[Driver], dirs: list[str]) -> list[Check]:
    """Every installed driver's own ``host_checks`` lines."""
    out = []
    for d in drivers:
        try:
            lines = d.call("host_checks", host=conn.host, wanted=_wanted(conn, d.name),
                           dirs=dirs) or []
        except VmconfineError as exc:
            out.append(Check("FAIL", f"driver {d.name} checks", exc.message))
            continue
        out += [Check(str(c["status"]), str(c["name"]), str(c.get("detail", "")),
                      str(c.get("fix", ""))) for c in lines]
    return out


def check_drivers(conn: Connection) -> list[Check]:
    out = []
    for info, ok, why in Stack.probe_installed(conn.host):
        name = f"driver {info.name}"
        if ok:
            out.append(_ok(name, f"available{f' ({why})' if why else ''}"))
        else:
            out.append(Check("FAIL" if _wanted(conn, info.name) else "WARN", name,
                             f"unavailable: {why}"))
    try:
        names = conn.stack.names()
        out.append(_ok("security stack", " -> ".join(names)))
    except VmconfineError as exc:
        out.append(Check("FAIL", "security stack", exc.message,
                         f"fix security_driver in {conn.instance.config_path}"))
    return out


def _stack(conn: Connection) -> Stack:
    try:
        return conn.stack
    except VmconfineError:
        return Stack.fallback(conn.host)


def host_validate(conn: Connection, image_dirs: list[str] | None = None) -> list[Check]:
    """Every check, in display order: the core's generic ones, then each installed driver's
    (registry order), then the instance directories and the stack."""
    ids = qemu_ids(_stack(conn), None).ids
    inst = conn.instance
    dirs = [str(inst.run_dir), str(inst.lib_dir), *(image_dirs or [])]
    drivers = [load_driver(conn.host, info) for info in conn.host.registry.infos()]
    checks = [check_kvm(ids), check_emulators(conn), check_swtpm(conn)]
    checks += check_network(inst.privileged, netlink=netdev.pyroute2 is not None)
    checks += check_driver_hosts(conn, drivers, dirs)
    checks += check_directories(conn, ids)
    checks += check_drivers(conn)
    return checks


def render_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=20)
    return "\n".join(c.line(width) for c in checks) + "\n"
