"""The helper's own reader of domain XML: ``pyexpat`` (standard library, a C extension) and
nothing else, for the common domain definitions.

The helper runs on every start of a confined domain whose policy is not cached, and its
start-up is most of its time: the shared domain model (:mod:`vmconfine.domain`, lxml, ~20
dataclasses, ~40 regexes) and the resource list around it cost 4x virt-aa-helper's whole run
before any work is done (docs/performance.md, P2a). This module reads just what the rules are
made of: the name and UUID, the emulator, file and block disks without backing chains,
character devices, VNC sockets, inputs, entropy and TPM passthrough devices, filesystems,
interfaces and the firmware and kernel paths.

It is deliberately narrow. :func:`read` returns a :class:`View` only for a document it
understands completely: every element and attribute it meets is on its lists, with values it
checks the way the domain model checks them. Anything else (a DOCTYPE or entity, malformed
XML, a namespace other than vmconfine's state, a hostdev, a backing chain, hugepages, a value
the model would refuse, an element it does not know) raises :class:`Fallback`, and the helper
reads the XML with the full domain model as before — which also gives every refusal its usual
message. A test runs both readers over every domain of the test corpus: where this one answers,
the rules it leads to are byte-identical to the model's (tests/unit/test_aa_domxml.py).
"""

from __future__ import annotations

from pyexpat import ExpatError, ParserCreate

#: the namespace of vmconfine's runtime state (vmconfine.domain.state.VMCONFINE_NS)
STATE_NS = "https://vmconfine.dev/xmlns/1.0"
_NS_SEP = " "
BLANK = " \t\r\n"
MAX_NAME_BYTES = 200  # vmconfine.domain.model.MAX_NAME_BYTES
MAX_VCPUS = 4096  # vmconfine.domain.model.MAX_VCPUS
MAX_TCP_PORT = 65535
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
#: memory units whose value is a plain decimal count (vmconfine.domain.xml.unit_scale)
_UNITS = frozenset({None, "KiB", "k", "K", "KB", "MiB", "M", "MB", "GiB", "G", "GB"})
_BOOT_DEVS = ("fd", "cdrom", "hd", "network")
_CHARDEV_KINDS = ("serial", "console", "channel", "parallel")
#: chardev types whose source (if any) is read here; others fall back
_CHARDEV_TYPES = ("null", "vc", "pty", "dev", "file", "pipe", "stdio", "tcp", "unix")


class Fallback(Exception):
    """This reader does not cover the document; read it with the full domain model."""


class Element:
    """One element of the mini tree: tag (``"URI local"`` when namespaced), attributes,
    children, text (all character data directly inside), and whether it held a comment or
    processing instruction."""

    __slots__ = ("attrs", "children", "other", "tag", "text")

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[Element] = []
        self.text = ""
        self.other = False

    def child(self, tag: str) -> Element | None:
        for c in self.children:
            if c.tag == tag:
                return c
        return None

    def only(self, attrs: tuple[str, ...] = (), children: tuple[str, ...] = ()) -> None:
        """Fall back unless every attribute and child element is one of those named."""
        for a in self.attrs:
            if a not in attrs:
                raise Fallback(f"<{self.tag} {a}=...>")
        for c in self.children:
            if c.tag not in children:
                raise Fallback(f"<{self.tag}><{c.tag}>")

    def leaf_text(self) -> str:
        """The text of an element that must hold text only (the model's ``itertext``)."""
        if self.children or self.other:
            raise Fallback(f"<{self.tag}> with mixed content")
        return self.text


def parse(data: bytes) -> Element:
    """The mini tree of ``data``; DOCTYPEs, entities and malformed XML fall back (the domain
    model refuses them with its own messages)."""
    parser = ParserCreate(None, _NS_SEP)
    stack: list[Element] = []
    roots: list[Element] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        el = Element(tag, attrs)
        if stack:
            stack[-1].children.append(el)
        else:
            roots.append(el)
        stack.append(el)

    def end(tag: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].text += text

    def other(*_: object) -> None:
        if stack:
            stack[-1].other = True

    def refuse(*_: object) -> None:
        raise Fallback("DOCTYPE or entity")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.CommentHandler = other
    parser.ProcessingInstructionHandler = other
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.SkippedEntityHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.SetParamEntityParsing(0)
    if b"\x00" in data:
        raise Fallback("NUL byte")
    try:
        parser.Parse(data, True)
    except ExpatError:
        raise Fallback("malformed XML") from None
    if len(roots) != 1:
        raise Fallback("no root element")
    return roots[0]


# ---- the view: what the rules need, with the domain model's attribute names ------------------


class Source:
    """A disk's image (``StorageSource``): no backing chain here."""

    __slots__ = ("format", "path", "type")

    def __init__(self, type: str, path: str, format: str) -> None:
        self.type, self.path, self.format = type, path, format


class Disk:
    __slots__ = ("device", "readonly", "shareable", "source", "target", "type")

    def __init__(self, type: str, device: str, target: str, source: Source | None,
                 readonly: bool, shareable: bool) -> None:
        self.type, self.device, self.target, self.source = type, device, target, source
        self.readonly, self.shareable = readonly, shareable


class Chardev:
    __slots__ = ("kind", "log_file", "mode", "path", "target_type", "type")

    def __init__(self, kind: str, type: str, path: str | None, mode: str | None,
                 target_type: str | None, log_file: str | None) -> None:
        self.kind, self.type, self.path, self.mode = kind, type, path, mode
        self.target_type, self.log_file = target_type, log_file


class Loader:
    __slots__ = ("path", "readonly", "type")

    def __init__(self, path: str | None, type: str | None, readonly: bool) -> None:
        self.path, self.type, self.readonly = path, type, readonly


class View:
    """What the helper's rules are made of (attribute names as in ``vmconfine.domain``):
    ``inputs`` are evdev paths, ``rngs`` host entropy paths (``<backend model='random'>``),
    ``tpms`` passthrough device paths, ``graphics`` VNC sockets, ``filesystems`` (source,
    readonly) of mount filesystems, ``interfaces`` (type, model)."""

    __slots__ = (
        "chardevs",
        "disks",
        "dtb",
        "emulator",
        "filesystems",
        "graphics",
        "initrd",
        "inputs",
        "interfaces",
        "kernel",
        "loader",
        "name",
        "nvram",
        "rngs",
        "tpms",
        "uuid",
        "virt_type",
    )

    def __init__(self) -> None:
        self.name = self.uuid = self.virt_type = ""
        self.emulator: str | None = None
        self.disks: list[Disk] = []
        self.chardevs: list[Chardev] = []
        self.inputs: list[str] = []
        self.rngs: list[str] = []
        self.tpms: list[str] = []
        self.graphics: list[str] = []
        self.filesystems: list[tuple[str, bool]] = []
        self.interfaces: list[tuple[str, str | None]] = []
        self.loader: Loader | None = None
        self.nvram = self.kernel = self.initrd = self.dtb = None  # type: str | None


def _text(el: Element | None) -> str | None:
    """``child_text``: the text, None when absent or empty."""
    return (el.leaf_text() or None) if el is not None else None


def _count(text: str, what: str) -> int:
    """A plain decimal count (blanks around allowed), else fall back."""
    s = text.strip(BLANK)
    if not s or not set(s) <= _DIGITS or len(s) > 12:
        raise Fallback(what)
    return int(s)


def _yes_no(el: Element, name: str) -> bool:
    value = el.attrs.get(name)
    if value is None or value == "no":
        return False
    if value == "yes":
        return True
    raise Fallback(f"{name}='{value}'")


def _uuid(text: str) -> str:
    s = text.strip(BLANK)
    if len(s) == 36 and all(s[i] == "-" for i in (8, 13, 18, 23)):
        s = s.replace("-", "")
    if len(s) != 32 or not set(s) <= _HEX:
        raise Fallback("uuid form")
    s = s.lower()
    return f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}"


def _memory(el: Element | None) -> int:
    if el is None:
        return 0
    el.only(("unit",))
    if el.attrs.get("unit") not in _UNITS:
        raise Fallback("memory unit")
    return _count(el.leaf_text(), "memory")


def _name(el: Element | None) -> str:
    name = _text(el)
    if name is None or "/" in name or "\n" in name or name.startswith(".") or \
            len(name.encode()) > MAX_NAME_BYTES:
        raise Fallback("name")
    return name


def _os(view: View, el: Element | None) -> None:
    if el is None:
        raise Fallback("no <os>")
    el.only(("firmware",), ("type", "boot", "loader", "nvram", "kernel", "initrd", "cmdline",
                            "dtb"))
    t = el.child("type")
    if t is None or (_text(t) or "").strip() != "hvm":
        raise Fallback("os type")
    t.only(("arch", "machine"))
    for boot in el.children:
        if boot.tag == "boot":
            boot.only(("dev",))
            if boot.attrs.get("dev") not in _BOOT_DEVS:
                raise Fallback("boot dev")
    loader = el.child("loader")
    if loader is not None:
        loader.only(("readonly", "type", "secure"))
        _yes_no(loader, "secure")
        view.loader = Loader(_text(loader), loader.attrs.get("type"),
                             _yes_no(loader, "readonly"))
    nvram = el.child("nvram")
    if nvram is not None:
        nvram.only(("template",))
        view.nvram = nvram.leaf_text() or None
    view.kernel, view.initrd = _text(el.child("kernel")), _text(el.child("initrd"))
    view.dtb = _text(el.child("dtb"))
    _text(el.child("cmdline"))


def _disk(el: Element, targets: set[str]) -> Disk:
    el.only(("type", "device"), ("driver", "source", "target", "readonly", "shareable",
                                 "serial", "address", "alias"))
    dtype, device = el.attrs.get("type", "file"), el.attrs.get("device", "disk")
    if dtype not in ("file", "block") or device not in ("disk", "cdrom", "floppy"):
        raise Fallback("disk type")
    tgt = el.child("target")
    target = tgt.attrs.get("dev") if tgt is not None else None
    if tgt is None or not target or target in targets:
        raise Fallback("disk target")
    tgt.only(("dev", "bus"))
    targets.add(target)
    drv = el.child("driver")
    fmt = None
    if drv is not None:
        drv.only(("name", "type"))
        fmt = drv.attrs.get("type")
    if fmt not in (None, "raw", "iso"):
        raise Fallback("disk format")  # a backing chain may follow (resolved by the model)
    source = None
    src = el.child("source")
    if src is not None:
        attr = "file" if dtype == "file" else "dev"
        src.only((attr,))
        path = src.attrs.get(attr)
        if path:
            source = Source(dtype, path, fmt or "raw")
    if source is None and device == "disk":
        raise Fallback("disk without source")
    for flag in ("readonly", "shareable"):
        c = el.child(flag)
        if c is not None:
            c.only()
    _text(el.child("serial"))
    return Disk(dtype, device, target, source,
                el.child("readonly") is not None or device == "cdrom",
                el.child("shareable") is not None)


def _chardev(el: Element) -> Chardev:
    el.only(("type",), ("source", "target", "log", "protocol", "address", "alias"))
    ctype = el.attrs.get("type", "pty")
    if ctype not in _CHARDEV_TYPES:
        raise Fallback("chardev type")
    sources = [c for c in el.children if c.tag == "source"]
    if len(sources) > 1:
        raise Fallback("several chardev sources")
    src = sources[0] if sources else None
    path = mode = None
    if src is not None:
        src.only(("path", "mode", "host", "service"))
        path = src.attrs.get("path") or None
        mode = src.attrs.get("mode")
    if ctype in ("unix", "tcp"):
        mode = mode or "connect"
        if mode not in ("bind", "connect"):
            raise Fallback("chardev mode")
    else:
        mode = None
    if ctype in ("file", "pipe", "dev", "unix") and not path:
        raise Fallback("chardev without path")  # refused, or a generated channel path
    tgt = el.child("target")
    target_type = None
    if tgt is not None:
        tgt.only(("type", "port", "name"))
        if "port" in tgt.attrs:
            _count(tgt.attrs["port"], "chardev port")
        target_type = tgt.attrs.get("type")
    log = el.child("log")
    log_file = None
    if log is not None:
        log.only(("file",))
        log_file = log.attrs.get("file")
    return Chardev(el.tag, ctype, path, mode, target_type, log_file)


def _port(value: str | None) -> None:
    if value is not None and value != "-1" and _count(value, "port") > MAX_TCP_PORT:
        raise Fallback("port")


def _graphics(el: Element) -> str | None:
    """A VNC or SPICE display; the VNC socket QEMU listens on (None: none)."""
    el.only(("type", "port", "autoport", "listen", "socket", "keymap"), ("listen",))
    gtype = el.attrs.get("type")
    if gtype not in ("vnc", "spice"):
        raise Fallback("graphics type")
    _port(el.attrs.get("port"))
    _yes_no(el, "autoport")
    socket = el.attrs.get("socket") or None
    listen = el.attrs.get("listen")
    for i, c in enumerate(el.children):
        c.only(("type", "address", "socket"))
        ltype = c.attrs.get("type")
        if ltype not in ("address", "socket"):
            raise Fallback("graphics listen type")
        if i:
            continue
        if ltype == "address":
            addr = c.attrs.get("address")
            if listen and addr and addr != listen:
                raise Fallback("graphics listen mismatch")  # refused by the model
        else:
            socket = c.attrs.get("socket") or socket
    return socket if gtype == "vnc" else None


def _seclabels(labels: list[Element]) -> None:
    """Domain ``<seclabel>``s (the live XML the driver sends carries the stack's labels):
    the domain model's rules, for explicit types and models only; anything else falls back."""
    models: set[str] = set()
    for el in labels:
        el.only(("type", "model", "relabel"), ("label", "imagelabel", "baselabel"))
        stype, model = el.attrs.get("type"), el.attrs.get("model")
        if stype not in ("dynamic", "static", "none") or not model or model == "none" or \
                model in models:
            raise Fallback("seclabel")
        models.add(model)
        relabel = el.attrs.get("relabel")
        if relabel not in (None, "yes", "no"):
            raise Fallback("seclabel relabel")
        relabel_on = relabel == "yes" or (relabel is None and stype == "dynamic")
        texts = {}
        for c in el.children:
            c.only()
            texts.setdefault(c.tag, c.leaf_text())
        if (stype == "dynamic" and not relabel_on) or (stype == "none" and relabel_on) or \
                (stype == "static" and not texts.get("label")) or \
                ("baselabel" in texts and stype != "dynamic"):
            raise Fallback("seclabel combination")  # refused by the model


def _device(view: View, el: Element, targets: set[str]) -> None:
    tag = el.tag
    if el.child("boot") is not None:
        raise Fallback("per-device boot order")  # checked against <os><boot> by the model
    if tag == "disk":
        view.disks.append(_disk(el, targets))
    elif tag in _CHARDEV_KINDS:
        view.chardevs.append(_chardev(el))
    elif tag == "emulator":
        el.only()
    elif tag == "interface":
        if not el.attrs.get("type"):
            raise Fallback("interface type")
        model = el.child("model")
        view.interfaces.append((el.attrs["type"], model.attrs.get("type")
                                if model is not None else None))
    elif tag == "input":
        if not el.attrs.get("type"):
            raise Fallback("input type")
        src = el.child("source")
        evdev = (src.attrs.get("evdev") or src.attrs.get("dev")) if src is not None else None
        if evdev:
            view.inputs.append(evdev)
    elif tag == "rng":
        be = el.child("backend")
        path = None
        if be is not None:
            text = be.leaf_text().strip()
            path = text or None
            if be.attrs.get("model") == "random" and path:
                view.rngs.append(path)
    elif tag == "tpm":
        be = el.child("backend")
        if be is not None and be.attrs.get("type") == "emulator":
            raise Fallback("TPM emulator")  # swtpm's child profile needs the instance
        dev = be.child("device") if be is not None else None
        if be is not None and be.attrs.get("type") == "passthrough" and dev is not None and \
                dev.attrs.get("path"):
            view.tpms.append(dev.attrs["path"])
    elif tag == "filesystem":
        src = el.child("source")
        path = None
        if src is not None:
            a = src.attrs
            path = a.get("dir") or a.get("file") or a.get("dev") or a.get("name")
        if el.attrs.get("type", "mount") == "mount" and path:
            view.filesystems.append((path, el.child("readonly") is not None))
    elif tag == "controller":
        el.only(("type", "index", "model"), ("address", "alias", "model", "target", "driver"))
        if "index" in el.attrs and _count(el.attrs["index"], "controller index") > 255:
            raise Fallback("controller index")  # a PCI index above 255 is refused
    elif tag == "graphics":
        socket = _graphics(el)
        if socket:
            view.graphics.append(socket)
    elif tag == "memballoon":
        if not el.attrs.get("model"):
            raise Fallback("memballoon model")
    elif tag not in ("video", "sound"):
        raise Fallback(f"<{tag}>")


def read(data: bytes) -> View:
    """The view of ``data``, or :class:`Fallback`."""
    root = parse(data)
    if root.tag != "domain":
        raise Fallback("root element")
    root.only(("type",), ("name", "uuid", "title", "description", "metadata", "memory",
                          "currentMemory", "vcpu", "os", "features", "clock", "on_poweroff",
                          "on_reboot", "on_crash", "devices", "seclabel"))
    view = View()
    virt_type = root.attrs.get("type")
    if virt_type not in ("qemu", "kvm"):
        raise Fallback("domain type")
    view.virt_type = virt_type
    view.name = _name(root.child("name"))
    uuid = _text(root.child("uuid"))
    if uuid is None:
        raise Fallback("no uuid")
    view.uuid = _uuid(uuid)
    for tag in ("title", "description"):
        _text(root.child(tag))
    if not _memory(root.child("memory")):
        raise Fallback("no memory")
    _memory(root.child("currentMemory"))
    vcpu = root.child("vcpu")
    if vcpu is not None:
        vcpu.only(("placement", "current"))
        count = _count(vcpu.leaf_text(), "vcpu")
        current = _count(vcpu.attrs["current"], "vcpu") if "current" in vcpu.attrs else count
        if not 0 < current <= count <= MAX_VCPUS or vcpu.attrs.get("placement") not in (
                None, "static"):
            raise Fallback("vcpu")
    _os(view, root.child("os"))
    for c in root.children:
        if c.tag == "metadata":
            for m in c.children:  # vmconfine's own state only (written by vmconfine)
                if m.tag != f"{STATE_NS}{_NS_SEP}state":
                    raise Fallback("metadata")
        elif c.tag == "features":
            c.only((), ("acpi", "apic", "pae"))
            for f in c.children:
                f.only()
        elif c.tag == "clock":
            c.only(("offset",))
            if c.attrs.get("offset") not in ("utc", "localtime"):
                raise Fallback("clock")
        elif c.tag in ("on_poweroff", "on_reboot", "on_crash"):
            if c.leaf_text() not in ("destroy", "restart"):
                raise Fallback("lifecycle action")
    _seclabels([c for c in root.children if c.tag == "seclabel"])
    devices = root.child("devices")
    if devices is not None:
        if devices.attrs:
            raise Fallback("<devices> attributes")
        view.emulator = _text(devices.child("emulator"))
        targets: set[str] = set()
        for el in devices.children:
            _device(view, el, targets)
    return view


__all__ = ["Fallback", "View", "read"]
