"""Device views of libvirt domain XML (the ``<devices>`` part of :mod:`vmconfine.domain`).

Every view is a plain dataclass filled from the lxml tree at parse time; ``element`` keeps the
source element so callers can look at anything vmconfine does not model. Paths are kept exactly
as written (never resolved): the drivers resolve them.

Defaults follow libvirt's ``domain_conf.c``: a disk without ``type`` is a file disk, without
``device`` a plain disk, a cdrom is always read-only, the bus comes from the target name; a
VNC display without ``port`` (or with ``port='-1'``) uses autoport. Character devices live in
:mod:`vmconfine.domain.chardev`, per-source seclabels in :mod:`vmconfine.domain.seclabel` and
the XML helpers in :mod:`vmconfine.domain.xml`; they are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.chardev import (
    CHARDEV_KINDS,
    CHARDEV_TYPES,
    Chardev,
    parse_chardev,
)
from vmconfine.domain.display import (
    Audio,
    Redirdev,
    Sound,
    SpiceOptions,
    Video,
    parse_audio,
    parse_redirdev,
    parse_sound,
    parse_spice,
    parse_video,
)
from vmconfine.domain.interface import INTERFACE_SOURCE_ATTR, Interface, parse_interface
from vmconfine.domain.seclabel import (
    DeviceSecLabel,
    find_device_seclabel,
    parse_device_seclabels,
)
from vmconfine.domain.xml import (
    ParseContext,
    attr,
    child,
    child_text,
    children,
    int_attr,
    one_line,
    parse_c_uint,
    parse_dec_int,
    xml_error,
    yes_no,
)

__all__ = [
    "CHARDEV_KINDS",
    "CHARDEV_TYPES",
    "DISK_DEVICES",
    "DISK_TYPES",
    "INTERFACE_SOURCE_ATTR",
    "MAX_BACKING_DEPTH",
    "Audio",
    "Chardev",
    "Controller",
    "DeviceSecLabel",
    "Devices",
    "Disk",
    "Filesystem",
    "Graphics",
    "Hostdev",
    "Input",
    "Interface",
    "ParseContext",
    "Redirdev",
    "Rng",
    "Sound",
    "SpiceOptions",
    "StorageSource",
    "Tpm",
    "Video",
    "Watchdog",
    "attr",
    "child",
    "child_text",
    "children",
    "default_disk_bus",
    "find_device_seclabel",
    "int_attr",
    "one_line",
    "parse_c_uint",
    "parse_chardev",
    "parse_controller",
    "parse_dec_int",
    "parse_device_seclabels",
    "parse_devices",
    "parse_disk",
    "parse_graphics",
    "parse_hostdev",
    "parse_input",
    "parse_interface",
    "xml_error",
    "yes_no",
]

MAX_BACKING_DEPTH = 200
"""libvirt refuses backing chains deeper than this (status XML nesting limit)."""

DISK_TYPES = ("file", "block", "dir", "network", "volume", "nvme", "vhostuser", "vhostvdpa")
DISK_DEVICES = ("disk", "cdrom", "floppy", "lun")
#: ``<disk><driver>`` attributes with libvirt's values: attribute → (Disk field, values)
DISK_DRIVER_ENUMS = {
    "cache": ("cache", ("none", "writethrough", "writeback", "directsync", "unsafe")),
    "discard": ("discard", ("unmap", "ignore")),
    "io": ("io", ("native", "threads", "io_uring")),
    "detect_zeroes": ("detect_zeroes", ("off", "on", "unmap")),
}
_DISK_PATH_ATTR = {"file": "file", "block": "dev", "dir": "dir", "vhostuser": "path",
                   "vhostvdpa": "dev"}
_BUS_PREFIXES = (("hd", "ide"), ("sd", "scsi"), ("vd", "virtio"), ("xvd", "xen"), ("ubd", "uml"))
#: libvirt's (and PCI's) limits of a host PCI address
PCI_ADDRESS_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 7}
MAX_TCP_PORT = 65535
#: a PCI controller's index is its bus number
MAX_PCI_CONTROLLER_INDEX = 255


# --------------------------------------------------------------------------- disks


@dataclass
class StorageSource:
    """One layer of a disk: ``path`` as written (None for network/volume storage), ``type``
    (file/block, or the disk type for other storage), ``format`` ('raw' when not given),
    ``backing`` (next layer from ``<backingStore>``), per-source ``seclabels``.

    ``backing_declared`` is True when the XML has a ``<backingStore>`` for this layer (an empty
    one means "no backing file"); False means the chain was not described in the XML.
    """

    path: str | None
    type: str
    format: str = "raw"
    backing: StorageSource | None = None
    seclabels: list[DeviceSecLabel] = field(default_factory=list)
    format_given: bool = False
    backing_declared: bool = False
    protocol: str | None = None
    name: str | None = None
    pool: str | None = None
    volume: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    def seclabel(self, model: str) -> DeviceSecLabel | None:
        """This layer's override for ``model`` (see :func:`find_device_seclabel`)."""
        return find_device_seclabel(self.seclabels, model)


@dataclass
class Disk:
    """A ``<disk>``: ``source`` None means empty (e.g. an empty cdrom)."""

    type: str
    device: str
    source: StorageSource | None
    target: str
    bus: str
    readonly: bool = False
    shareable: bool = False
    boot_order: int | None = None
    serial: str | None = None
    driver_name: str | None = None
    cache: str | None = None
    discard: str | None = None
    io: str | None = None
    detect_zeroes: str | None = None
    transient: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    @property
    def format(self) -> str | None:
        """Format of the top layer (``<driver type=>``), None for an empty disk."""
        return self.source.format if self.source else None

    def chain(self) -> list[StorageSource]:
        """Every layer, top image first."""
        out: list[StorageSource] = []
        node = self.source
        while node is not None:
            out.append(node)
            node = node.backing
        return out


def default_disk_bus(device: str, target: str) -> str:
    """libvirt's default bus: floppy → fdc, else from the target prefix, else ide."""
    if device == "floppy":
        return "fdc"
    for prefix, bus in _BUS_PREFIXES:
        if target.startswith(prefix):
            return bus
    return "ide"


def _source_fields(src: etree._Element | None, stype: str) -> dict[str, str | None]:
    if src is None:
        return {"path": None}
    if stype == "network":
        return {"path": None, "protocol": src.get("protocol"), "name": src.get("name")}
    if stype == "volume":
        return {"path": None, "pool": src.get("pool"), "volume": src.get("volume")}
    name = _DISK_PATH_ATTR.get(stype)
    return {"path": (src.get(name) or None) if name else None}


def _parse_backing(ctx: ParseContext, parent: etree._Element, disk_name: str, depth: int,
                   seen: set[str]) -> tuple[StorageSource | None, bool]:
    """The ``<backingStore>`` under ``parent``: (layer or None, declared?)."""
    el = child(parent, "backingStore")
    if el is None:
        return None, False
    stype = el.get("type")
    if stype is None:  # <backingStore/>: explicitly the end of the chain
        return None, True
    if depth >= MAX_BACKING_DEPTH:
        raise ctx.error(el, f"backing chain of disk '{disk_name}' is deeper than "
                            f"{MAX_BACKING_DEPTH} layers; flatten the image chain")
    if stype not in DISK_TYPES:
        raise ctx.error(el, f"unknown backingStore type '{stype}' in disk '{disk_name}'")
    fmt = attr(child(el, "format"), "type")
    if not fmt:
        raise ctx.error(el, f"<backingStore> of disk '{disk_name}' has no <format type=...>; "
                            "give the backing image's format (it is never probed)")
    src = child(el, "source")
    fields = _source_fields(src, stype)
    path = fields["path"]
    if path is not None:
        if path in seen:
            raise ctx.error(el, f"backing chain of disk '{disk_name}' repeats '{path}'")
        seen.add(path)
    node = StorageSource(type=stype, format=fmt, format_given=True,
                         seclabels=parse_device_seclabels(ctx, src), element=el, **fields)
    node.backing, node.backing_declared = _parse_backing(ctx, el, disk_name, depth + 1, seen)
    return node, True


def parse_disk(ctx: ParseContext, el: etree._Element) -> Disk:
    """One ``<disk>`` element."""
    dtype = el.get("type", "file")
    if dtype not in DISK_TYPES:
        raise ctx.error(el, f"unknown disk type '{dtype}'; expected one of {', '.join(DISK_TYPES)}")
    device = el.get("device", "disk")
    if device not in DISK_DEVICES:
        raise ctx.error(el, f"unknown disk device '{device}'; expected one of "
                            f"{', '.join(DISK_DEVICES)}")
    tgt = child(el, "target")
    target = attr(tgt, "dev")
    if not target:
        raise ctx.error(el, "disk has no <target dev=...>; add one, e.g. <target dev='vda'/>")
    assert tgt is not None
    drv = child(el, "driver")
    fmt = attr(drv, "type")
    src_el = child(el, "source")
    fields = _source_fields(src_el, dtype)
    source: StorageSource | None = None
    if fields["path"] is not None or (src_el is not None and dtype not in _DISK_PATH_ATTR):
        source = StorageSource(type=dtype, format=fmt or "raw", format_given=fmt is not None,
                               seclabels=parse_device_seclabels(ctx, src_el), element=src_el,
                               **fields)
        seen = {source.path} if source.path else set()
        source.backing, source.backing_declared = _parse_backing(ctx, el, target, 1, seen)
    if source is None and device in ("disk", "lun"):
        # libvirt: only removable media (cdrom, floppy) may be empty
        raise ctx.error(el, f"missing source information for device {target}; give the "
                            f"disk a <source> with a non-empty path, or make it a cdrom")
    boot = child(el, "boot")
    boot_order = int_attr(ctx, boot, "order", "disk boot order") if boot is not None else None
    if boot_order == 0:
        raise ctx.error(boot, "disk boot order must be 1 or more")
    return Disk(
        type=dtype, device=device, source=source, target=target,
        bus=tgt.get("bus") or default_disk_bus(device, target),
        readonly=child(el, "readonly") is not None or device == "cdrom",
        shareable=child(el, "shareable") is not None, boot_order=boot_order,
        serial=child_text(el, "serial"), driver_name=attr(drv, "name"),
        transient=child(el, "transient") is not None, element=el,
        **{key: _driver_enum(ctx, drv, name, values) for name, (key, values)
           in DISK_DRIVER_ENUMS.items()})


def _driver_enum(ctx: ParseContext, drv: etree._Element | None, name: str,
                 values: tuple[str, ...]) -> str | None:
    """A ``<driver>`` tuning attribute; None when absent or libvirt's 'default'."""
    value = attr(drv, name)
    if value is None or value == "default":
        return None
    if value not in values:
        assert drv is not None
        raise ctx.error(drv, f"unknown disk {name} mode '{one_line(value, 40)}'; use one of "
                             f"{', '.join(values)}")
    return value


# --------------------------------------------------------------------------- graphics, nics


@dataclass
class Graphics:
    """A ``<graphics>`` display. ``port`` -1 means autoport; None when it listens on a socket."""

    type: str
    port: int | None = None
    autoport: bool = False
    listen: str | None = None
    socket: str | None = None
    listen_type: str | None = None
    listen_network: str | None = None
    websocket: int | None = None
    keymap: str | None = None
    rendernode: str | None = None
    xauth: str | None = None
    display: str | None = None
    #: the SPICE-only settings of a ``type='spice'`` display (None for other types)
    spice: SpiceOptions | None = None
    #: the socket path was generated at start (libvirt's ``<libDir>/spice.sock``)
    socket_generated: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_graphics(ctx: ParseContext, el: etree._Element) -> Graphics:
    """One ``<graphics>`` (vnc fully; others: type, ports, listen, render node, xauth)."""
    gtype = el.get("type")
    if not gtype:
        raise ctx.error(el, "<graphics> has no type; use e.g. type='vnc'")
    g = Graphics(type=gtype, keymap=el.get("keymap"), xauth=el.get("xauth"),
                 display=el.get("display"), element=el, socket=el.get("socket") or None,
                 websocket=int_attr(ctx, el, "websocket", "graphics websocket port", signed=True),
                 rendernode=attr(child(el, "gl"), "rendernode") or el.get("rendernode"))
    listen_attr = el.get("listen")
    listens = children(el, "listen")
    first = listens[0] if listens else None
    if first is not None:
        g.listen_type = first.get("type")
        if g.listen_type == "address":
            addr = first.get("address")
            if listen_attr and addr and addr != listen_attr:
                raise ctx.error(el, f"graphics listen='{listen_attr}' must match the first "
                                    f"<listen address='{addr}'>")
            g.listen = addr or listen_attr
        elif g.listen_type == "network":
            g.listen_network = first.get("network")
            g.listen = first.get("address")
        elif g.listen_type == "socket":
            g.socket = first.get("socket") or g.socket
    elif listen_attr:
        g.listen, g.listen_type = listen_attr, "address"
    if g.socket and g.listen_type is None:
        g.listen_type = "socket"
    if gtype in ("vnc", "spice"):
        port = int_attr(ctx, el, "port", f"{gtype} port", signed=True)
        autoport = port is None or port == -1
        autoport = yes_no(ctx, el, "autoport", autoport)
        if g.socket is not None and port is None:
            g.port, g.autoport = None, False
        elif autoport and not (ctx.live and port is not None and port > 0):
            g.port, g.autoport = -1, True
        else:
            g.port, g.autoport = port if port is not None else 0, autoport
        for what, value in ((f"{gtype} port", g.port), ("websocket port", g.websocket)):
            if value is not None and value > MAX_TCP_PORT:
                raise ctx.error(el, f"{what} must be in range [5900,{MAX_TCP_PORT}], not "
                                    f"{value}")
    if gtype == "spice":
        g.spice = parse_spice(ctx, el, g.autoport)
    return g


# --------------------------------------------------------------------------- hostdevs etc.


@dataclass
class Hostdev:
    """A ``<hostdev>``. USB: vendor/product ids and/or bus/device; PCI: the host address."""

    mode: str
    type: str
    managed: bool = False
    driver: str | None = None
    vendor: int | None = None
    product: int | None = None
    bus: int | None = None
    device: int | None = None
    domain: int | None = None
    slot: int | None = None
    function: int | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    # Prefixed aliases: usb_* are None unless type='usb', pci_* None unless type='pci'.
    def _only(self, kind: str, value: int | None) -> int | None:
        return value if self.type == kind else None

    @property
    def usb_vendor(self) -> int | None:
        return self._only("usb", self.vendor)

    @property
    def usb_product(self) -> int | None:
        return self._only("usb", self.product)

    @property
    def usb_bus(self) -> int | None:
        return self._only("usb", self.bus)

    @property
    def usb_device(self) -> int | None:
        return self._only("usb", self.device)

    @property
    def pci_domain(self) -> int | None:
        return self._only("pci", self.domain)

    @property
    def pci_bus(self) -> int | None:
        return self._only("pci", self.bus)

    @property
    def pci_slot(self) -> int | None:
        return self._only("pci", self.slot)

    @property
    def pci_function(self) -> int | None:
        return self._only("pci", self.function)


def parse_hostdev(ctx: ParseContext, el: etree._Element) -> Hostdev:
    """One ``<hostdev>`` (usb and pci subsystem devices in detail; others by type)."""
    mode = el.get("mode", "subsystem")
    htype = el.get("type")
    if not htype:
        raise ctx.error(el, "<hostdev> has no type; use type='usb' or type='pci'")
    h = Hostdev(mode=mode, type=htype, managed=yes_no(ctx, el, "managed", False),
                driver=attr(child(el, "driver"), "name"), element=el)
    src = child(el, "source")
    if mode != "subsystem" or src is None:
        return h
    addr = child(src, "address")
    if htype == "usb":
        for name in ("vendor", "product"):
            sub = child(src, name)
            if sub is not None:
                if sub.get("id") is None:
                    raise ctx.error(sub, f"usb {name} needs an id attribute, e.g. id='0x1234'")
                setattr(h, name, int_attr(ctx, sub, "id", f"usb {name} id", base0=True,
                                          maximum=0xFFFF, too_large="{what} {value:#06x} is "
                                          "not a USB id; USB ids are at most 0xffff"))
        if (h.vendor is None) != (h.product is None):
            raise ctx.error(src, "usb hostdev needs both <vendor id=...> and <product id=...>")
        if addr is not None:
            for name in ("bus", "device"):
                if addr.get(name) is None:
                    raise ctx.error(addr, f"usb address needs a {name} attribute")
                setattr(h, name, int_attr(ctx, addr, name, f"usb {name}", base0=True))
        if h.vendor is None and h.bus is None:
            raise ctx.error(src, "usb hostdev needs <vendor>/<product> ids or "
                                 "<address bus=... device=...>")
    elif htype == "pci":
        if addr is None:
            raise ctx.error(src, "pci hostdev needs <address domain=... bus=... slot=... "
                                 "function=...>")
        for name, limit in PCI_ADDRESS_LIMITS.items():
            value = int_attr(ctx, addr, name, f"pci {name}", base0=True, maximum=limit,
                             too_large=f"Invalid PCI address {name}='{{value:#x}}', must be "
                                       f"<= {limit:#X}".replace("0X", "0x"))
            setattr(h, name, 0 if value is None else value)
    return h


@dataclass
class Input:
    """An ``<input>``; ``evdev`` is the host event device of passthrough/evdev inputs."""

    type: str
    bus: str | None = None
    evdev: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_input(ctx: ParseContext, el: etree._Element) -> Input:
    """One ``<input>``."""
    itype = el.get("type")
    if not itype:
        raise ctx.error(el, "<input> has no type; use e.g. type='tablet'")
    src = child(el, "source")
    return Input(type=itype, bus=el.get("bus"),
                 evdev=attr(src, "evdev") or attr(src, "dev"), element=el)


@dataclass
class Controller:
    """A ``<controller>``."""

    type: str | None
    index: int | None = None
    model: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)
    ports: int | None = None  #: ``ports=`` of a USB controller (xHCI port count)


def parse_controller(ctx: ParseContext, el: etree._Element) -> Controller:
    """One ``<controller>``."""
    ctype = el.get("type")
    index = int_attr(ctx, el, "index", "controller index", signed=True)
    if index is not None and index < 0:
        raise ctx.error(el, f"controller index {index} is negative; give index='0' or more")
    if ctype == "pci" and index is not None and index > MAX_PCI_CONTROLLER_INDEX:
        raise ctx.error(el, f"PCI controller index {index} too high, maximum is "
                            f"{MAX_PCI_CONTROLLER_INDEX}")
    ports = int_attr(ctx, el, "ports", "USB port count", maximum=15,
                     too_large="a USB controller has at most {maximum} ports, not {value}")
    return Controller(type=ctype, model=el.get("model"), element=el, index=index, ports=ports)


@dataclass
class Tpm:
    """A ``<tpm>``: ``backend`` passthrough (``device_path``) or emulator (swtpm)."""

    model: str | None
    backend: str | None
    device_path: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)
    #: the emulator's TPM version (``<backend version=...>``): "2.0" or "1.2"
    version: str | None = None


@dataclass
class Rng:
    """An ``<rng>``: ``backend_model`` random (``path``, the host entropy source) or egd."""

    model: str | None
    backend_model: str | None
    path: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


@dataclass
class Filesystem:
    """A ``<filesystem>`` shared into the guest (``source`` host dir, ``target`` tag)."""

    type: str
    source: str | None
    target: str | None
    accessmode: str | None = None
    readonly: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)


WATCHDOG_MODELS = ("i6300esb", "ib700", "diag288", "itco")
WATCHDOG_ACTIONS = ("reset", "shutdown", "poweroff", "pause", "dump", "none", "inject-nmi")


@dataclass
class Watchdog:
    """A ``<watchdog model=... action=...>`` (libvirt's default action: reset)."""

    model: str
    action: str = "reset"
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_watchdog(ctx: ParseContext, el: etree._Element) -> Watchdog:
    """One ``<watchdog>``."""
    model = el.get("model")
    if model not in WATCHDOG_MODELS:
        raise ctx.error(el, f"unknown watchdog model '{one_line(model or '', 40)}'; use one of "
                            f"{', '.join(WATCHDOG_MODELS)}")
    action = el.get("action", "reset")
    if action not in WATCHDOG_ACTIONS:
        raise ctx.error(el, f"unknown watchdog action '{one_line(action, 40)}'; use one of "
                            f"{', '.join(WATCHDOG_ACTIONS)}")
    return Watchdog(model=model, action=action, element=el)


@dataclass
class Devices:
    """Everything under ``<devices>``, in document order per kind."""

    emulator: str | None = None
    disks: list[Disk] = field(default_factory=list)
    chardevs: list[Chardev] = field(default_factory=list)
    graphics: list[Graphics] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    hostdevs: list[Hostdev] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=list)
    memballoon: str | None = None
    tpms: list[Tpm] = field(default_factory=list)
    rngs: list[Rng] = field(default_factory=list)
    filesystems: list[Filesystem] = field(default_factory=list)
    watchdogs: list[Watchdog] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    sounds: list[Sound] = field(default_factory=list)
    redirdevs: list[Redirdev] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)


#: display-related elements: tag → (Devices list, parser)
_DISPLAY_PARSERS = {"video": ("videos", parse_video), "sound": ("sounds", parse_sound),
                    "redirdev": ("redirdevs", parse_redirdev), "audio": ("audios", parse_audio)}


def _parse_misc(ctx: ParseContext, el: etree._Element, out: Devices) -> None:
    tag = el.tag
    if tag in _DISPLAY_PARSERS:
        name, parse = _DISPLAY_PARSERS[str(tag)]
        getattr(out, name).append(parse(ctx, el))  # type: ignore[operator]
    elif tag == "memballoon":
        if out.memballoon is None:
            model = el.get("model")
            if not model:
                raise ctx.error(el, "<memballoon> needs a model, e.g. model='virtio' or 'none'")
            out.memballoon = model
    elif tag == "tpm":
        be = child(el, "backend")
        out.tpms.append(Tpm(model=el.get("model"), backend=attr(be, "type"), element=el,
                            device_path=attr(child(be, "device"), "path")
                            if be is not None else None, version=attr(be, "version")))
    elif tag == "rng":
        be = child(el, "backend")
        text = "".join(be.itertext()).strip() if be is not None else ""
        src = child(be, "source") if be is not None else None
        out.rngs.append(Rng(model=el.get("model"), backend_model=attr(be, "model"),
                            path=text or attr(src, "path") or None, element=el))
    elif tag == "filesystem":
        src, tgt = child(el, "source"), child(el, "target")
        path = None
        if src is not None:
            path = src.get("dir") or src.get("file") or src.get("dev") or src.get("name")
        out.filesystems.append(Filesystem(
            type=el.get("type", "mount"), source=path, target=attr(tgt, "dir"),
            accessmode=el.get("accessmode"), readonly=child(el, "readonly") is not None,
            element=el))


def parse_devices(ctx: ParseContext, devices: etree._Element | None) -> Devices:
    """Parse ``<devices>``; unknown device elements are left to the tree."""
    out = Devices()
    if devices is None:
        return out
    out.emulator = child_text(devices, "emulator")
    targets: dict[str, etree._Element] = {}
    for el in devices:
        tag = el.tag
        if not isinstance(tag, str):
            continue
        if tag == "disk":
            disk = parse_disk(ctx, el)
            if disk.target in targets:
                raise ctx.error(el, f"disk target '{disk.target}' is used twice (also at line "
                                    f"{targets[disk.target].sourceline}); give each disk its "
                                    "own <target dev=...>")
            targets[disk.target] = el
            out.disks.append(disk)
        elif tag in CHARDEV_KINDS:
            out.chardevs.append(parse_chardev(ctx, el))
        elif tag == "graphics":
            out.graphics.append(parse_graphics(ctx, el))
        elif tag == "interface":
            out.interfaces.append(parse_interface(ctx, el))
        elif tag == "hostdev":
            out.hostdevs.append(parse_hostdev(ctx, el))
        elif tag == "input":
            out.inputs.append(parse_input(ctx, el))
        elif tag == "controller":
            out.controllers.append(parse_controller(ctx, el))
        elif tag == "watchdog":
            out.watchdogs.append(parse_watchdog(ctx, el))
        else:
            _parse_misc(ctx, el, out)
    number_controllers(out.controllers)
    return out


#: PCI controllers that are the root bus (always index 0)
PCI_ROOTS = frozenset({"pci-root", "pcie-root"})


def number_controllers(controllers: list[Controller]) -> None:
    """Give every controller without ``index=`` one, as libvirt does at parse time (virt-install
    writes none): a PCI root bus 0, any other controller the lowest index its type has free
    (PCI from 1: bus 0 is the root), in document order; written into the tree too."""
    used: dict[str | None, set[int]] = {}
    for c in controllers:
        if c.index is not None:
            used.setdefault(c.type, set()).add(c.index)
    for c in controllers:
        if c.index is not None:
            continue
        taken = used.setdefault(c.type, set())
        if c.type == "pci" and c.model in PCI_ROOTS:
            index = 0
        else:
            index = 1 if c.type == "pci" else 0
            while index in taken:
                index += 1
        taken.add(index)
        c.index = index
        if c.element is not None:
            c.element.set("index", str(index))
