"""Device views of libvirt domain XML (the ``<devices>`` part of :mod:`vmconfine.domain`).

Every view is a plain dataclass filled from the lxml tree at parse time; ``element`` keeps the
source element so callers can look at anything vmconfine does not model. Paths are kept exactly
as written (never resolved): the drivers resolve them.

Defaults follow libvirt's ``domain_conf.c``: a disk without ``type`` is a file disk, without
``device`` a plain disk, a cdrom is always read-only, the bus comes from the target name; a
character device without ``type`` is a pty; unix/tcp sources connect unless ``mode='bind'``; a
VNC display without ``port`` (or with ``port='-1'``) uses autoport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

from vmconfine.errors import XMLError

MAX_BACKING_DEPTH = 200
"""libvirt refuses backing chains deeper than this (status XML nesting limit)."""

DISK_TYPES = ("file", "block", "dir", "network", "volume", "nvme", "vhostuser", "vhostvdpa")
DISK_DEVICES = ("disk", "cdrom", "floppy", "lun")
_DISK_PATH_ATTR = {"file": "file", "block": "dev", "dir": "dir", "vhostuser": "path",
                   "vhostvdpa": "dev"}
_BUS_PREFIXES = (("hd", "ide"), ("sd", "scsi"), ("vd", "virtio"), ("xvd", "xen"), ("ubd", "uml"))
CHARDEV_KINDS = ("serial", "console", "channel", "parallel")
CHARDEV_TYPES = ("null", "vc", "pty", "dev", "file", "pipe", "stdio", "udp", "tcp", "unix",
                 "spicevmc", "spiceport", "nmdm", "qemu-vdagent", "dbus")
INTERFACE_SOURCE_ATTR = {"network": "network", "bridge": "bridge", "direct": "dev",
                         "vhostuser": "path", "vdpa": "dev", "server": "address",
                         "client": "address", "mcast": "address", "udp": "address"}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with control characters escaped (so a message stays on one line), cut at
    ``limit`` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def xml_error(source: str, line: int, what: str) -> XMLError:
    """``XMLError("<source>: line N: <what>")``, always a single line."""
    return XMLError(f"{one_line(source, 200)}: line {line}: {one_line(what, 500)}")


class ParseContext:
    """Where a parse is: the source name (for messages) and live vs inactive rules."""

    def __init__(self, source: str, live: bool) -> None:
        self.source = source
        self.live = live

    def error(self, elem: etree._Element | None, what: str) -> XMLError:
        """``XMLError("<source>: line N: <what>")`` pointing at ``elem``."""
        return xml_error(self.source, getattr(elem, "sourceline", None) or 1, what)


def children(elem: etree._Element, tag: str) -> list[etree._Element]:
    """Direct element children named ``tag`` (no namespace)."""
    return [c for c in elem if c.tag == tag]


def child(elem: etree._Element, tag: str) -> etree._Element | None:
    """First direct element child named ``tag``."""
    for c in elem:
        if c.tag == tag:
            return c
    return None


def child_text(elem: etree._Element, tag: str) -> str | None:
    """Text of the first ``tag`` child; None when absent or empty (libvirt's virXPathString)."""
    c = child(elem, tag)
    if c is None:
        return None
    text = "".join(c.itertext())
    return text or None


def attr(elem: etree._Element | None, name: str) -> str | None:
    """Attribute value, or None when the element or attribute is absent."""
    return None if elem is None else elem.get(name)


_C_UINT = re.compile(r"[ \t\r\n]*\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|0(?P<oct>[0-7]*)"
                     r"|(?P<dec>[1-9][0-9]*))[ \t\r\n]*")
_DEC_INT = re.compile(r"[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*")


def parse_c_uint(text: str) -> int | None:
    """Parse like C ``strtoul(s, &end, 0)`` with a full match: 0x = hex, leading 0 = octal."""
    m = _C_UINT.fullmatch(text)
    if m is None:
        return None
    if m["hex"] is not None:
        return int(m["hex"], 16)
    if m["oct"] is not None:
        return int(m["oct"] or "0", 8)
    return int(m["dec"], 10)


def parse_dec_int(text: str) -> int | None:
    """A plain decimal integer (ASCII digits, optional sign and surrounding blanks)."""
    return int(text) if _DEC_INT.fullmatch(text) else None


def int_attr(ctx: ParseContext, elem: etree._Element, name: str, what: str, *,
             base0: bool = False, signed: bool = False) -> int | None:
    """Integer attribute (None when absent); a clear error when it is not a number."""
    raw = elem.get(name)
    if raw is None:
        return None
    value: int | None
    if base0:
        value = parse_c_uint(raw)
    else:
        value = parse_dec_int(raw)
        if value is not None and value < 0 and not signed:
            value = None
    if value is None:
        kind = "an integer" if signed else "a non-negative integer"
        raise ctx.error(elem, f"{what} '{one_line(raw, 40)}' is not {kind}; fix the {name}= "
                              "attribute")
    return value


def yes_no(ctx: ParseContext, elem: etree._Element, name: str, default: bool) -> bool:
    """A yes/no attribute (libvirt's virStringParseYesNo)."""
    raw = elem.get(name)
    if raw is None:
        return default
    if raw not in ("yes", "no"):
        raise ctx.error(elem, f"invalid {name} value '{one_line(raw, 40)}' on <{elem.tag}>; "
                              "use 'yes' or 'no'")
    return raw == "yes"


# --------------------------------------------------------------------------- seclabels


@dataclass
class DeviceSecLabel:
    """Per-source ``<seclabel>`` override: ``model``, ``relabel`` (libvirt's default: True),
    ``label`` (owner/context to use instead of the domain's image label)."""

    model: str | None
    relabel: bool
    label: str | None
    labelskip: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def find_device_seclabel(labels: list[DeviceSecLabel], model: str) -> DeviceSecLabel | None:
    """The override for ``model``: an exact model match, else one without a model."""
    for sl in labels:
        if sl.model == model:
            return sl
    for sl in labels:
        if sl.model is None:
            return sl
    return None


def parse_device_seclabels(ctx: ParseContext, source: etree._Element | None,
                           ) -> list[DeviceSecLabel]:
    """``<seclabel>`` children of a ``<source>`` (libvirt virSecurityDeviceLabelDefParseXML)."""
    if source is None:
        return []
    out: list[DeviceSecLabel] = []
    for el in children(source, "seclabel"):
        model = el.get("model")
        if model is not None and any(o.model == model for o in out):
            raise ctx.error(el, f"seclabel for model '{model}' is already provided; "
                                "keep one <seclabel> per model")
        relabel = yes_no(ctx, el, "relabel", True)
        label = child_text(el, "label")
        if label is not None and not relabel:
            raise ctx.error(el, "cannot specify a <label> when relabel='no' "
                                f"(model {model or 'unset'}); drop one of them")
        skip = ctx.live and yes_no(ctx, el, "labelskip", False)
        out.append(DeviceSecLabel(model, relabel, label, skip, el))
    return out


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
        cache=attr(drv, "cache"), transient=child(el, "transient") is not None, element=el)


# --------------------------------------------------------------------------- chardevs


@dataclass
class Chardev:
    """A serial/console/channel/parallel device and its host side."""

    kind: str
    type: str
    path: str | None = None
    mode: str | None = None
    target_type: str | None = None
    target_name: str | None = None
    target_port: int | None = None
    seclabels: list[DeviceSecLabel] = field(default_factory=list)
    host: str | None = None
    service: str | None = None
    log_file: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    def seclabel(self, model: str) -> DeviceSecLabel | None:
        """The source's override for ``model``."""
        return find_device_seclabel(self.seclabels, model)


def parse_chardev(ctx: ParseContext, el: etree._Element) -> Chardev:
    """One ``<serial>``, ``<console>``, ``<channel>`` or ``<parallel>``."""
    kind = str(el.tag)
    ctype = el.get("type", "pty")
    if ctype not in CHARDEV_TYPES:
        raise ctx.error(el, f"unknown <{kind}> type '{ctype}'; expected one of "
                            f"{', '.join(CHARDEV_TYPES)}")
    sources = children(el, "source")
    with_path = next((s for s in sources if s.get("path")), None)
    first = with_path if with_path is not None else (sources[0] if sources else None)
    path = attr(with_path, "path")
    tgt = child(el, "target")
    dev = Chardev(kind=kind, type=ctype, path=path, target_type=attr(tgt, "type"),
                  target_name=attr(tgt, "name"), element=el,
                  target_port=int_attr(ctx, tgt, "port", f"<{kind}> target port")
                  if tgt is not None else None,
                  log_file=attr(child(el, "log"), "file"))
    if ctype in ("unix", "tcp"):
        mode = attr(first, "mode") or "connect"
        if mode not in ("bind", "connect"):
            raise ctx.error(first, f"unknown <{kind}> source mode '{mode}'; "
                                   "use 'bind' or 'connect'")
        dev.mode = mode
    if ctype in ("tcp", "udp"):
        dev.host, dev.service = attr(first, "host"), attr(first, "service")
    if ctype in ("file", "pipe", "dev") and not path:
        raise ctx.error(el, f"<{kind} type='{ctype}'> needs <source path=...>")
    if ctype == "unix" and not path and dev.target_type not in ("virtio", "xen"):
        raise ctx.error(el, f"<{kind} type='unix'> needs <source path=...> "
                            "(only virtio channels get a generated path)")
    for src in sources:
        labels = parse_device_seclabels(ctx, src)
        if labels:
            dev.seclabels = labels
            break
    return dev


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
    return g


@dataclass
class Interface:
    """A ``<interface>``: ``source`` is the network/bridge/device/socket it attaches to."""

    type: str
    model: str | None = None
    mac: str | None = None
    source: str | None = None
    target_dev: str | None = None
    script: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_interface(ctx: ParseContext, el: etree._Element) -> Interface:
    """One ``<interface>``."""
    itype = el.get("type")
    if not itype:
        raise ctx.error(el, "<interface> has no type; use e.g. type='user' or type='network'")
    src_attr = INTERFACE_SOURCE_ATTR.get(itype)
    return Interface(type=itype, model=attr(child(el, "model"), "type"),
                     mac=attr(child(el, "mac"), "address"),
                     source=attr(child(el, "source"), src_attr) if src_attr else None,
                     target_dev=attr(child(el, "target"), "dev"),
                     script=attr(child(el, "script"), "path"), element=el)


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
                setattr(h, name, int_attr(ctx, sub, "id", f"usb {name} id", base0=True))
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
        for name in ("domain", "bus", "slot", "function"):
            value = int_attr(ctx, addr, name, f"pci {name}", base0=True)
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


def parse_controller(ctx: ParseContext, el: etree._Element) -> Controller:
    """One ``<controller>``."""
    return Controller(type=el.get("type"), model=el.get("model"), element=el,
                      index=int_attr(ctx, el, "index", "controller index"))


@dataclass
class Tpm:
    """A ``<tpm>``: ``backend`` passthrough (``device_path``) or emulator (swtpm)."""

    model: str | None
    backend: str | None
    device_path: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


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


def _parse_misc(ctx: ParseContext, el: etree._Element, out: Devices) -> None:
    tag = el.tag
    if tag == "memballoon":
        if out.memballoon is None:
            model = el.get("model")
            if not model:
                raise ctx.error(el, "<memballoon> needs a model, e.g. model='virtio' or 'none'")
            out.memballoon = model
    elif tag == "tpm":
        be = child(el, "backend")
        out.tpms.append(Tpm(model=el.get("model"), backend=attr(be, "type"), element=el,
                            device_path=attr(child(be, "device"), "path")
                            if be is not None else None))
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
        else:
            _parse_misc(ctx, el, out)
    return out
