"""Hotplug on the QEMU side for character devices and USB host devices: the ``chardev-add``
backend and the ``device_add`` properties of one device, with the same device models the
command line uses (:mod:`vmconfine.qemu.argv_devices`).

Host resources reach QEMU as descriptors only: a chardev's listening unix socket through
``getfd`` (the backend's address is ``{"type": "fd", "str": NAME}``), a USB device node through
an fd set (``usb-host`` ``hostdevice=/dev/fdset/N``). QEMU never opens a path, so a QEMU
confined at exec (Landlock, a per-domain root) takes the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmconfine.domain import Chardev, Domain, Hostdev
from vmconfine.qemu.argv import _DEFAULT_MACHINES, guest_arch
from vmconfine.qemu.argv_devices import Builder, UnsupportedConfigError, add_controllers

#: the chardev kinds attach-device takes, and the alias prefix of each
CHARDEV_ALIAS = {"serial": "serial", "console": "console", "channel": "channel"}


@dataclass
class ChardevPlan:
    """The QMP side of one chardev: its alias, backend (``chardev-add``) and device."""

    chardev: Chardev
    alias: str
    backend: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)

    @property
    def chardev_id(self) -> str:
        return f"char{self.alias}"

    @property
    def listens(self) -> bool:
        """vmconfine creates the listening socket and passes it (``getfd``)."""
        return self.chardev.type == "unix"


def free_alias(prefix: str, taken: set[str]) -> str:
    """``PREFIXn`` with the smallest n neither QEMU nor the domain uses (``taken`` holds device
    ids and chardev ids)."""
    n = 0
    while f"{prefix}{n}" in taken or f"char{prefix}{n}" in taken:
        n += 1
    return f"{prefix}{n}"


def plan_chardev(chardev: Chardev, alias: str) -> ChardevPlan:
    """``chardev-add`` and ``device_add`` arguments for ``chardev``. Supported: unix sockets in
    ``mode='bind'`` (vmconfine listens, QEMU gets the socket), pty and null."""
    plan = ChardevPlan(chardev, alias)
    what = f"<{chardev.kind} type='{chardev.type}'>"
    if chardev.type == "unix":
        if chardev.mode != "bind":
            raise UnsupportedConfigError(
                f"{what}: only a listening socket can be hotplugged (vmconfine creates it and "
                "passes it to QEMU); use <source mode='bind' .../>")
        backend: dict[str, Any] = {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": plan.chardev_id}},
            "server": True, "wait": False}}
    elif chardev.type in ("pty", "null"):
        backend = {"type": chardev.type, "data": {}}
    else:
        raise UnsupportedConfigError(
            f"{what} cannot be hotplugged; use type='unix' (mode='bind'), 'pty' or 'null'")
    if chardev.log_file:
        raise UnsupportedConfigError(f"{what}: a chardev with <log> cannot be hotplugged; "
                                     "remove <log>")
    plan.backend = {"id": plan.chardev_id, "backend": backend}
    plan.device = _chardev_device(chardev, alias, plan.chardev_id)
    return plan


def _chardev_device(chardev: Chardev, alias: str, cid: str) -> dict[str, Any]:
    ttype = chardev.target_type
    if chardev.kind == "channel":
        if ttype != "virtio":
            raise UnsupportedConfigError(f"channel target type '{ttype}' cannot be hotplugged; "
                                         "use <target type='virtio' name='...'/>")
        props = {"driver": "virtserialport", "bus": "virtio-serial0.0", "chardev": cid,
                 "id": alias}
        if chardev.target_name:
            props["name"] = chardev.target_name
        return props
    if chardev.kind == "console":
        if ttype != "virtio":
            raise UnsupportedConfigError(
                f"console target type '{ttype or 'serial'}' cannot be hotplugged (a serial "
                "console is an ISA port); use <target type='virtio'/>")
        return {"driver": "virtconsole", "bus": "virtio-serial0.0", "chardev": cid, "id": alias}
    if chardev.kind == "serial":
        if ttype != "pci-serial":
            raise UnsupportedConfigError(
                f"serial target type '{ttype or 'isa-serial'}' cannot be hotplugged (ISA "
                "ports are fixed at start); use <target type='pci-serial'/>")
        return {"driver": "pci-serial", "chardev": cid, "id": alias}
    raise UnsupportedConfigError(f"<{chardev.kind}> cannot be hotplugged")


def needs_controller(plan: ChardevPlan) -> str | None:
    """The controller the device plugs into (it must exist in the running domain)."""
    bus = plan.device.get("bus")
    return str(bus).split(".")[0] if bus else None


def plan_usb_hostdev(domain: Domain, config: Any, hostdev: Hostdev, alias: str,
                     fdset: int) -> dict[str, Any]:
    """``device_add`` of a USB host device opened by vmconfine (fd set ``fdset``)."""
    if hostdev.mode != "subsystem" or hostdev.type != "usb":
        raise UnsupportedConfigError(
            f"<hostdev mode='{hostdev.mode}' type='{hostdev.type}'> cannot be hotplugged; "
            "only mode='subsystem' type='usb' can")
    arch = guest_arch(domain)
    b = Builder(domain=domain, config=config,
                machine=domain.os.machine or _DEFAULT_MACHINES.get(arch, ""), arch=arch)
    add_controllers(b)
    if b.usb_bus is None:
        raise UnsupportedConfigError("a USB host device needs a USB controller, but the USB "
                                     "controller model is 'none'")
    return {"driver": "usb-host", "id": alias, "bus": b.usb_bus,
            "hostdevice": f"/dev/fdset/{fdset}"}
