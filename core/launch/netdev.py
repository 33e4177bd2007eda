"""The host side of a domain's network interfaces: taps, bridges, macvtap, vhost-net.

libvirt's model (``qemuInterfaceBridgeConnect``, ``qemuInterfaceEthernetConnect``,
``qemuInterfaceDirectConnect``, ``qemuInterfaceOpenVhostNet``): vmconfine, privileged, makes
the network devices and opens their descriptors; QEMU only inherits the descriptors
(``-netdev tap,fd=N,vhostfd=V``, :mod:`vmconfine.qemu.netdev`), so it needs no
CAP_NET_ADMIN, and no rule of any driver grants it ``/dev/net/tun`` or ``/dev/vhost-net``.

* ``type='bridge'`` / ``'network'``: a tap is created (``TUNSETIFF`` with ``IFF_TAP |
  IFF_NO_PI``, ``IFF_VNET_HDR`` for virtio-like models, ``IFF_MULTI_QUEUE`` and one
  descriptor per queue for ``<driver queues='N'>``; the kernel names it ``vnetN`` unless
  ``<target dev>`` names it), its MAC set to the guest's with the first byte ``fe`` (as
  libvirt: the bridge never takes the guest's MAC as its own), its MTU to ``<mtu size>`` or
  else the bridge's, attached to the bridge and brought up;
* ``type='ethernet'``: the same without a bridge; with ``<target dev='X' managed='no'/>`` the
  existing tap ``X`` is opened as it is (never changed, never removed);
* ``type='direct'``: a macvtap link on ``<source dev>`` in the given mode, with the guest's
  MAC, and its character device ``/dev/tapIFINDEX`` opened once per queue;
* vhost-net: ``/dev/vhost-net`` opened once per queue when the plan says so.

Netlink is spoken through pyroute2 (no ``ip`` processes to parse); it is imported when
first used, because importing it costs every command ~150 ms.

Journal: a created device is recorded (``pipeline``/``netdev``) before it is made and its
ifindex noted after (``netdev-made``, with the network namespace). A tap is not persistent:
the kernel removes it when the last descriptor closes (QEMU's and vmconfine's), so a killed
vmconfine leaves none behind. A macvtap link outlives its descriptors: :func:`remove_devices`
(from the teardown, so also from crash recovery in a fresh process) deletes every created
device that is still the one vmconfine made (same name, ifindex and MAC), and never a device
vmconfine did not create.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vmconfine.domain.interface import MAX_IFNAME, valid_ifname
from vmconfine.domain.xml import child
from vmconfine.errors import LaunchError
from vmconfine.qemu.netdev import MACVTAP_TEMPLATE, TUN_PATH, VHOST_PATH, NetPlan

if TYPE_CHECKING:
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.context import DomainContext


def _lazy(name: str) -> ModuleType:
    """``name`` imported on first attribute access (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


try:
    pyroute2 = _lazy("pyroute2")
except ImportError:  # reported when a network device is needed
    pyroute2 = None  # type: ignore[assignment]

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
_IFREQ = "16sH22x"

#: how long to wait for ``/dev/tapN`` of a new macvtap link (devtmpfs makes it at once;
#: with udev it may take a moment)
TAP_NODE_WAIT = 5.0

OWN = "pipeline"


def host_mac(mac: str) -> str:
    """The host side's MAC of a tap: the guest's with the first byte ``fe`` (libvirt)."""
    return "fe" + mac[2:]


def netns_id() -> int:
    """The inode of this process's network namespace (taps live in one)."""
    return os.stat("/proc/self/ns/net").st_ino


def _ipr() -> Any:
    if pyroute2 is None:
        raise LaunchError("network interfaces need the pyroute2 library; install it "
                          "(apt-get install python3-pyroute2, or bash scripts/setup.sh)")
    return pyroute2.IPRoute()


def _netlink_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)


def _link(ipr: Any, name: str) -> Any | None:
    """The link named ``name`` (a pyroute2 message), or None."""
    try:
        links = ipr.get_links(ifname=name)
    except pyroute2.NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


# --------------------------------------------------------------------------- descriptors


@contextlib.contextmanager
def _close_on_error(fds: list[int]) -> Iterator[list[int]]:
    """Close every descriptor in ``fds`` if the block fails (a tap goes with its fds)."""
    try:
        yield fds
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def tun_ioctl(fd: int, name: str, flags: int) -> str:
    """``TUNSETIFF`` on ``fd``; returns the name the kernel gave."""
    ifr = struct.pack(_IFREQ, name.encode(), flags)
    out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    return out[:16].split(b"\x00", 1)[0].decode()


def _open_tun() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LaunchError(f"tun is not available: {TUN_PATH} does not exist; load the tun "
                          "module (modprobe tun)") from None
    except OSError as exc:
        raise LaunchError(f"tun is not available: cannot open {TUN_PATH}: {exc.strerror}; "
                          "tap interfaces need a privileged instance (qemu:///system, or "
                          "qemu:///embed as root)") from None


def open_tap_queues(name: str, plan: NetPlan) -> tuple[list[int], str]:
    """Open (and, for a template or a new name, create) the tap ``name`` once per queue;
    returns the descriptors and the tap's name."""
    flags = IFF_TAP | IFF_NO_PI
    if plan.vnet_hdr:
        flags |= IFF_VNET_HDR
    if plan.queues > 1:
        flags |= IFF_MULTI_QUEUE
    with _close_on_error([]) as fds:
        for _ in range(plan.queues):
            fd = _open_tun()
            fds.append(fd)
            try:
                name = tun_ioctl(fd, name, flags)
            except OSError as exc:
                hint = ("vmconfine needs CAP_NET_ADMIN to create taps: use a privileged "
                        "instance" if exc.errno == errno.EPERM else
                        "an existing tap must have been made with the same flags "
                        "(multi_queue, vnet_hdr) and must not be in use" if exc.errno in
                        (errno.EINVAL, errno.EBUSY) else "check the interface name")
                raise LaunchError(f"cannot open tap '{name}': {exc.strerror}; {hint}"
                                  ) from None
    return fds, name


def open_vhost(plan: NetPlan) -> list[int]:
    """``/dev/vhost-net`` once per queue (none when the plan uses no vhost)."""
    with _close_on_error([]) as fds:
        for _ in plan.vhost_names:
            try:
                fds.append(os.open(VHOST_PATH, os.O_RDWR | os.O_CLOEXEC))
            except OSError as exc:
                raise LaunchError(f"vhost-net was requested for interface {plan.index}, but "
                                  f"{VHOST_PATH} cannot be opened: {exc.strerror}; load the "
                                  "vhost_net module or use <driver name='qemu'/>") from None
    return fds


def _open_macvtap_queues(ifindex: int, plan: NetPlan) -> list[int]:
    node = f"/dev/tap{ifindex}"
    deadline = time.monotonic() + TAP_NODE_WAIT
    while not os.path.exists(node) and time.monotonic() < deadline:
        time.sleep(0.02)
    with _close_on_error([]) as fds:
        for _ in range(plan.queues):
            try:
                fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise LaunchError(f"cannot open macvtap device {node}: {exc.strerror}; "
                                  "/dev must be devtmpfs (or udev must create it)") from None
            fds.append(fd)
            if not plan.vnet_hdr:  # macvtap starts with IFF_VNET_HDR
                tun_ioctl(fd, "", IFF_TAP | IFF_NO_PI | (IFF_MULTI_QUEUE if plan.queues > 1
                                                          else 0))
    return fds


# --------------------------------------------------------------------------- devices


def _bridge(ipr: Any, plan: NetPlan) -> Any:
    name = plan.iface.bridge
    assert name is not None
    link = _link(ipr, name)
    what = (f"network '{plan.iface.source}'" if plan.iface.type == "network"
            else f"interface {plan.index}")
    if link is None:
        raise LaunchError(f"bridge '{name}' of {what} does not exist; create it (e.g. ip "
                          f"link add {name} type bridge) or fix the domain XML")
    kind = _kind(link)
    if kind != "bridge":
        raise LaunchError(f"'{name}' of {what} is not a Linux bridge (it is a "
                          f"{kind or 'plain'} device); give the name of a Linux bridge")
    return link


def _set_live(plan: NetPlan, ifname: str) -> None:
    """The live XML: ``<target dev>`` names the tap, ``<mac>`` the guest's MAC, and a
    network's ``<source>`` its bridge (as libvirt's live XML)."""
    el = plan.iface.element
    plan.iface.target_dev = ifname
    if el is None:
        return
    from_xml = {"mac": ("address", plan.mac), "target": ("dev", ifname)}
    for tag, (name, value) in from_xml.items():
        sub = child(el, tag)
        if sub is None:
            sub = el.makeelement(tag, {})
            el.append(sub)
        sub.set(name, value)
    src = child(el, "source")
    if plan.iface.type == "network" and src is not None and plan.iface.bridge and \
            not plan.iface.macvtap:
        src.set("bridge", plan.iface.bridge)


def _made(journal: Journal, kind: str, ifname: str, ifindex: int, mac: str) -> None:
    journal.note(OWN, "netdev-made", kind=kind, ifname=ifname, ifindex=ifindex, mac=mac,
                 netns=netns_id())


def _check(ipr: Any, plan: NetPlan) -> Any | None:
    """What must exist before anything is made (changes nothing): the bridge, the macvtap's
    lower device, an unmanaged tap; a free ``<target dev>`` name. Returns the bridge (tap
    types) or the lower device (``direct``)."""
    iface = plan.iface
    if iface.macvtap:
        dev = iface.direct_dev
        assert dev is not None
        lower = _link(ipr, dev) if valid_ifname(dev) else None
        if lower is None:
            where = (f"network '{iface.source}'" if iface.type == "network"
                     else "<interface type='direct'>")
            raise LaunchError(f"source dev '{dev}' of {where} does not exist; give an "
                              "existing host network device")
        found = lower
    else:
        found = _bridge(ipr, plan) if iface.bridge else None
    name = plan.ifname_template
    existing = _link(ipr, name) if iface.target_dev else None
    if iface.type == "ethernet" and not iface.managed:
        if existing is None:
            raise LaunchError(f"tap '{name}' does not exist (managed='no' uses an existing "
                              f"tap as it is); create it (ip tuntap add {name} mode tap) or "
                              "remove managed='no'")
    elif existing is not None:
        raise LaunchError(f"interface '{name}' already exists; give <target dev> a free name, "
                          "or, for an existing tap, use <interface type='ethernet'> with "
                          "<target dev='NAME' managed='no'/>")
    return found


def check_devices(plans: Iterable[NetPlan]) -> None:
    """The checks a start makes before it creates network devices (for the confinement
    report: it finds what ``run`` would stop at); raises ``LaunchError``."""
    plans = [p for p in plans if p.iface.tap]
    if not plans:
        return
    if any(not p.iface.macvtap for p in plans) and not os.path.exists(TUN_PATH):
        raise LaunchError(f"tun is not available: {TUN_PATH} does not exist; load the tun "
                          "module (modprobe tun)")
    with _ipr() as ipr:
        for plan in plans:
            try:
                _check(ipr, plan)
            except pyroute2.NetlinkError as exc:
                raise LaunchError(f"interface {plan.index}: netlink: "
                                  f"{_netlink_error(exc)}") from None


def _tap(ipr: Any, journal: Journal, plan: NetPlan) -> list[int]:
    iface = plan.iface
    bridge = _check(ipr, plan)
    name = plan.ifname_template
    if iface.type == "ethernet" and not iface.managed:
        fds, _ = open_tap_queues(name, plan)
        journal.note(OWN, "netdev-opened", ifname=name)
        _set_live(plan, name)
        return fds
    journal.record(OWN, "netdev", kind="tap", ifname=name, mac=host_mac(plan.mac),
                   netns=netns_id())
    fds, name = open_tap_queues(name, plan)
    with _close_on_error(fds):
        link = _link(ipr, name)
        assert link is not None, name
        index = link["index"]
        _made(journal, "tap", name, index, host_mac(plan.mac))
        mtu = iface.mtu or (bridge.get_attr("IFLA_MTU") if bridge is not None else None)
        ipr.link("set", index=index, address=host_mac(plan.mac), **({"mtu": mtu} if mtu
                                                                     else {}))
        if bridge is not None:
            ipr.link("set", index=index, master=bridge["index"])
        ipr.link("set", index=index, state="up")
    _set_live(plan, name)
    return fds


def _free_macvtap_name(ipr: Any) -> str:
    for n in range(1 << 16):
        name = MACVTAP_TEMPLATE % n
        if len(name) <= MAX_IFNAME and _link(ipr, name) is None:
            return name
    raise LaunchError("no free macvtap name left")


def _macvtap(ipr: Any, journal: Journal, plan: NetPlan) -> list[int]:
    iface = plan.iface
    lower = _check(ipr, plan)
    for _attempt in range(8):
        name = iface.target_dev or _free_macvtap_name(ipr)
        journal.record(OWN, "netdev", kind="macvtap", ifname=name, mac=plan.mac,
                       netns=netns_id())
        try:
            ipr.link("add", ifname=name, kind="macvtap", link=lower["index"],
                     macvtap_mode=iface.source_mode, address=plan.mac)
            break
        except pyroute2.NetlinkError as exc:
            if exc.code == errno.EEXIST and not iface.target_dev:
                continue  # another start took the name first
            raise LaunchError(f"cannot create macvtap '{name}' on '{iface.direct_dev}': "
                              f"{_netlink_error(exc)}") from None
    else:
        raise LaunchError(f"cannot create a macvtap link on '{iface.direct_dev}': every name "
                          "tried was taken")
    link = _link(ipr, name)
    assert link is not None, name
    _made(journal, "macvtap", name, link["index"], plan.mac)
    if iface.mtu:
        ipr.link("set", index=link["index"], mtu=iface.mtu)
    ipr.link("set", index=link["index"], state="up")
    fds = _open_macvtap_queues(link["index"], plan)
    _set_live(plan, name)
    return fds


def open_interfaces(ctx: DomainContext, plans: Iterable[NetPlan]) -> dict[str, int]:
    """Create and open every tap-backed interface of ``plans``; descriptors by fd name.

    On failure what was opened is closed (taps vanish with it) and a ``LaunchError`` raised;
    created macvtap links are journaled, so the teardown removes them."""
    plans = [p for p in plans if p.iface.tap]
    fds: dict[str, int] = {}
    if not plans:
        return fds
    opened: list[int] = []
    with _close_on_error(opened), _ipr() as ipr:
        for plan in plans:
            try:
                queues = (_macvtap(ipr, ctx.journal, plan) if plan.iface.macvtap
                          else _tap(ipr, ctx.journal, plan))
            except pyroute2.NetlinkError as exc:
                raise LaunchError(f"interface {plan.index}: netlink: "
                                  f"{_netlink_error(exc)}") from None
            opened += queues
            vhost = open_vhost(plan)
            opened += vhost
            fds.update(zip(plan.tap_names, queues, strict=True))
            fds.update(zip(plan.vhost_names, vhost, strict=True))
    return fds


def remove_devices(journal: Journal) -> list[str]:
    """Delete every network device vmconfine created for the domain that is still there
    (newest first), checked by name, ifindex and MAC; returns the problems."""
    intents = journal.records(OWN, "netdev")
    if not intents:
        return []
    made = {(r["ifname"], r["netns"]): r for r in journal.records(OWN, "netdev-made")}
    here = netns_id()
    errors: list[str] = []
    done: set[str] = set()
    try:
        ipr_cm = _ipr()
    except LaunchError as exc:
        return [exc.message]
    with ipr_cm as ipr:
        for rec in reversed(intents):
            name = rec["ifname"]
            if name in done or "%" in name:
                continue  # a template: the kernel named it; see the netdev-made note
            done.add(name)
            if rec["netns"] != here:
                if rec["kind"] == "macvtap":
                    errors.append(f"macvtap '{name}' was created in another network "
                                  "namespace; run the next vmconfine command in it")
                continue  # a tap vanishes with its descriptors
            try:
                link = _link(ipr, name)
                if link is None or _kind(link) not in (rec["kind"], "tun"):
                    continue
                note = made.get((name, here))
                if note is not None and note["ifindex"] != link["index"]:
                    continue  # not ours any more
                if link.get_attr("IFLA_ADDRESS") != rec["mac"]:
                    continue
                ipr.link("del", index=link["index"])
            except pyroute2.NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    errors.append(f"cannot remove network device '{name}': "
                                  f"{_netlink_error(exc)}")
        for rec in journal.records(OWN, "netdev-made"):
            if rec["kind"] == "tap" and rec["netns"] == here and rec["ifname"] not in done:
                with contextlib.suppress(pyroute2.NetlinkError):
                    link = _link(ipr, rec["ifname"])
                    if link is not None and link["index"] == rec["ifindex"] and \
                            link.get_attr("IFLA_ADDRESS") == rec["mac"]:
                        ipr.link("del", index=link["index"])
    return errors
