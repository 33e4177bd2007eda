"""Network back ends on the QEMU command line (libvirt 9's ``qemuBuildHostNetProps``).

* ``type='user'``: QEMU's user-mode networking (``-netdev user``);
* ``type='bridge'``, ``'network'``, ``'ethernet'`` and ``'direct'`` (macvtap): a tap whose
  queues vmconfine opens (:mod:`vmconfine.launch.netdev`); QEMU gets only the descriptors,
  ``-netdev tap,fd=N`` (``fds=N:M`` with ``<driver queues>``), and ``vhost=on,vhostfd=V``
  when vhost-net is used, so it needs neither CAP_NET_ADMIN nor access to ``/dev/net/tun``
  or ``/dev/vhost-net``.

vhost-net follows libvirt's ``qemuInterfaceOpenVhostNet``: only for virtio NICs of KVM
domains, not with ``<driver name='qemu'>``; by default when ``/dev/vhost-net`` can be opened,
and ``<driver name='vhost'>`` when it cannot is an error. The tap has a virtio-net header
(``IFF_VNET_HDR``) for the NIC models that use one (libvirt's
``qemuInterfaceIsVnetCompatModel``).

``domxml-to-native`` shows a tap as ``ifname=NAME,script=no,downscript=no`` (libvirt's
conversion of a bridge to an unmanaged tap; NAME ``vnet%d`` lets the kernel pick), which runs
by hand but joins no bridge.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmconfine.qemu.fdpass import NETFD, Alt, PassedFd, escape_opt

if TYPE_CHECKING:
    from vmconfine.domain import Domain, Interface

TUN_PATH = "/dev/net/tun"
VHOST_PATH = "/dev/vhost-net"
#: NIC models that take a virtio-net header on the tap (``IFF_VNET_HDR``)
VNET_HDR_MODELS = ("virtio", "e1000e", "igb", "vmxnet3")
#: kernel name templates of the devices vmconfine creates
TAP_TEMPLATE = "vnet%d"
MACVTAP_TEMPLATE = "macvtap%d"


class NetConfigError(ValueError):
    """An interface the command line cannot express (the caller raises its own error type)."""


def default_mac(uuid: str, index: int) -> str:
    """A stable MAC for an interface without ``<mac>`` (52:54:00 = QEMU's prefix)."""
    digest = hashlib.sha256(f"{uuid}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{x:02x}" for x in digest[:3])


def vhost_usable() -> bool:
    """True when this process can open ``/dev/vhost-net`` read-write."""
    return os.access(VHOST_PATH, os.R_OK | os.W_OK)


@dataclass(frozen=True)
class NetPlan:
    """How one interface is connected: the same for the command line and the host side."""

    index: int
    iface: Interface
    model: str
    mac: str
    queues: int
    vhost: bool

    @property
    def netdev_id(self) -> str:
        return f"hostnet{self.index}"

    @property
    def alias(self) -> str:
        return f"net{self.index}"

    @property
    def vnet_hdr(self) -> bool:
        return self.model in VNET_HDR_MODELS

    @property
    def tap_names(self) -> list[str]:
        """The fd names of the tap queues (libvirt: ``tapfd-ALIASN``)."""
        return [f"tapfd-{self.alias}-{q}" for q in range(self.queues)]

    @property
    def vhost_names(self) -> list[str]:
        return [f"vhostfd-{self.alias}-{q}" for q in range(self.queues)] if self.vhost else []

    @property
    def ifname_template(self) -> str:
        """The name asked of the kernel: the XML's ``<target dev>``, else a template."""
        if self.iface.target_dev:
            return self.iface.target_dev
        return MACVTAP_TEMPLATE if self.iface.macvtap else TAP_TEMPLATE


def plan_interface(domain: Domain, index: int, iface: Interface, model: str) -> NetPlan:
    """The plan of interface ``index`` (``model`` is the NIC model after defaults)."""
    queues = iface.queues or 1
    if queues > 1 and not iface.tap:
        raise NetConfigError(f"interface {index}: <driver queues> (multiqueue) needs a tap "
                             f"back end, not type='{iface.type}'")
    if queues > 1 and model != "virtio":
        raise NetConfigError(f"interface {index}: multiqueue is only supported for virtio "
                             f"network interfaces; use <model type='virtio'/>")
    vhost = False
    if iface.tap and domain.virt_type == "kvm" and iface.driver_name != "qemu":
        if model != "virtio":
            if iface.driver_name == "vhost":
                raise NetConfigError("vhost-net is only supported for virtio network "
                                     "interfaces; use <model type='virtio'/>")
        elif vhost_usable():
            vhost = True
        elif iface.driver_name == "vhost":
            raise NetConfigError(
                f"vhost-net was requested for interface {index}, but {VHOST_PATH} is "
                "unavailable; load the vhost_net module or use <driver name='qemu'/>")
    return NetPlan(index=index, iface=iface, model=model,
                   mac=iface.mac or default_mac(domain.uuid, index), queues=queues,
                   vhost=vhost)


def _fd_list(key: str, names: list[str], path: str) -> tuple[str | PassedFd, ...]:
    """``key=N`` for one descriptor, ``keys=N:M`` for several."""
    parts: list[str | PassedFd] = [f"{key}s=" if len(names) > 1 else f"{key}="]
    for n, name in enumerate(names):
        if n:
            parts.append(":")
        parts.append(PassedFd(NETFD, path, name))
    return tuple(parts)


def netdev_value(plan: NetPlan) -> tuple[str | Alt, ...] | str:
    """The ``-netdev`` value: a plain string (user mode) or parts with fd placeholders."""
    iface = plan.iface
    if iface.type == "user":
        return f"user,id={plan.netdev_id}"
    source = "/dev/tap" if iface.macvtap else TUN_PATH
    fds: list[str | PassedFd] = ["tap,", *_fd_list("fd", plan.tap_names, source)]
    symbolic = (f"tap,id={plan.netdev_id},ifname={escape_opt(plan.ifname_template)},"
                "script=no,downscript=no")
    if plan.queues > 1:
        symbolic += f",queues={plan.queues}"
    if plan.vhost:
        fds += [",vhost=on,", *_fd_list("vhostfd", plan.vhost_names, VHOST_PATH)]
        symbolic += ",vhost=on"
    fds.append(f",id={plan.netdev_id}")
    return (Alt(symbolic, tuple(fds)),)


def nic_props(plan: NetPlan, qdev: str) -> dict[str, Any]:
    """The ``-device`` properties of the NIC front end (without ``bootindex``)."""
    props: dict[str, Any] = {"driver": qdev}
    if plan.queues > 1:
        props.update({"mq": True, "vectors": 2 * plan.queues + 2})
    if plan.iface.mtu is not None and plan.model == "virtio":
        props["host_mtu"] = plan.iface.mtu
    props.update({"netdev": plan.netdev_id, "id": plan.alias, "mac": plan.mac})
    return props


def interface_plans(domain: Domain, default_model: str) -> list[NetPlan]:
    """Every interface's plan, in document order (raises :class:`NetConfigError`)."""
    return [plan_interface(domain, i, iface, iface.model or default_model)
            for i, iface in enumerate(domain.interfaces)]
