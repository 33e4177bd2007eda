"""``<interface>``: the network devices of a domain (part of :mod:`vmconfine.domain.devices`).

libvirt's rules, checked when the XML is read so a bad value is one line naming it:

* ``<mac address>``: six hex bytes separated by ``:``, unicast (libvirt: "expected unicast
  mac address, found multicast"); kept lowercase with two digits per byte;
* ``<target dev>``: a Linux interface name (1-15 bytes, no ``/``, ``:`` or blanks). Names
  starting with ``vnet``, ``macvtap`` or ``macvlan`` are generated ones: libvirt drops them
  when it reads an inactive (config) definition, and so does vmconfine;
* ``<target managed='no'>`` (``type='ethernet'``): use an existing tap as it is;
* ``<source mode>`` of ``type='direct'`` (macvtap): vepa (libvirt's default), bridge, private,
  passthrough;
* ``<driver name='vhost'|'qemu' queues='N'>``: N from 1 to 256 (the tun driver's limit);
* ``<mtu size>``: 68 to 65535 (what QEMU's ``host_mtu`` takes).

The host side (taps, bridges, macvtap) is :mod:`vmconfine.launch.netdev`; the command line is
:mod:`vmconfine.qemu.netdev`; ``type='network'`` is resolved through the instance's network
definitions (:mod:`vmconfine.config.networks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.xml import (
    ParseContext,
    attr,
    child,
    children,
    int_attr,
    one_line,
    remove_element,
    yes_no,
)

#: ``<interface type>`` → the ``<source>`` attribute naming what it attaches to
INTERFACE_SOURCE_ATTR = {"network": "network", "bridge": "bridge", "direct": "dev",
                         "vhostuser": "path", "vdpa": "dev", "server": "address",
                         "client": "address", "mcast": "address", "udp": "address"}
#: types whose host side is a tap device vmconfine creates or opens
TAP_TYPES = ("network", "bridge", "ethernet")
#: macvtap modes (``<source dev mode>``), libvirt's default first
DIRECT_MODES = ("vepa", "bridge", "private", "passthrough")
#: ``<driver name>``: the kernel's vhost-net or QEMU's own virtio-net back end
DRIVER_NAMES = ("vhost", "qemu")
#: the most queues a tap takes (``MAX_TAP_QUEUES`` in the kernel's tun driver)
MAX_QUEUES = 256
MTU_RANGE = (68, 65535)
#: prefixes of generated interface names, dropped from inactive XML (libvirt's
#: VIR_NET_GENERATED_VNET_PREFIX, _MACVTAP_PREFIX, _MACVLAN_PREFIX)
GENERATED_PREFIXES = ("vnet", "macvtap", "macvlan")
#: IFNAMSIZ - 1
MAX_IFNAME = 15

_MAC = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")


@dataclass
class Interface:
    """A ``<interface>``: ``source`` is the network/bridge/device/socket it attaches to;
    ``bridge`` the Linux bridge a tap joins (``type='bridge'``: the source; ``type='network'``:
    filled in from the network's definition when the domain is prepared)."""

    type: str
    model: str | None = None
    mac: str | None = None
    source: str | None = None
    target_dev: str | None = None
    script: str | None = None
    managed: bool = True
    source_mode: str | None = None
    driver_name: str | None = None
    queues: int | None = None
    mtu: int | None = None
    bridge: str | None = None
    #: the macvtap lower device: ``<source dev>`` of ``type='direct'``, or the ``<forward>``
    #: device of a macvtap network
    direct_dev: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    @property
    def tap(self) -> bool:
        """True when QEMU's back end is a tap (or macvtap) fd vmconfine opens."""
        return self.type in TAP_TYPES or self.type == "direct"

    @property
    def macvtap(self) -> bool:
        """True for a macvtap link: ``type='direct'``, or a network that resolved to one."""
        return self.direct_dev is not None


def parse_mac(text: str) -> str | None:
    """``text`` as a canonical MAC (``52:54:00:0a:0b:0c``), None when it is not one."""
    if not _MAC.fullmatch(text):
        return None
    return ":".join(f"{int(x, 16):02x}" for x in text.split(":"))


def is_generated_ifname(name: str | None) -> bool:
    """True for names vmconfine (and libvirt) generate: ``vnetN``, ``macvtapN``..."""
    return bool(name) and any(name.startswith(p) for p in GENERATED_PREFIXES)  # type: ignore[union-attr]


def valid_ifname(name: str) -> bool:
    """The kernel's ``dev_valid_name`` plus ``:`` (an alias separator)."""
    return (0 < len(name.encode()) <= MAX_IFNAME and name not in (".", "..")
            and not any(c in name for c in "/: \t\n\r\x0b\x0c"))


def _mac(ctx: ParseContext, el: etree._Element) -> str | None:
    mac_el = child(el, "mac")
    raw = attr(mac_el, "address")
    if raw is None:
        return None
    mac = parse_mac(raw)
    if mac is None:
        raise ctx.error(mac_el, f"unable to parse mac address '{one_line(raw, 40)}'; write "
                                "six hex bytes, e.g. 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ctx.error(mac_el, f"expected unicast mac address, found multicast '{mac}'; "
                                "the first byte must be even, e.g. 52:54:00:...")
    return mac


def _target(ctx: ParseContext, el: etree._Element) -> tuple[str | None, bool]:
    tgt = child(el, "target")
    if tgt is None:
        return None, True
    managed = yes_no(ctx, tgt, "managed", True)
    dev = tgt.get("dev")
    if dev is None:
        return None, managed
    if not valid_ifname(dev):
        raise ctx.error(tgt, f"interface target dev '{one_line(dev, 40)}' is not a valid "
                             f"interface name (1-{MAX_IFNAME} bytes, no '/', ':' or blanks)")
    if is_generated_ifname(dev) and not ctx.live:
        return None, managed  # generated at each start (libvirt drops it too)
    return dev, managed


def _driver(ctx: ParseContext, el: etree._Element) -> tuple[str | None, int | None]:
    drv = child(el, "driver")
    if drv is None:
        return None, None
    name = drv.get("name")
    if name is not None and name not in DRIVER_NAMES:
        raise ctx.error(drv, f"unknown interface driver name '{one_line(name, 40)}'; use "
                             "'vhost' or 'qemu'")
    queues = int_attr(ctx, drv, "queues", "interface driver queues")
    if queues == 0:
        queues = None
    if queues is not None and queues > MAX_QUEUES:
        raise ctx.error(drv, f"interface driver queues must be from 1 to {MAX_QUEUES}, not "
                             f"{queues}")
    return name, queues


def _mtu(ctx: ParseContext, el: etree._Element) -> int | None:
    mtu_el = child(el, "mtu")
    if mtu_el is None:
        return None
    size = int_attr(ctx, mtu_el, "size", "interface mtu size")
    low, high = MTU_RANGE
    if size is None or not low <= size <= high:
        raise ctx.error(mtu_el, f"interface <mtu size> must be from {low} to {high}, not "
                                f"{mtu_el.get('size')!r}")
    return size


def parse_interface(ctx: ParseContext, el: etree._Element) -> Interface:
    """One ``<interface>``."""
    itype = el.get("type")
    if not itype:
        raise ctx.error(el, "<interface> has no type; use e.g. type='user' or type='network'")
    src_attr = INTERFACE_SOURCE_ATTR.get(itype)
    src = child(el, "source")
    source = attr(src, src_attr) if src_attr else None
    if itype in ("network", "bridge", "direct") and not source:
        raise ctx.error(el, f"<interface type='{itype}'> needs <source {src_attr}='...'>")
    mode = None
    if itype == "direct":
        mode = attr(src, "mode") or DIRECT_MODES[0]
        if mode not in DIRECT_MODES:
            raise ctx.error(src, f"unknown macvtap mode '{one_line(mode, 40)}'; use one of "
                                 f"{', '.join(DIRECT_MODES)}")
    target_dev, managed = _target(ctx, el)
    driver_name, queues = _driver(ctx, el)
    return Interface(type=itype, model=attr(child(el, "model"), "type"), mac=_mac(ctx, el),
                     source=source, target_dev=target_dev,
                     script=attr(child(el, "script"), "path"), managed=managed,
                     source_mode=mode, driver_name=driver_name, queues=queues,
                     mtu=_mtu(ctx, el), bridge=source if itype == "bridge" else None,
                     direct_dev=source if itype == "direct" else None, element=el)


def drop_generated_ifnames(root: etree._Element) -> None:
    """Remove generated ``<target dev>`` names (``vnet0``...) from a domain tree: the inactive
    XML has none, as libvirt's (a new one is made at each start)."""
    for devices in (c for c in root if c.tag == "devices"):
        for iface in (c for c in devices if c.tag == "interface"):
            for tgt in children(iface, "target"):
                if is_generated_ifname(tgt.get("dev")):
                    del tgt.attrib["dev"]
                    if not tgt.attrib and len(tgt) == 0:
                        remove_element(tgt)
            src = child(iface, "source")
            if iface.get("type") == "network" and src is not None:
                src.attrib.pop("bridge", None)  # the live XML's resolved bridge
