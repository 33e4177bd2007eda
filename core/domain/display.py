"""SPICE, video, sound and USB redirection in libvirt domain XML (part of
:mod:`vmconfine.domain.devices`): what ``virt-install --graphics spice`` writes.

* :class:`SpiceOptions`: the SPICE-only part of a ``<graphics type='spice'>`` (TLS port,
  password, channel modes, ``<image>``/``<jpeg>``/``<zlib>``/``<playback>`` compression,
  ``<streaming>``, ``<clipboard>``, ``<filetransfer>``, ``<mouse>``, ``<gl>``), values checked
  against libvirt's enums when the XML is read;
* :class:`Video` (``<video><model type ram vram vgamem heads primary>``, with libvirt's QXL
  defaults), :class:`Sound` (``<sound model>`` and its ``<audio id>``), :class:`Audio`
  (``<audio id type>``), :class:`Redirdev` (``<redirdev bus type>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.xml import ParseContext, attr, child, children, int_attr, one_line

#: libvirt's virDomainGraphicsSpiceChannelName
SPICE_CHANNELS = ("main", "display", "inputs", "cursor", "playback", "record", "smartcard",
                  "usbredir")
SPICE_MODES = ("any", "secure", "insecure")
#: element → (attribute, libvirt's values)
SPICE_ENUMS = {
    "image": ("compression", ("auto_glz", "auto_lz", "quic", "glz", "lz", "off")),
    "jpeg": ("compression", ("auto", "never", "always")),
    "zlib": ("compression", ("auto", "never", "always")),
    "playback": ("compression", ("on", "off")),
    "streaming": ("mode", ("filter", "all", "off")),
    "mouse": ("mode", ("server", "client")),
}
#: libvirt's QXL defaults in KiB (qemuDomainDeviceVideoDefPostParse / virDomainVideoDefaultRAM)
QXL_DEFAULTS = {"ram": 65536, "vram": 65536, "vgamem": 16384}


@dataclass
class SpiceOptions:
    """The SPICE-only settings of one ``<graphics type='spice'>``.

    ``tls_port``: -1 = allocate at start, None = none or decided at start (autoport: by the
    channel modes and ``spice_tls``, as libvirt's qemuProcessSPICEAllocatePorts); ``passwd``: the
    ticket (None = none); ``channels``: channel name → 'secure'/'insecure'/'any';
    ``compression``: ``SPICE_ENUMS`` element → value; ``copypaste``, ``filetransfer``,
    ``gl``: None when not given."""

    tls_port: int | None = None
    passwd: str | None = None
    default_mode: str = "any"
    channels: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    copypaste: bool | None = None
    filetransfer: bool | None = None
    gl: bool | None = None


def _yes_no(ctx: ParseContext, el: etree._Element | None, name: str) -> bool | None:
    value = attr(el, name)
    if value is None:
        return None
    if value not in ("yes", "no"):
        assert el is not None
        raise ctx.error(el, f"invalid {name} value '{one_line(value, 40)}' on <{el.tag}>; use "
                            "'yes' or 'no'")
    return value == "yes"


def _enum(ctx: ParseContext, el: etree._Element, name: str, values: tuple[str, ...],
          what: str) -> str | None:
    value = el.get(name)
    if value is not None and value not in values:
        raise ctx.error(el, f"unknown {what} '{one_line(value, 40)}'; use one of "
                            f"{', '.join(values)}")
    return value


def parse_spice(ctx: ParseContext, el: etree._Element, autoport: bool) -> SpiceOptions:
    """The SPICE part of ``<graphics type='spice'>`` (``autoport``: its port is allocated)."""
    tls = int_attr(ctx, el, "tlsPort", "spice tlsPort", signed=True)
    if tls is not None and tls > 65535:
        raise ctx.error(el, f"spice tlsPort must be in range [5900,65535], not {tls}")
    if (autoport and not ctx.live) or tls == 0:
        tls = None  # autoport: whether a TLS port is needed is decided at start
    opts = SpiceOptions(tls_port=tls, passwd=el.get("passwd"),
                        default_mode=_enum(ctx, el, "defaultMode", SPICE_MODES,
                                           "spice defaultMode") or "any")
    for ch in children(el, "channel"):
        name = _enum(ctx, ch, "name", SPICE_CHANNELS, "spice channel")
        mode = _enum(ctx, ch, "mode", SPICE_MODES, "spice channel mode")
        if not name or not mode:
            raise ctx.error(ch, "a spice <channel> needs name= and mode=, e.g. "
                                "<channel name='main' mode='secure'/>")
        opts.channels[name] = mode
    for tag, (name, values) in SPICE_ENUMS.items():
        sub = child(el, tag)
        if sub is not None:
            value = _enum(ctx, sub, name, values, f"spice {tag} {name}")
            if value is not None:
                opts.settings[tag] = value
    opts.copypaste = _yes_no(ctx, child(el, "clipboard"), "copypaste")
    opts.filetransfer = _yes_no(ctx, child(el, "filetransfer"), "enable")
    opts.gl = _yes_no(ctx, child(el, "gl"), "enable")
    return opts


@dataclass
class Video:
    """A ``<video>``: ``model`` ('cirrus' when not given, libvirt's x86 default); sizes in KiB
    (QXL's libvirt defaults filled in), ``heads``, ``primary``."""

    model: str
    ram: int | None = None
    vram: int | None = None
    vram64: int | None = None
    vgamem: int | None = None
    heads: int | None = None
    primary: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_video(ctx: ParseContext, el: etree._Element) -> Video:
    """One ``<video>``."""
    model = child(el, "model")
    if model is None:
        return Video(model="cirrus", element=el)
    vtype = model.get("type") or "cirrus"
    sizes = {name: int_attr(ctx, model, name, f"video {name}")
             for name in ("ram", "vram", "vram64", "vgamem", "heads")}
    if vtype == "qxl":
        for name, default in QXL_DEFAULTS.items():
            if sizes[name] is None:
                sizes[name] = default
        if sizes["heads"] is None:
            sizes["heads"] = 1
    if sizes["heads"] == 0:
        raise ctx.error(model, "video heads must be 1 or more")
    return Video(model=vtype, primary=_yes_no(ctx, model, "primary") or False, element=el,
                 **sizes)


@dataclass
class Audio:
    """An ``<audio id type>`` backend."""

    id: int
    type: str
    element: etree._Element | None = field(default=None, repr=False, compare=False)


@dataclass
class Sound:
    """A ``<sound model>``; ``audio``: the ``<audio id>`` backend it plays to (None: the
    first one)."""

    model: str
    audio: int | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


@dataclass
class Redirdev:
    """A ``<redirdev bus type>`` (USB redirection)."""

    bus: str
    type: str
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_audio(ctx: ParseContext, el: etree._Element) -> Audio:
    """One top-level ``<audio>``."""
    audio_id = int_attr(ctx, el, "id", "audio id")
    if not audio_id:
        raise ctx.error(el, "<audio> needs an id of 1 or more, e.g. <audio id='1' "
                            "type='spice'/>")
    atype = el.get("type")
    if not atype:
        raise ctx.error(el, "<audio> needs a type, e.g. type='spice' or type='none'")
    return Audio(id=audio_id, type=atype, element=el)


def parse_sound(ctx: ParseContext, el: etree._Element) -> Sound:
    """One ``<sound>``."""
    model = el.get("model")
    if not model:
        raise ctx.error(el, "<sound> needs a model, e.g. model='ich9'")
    audio = child(el, "audio")
    return Sound(model=model, element=el,
                 audio=int_attr(ctx, audio, "id", "sound audio id") if audio is not None
                 else None)


def parse_redirdev(ctx: ParseContext, el: etree._Element) -> Redirdev:
    """One ``<redirdev>``."""
    bus = el.get("bus", "usb")
    rtype = el.get("type")
    if not rtype:
        raise ctx.error(el, "<redirdev> needs a type, e.g. type='spicevmc'")
    return Redirdev(bus=bus, type=rtype, element=el)


def spice_tls_port(graphics: list) -> int | None:
    """The TLS port of the domain's SPICE display once allocated (None: no TLS port, or a
    unix socket): QEMU then reads ``spice_tls_x509_cert_dir``."""
    for g in graphics:
        spice = getattr(g, "spice", None)
        if g.type == "spice" and spice is not None and not g.socket and spice.tls_port:
            return int(spice.tls_port)
    return None


def drop_allocated_ports(root: etree._Element) -> None:
    """Remove the ports allocated at start from an autoport display (libvirt's inactive XML
    has none: they are allocated again at the next start; a VNC autoport shows ``-1``)."""
    for devices in (c for c in root if c.tag == "devices"):
        for g in (c for c in devices if c.tag == "graphics"):
            if g.get("autoport") != "yes":
                continue
            if g.get("type") == "spice":
                for name in ("port", "tlsPort"):
                    g.attrib.pop(name, None)
            elif g.get("type") == "vnc" and g.get("port") not in (None, "-1"):
                g.set("port", "-1")
