"""The device half of ``domxml-from-native`` (see :mod:`vmconfine.qemu.fromnative.convert`).

QEMU options are read back into a small device model (:class:`Guest`): storage from
``-blockdev`` graphs (or ``-drive if=none``) joined to their ``-device`` front-end, NICs from
``-netdev`` + ``-device``, character devices from ``-chardev`` + their serial/console/channel
device, and the legacy forms (``-hda``, ``-drive if=ide``, ``-net nic``, ``-serial pty``...).
This inverts :mod:`vmconfine.qemu.argv_devices`: device ids written by vmconfine (libvirt's
aliases) give back the exact disk targets, controller indexes and console numbers.

Anything that cannot be expressed as domain XML raises :class:`Unconvertible`; the caller then
keeps the option (and every definition it references) verbatim as ``<qemu:arg>``. Properties
vmconfine does not model on a converted device are recorded with :meth:`Guest.note` and named
in the conversion warning.
"""

from __future__ import annotations

import re
from typing import Any

from vmconfine.qemu.fromnative.model import (
    PCI_PLACEMENT,
    CharSrc,
    Guest,
    Layer,
    Monitor,
    NChar,
    NDisk,
    NHostdev,
    NNic,
    Opt,
    Unconvertible,
    alias_index,
    as_bool,
    as_int,
    escape,
    join_opts,
    note_extra,
    parse_opts,
    split_commas,
)

# --------------------------------------------------------------------------- storage

PROTOCOLS = {"file": "file", "host_device": "block", "host_cdrom": "block"}
FORMATS = {"raw", "qcow", "qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc", "dmg", "bochs",
           "cloop", "parallels"}
_PROTO_KEYS = {"driver", "filename", "node-name", "auto-read-only", "discard", "read-only"}
_FORMAT_KEYS = {"driver", "node-name", "read-only", "file", "backing", "discard",
                "auto-read-only"}


def _node(g: Guest, ref: Any, used: list[Opt]) -> dict[str, Any]:
    if isinstance(ref, dict):
        return ref
    opt, props = g.lookup("node", ref)
    used.append(opt)
    return props


def _protocol(g: Guest, node: dict[str, Any]) -> tuple[str, str]:
    drv = node.get("driver")
    if drv not in PROTOCOLS or not node.get("filename"):
        raise Unconvertible(f"block driver '{drv}' is not a local file or device")
    note_extra(g, f"-blockdev {node.get('node-name', drv)}", node, _PROTO_KEYS)
    return str(node["filename"]), PROTOCOLS[str(drv)]


def resolve_layer(g: Guest, ref: Any, used: list[Opt], depth: int = 0) -> tuple[Layer, bool]:
    """The image chain below block node ``ref``; returns (top layer, read-only)."""
    if depth > 200:
        raise Unconvertible("backing chain deeper than 200 images")
    node = _node(g, ref, used)
    drv = node.get("driver")
    if drv in PROTOCOLS:
        path, ptype = _protocol(g, node)
        return Layer(path, ptype, "raw"), as_bool(node.get("read-only", False))
    if drv not in FORMATS or node.get("file") is None:
        raise Unconvertible(f"block driver '{drv}' cannot be expressed as a <disk>")
    path, ptype = _protocol(g, _node(g, node["file"], used))
    note_extra(g, f"-blockdev {node.get('node-name', drv)}", node, _FORMAT_KEYS)
    layer = Layer(path, ptype, str(drv))
    if "backing" in node:
        if node["backing"] is None:
            layer.end = True
        else:
            layer.backing, _ro = resolve_layer(g, node["backing"], used, depth + 1)
    return layer, as_bool(node.get("read-only", False))


def drive_layer(g: Guest, props: dict[str, Any], what: str) -> tuple[Layer | None, bool]:
    """The image of a legacy ``-drive`` (None for an empty drive) and its read-only flag."""
    path = props.get("file")
    fmt = str(props.get("format") or "raw")
    disk = props.get("media", "disk") == "disk" and props.get("if") != "floppy"
    if path and not props.get("format") and disk and not str(path).startswith("/dev/"):
        g.note(f"{what}: no format= given, raw assumed (vmconfine never probes a format)")
    if fmt not in FORMATS:
        raise Unconvertible(f"image format '{fmt}' is not supported")
    known = {"file", "format", "if", "index", "bus", "unit", "media", "readonly", "id"}
    note_extra(g, what, props, known)
    if not path:
        return None, as_bool(props.get("readonly", False))
    path = str(path)
    if re.match(r"^[a-z0-9+]+:", path) and not path.startswith("/"):
        raise Unconvertible(f"network or protocol image '{path}'")
    ptype = "block" if path.startswith("/dev/") else "file"
    return Layer(path, ptype, fmt), as_bool(props.get("readonly", False))


_FRONT_ENDS = {
    "virtio-blk-pci": ("disk", "virtio"), "virtio-blk": ("disk", "virtio"),
    "ide-hd": ("disk", "ide"), "ide-cd": ("cdrom", "ide"), "scsi-hd": ("disk", "scsi"),
    "scsi-cd": ("cdrom", "scsi"), "floppy": ("floppy", "fdc"),
}
_FRONT_KEYS = {"driver", "id", "drive", "unit", "channel", "scsi-id", "lun", "bootindex",
               "share-rw", "serial"}


def _ide_place(g: Guest, props: dict[str, Any]) -> tuple[str, int]:
    bus = str(props.get("bus") or "")
    unit = as_int(props.get("unit", 0)) or 0
    m = re.fullmatch(r"(.+)\.(\d+)", bus)
    if m and m.group(1) in g.sata_ids:
        return "sata", g.sata_ids[m.group(1)] * 6 + int(m.group(2))
    if m and m.group(1) == "ide":
        if g.q35:
            return "sata", int(m.group(2))
        return "ide", int(m.group(2)) * 2 + unit
    if bus:
        raise Unconvertible(f"IDE/SATA bus '{bus}' is not known")
    return ("sata", g.free_index("sata")) if g.q35 else ("ide", g.free_index("ide"))


def _scsi_place(g: Guest, props: dict[str, Any]) -> tuple[int, str | None]:
    bus = str(props.get("bus") or "")
    m = re.fullmatch(r"(.+)\.0", bus)
    if bus and not (m and m.group(1) in g.scsi_ids):
        raise Unconvertible(f"SCSI bus '{bus}' is not a SCSI controller of this command line")
    controller = g.scsi_ids[m.group(1)] if m else 0
    model = g.controllers.get(("scsi", controller))
    scsi_id = as_int(props.get("scsi-id", 0)) or 0
    lun = as_int(props.get("lun", 0)) or 0
    unit = scsi_id if model == "lsilogic" or (lun == 0 and scsi_id) else lun
    return controller * 7 + unit, model


def disk_frontend(g: Guest, props: dict[str, Any], used: list[Opt]) -> NDisk:
    """A disk from a ``-device`` front-end and the storage its ``drive=`` names."""
    driver = str(props["driver"])
    device, bus = _FRONT_ENDS[driver]
    top: Layer | None = None
    readonly = False
    if props.get("drive") is not None:
        ref = props["drive"]
        if str(ref) in g.defs.get("drive", {}):
            opt, dprops = g.lookup("drive", ref)
            used.append(opt)
            top, readonly = drive_layer(g, dprops, f"-drive {ref}")
            if dprops.get("media") == "cdrom":
                device = "cdrom" if device == "disk" else device
        else:
            top, readonly = resolve_layer(g, ref, used)
    if bus == "virtio":
        index = alias_index(props.get("id"), "virtio-disk")
        index = g.free_index("virtio") if index is None else index
    elif bus == "ide":
        bus, index = _ide_place(g, props)
    elif bus == "scsi":
        index, _model = _scsi_place(g, props)
    else:
        index = as_int(props.get("unit", 0)) or 0
    if index < 0:
        raise Unconvertible(f"disk position {index}")
    if index in {d.index for d in g.disks if d.bus == bus or
                 {d.bus, bus} <= {"sata", "scsi"}}:
        raise Unconvertible(f"a second disk at {bus} position {index}")
    known = _FRONT_KEYS | ({"bus"} if bus != "virtio" else set())
    note_extra(g, f"-device {driver} {props.get('id', '')}".rstrip(), props, known)
    return NDisk(device=device, bus=bus, index=index, top=top,
                 readonly=readonly or device == "cdrom",
                 shareable=as_bool(props.get("share-rw", False)),
                 serial=str(props["serial"]) if props.get("serial") is not None else None,
                 boot=as_int(props.get("bootindex")))


def legacy_drive(g: Guest, props: dict[str, Any], what: str) -> NDisk | None:
    """``-drive if=ide|scsi|virtio|floppy,...`` (and ``-hda``...); None for if=pflash."""
    iface = str(props.get("if") or ("scsi" if g.arch.startswith("ppc") else "ide"))
    media = str(props.get("media") or "disk")
    if iface == "pflash":
        top, readonly = drive_layer(g, props, what)
        if top is None:
            raise Unconvertible("a pflash drive without a file")
        unit = as_int(props.get("unit", props.get("index", 0))) or 0
        if unit == 0:
            g.loader = (top.path, "pflash", readonly)
        elif unit == 1:
            g.nvram = top.path
        else:
            raise Unconvertible(f"pflash unit {unit}")
        return None
    buses = {"ide": "ide", "scsi": "scsi", "virtio": "virtio", "floppy": "fdc"}
    if iface not in buses:
        raise Unconvertible(f"drive interface if={iface}")
    bus = buses[iface]
    if bus == "ide" and g.q35:
        bus = "sata"
    top, readonly = drive_layer(g, props, what)
    index = as_int(props.get("index"))
    if index is None and (props.get("bus") is not None or props.get("unit") is not None):
        bus_n = as_int(props.get("bus", 0)) or 0
        unit = as_int(props.get("unit", 0)) or 0
        index = bus_n * {"ide": 2, "scsi": 7}.get(bus, 1) + unit if bus != "fdc" else unit
    if index is None:
        index = g.free_index(bus)
    elif index < 0:
        raise Unconvertible(f"drive index {index}")
    elif index in {d.index for d in g.disks if d.bus == bus}:
        raise Unconvertible(f"a second drive at {iface} index {index}")
    device = "floppy" if bus == "fdc" else ("cdrom" if media == "cdrom" else "disk")
    if bus == "scsi":
        g.controllers.setdefault(("scsi", index // 7), "lsilogic")
    return NDisk(device=device, bus=bus, index=index, top=top,
                 readonly=readonly or device == "cdrom")


# --------------------------------------------------------------------------- character devices

_CHAR_KEYS = {"backend", "id", "path", "server", "wait", "host", "port", "localaddr",
              "localport", "ipv4", "ipv6"}


def chardev_source(g: Guest, props: dict[str, Any]) -> CharSrc:
    """The host side of a ``-chardev``."""
    backend = str(props.get("backend"))
    path = str(props["path"]) if props.get("path") else None
    note_extra(g, f"-chardev {props.get('id', backend)}", props, _CHAR_KEYS)
    if backend in ("pty", "null", "vc", "stdio"):
        return CharSrc(backend)
    kinds = {"file": "file", "pipe": "pipe", "serial": "dev", "tty": "dev", "parallel": "dev",
             "parport": "dev"}
    if backend in kinds:
        if not path:
            raise Unconvertible(f"-chardev {backend} without path=")
        return CharSrc(kinds[backend], path=path)
    server = as_bool(props.get("server", False))
    mode = "bind" if server else "connect"
    if backend == "socket" and path:
        return CharSrc("unix", path=path, mode=mode)
    if backend == "socket" and props.get("port"):
        return CharSrc("tcp", mode=mode, host=str(props.get("host") or "0.0.0.0"),
                       service=str(props["port"]))
    if backend == "udp" and props.get("port"):
        return CharSrc("udp", host=str(props.get("host") or "localhost"),
                       service=str(props["port"]))
    raise Unconvertible(f"-chardev {backend} cannot be expressed as domain XML")


def legacy_char(spec: str) -> CharSrc | None:
    """``-serial``/``-parallel``/``-monitor`` device syntax (``pty``, ``file:PATH``,
    ``unix:PATH,server``...); None for ``none``."""
    if spec == "none":
        return None
    if spec in ("pty", "null", "stdio") or spec.startswith("vc"):
        return CharSrc(spec if not spec.startswith("vc") else "vc")
    for prefix, ctype in (("file:", "file"), ("pipe:", "pipe")):
        if spec.startswith(prefix):
            return CharSrc(ctype, path=spec[len(prefix):])
    if spec.startswith("/dev/"):
        return CharSrc("dev", path=spec)
    if spec.startswith("unix:"):
        parts = split_commas(spec[5:])
        opts = parse_opts(",".join(escape(p) for p in parts[1:])) if len(parts) > 1 else {}
        return CharSrc("unix", path=parts[0],
                       mode="bind" if as_bool(opts.get("server", "off")) else "connect")
    if spec.startswith(("tcp:", "telnet:")):
        rest = spec.split(":", 1)[1]
        head, _, tail = rest.partition(",")
        host, _, port = head.rpartition(":")
        opts = parse_opts(tail) if tail else {}
        return CharSrc("tcp", host=host.strip("[]") or "0.0.0.0", service=port,
                       mode="bind" if as_bool(opts.get("server", "off")) else "connect")
    if spec.startswith("udp:"):
        host, _, port = spec[4:].split("@")[0].rpartition(":")
        return CharSrc("udp", host=host or "localhost", service=port)
    raise Unconvertible(f"character device '{spec}'")


def monitor_from(protocol: str, src: CharSrc | None, option: str) -> Monitor:
    """A :class:`Monitor` for a monitor's host side."""
    if src is None:
        return Monitor(protocol, "other", None, False, option)
    kind = src.type if src.type in ("unix", "tcp", "pty", "stdio") else "other"
    return Monitor(protocol, kind, src.path, src.mode == "bind", option)


# --------------------------------------------------------------------------- other devices

NIC_MODELS = {"virtio-net-pci": "virtio", "virtio-net": "virtio", "e1000": "e1000",
              "e1000e": "e1000e", "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci",
              "pcnet": "pcnet", "vmxnet3": "vmxnet3"}
USB_MODELS = {"piix3-usb-uhci": "piix3-uhci", "piix4-usb-uhci": "piix4-uhci",
              "usb-ehci": "ehci", "ich9-usb-ehci1": "ich9-ehci1", "ich9-usb-uhci1": "ich9-uhci1",
              "ich9-usb-uhci2": "ich9-uhci2", "ich9-usb-uhci3": "ich9-uhci3",
              "pci-ohci": "pci-ohci", "nec-usb-xhci": "nec-xhci", "qemu-xhci": "qemu-xhci"}
INPUTS = {"usb-tablet": ("tablet", "usb"), "usb-mouse": ("mouse", "usb"),
          "usb-kbd": ("keyboard", "usb"), "virtio-tablet-pci": ("tablet", "virtio"),
          "virtio-mouse-pci": ("mouse", "virtio"), "virtio-keyboard-pci": ("keyboard", "virtio")}
VIDEOS = {"VGA": "vga", "cirrus-vga": "cirrus", "vmware-svga": "vmvga", "qxl-vga": "qxl",
          "virtio-vga": "virtio", "bochs-display": "bochs", "ramfb": "ramfb",
          "virtio-gpu-pci": "virtio", "qxl": "qxl"}
LEGACY_NIC_MODELS = {"virtio": "virtio", **{k: v for k, v in NIC_MODELS.items()}}


#: PCI controllers of a Q35 topology (vmconfine builds libvirt's again, vmconfine.qemu.pci)
PCI_BUS_DEVICES = ("pcie-root-port", "pcie-pci-bridge", "ioh3420", "pci-bridge")


def netdev_nic(g: Guest, nprops: dict[str, Any], model: str, mac: Any,
               boot: int | None) -> NNic:
    """An interface for a ``-netdev``/``-net``/``-nic`` backend."""
    ntype = str(nprops.get("type"))
    what = f"-netdev {nprops.get('id', ntype)}"
    extra = {k: v for k, v in nprops.items() if k not in ("type", "id", "vlan", "name")}
    nic = NNic(type="user", model=model, mac=str(mac) if mac else None, boot=boot)
    if ntype == "user":
        if extra:
            raise Unconvertible(f"user networking options ({join_opts(extra)})")
        return nic
    if ntype == "tap":
        nic.type = "ethernet"
        nic.ifname = str(extra.pop("ifname")) if extra.get("ifname") else None
        script = str(extra.pop("script", "no"))
        nic.script = None if script == "no" else script
        note_extra(g, what, extra, {"downscript"})
        return nic
    if ntype == "bridge":
        nic.type = "bridge"
        nic.bridge = str(extra.pop("br", "br0"))
        note_extra(g, what, extra, set())
        return nic
    raise Unconvertible(f"network backend '{ntype}'")


def _controller(g: Guest, driver: str, props: dict[str, Any]) -> bool:
    ident = str(props.get("id") or "")
    if driver in USB_MODELS:
        index = 0 if ident == "usb" else alias_index(ident, "usb")
        index = len([k for k in g.controllers if k[0] == "usb"]) if index is None else index
        g.controllers[("usb", index)] = USB_MODELS[driver]
    elif driver in ("virtio-scsi-pci", "lsi53c895a"):
        index = alias_index(ident, "scsi")
        index = len(g.scsi_ids) if index is None else index
        g.scsi_ids[ident or f"scsi{index}"] = index
        g.controllers[("scsi", index)] = "virtio-scsi" if driver != "lsi53c895a" else "lsilogic"
    elif driver == "ahci":
        index = alias_index(ident, "sata")
        index = len(g.sata_ids) + (1 if g.q35 else 0) if index is None else index
        g.sata_ids[ident or f"sata{index}"] = index
        g.controllers[("sata", index)] = None
    elif driver in ("virtio-serial-pci", "virtio-serial"):
        index = alias_index(ident, "virtio-serial")
        g.controllers[("virtio-serial", index or 0)] = None
    elif driver == "isa-fdc" and set(props) <= {"driver", "id"}:
        pass  # implied by the floppy disks
    else:
        return False
    note_extra(g, f"-device {driver}", props, {"driver", "id"})
    return True


def _char_device(g: Guest, driver: str, props: dict[str, Any], used: list[Opt]) -> bool:
    kinds = {"isa-serial": "serial", "pci-serial": "serial", "isa-parallel": "parallel",
             "virtconsole": "console", "virtserialport": "channel"}
    if driver not in kinds:
        return False
    opt, cprops = g.lookup("chardev", props.get("chardev"))
    used.append(opt)
    src = chardev_source(g, cprops)
    kind = kinds[driver]
    char = NChar(kind=kind, src=src)
    count = len([c for c in g.chars if c.kind == kind])
    if driver == "isa-serial":
        char.port = as_int(props.get("index", count))
    elif driver == "isa-parallel":
        char.port = alias_index(props.get("id"), "parallel")
        char.port = count if char.port is None else char.port
    elif driver == "pci-serial":
        char.target_type = "pci-serial"
    elif kind == "console":
        char.target_type, char.alias = "virtio", alias_index(props.get("id"), "console")
    elif kind == "channel":
        char.target_type = "virtio"
        char.name = str(props["name"]) if props.get("name") else None
    known = {"driver", "id", "chardev", "index", "name", "nr"} | (
        {"bus"} if kind == "channel" else set())
    note_extra(g, f"-device {driver}", props, known)
    g.chars.append(char)
    return True


def _other_device(g: Guest, driver: str, props: dict[str, Any], used: list[Opt]) -> bool:
    known = {"driver", "id"} | ({"bus"} if driver.startswith("usb-") else set())
    if driver in INPUTS:
        g.inputs.append((*INPUTS[driver], None))
    elif driver == "virtio-input-host-pci" and props.get("evdev"):
        g.inputs.append(("passthrough", "virtio", str(props["evdev"])))
        known.add("evdev")
    elif driver in VIDEOS:
        g.videos.append(VIDEOS[driver])
    elif driver in ("virtio-balloon-pci", "virtio-balloon"):
        g.balloon = True
    elif driver == "vfio-pci" and props.get("host"):
        m = re.fullmatch(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\."
                         r"([0-7])", str(props["host"]))
        if not m:
            raise Unconvertible(f"PCI host address '{props['host']}'")
        ids = {k: int(v or "0", 16) for k, v in zip(("domain", "bus", "slot", "function"),
                                                     m.groups(), strict=True)}
        g.hostdevs.append(NHostdev("pci", ids, as_int(props.get("bootindex"))))
        known |= {"host", "bootindex"}
    elif driver == "usb-host":
        pairs = (("hostbus", "bus"), ("hostaddr", "device"), ("vendorid", "vendor"),
                 ("productid", "product"))
        ids = {name: as_int(props[key]) for key, name in pairs if props.get(key) is not None}
        if None in ids.values() or not ({"bus", "device"} <= set(ids) or
                                         {"vendor", "product"} <= set(ids)):
            raise Unconvertible("usb-host without hostbus/hostaddr or vendorid/productid")
        g.hostdevs.append(NHostdev("usb", {k: v for k, v in ids.items() if v is not None},
                                   as_int(props.get("bootindex"))))
        known |= {k for k, _ in pairs} | {"bootindex"}
    elif driver in ("virtio-rng-pci", "virtio-rng") and props.get("rng"):
        opt, oprops = g.lookup("object", props["rng"])
        if oprops.get("qom-type") != "rng-random":
            raise Unconvertible(f"rng backend '{oprops.get('qom-type')}'")
        used.append(opt)
        g.rngs.append(str(oprops.get("filename") or "/dev/urandom"))
        known.add("rng")
    else:
        return False
    note_extra(g, f"-device {driver}", props, known)
    return True


def convert_device(g: Guest, props: dict[str, Any], used: list[Opt]) -> None:
    """Convert one ``-device`` (raises :class:`Unconvertible` when it cannot be)."""
    driver = str(props.get("driver"))
    if driver in PCI_BUS_DEVICES:
        g.note(PCI_PLACEMENT)  # vmconfine adds libvirt's root ports and bridge itself
        return
    if driver in _FRONT_ENDS:
        g.disks.append(disk_frontend(g, props, used))
        return
    if driver in NIC_MODELS:
        if props.get("netdev") is None:
            raise Unconvertible(f"-device {driver} without netdev=")
        opt, nprops = g.lookup("netdev", props["netdev"])
        nic = netdev_nic(g, nprops, NIC_MODELS[driver], props.get("mac"),
                         as_int(props.get("bootindex")))
        used.append(opt)
        note_extra(g, f"-device {driver}", props, {"driver", "id", "netdev", "mac", "bootindex"})
        g.nics.append(nic)
        return
    if _controller(g, driver, props) or _char_device(g, driver, props, used):
        return
    if not _other_device(g, driver, props, used):
        raise Unconvertible(f"device '{driver}' is not modelled by vmconfine")
