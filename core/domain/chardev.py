"""Character devices of libvirt domain XML: ``<serial>``, ``<console>``, ``<channel>`` and
``<parallel>`` and their host side (part of :mod:`vmconfine.domain.devices`).

Defaults follow libvirt's ``domain_conf.c``: a character device without ``type`` is a pty;
unix/tcp sources connect unless ``mode='bind'``.

Which host sides vmconfine opens itself and hands to QEMU as file descriptors (libvirt 9's
``qemuProcessPrepareHostChardevSource``) is decided here, once, for the command line, the
resources every driver sees and the pipeline that opens them: :func:`passed_kind`. A virtio
channel's unix socket without a path gets one generated as libvirt does
(:func:`fill_channel_paths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.seclabel import (
    DeviceSecLabel,
    find_device_seclabel,
    parse_device_seclabels,
)
from vmconfine.domain.xml import ParseContext, attr, child, children, int_attr

CHARDEV_KINDS = ("serial", "console", "channel", "parallel")
CHARDEV_TYPES = ("null", "vc", "pty", "dev", "file", "pipe", "stdio", "udp", "tcp", "unix",
                 "spicevmc", "spiceport", "nmdm", "qemu-vdagent", "dbus")


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
    append: bool | None = None  #: ``<source append='on|off'>`` of a file (None: not given)
    log_append: bool | None = None  #: ``<log append='on|off'>``
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    def seclabel(self, model: str) -> DeviceSecLabel | None:
        """The source's override for ``model``."""
        return find_device_seclabel(self.seclabels, model)


def passed_kind(dev: Chardev) -> str | None:
    """How QEMU gets this chardev's host side when vmconfine starts it.

    ``"listen"``: a ``unix`` source in ``mode='bind'``: vmconfine creates the listening socket
    and QEMU gets it as ``fd=N``; ``"fdset"``: a ``file`` source: vmconfine opens it and QEMU
    gets it through ``-add-fd`` as ``/dev/fdset/N``; None: QEMU opens the path itself (pipes,
    devices, connecting sockets: QEMU's ``pipe`` backend only takes a path, as in libvirt).
    The ``<log file>`` of any chardev is always passed through an fdset (:func:`log_passed`).
    """
    if dev.type == "unix" and dev.mode == "bind" and dev.path:
        return "listen"
    if dev.type == "file" and dev.path:
        return "fdset"
    return None


def log_passed(dev: Chardev) -> bool:
    """A chardev ``<log file>`` is opened by vmconfine and passed through an fdset."""
    return bool(dev.log_file)


def virtio_serial_ports(chardevs: list[Chardev]) -> dict[int, int]:
    """``id(chardev)`` → virtio-serial port number (``nr``) of each virtio channel, as the
    command line numbers them: virtio consoles take the first ports, channels follow from
    ``max(1, number of virtio consoles)``."""
    consoles = sum(1 for c in chardevs
                   if c.kind == "console" and (c.target_type or "serial") == "virtio")
    ports = {}
    nr = max(1, consoles)
    for dev in chardevs:
        if dev.kind == "channel" and dev.target_type == "virtio":
            ports[id(dev)] = nr
            nr += 1
    return ports


def generated_channel_name(dev: Chardev, port: int) -> str:
    """libvirt's ``qemuDomainPrepareChannel`` file name: the target name, else
    ``vioser-CC-BB-PP.sock`` from the virtio-serial address (controller 0, bus 0)."""
    name = dev.target_name
    if name and "/" not in name and name not in (".", ".."):
        return name
    return f"vioser-00-00-{port:02d}.sock"


def fill_channel_paths(chardevs: list[Chardev], directory: str) -> list[str]:
    """Give every virtio ``unix`` channel without a path one under ``directory`` (libvirt:
    ``<channelTargetDir>/domain-ID-NAME/NAME``), in the tree too so the live XML shows it.
    Returns the paths generated."""
    ports = virtio_serial_ports(chardevs)
    out = []
    for dev in chardevs:
        if dev.type != "unix" or dev.path or dev.kind != "channel" \
                or dev.target_type != "virtio":
            continue
        path = f"{directory.rstrip('/')}/{generated_channel_name(dev, ports[id(dev)])}"
        dev.path = path
        out.append(path)
        if dev.element is not None:
            src = child(dev.element, "source")
            if src is None:
                src = etree.Element("source")
                src.tail = dev.element.text
                dev.element.insert(0, src)
            src.set("mode", dev.mode or "connect")
            src.set("path", path)
    return out


def _switch(ctx: ParseContext, el: etree._Element | None, name: str) -> bool | None:
    """A libvirt on/off attribute (None when absent)."""
    value = attr(el, name)
    if value is None:
        return None
    if value not in ("on", "off"):
        raise ctx.error(el, f"{name}='{value}' must be 'on' or 'off'")
    return value == "on"


def record_pty(chardevs: list[Chardev], dev: Chardev, path: str) -> list[str]:
    """Write the pseudo-terminal QEMU allocated for ``dev`` into the tree as libvirt's live XML
    has it: ``<source path>``, and ``tty=`` on a ``<console>`` (a serial console shows the
    first serial port's terminal). Returns the paths written (generated paths: the inactive
    XML leaves them out)."""
    targets = [dev]
    serials = [c for c in chardevs if c.kind == "serial"]
    consoles = [c for c in chardevs if c.kind == "console"]
    if serials and dev is serials[0] and consoles and \
            (consoles[0].target_type or "serial") == "serial":
        targets.append(consoles[0])
    for target in targets:
        el = target.element
        if el is None:
            continue
        src = child(el, "source")
        if src is None:
            src = etree.Element("source")
            el.insert(0, src)
        src.set("path", path)
        if target.kind == "console":
            el.set("tty", path)
    return [path]


def drop_generated_paths(root: etree._Element, paths: list[str]) -> None:
    """Remove generated chardev source paths (and a console's ``tty``, a generated SPICE
    socket) from a domain tree (libvirt's inactive XML has none: the path is generated again
    at the next start)."""
    if not paths:
        return
    wanted = set(paths)
    for devices in (c for c in root if c.tag == "devices"):
        for dev in (c for c in devices if c.tag in CHARDEV_KINDS):
            if dev.get("tty") in wanted:
                del dev.attrib["tty"]
            for src in children(dev, "source"):
                if src.get("path") in wanted:
                    del src.attrib["path"]
        for g in (c for c in devices if c.tag == "graphics"):  # a generated SPICE socket
            for listen in children(g, "listen"):
                if listen.get("socket") in wanted:
                    del listen.attrib["socket"]


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
                  log_file=attr(child(el, "log"), "file"),
                  append=_switch(ctx, with_path, "append"),
                  log_append=_switch(ctx, child(el, "log"), "append"))
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
    if ctype == "unix" and not path and (kind != "channel" or dev.target_type != "virtio"):
        raise ctx.error(el, f"<{kind} type='unix'> needs <source path=...> "
                            "(only virtio channels get a generated path)")
    for src in sources:
        labels = parse_device_seclabels(ctx, src)
        if labels:
            dev.seclabels = labels
            break
    return dev
