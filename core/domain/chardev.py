"""Character devices of libvirt domain XML: ``<serial>``, ``<console>``, ``<channel>`` and
``<parallel>`` and their host side (part of :mod:`vmconfine.domain.devices`).

Defaults follow libvirt's ``domain_conf.c``: a character device without ``type`` is a pty;
unix/tcp sources connect unless ``mode='bind'``.
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
