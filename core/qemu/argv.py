"""The QEMU command line of a domain: what ``vmconfine run`` executes and what
``vmconfine domxml-to-native qemu-argv`` prints, built by ONE code path.

The layout follows libvirt 9's ``qemu_command.c`` for QEMU 7.x: the guest starts paused
(``-S``), with ``-no-user-config -nodefaults`` so QEMU adds nothing the XML does not describe,
disks as explicit ``-blockdev`` graphs (see :mod:`vmconfine.qemu.argv_devices`), the QMP monitor on
a unix socket, and libvirt's seccomp sandbox unless ``seccomp_sandbox = 0``. Boot order is
given per device (``bootindex``) whether the XML uses ``<boot dev=...>`` or per-device
``<boot order=...>``, with ``-boot strict=on``, as libvirt does.

The environment is cleared to ``LC_ALL=C PATH HOME USER LOGNAME`` plus ``<qemu:env>``;
``<qemu:arg>`` values are appended verbatim and taint the domain (``custom-argv``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmconfine.errors import LaunchError
from vmconfine.qemu import pci
from vmconfine.qemu.argv_devices import (
    Builder,
    UnsupportedConfigError,
    add_chardevs,
    add_controllers,
    add_disks,
    add_hostdevs,
    add_inputs,
    add_interfaces,
    add_memballoon,
    add_rngs,
    add_tpms,
    element_boot_order,
    to_json,
)
from vmconfine.qemu.argv_display import add_graphics
from vmconfine.qemu.argv_platform import (
    add_cpu,
    add_pm,
    add_rtc,
    add_watchdogs,
    memory_backend,
    smp,
)
from vmconfine.qemu.fdpass import (
    FDSET,
    LISTEN,
    Part,
    PassedFd,
    add_fd_args,
    escape_opt,
    render,
)

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.qemu.netdev import NetPlan

__all__ = [
    "CommandPaths",
    "EmulatorNotFoundError",
    "PassedFd",
    "QemuCommand",
    "UnsupportedConfigError",
    "build_command",
    "domain_taints",
    "find_emulator",
]

#: libvirt's ``-sandbox`` value for seccomp_sandbox = 1 (and QEMU's default, -1)
SANDBOX_ON = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

DEFAULT_SEARCH_PATH = ["/usr/bin", "/usr/local/bin"]

#: emulator binaries tried for a guest architecture, in order
_EMULATORS = {
    "i686": ["qemu-system-i386", "qemu-system-x86_64"],
    "i386": ["qemu-system-i386", "qemu-system-x86_64"],
    "armv7l": ["qemu-system-arm", "qemu-system-aarch64"],
    "armv6l": ["qemu-system-arm"],
}

_DEFAULT_MACHINES = {
    "x86_64": "pc", "i686": "pc", "aarch64": "virt", "armv7l": "virt", "riscv64": "virt",
    "ppc64": "pseries", "ppc64le": "pseries", "s390x": "s390-ccw-virtio",
}


class EmulatorNotFoundError(LaunchError):
    """No QEMU binary for the guest architecture."""


@dataclass(frozen=True)
class CommandPaths:
    """Per-instance values the command line needs (from
    :class:`vmconfine.config.instance.Instance`).

    ``user_monitor_socket``: a second QMP monitor (``qemu-monitor-command`` and other clients),
    so vmconfine's own monitor connection is never shared.
    """

    monitor_socket: str
    home_dir: str
    runtime_dir: str
    user: str
    path_env: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    user_monitor_socket: str | None = None
    #: the per-domain hugetlbfs directory of ``<hugepages/>`` guests
    #: (:func:`vmconfine.config.hugepages.hugepage_dir`)
    hugepage_dir: str | None = None


@dataclass
class QemuCommand:
    """A QEMU command line: environment, binary and arguments.

    ``args`` are the symbolic form: every resource vmconfine opens itself shows as the path
    QEMU would open (what ``domxml-to-native`` prints and what runs when the line is used by
    hand). ``passed`` lists those resources (:class:`vmconfine.qemu.fdpass.PassedFd`: the QMP
    monitors, chardev sockets in ``mode='bind'``, chardev files and logs, the VNC socket) in
    command-line order; ``slots`` maps an ``args`` index to its value's parts. ``vmconfine
    run`` opens them (:mod:`vmconfine.launch.preopen`) and calls :meth:`argv` with their
    descriptors by name, which gives ``fd=N``, ``-add-fd`` + ``/dev/fdset/S`` and ``-vnc none``
    (the per-start values).
    """

    env: dict[str, str]
    emulator: str
    args: list[str]
    taints: list[str] = field(default_factory=list)
    slots: dict[int, tuple[Part, ...]] = field(default_factory=dict)
    passed: list[PassedFd] = field(default_factory=list)
    symbolic: bool = False
    #: character devices by QEMU chardev label (``charserial0``...), to match QMP answers
    chardevs: dict[str, Any] = field(default_factory=dict)
    #: how each ``<interface>`` is connected (:class:`vmconfine.qemu.netdev.NetPlan`)
    networks: list[NetPlan] = field(default_factory=list)

    @property
    def tainted(self) -> bool:
        """True when the domain uses unsupported pass-through (see :func:`domain_taints`)."""
        return bool(self.taints)

    @property
    def inherited(self) -> list[PassedFd]:
        """The passed resources QEMU inherits at exec (all but the VNC socket)."""
        return [p for p in self.passed if p.inherited]

    def _args(self, fds: Mapping[str, int] | None) -> list[str]:
        if fds is None:
            return list(self.args)
        missing = [p.name for p in self.inherited if p.name not in fds]
        if missing:
            raise ValueError(f"no descriptor for {', '.join(missing)}")
        fdsets = {p.name: n for n, p in enumerate(x for x in self.passed if x.kind == FDSET)}
        out: list[str] = []
        for i, arg in enumerate(self.args):
            parts = self.slots.get(i + 1)
            if parts is not None:
                out += add_fd_args(parts, fds, fdsets)
            parts = self.slots.get(i)
            out.append(arg if parts is None else render(parts, fds, fdsets))
        return out

    def argv(self, fds: Mapping[str, int] | None = None) -> list[str]:
        """``[emulator, *args]`` for ``os.execve`` (with :attr:`env` as the environment);
        ``fds``: the descriptor of every :attr:`inherited` resource, by name."""
        return [self.emulator, *self._args(fds)]

    def format_native(self, fds: Mapping[str, int] | None = None) -> str:
        """One shell line: ``LC_ALL=C PATH=... HOME=... USER=... LOGNAME=... EMULATOR ARGS``."""
        words = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        words += [shlex.quote(a) for a in self.argv(fds)]
        return " ".join(words)


def domain_taints(domain: Domain) -> list[str]:
    """libvirt's taint flags the domain definition itself causes."""
    taints = []
    if domain.qemu_args or domain.qemu_env:
        taints.append("custom-argv")
    if domain.os.dtb:
        taints.append("custom-dtb")
    return taints


def guest_arch(domain: Domain) -> str:
    """The guest architecture (the host's when the XML gives none)."""
    arch = domain.os.arch or platform.machine()
    return {"amd64": "x86_64", "i386": "i686"}.get(arch, arch)


def default_machine(domain: Domain) -> str | None:
    """The machine type a domain without ``<type machine>`` gets (its alias, e.g. ``pc``)."""
    return _DEFAULT_MACHINES.get(guest_arch(domain))


def find_emulator(domain: Domain, config: Any) -> str:
    """The QEMU binary: ``<emulator>`` if given, else ``qemu-system-<arch>`` searched in
    ``emulator_search_path`` (i686 tries qemu-system-i386, then qemu-system-x86_64)."""
    if domain.emulator:
        if not os.path.isabs(domain.emulator):
            raise EmulatorNotFoundError(
                f"<emulator>{domain.emulator}</emulator> is not an absolute path; give the "
                f"full path of the QEMU binary"
            )
        return domain.emulator
    arch = guest_arch(domain)
    names = _EMULATORS.get(arch, [f"qemu-system-{arch}"])
    search = list(getattr(config, "emulator_search_path", None) or DEFAULT_SEARCH_PATH)
    for name in names:
        for directory in search:
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    raise EmulatorNotFoundError(
        f"no QEMU binary for arch '{arch}': looked for {' or '.join(names)} in "
        f"{':'.join(search)}; install qemu-system (apt-get install qemu-system-x86), set "
        f"emulator_search_path in qemu.conf, or give <emulator> in the domain XML"
    )


def _environment(domain: Domain, paths: CommandPaths) -> dict[str, str]:
    env = {
        "LC_ALL": "C",
        "PATH": paths.path_env,
        "HOME": paths.home_dir,
        "USER": paths.user,
        "LOGNAME": paths.user,
    }
    for name, value in domain.qemu_env:
        env[name] = value if value is not None else ""
    return env


def _boot_indexes(domain: Domain) -> dict[int, int]:
    """Device → bootindex, from per-device ``<boot order>`` or else from ``<os><boot dev>``."""
    per_device: dict[int, int] = {}
    for disk in domain.disks:
        if disk.boot_order:
            per_device[id(disk)] = disk.boot_order
    for dev in [*domain.interfaces, *domain.hostdevs]:
        order = element_boot_order(dev)
        if order:
            per_device[id(dev)] = order
    if per_device:
        return per_device
    out: dict[int, int] = {}
    first: dict[str, object | None] = {
        "hd": next((d for d in domain.disks if d.device == "disk"), None),
        "cdrom": next((d for d in domain.disks if d.device == "cdrom"), None),
        "fd": next((d for d in domain.disks if d.device == "floppy"), None),
        "network": domain.interfaces[0] if domain.interfaces else None,
    }
    for n, dev_name in enumerate(domain.os.boot_devs, start=1):
        dev = first.get(dev_name)
        if dev is not None and id(dev) not in out:
            out[id(dev)] = n
    return out


def _firmware(b: Builder, machine_opts: list[str]) -> None:
    os_ = b.domain.os
    loader = os_.loader
    if loader is None or not loader.path:
        if os_.nvram:
            raise UnsupportedConfigError(
                "<nvram> needs a <loader type='pflash'>; add the firmware loader"
            )
        return
    if loader.type == "pflash":
        images = [("pflash0", loader.path, bool(loader.readonly))]
        if os_.nvram:
            images.append(("pflash1", os_.nvram, False))
        for unit, path, readonly in images:
            node = f"vmc-{unit}"
            b.add("-blockdev", to_json({"driver": "file", "filename": path,
                                        "node-name": f"{node}-storage", "auto-read-only": True,
                                        "discard": "unmap"}))
            b.add("-blockdev", to_json({"node-name": f"{node}-format", "read-only": readonly,
                                        "driver": "raw", "file": f"{node}-storage"}))
            machine_opts.append(f"{unit}={node}-format")
    elif loader.type in (None, "rom"):
        if os_.nvram:
            raise UnsupportedConfigError(
                "<nvram> needs a <loader type='pflash'>, not a ROM loader"
            )
        b.bios = loader.path
    else:
        raise UnsupportedConfigError(
            f"loader type '{loader.type}' is not supported; use type='pflash' or type='rom'"
        )


def _machine(b: Builder, config: Any, ram: dict[str, Any] | None) -> None:
    domain = b.domain
    if domain.virt_type not in ("qemu", "kvm"):
        raise UnsupportedConfigError(
            f"domain type '{domain.virt_type}' is not supported; use type='kvm' or type='qemu'"
        )
    opts = [escape_opt(b.machine)]
    if b.arch in ("x86_64", "i686"):
        opts.append("usb=off")
    if domain.vmport is not None:
        opts.append(f"vmport={domain.vmport}")
    if domain.smm is not None:
        opts.append(f"smm={domain.smm}")
    opts.append("dump-guest-core=" + ("on" if getattr(config, "dump_guest_core", False)
                                      else "off"))
    _firmware(b, opts)
    if b.arch in ("x86_64", "i686") and "acpi" not in domain.features:
        opts.append("acpi=off")
    if ram is not None:
        opts.append(f"memory-backend={ram['id']}")
    b.add("-machine", ",".join(opts))
    b.add("-accel", "kvm" if domain.virt_type == "kvm" else "tcg")
    add_cpu(b)
    loader = domain.os.loader
    if loader is not None and loader.secure:
        if not loader.path or loader.type != "pflash":
            raise UnsupportedConfigError(
                "<loader secure='yes'> needs a pflash firmware: give <os firmware='efi'> or "
                "<loader type='pflash' readonly='yes'>PATH</loader>"
            )
        if not b.q35:
            raise UnsupportedConfigError(
                f"Secure boot is supported with q35 machine types only (machine '{b.machine}')"
                "; use <type machine='q35'>"
            )
        b.add("-global", "driver=cfi.pflash01,property=secure,value=on")
    if b.bios:
        b.add("-bios", b.bios)


def _monitors(b: Builder, paths: CommandPaths) -> None:
    """QMP monitors (vmconfine's own, then the user monitor), passed as listening fds."""
    monitors = [("charmonitor", "monitor", paths.monitor_socket)]
    if paths.user_monitor_socket:
        monitors.append(("charusermonitor", "usermonitor", paths.user_monitor_socket))
    for chardev_id, mon_id, path in monitors:
        b.add_passed("-chardev", (f"socket,id={chardev_id},", PassedFd(LISTEN, path, chardev_id),
                                  ",server=on,wait=off"))
        b.add("-mon", f"chardev={chardev_id},id={mon_id},mode=control")


def _check_unsupported(domain: Domain) -> None:
    """Refuse devices vmconfine cannot start (better than silently leaving them out)."""
    if any(t.backend != "emulator" for t in domain.tpms):
        raise UnsupportedConfigError(
            "<tpm> with a passthrough backend is not supported; use <backend type='emulator'>"
        )
    if domain.filesystems:
        raise UnsupportedConfigError(
            "<filesystem> shares are not supported; remove the <filesystem> or use a disk"
        )
    if domain.os.firmware:
        raise UnsupportedConfigError(
            f"<os firmware='{domain.os.firmware}'> has not been resolved: firmware "
            f"auto-selection runs in `vmconfine run` and `domxml-to-native` (or give "
            f"<loader type='pflash'>PATH</loader> and <nvram>)"
        )


def _place_pci(b: Builder, at: int) -> None:
    """libvirt's Q35 topology (:mod:`vmconfine.qemu.pci`): every PCI device gets its
    ``bus``/``addr``, the PCI controllers go before the first device, and the XML tree gets
    the addresses and controllers (the live XML shows them)."""
    devices = [i + 1 for i, arg in enumerate(b.args[:-1])
               if arg == "-device" and b.args[i + 1].startswith("{")]
    props = [json.loads(b.args[i]) for i in devices]
    plan = pci.assign(b.domain, pci.inventory(b.domain, props, b.elements))
    for i, p in zip(devices, props, strict=True):
        b.args[i] = to_json(plan.place(p))
    b.insert(at, *[x for c in plan.controller_devices() for x in ("-device", to_json(c))])


def build_command(domain: Domain, config: Any, paths: CommandPaths, *,
                  symbolic: bool = False) -> QemuCommand:
    """The full QEMU command for ``domain``.

    ``config`` is the instance's :class:`vmconfine.config.settings.QemuConfig`. Disk backing chains
    are resolved (and filled into the model) with :func:`vmconfine.domain.chain.resolve_chain`.
    ``symbolic=True`` is for ``domxml-to-native``: nothing that only exists at start is
    filled in, and an image that does not exist shows as its top node (as libvirt's
    domxml-to-native: the chain is resolved at start). The other per-start values are the
    inherited monitor fds, which appear only when passed to :meth:`QemuCommand.argv`
    (``run``); without them each monitor shows as the unix socket path QEMU would create,
    so the printed line also runs by hand.
    """
    if domain.os.type not in (None, "hvm"):
        raise UnsupportedConfigError(
            f"<os><type>{domain.os.type}</type> is not supported; use hvm"
        )
    _check_unsupported(domain)
    arch = guest_arch(domain)
    machine = domain.os.machine or default_machine(domain)
    if not machine:
        raise UnsupportedConfigError(
            f"no default machine type for arch '{arch}'; give <type machine=...>"
        )
    emulator = find_emulator(domain, config)
    b = Builder(domain=domain, config=config, machine=machine, arch=arch, symbolic=symbolic)
    b.boot_index = _boot_indexes(domain)

    name = f"guest={escape_opt(domain.name)},debug-threads=on"
    if getattr(config, "set_process_name", False):
        name += f",process=qemu:{escape_opt(domain.name)}"
    b.add("-name", name, "-S")
    ram = memory_backend(b, paths.hugepage_dir)
    _machine(b, config, ram)
    b.add("-m", f"size={math.ceil(domain.memory_kib / 1024) * 1024}k")
    if ram is not None:
        b.add("-object", to_json(ram))
    b.add("-smp", smp(b))
    b.add("-uuid", domain.uuid)
    if not domain.graphics:
        b.add("-display", "none")
    b.add("-no-user-config", "-nodefaults")
    _monitors(b, paths)
    add_rtc(b)
    if domain.on_reboot == "destroy":
        b.add("-no-reboot")
    add_pm(b)
    b.add("-boot", "strict=on")
    if domain.os.kernel:
        b.add("-kernel", domain.os.kernel)
    if domain.os.initrd:
        b.add("-initrd", domain.os.initrd)
    if domain.os.cmdline:
        b.add("-append", domain.os.cmdline)
    if domain.os.dtb:
        b.add("-dtb", domain.os.dtb)

    first_device = len(b.args)
    add_controllers(b)
    add_disks(b)
    add_interfaces(b)
    add_chardevs(b)
    add_inputs(b)
    add_graphics(b, paths.runtime_dir)
    add_hostdevs(b)
    add_rngs(b)
    add_tpms(b, paths.runtime_dir)
    add_watchdogs(b)
    add_memballoon(b)
    if b.q35:
        _place_pci(b, first_device)

    seccomp = int(getattr(config, "seccomp_sandbox", -1))
    b.add("-sandbox", SANDBOX_ON if seccomp != 0 else "off")
    b.add("-msg", "timestamp=on")
    b.add(*domain.qemu_args)
    return QemuCommand(env=_environment(domain, paths), emulator=emulator, args=b.args,
                       taints=domain_taints(domain), slots=b.slots, passed=b.passed,
                       symbolic=symbolic, chardevs=b.chardevs, networks=b.networks)
