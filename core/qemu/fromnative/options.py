"""Machine-level options of ``domxml-from-native`` (see :mod:`vmconfine.qemu.fromnative.convert`).

:func:`scan` groups the arguments into options (a table of QEMU's value-taking options and
flags tells them apart; an unknown option takes the next word unless it starts with ``-``).
:class:`Converter` then interprets them in three passes: the definitions devices refer to
(``-blockdev``, ``-drive if=none``, ``-chardev``, ``-netdev``, ``-object``), the controllers,
then every option in command-line order. Each option ends *used* (converted), *drop* (vmconfine
adds its own), *rest* (some sub-options kept as ``<qemu:arg>``) or *pass* (kept verbatim).
"""

from __future__ import annotations

import math
import platform
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from vmconfine.domain.devices import one_line
from vmconfine.qemu.fromnative.devices import (
    NIC_MODELS,
    chardev_source,
    convert_device,
    legacy_char,
    legacy_drive,
    monitor_from,
    netdev_nic,
    resolve_layer,
)
from vmconfine.qemu.fromnative.model import (
    CharSrc,
    Guest,
    Monitor,
    NativeArgsError,
    NChar,
    NHostdev,
    Opt,
    Unconvertible,
    as_bool,
    as_int,
    join_opts,
    parse_opts,
    parse_props,
)

_EMULATOR = re.compile(r"qemu-system-([A-Za-z0-9_]+)|qemu|qemu-kvm|kvm")
DEFAULT_MEMORY_KIB = 128 * 1024  # QEMU's default RAM size

#: options without a value (QEMU 7.2, plus a few removed ones old command lines use)
FLAGS = frozenset("""-S -snapshot -nographic -no-acpi -no-hpet -no-reboot -no-shutdown
-enable-kvm -no-kvm -no-user-config -nodefaults -nodefconfig -daemonize -usb -full-screen
-alt-grab -ctrl-grab -no-quit -no-fd-bootchk -win2k-hack -no-frame -localtime -s -singlestep
-preconfig -version -help -h -sdl -curses -portrait -std-vga -vmwarevga -enable-fips
-semihosting -only-migratable -xen-attach -mem-prealloc -old-param -show-cursor
-enable-sync-profile -no-kvm-irqchip -no-kvm-pit -tdf -audio-help""".split())
#: options with a value that the conversion handles or knows
VALUE_OPTS = frozenset("""-machine -M -cpu -accel -smp -m -name -uuid -boot -kernel -initrd
-append -dtb -bios -hda -hdb -hdc -hdd -cdrom -fda -fdb -drive -blockdev -pflash -device
-netdev -net -nic -chardev -serial -parallel -monitor -qmp -qmp-pretty -mon -vga -vnc
-display -usbdevice -object -msg -sandbox -pidfile -runas -chroot -rtc -overcommit -realtime
-global -numa -k -spice -incoming -loadvm -D -d -L -trace -fw_cfg -smbios -acpitable
-watchdog -watchdog-action -action -icount -option-rom -mem-path -add-fd -set -audiodev
-soundhw -tpmdev -fsdev -virtfs -iscsi -sd -mtdblock -debugcon -gdb -prom-env
-semihosting-config -readconfig -plugin -qtest -qtest-log -dump-vmstate -compat -echr
-balloon -pcidevice -g -rotate -tb-size -xen-domid -device-help""".split())
#: the definitions devices refer to by id
_DEFS = {"-blockdev": ("node", "driver", "node-name"), "-chardev": ("chardev", "backend", "id"),
         "-netdev": ("netdev", "type", "id"), "-object": ("object", "qom-type", "id")}
_CONTROLLERS = frozenset({"piix3-usb-uhci", "piix4-usb-uhci", "usb-ehci", "ich9-usb-ehci1",
                          "ich9-usb-uhci1", "ich9-usb-uhci2", "ich9-usb-uhci3", "pci-ohci",
                          "nec-usb-xhci", "qemu-xhci", "virtio-scsi-pci", "lsi53c895a", "ahci",
                          "virtio-serial-pci", "virtio-serial", "isa-fdc"})
_LEGACY_DISKS = {"-hda": ("ide", 0), "-hdb": ("ide", 1), "-hdc": ("ide", 2), "-hdd": ("ide", 3),
                 "": ("ide", 0), "-fda": ("floppy", 0), "-fdb": ("floppy", 1)}
_VGA = {"std": "vga", "cirrus": "cirrus", "vmware": "vmvga", "qxl": "qxl", "virtio": "virtio",
        "bochs": "bochs"}
_BOOT_LETTERS = {"a": "fd", "b": "fd", "c": "hd", "d": "cdrom", "n": "network"}
_SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "p": 1 << 50, "e": 1 << 60}



# --------------------------------------------------------------------------- scanning


def emulator_arch(path: str, source: str) -> tuple[str, bool]:
    """(guest arch, kvm by name) for a QEMU binary path; refuses anything else."""
    base = path.rsplit("/", 1)[-1]
    m = _EMULATOR.fullmatch(base)
    if not m:
        raise NativeArgsError(f"{source}: '{one_line(path, 80)}' is not a QEMU "
                              "binary (expected qemu-system-ARCH, qemu-kvm, kvm or qemu); give "
                              "the QEMU command line")
    if m.group(1):
        arch = m.group(1)
        return {"i386": "i686", "arm": "armv7l"}.get(arch, arch), False
    if base == "qemu":
        return "i686", False  # libvirt's rule for the old single binary
    host = platform.machine()
    return {"amd64": "x86_64", "i386": "i686"}.get(host, host), True


def scan(argv: list[str], source: str) -> list[Opt]:
    """Group the arguments into options; positional words are disk images (``-hda``)."""
    opts: list[Opt] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word == "-":
            if word == "":
                raise NativeArgsError(f"{source}: empty argument at position {i + 1}; remove "
                                      "it or quote the value it belongs to")
            opts.append(Opt(word, "", None, i))
            i += 1
            continue
        name = word[1:] if word.startswith("--") else word
        if name in FLAGS:
            opts.append(Opt(word, name, None, i))
            i += 1
        elif name in VALUE_OPTS:
            if i + 1 >= len(argv):
                raise NativeArgsError(f"{source}: QEMU option {word} needs a value but the "
                                      "command line ends there; add its value")
            opts.append(Opt(word, name, argv[i + 1], i))
            i += 2
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            opts.append(Opt(word, name, argv[i + 1], i))
            i += 2
        else:
            opts.append(Opt(word, name, None, i))
            i += 1
    return opts


def parse_size_kib(text: str) -> int:
    """QEMU's ``-m`` size (MiB unless suffixed) in KiB, rounded up."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([bkmgtpe]?)(?:i?b)?\s*", text, re.I)
    if not m:
        raise NativeArgsError(f"-m '{one_line(text)}' is not a memory size; use e.g. -m 512 "
                              "or -m 2G")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise NativeArgsError(f"-m '{one_line(text)}' is not a memory size") from None
    kib = math.ceil(number * _SIZE_UNITS[m.group(2).lower()] / 1024)
    if kib >= 1 << 53:
        raise NativeArgsError(f"-m '{one_line(text)}' is too large")
    if kib <= 0:
        raise NativeArgsError(f"-m '{one_line(text)}': the memory size must be above zero")
    return kib


# --------------------------------------------------------------------------- conversion


@dataclass
class State:
    """The machine-level settings (devices live in :class:`Guest`)."""

    name: str
    uuid: str
    virt_type: str
    memory_kib: int = DEFAULT_MEMORY_KIB
    vcpus: int = 1
    acpi: bool = True
    on_reboot: str = "restart"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    dtb: str | None = None
    boot_devs: list[str] = field(default_factory=list)
    graphics: dict[str, str] | None = None
    nodefaults: bool = False
    nics: list[tuple[Opt, dict[str, str]]] = field(default_factory=list)
    backends: list[tuple[Opt, dict[str, str]]] = field(default_factory=list)


class Converter:
    """One conversion: ``g`` holds the devices, ``s`` the machine settings."""

    def __init__(self, argv: list[str], source: str, name: str, uuid: str) -> None:
        self.source = source
        self.emulator = argv[0]
        arch, kvm = emulator_arch(argv[0], source)
        self.g = Guest(arch=arch)
        self.s = State(name=name, uuid=uuid, virt_type="kvm" if kvm else "qemu")
        self.opts = scan(argv[1:], source)

    # ---- the passes ------------------------------------------------------------------------
    def run(self) -> None:
        for opt in self.opts:
            if opt.name in ("-machine", "-M"):
                self.g.machine = parse_opts(opt.value or "", "type").get("type") or None
            elif opt.name == "-nodefaults":
                self.s.nodefaults = True
        self._definitions()
        for opt in self.opts:
            if opt.name == "-device" and self._props(opt).get("driver") in _CONTROLLERS:
                self._try(opt, lambda o=opt: self._opt_device(o))
        for opt in self.opts:
            if opt.status == "pass" and not opt.why:
                handler = getattr(self, "_opt" + opt.name.replace("-", "_"), None)
                if opt.name == "":
                    handler = self._legacy_disk
                if handler is not None:
                    self._try(opt, lambda o=opt, h=handler: h(o))
        self._legacy_net()

    def _try(self, opt: Opt, action: Any) -> None:
        """Run one conversion; on :class:`Unconvertible` keep ``opt`` as ``<qemu:arg>``."""
        marks = [o for o in self.opts if o.status == "used"]
        n_notes = len(self.g.notes)
        try:
            used = action()
        except Unconvertible as exc:
            opt.status, opt.why = "pass", str(exc)
            del self.g.notes[n_notes:]
            for o in self.opts:
                if o.status == "used" and o not in marks:
                    o.status = "pass"
            return
        if opt.status in ("pass", "later"):
            opt.status = "used"
        for o in used or []:
            o.status = "used"

    def _props(self, opt: Opt) -> dict[str, Any]:
        key = id(opt)
        if key not in self.g.props:
            self.g.props[key] = parse_props(opt.value or "", "driver")
        return self.g.props[key]

    def _definitions(self) -> None:
        for opt in self.opts:
            if opt.name in _DEFS:
                kind, implied, idkey = _DEFS[opt.name]
                props = parse_props(opt.value or "", implied)
                if props.get(idkey):
                    self.g.define(kind, str(props[idkey]), opt, props)
            elif opt.name == "-drive":
                props = parse_opts(opt.value or "")
                if props.get("if") == "none" and props.get("id"):
                    self.g.define("drive", props["id"], opt, props)

    # ---- machine ---------------------------------------------------------------------------
    def _opt_name(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "guest")
        name = props.pop("guest", "")
        if "/" in name or "\n" in name:
            raise NativeArgsError(f"{self.source}: -name '{one_line(name)}': a domain name "
                                  "cannot contain '/' or a newline")
        self.s.name = name or self.s.name
        for key in ("process", "debug-threads"):
            props.pop(key, None)
        for key, value in props.items():
            self.g.note(f"-name {key}={value}")

    def _opt_uuid(self, opt: Opt) -> None:
        try:
            self.s.uuid = str(uuidlib.UUID(opt.value or ""))
        except ValueError:
            raise NativeArgsError(f"{self.source}: -uuid '{one_line(opt.value or '')}' is not "
                                  "a UUID; use the form 4dea24b3-1d52-d8f3-2516-782e98a23fa0"
                                  ) from None

    def _opt_m(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "size")
        self.s.memory_kib = parse_size_kib(props.pop("size", ""))
        self._rest(opt, props)

    def _opt_smp(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "cpus")
        cpus = as_int(props.pop("cpus", "0") or "0")
        if cpus is None or cpus < 0:
            raise NativeArgsError(f"{self.source}: -smp '{one_line(opt.value or '')}' is not "
                                  "a CPU count; use e.g. -smp 2")
        if not cpus:
            topo = [as_int(props.get(k, "1")) or 1 for k in ("sockets", "dies", "cores",
                                                              "threads")]
            cpus = as_int(props.get("maxcpus", "0")) or math.prod(topo)
        self.s.vcpus = cpus
        self._rest(opt, props)

    def _rest(self, opt: Opt, props: dict[str, str]) -> None:
        """Keep the sub-options not converted as a ``<qemu:arg>`` of their own (QEMU merges
        repeated -m, -smp, -boot and -machine options)."""
        if props:
            opt.value, opt.status = join_opts(props), "rest"

    def _opt_machine(self, opt: Opt) -> list[Opt]:
        props = parse_opts(opt.value or "", "type")
        props.pop("type", None)
        accel = props.pop("accel", None)
        if accel:
            self.s.virt_type = "kvm" if accel.split(":")[0] == "kvm" else "qemu"
        if as_bool(props.pop("usb", "off")):
            self.g.usb_wanted = True
        props.pop("dump-guest-core", None)
        if props.get("acpi") in ("off", "on"):
            self.s.acpi = props.pop("acpi") == "on"
        used: list[Opt] = []
        for unit in ("pflash0", "pflash1"):
            if unit in props:
                mine: list[Opt] = []
                try:
                    layer, readonly = resolve_layer(self.g, props[unit], mine)
                except Unconvertible:
                    continue  # stays in the -machine kept as <qemu:arg>, with its nodes
                del props[unit]
                used += mine
                if unit == "pflash0":
                    self.g.loader = (layer.path, "pflash", readonly)
                else:
                    self.g.nvram = layer.path
        self._rest(opt, props)
        return used

    _opt_M = _opt_machine

    def _opt_accel(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "accel")
        accel = props.pop("accel", "")
        if accel not in ("kvm", "tcg"):
            raise Unconvertible(f"accelerator '{accel}'")
        self.s.virt_type = "kvm" if accel == "kvm" else "qemu"
        for key, value in props.items():
            self.g.note(f"-accel {accel}: {key}={value}")

    def _opt_enable_kvm(self, opt: Opt) -> None:
        self.s.virt_type = "kvm"

    def _opt_no_kvm(self, opt: Opt) -> None:
        self.s.virt_type = "qemu"

    def _opt_cpu(self, opt: Opt) -> None:
        model = opt.value or ""
        if model == "qemu32" and self.g.arch in ("x86_64", "i686"):
            self.g.arch = "i686"
        elif not (model == "qemu64" and self.g.arch == "x86_64"):
            raise Unconvertible("CPU models are not modelled by vmconfine")

    def _opt_boot(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "order")
        props.pop("strict", None)
        order = props.pop("order", None) or props.pop("once", None) or ""
        devs = [_BOOT_LETTERS[c] for c in order if c in _BOOT_LETTERS]
        self.s.boot_devs = list(dict.fromkeys(devs)) or self.s.boot_devs
        self._rest(opt, props)

    def _opt_kernel(self, opt: Opt) -> None:
        self.s.kernel = opt.value

    def _opt_initrd(self, opt: Opt) -> None:
        self.s.initrd = opt.value

    def _opt_append(self, opt: Opt) -> None:
        self.s.cmdline = opt.value

    def _opt_dtb(self, opt: Opt) -> None:
        self.s.dtb = opt.value

    def _opt_bios(self, opt: Opt) -> None:
        self.g.loader = (opt.value or "", "rom", False)

    def _opt_no_acpi(self, opt: Opt) -> None:
        self.s.acpi = False

    def _opt_no_reboot(self, opt: Opt) -> None:
        self.s.on_reboot = "destroy"

    def _opt_usb(self, opt: Opt) -> None:
        self.g.usb_wanted = True

    def _drop(self, opt: Opt) -> None:
        opt.status = "drop"

    _opt_S = _opt_no_user_config = _opt_nodefaults = _opt_nodefconfig = _drop
    _opt_msg = _opt_sandbox = _opt_daemonize = _opt_pidfile = _opt_nographic = _drop

    def _opt_no_shutdown(self, opt: Opt) -> None:
        opt.status = "drop"
        self.g.note("-no-shutdown (vmconfine ends the domain when QEMU exits)")

    def _opt_runas(self, opt: Opt) -> None:
        opt.status = "drop"
        self.g.note(f"{opt.name} {opt.value} (vmconfine runs QEMU as the qemu.conf user)")

    _opt_chroot = _opt_runas

    def _opt_rtc(self, opt: Opt) -> None:
        if opt.value not in ("base=utc", "base=localtime"):
            raise Unconvertible("RTC settings")
        self.g.clock_offset = opt.value.removeprefix("base=")
        opt.status = "drop"

    def _opt_overcommit(self, opt: Opt) -> None:
        if opt.value not in ("mem-lock=off",):
            raise Unconvertible("memory locking")
        opt.status = "drop"

    def _opt_realtime(self, opt: Opt) -> None:
        if opt.value not in ("mlock=off",):
            raise Unconvertible("memory locking")
        opt.status = "drop"

    # ---- display ---------------------------------------------------------------------------
    def _opt_display(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "type")
        if "vnc" in props:
            self._vnc(props["vnc"])
        elif props.get("type") == "none":
            opt.status = "drop"
        else:
            raise Unconvertible(f"display '{props.get('type')}' (vmconfine offers VNC)")

    def _opt_vnc(self, opt: Opt) -> None:
        self._vnc(opt.value or "")

    def _vnc(self, value: str) -> None:
        if value == "none":
            self.s.graphics = {"listen_type": "none"}
            return
        if value.startswith("unix:"):
            path, _, rest = value[5:].partition(",")
            self.s.graphics = {"socket": path}
            for key, val in parse_opts(rest).items() if rest else []:
                self.g.note(f"-vnc {key}={val}")
            return
        head, _, rest = value.partition(",")
        host, sep, display = head.rpartition(":")
        if not sep or not display.isdigit() or int(display) > 65535 - 5900:
            raise NativeArgsError(f"{self.source}: -vnc '{one_line(value)}' has no valid "
                                  "display number; use e.g. -vnc 127.0.0.1:1 or -vnc "
                                  "unix:PATH")
        props = parse_opts(rest) if rest else {}
        graphics = {"listen": host.strip("[]") or "0.0.0.0"}
        if "to" in props:
            props.pop("to")
            graphics.update(port="-1", autoport="yes")
        else:
            graphics.update(port=str(5900 + int(display)), autoport="no")
        if "websocket" in props:
            ws = props.pop("websocket")
            graphics["websocket"] = "-1" if as_bool(ws) else ws
        for key, val in props.items():
            self.g.note(f"-vnc {key}={val}")
        self.s.graphics = graphics

    def _opt_vga(self, opt: Opt) -> None:
        if opt.value == "none":
            self.g.videos.append("none")
        elif opt.value in _VGA:
            self.g.videos.append(_VGA[opt.value])
        else:
            raise Unconvertible(f"video card '{opt.value}'")

    # ---- devices ---------------------------------------------------------------------------
    def _opt_device(self, opt: Opt) -> list[Opt]:
        used: list[Opt] = []
        convert_device(self.g, self._props(opt), used)
        return used

    def _opt_drive(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "")
        if props.get("if") == "none":
            raise Unconvertible("-drive if=none that no device uses")
        disk = legacy_drive(self.g, props, f"-drive {props.get('file', '')}".rstrip())
        if disk is not None:
            self.g.disks.append(disk)

    def _legacy_disk(self, opt: Opt) -> None:
        name = opt.name
        if name == "-cdrom":
            props = {"file": opt.value or "", "index": "2", "media": "cdrom"}
        else:
            iface, index = _LEGACY_DISKS[name]
            props = {"file": opt.value if name else opt.raw, "if": iface, "index": str(index)}
        disk = legacy_drive(self.g, props, f"{name or 'image'} {props['file']}")
        if disk is not None:
            self.g.disks.append(disk)

    _opt_hda = _opt_hdb = _opt_hdc = _opt_hdd = _opt_cdrom = _opt_fda = _opt_fdb = _legacy_disk

    def _opt_pflash(self, opt: Opt) -> None:
        unit = 0 if self.g.loader is None else 1
        legacy_drive(self.g, {"file": opt.value or "", "if": "pflash", "unit": str(unit),
                              "format": "raw"}, f"-pflash {opt.value}")

    def _opt_usbdevice(self, opt: Opt) -> None:
        kinds = {"tablet": "tablet", "mouse": "mouse", "keyboard": "keyboard"}
        if opt.value in kinds:
            self.g.inputs.append((kinds[opt.value], "usb", None))
            self.g.usb_wanted = True
            return
        raise Unconvertible(f"USB device '{opt.value}'")

    def _opt_balloon(self, opt: Opt) -> None:
        if not (opt.value or "").startswith("virtio"):
            raise Unconvertible("balloon device")
        self.g.balloon = True

    def _opt_pcidevice(self, opt: Opt) -> None:
        m = re.fullmatch(r"host=([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", opt.value or "")
        if not m:
            raise Unconvertible(f"PCI device '{opt.value}'")
        ids = dict(zip(("bus", "slot", "function"), (int(x, 16) for x in m.groups()),
                       strict=True))
        self.g.hostdevs.append(NHostdev("pci", {"domain": 0, **ids}))

    # ---- character devices and monitors ----------------------------------------------------
    def _char_option(self, opt: Opt, kind: str) -> list[Opt]:
        spec = opt.value or ""
        used: list[Opt] = []
        if spec.startswith("mon:"):
            self.g.note(f"{opt.name} {spec}: the monitor multiplexed onto it")
            spec = spec[4:]
        if spec.startswith("chardev:"):
            copt, props = self.g.lookup("chardev", spec[8:])
            used.append(copt)
            src: CharSrc | None = chardev_source(self.g, props)
        else:
            src = legacy_char(spec)
        if src is not None:
            port = len([c for c in self.g.chars if c.kind == kind])
            self.g.chars.append(NChar(kind=kind, src=src, port=port))
        return used

    def _opt_serial(self, opt: Opt) -> list[Opt]:
        return self._char_option(opt, "serial")

    def _opt_parallel(self, opt: Opt) -> list[Opt]:
        return self._char_option(opt, "parallel")

    def _monitor(self, opt: Opt, protocol: str) -> None:
        spec = opt.value or ""
        try:
            src = legacy_char(spec) if not spec.startswith("chardev:") else None
        except Unconvertible:
            src = None
        self.g.monitors.append(monitor_from(protocol, src, opt.text()))
        opt.status = "drop"

    def _opt_monitor(self, opt: Opt) -> None:
        self._monitor(opt, "hmp")

    def _opt_qmp(self, opt: Opt) -> None:
        self._monitor(opt, "qmp")

    _opt_qmp_pretty = _opt_qmp

    def _opt_mon(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "chardev")
        protocol = "qmp" if props.get("mode") == "control" else "hmp"
        copt, cprops = self.g.lookup("chardev", props.get("chardev"))
        if cprops.get("fd") is not None:
            monitor = Monitor(protocol, "fd", None, True, opt.text())
        else:
            try:
                monitor = monitor_from(protocol, chardev_source(Guest(), cprops), opt.text())
            except Unconvertible:
                monitor = Monitor(protocol, "other", None, False, opt.text())
        self.g.monitors.append(monitor)
        copt.status = opt.status = "drop"

    # ---- network ---------------------------------------------------------------------------
    def _opt_net(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "type")
        if props.get("type") == "none":
            return
        target = self.s.nics if props.get("type") == "nic" else self.s.backends
        target.append((opt, props))
        opt.status = "later"

    def _opt_nic(self, opt: Opt) -> None:
        props = parse_opts(opt.value or "", "type")
        if props.get("type") == "none":
            return
        model = self._nic_model(props.pop("model", None))
        mac = props.pop("mac", None)
        self.g.nics.append(netdev_nic(self.g, props, model, mac, None))

    def _nic_model(self, model: str | None) -> str:
        if model is None:
            return "e1000e" if self.g.q35 else "e1000"
        if model in NIC_MODELS:
            return NIC_MODELS[model]
        if model in NIC_MODELS.values():
            return model
        raise Unconvertible(f"NIC model '{model}'")

    def _legacy_net(self) -> None:
        backends = list(self.s.backends)
        for i, (opt, props) in enumerate(self.s.nics):
            def pair(opt: Opt = opt, props: dict[str, str] = props, i: int = i) -> list[Opt]:
                model = self._nic_model(props.get("model"))
                if props.get("netdev"):
                    bopt, bprops = self.g.lookup("netdev", props["netdev"])
                elif i < len(backends):
                    bopt, bprops = backends[i]
                else:
                    raise Unconvertible("-net nic without a network backend")
                self.g.nics.append(netdev_nic(self.g, bprops, model, props.get("macaddr"),
                                              None))
                return [bopt]
            self._try(opt, pair)
        for opt in self.opts:
            if opt.status == "later":
                opt.status, opt.why = "pass", "network backend without a NIC"
