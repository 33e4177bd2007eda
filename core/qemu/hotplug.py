"""Hotplug on the QEMU side: the QMP commands that add or remove one disk, built by the same
code that builds the command line (:func:`vmconfine.qemu.argv_devices.disk_device`).

Every storage node opens its image through an fd set (``/dev/fdset/N``): vmconfine opens the
file and hands QEMU the descriptor (QMP ``add-fd`` with SCM_RIGHTS), as libvirt does, so a
QEMU whose filesystem access was fixed at exec (Landlock, a per-domain root) needs no new path.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from vmconfine.domain import Disk, Domain, parse_domain
from vmconfine.errors import XMLError
from vmconfine.qemu import pci
from vmconfine.qemu.argv import _DEFAULT_MACHINES, guest_arch
from vmconfine.qemu.argv_devices import (
    Builder,
    UnsupportedConfigError,
    add_controllers,
    disk_device,
)

#: buses whose devices QEMU adds and removes while the guest runs (IDE/SATA/floppy: no)
HOTPLUG_BUSES = ("virtio", "scsi")


@dataclass
class DiskPlan:
    """The QMP side of one disk: block nodes bottom first, the device, the image files."""

    disk: Disk
    blockdevs: list[dict[str, Any]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_nodes(self) -> list[dict[str, Any]]:
        """The protocol nodes (``file`` / ``host_device``) that open an image."""
        return [n for n in self.blockdevs if "filename" in n]

    @property
    def node_names(self) -> list[str]:
        return [n["node-name"] for n in self.blockdevs]


#: the device elements ``attach-device`` / ``detach-device`` take
DEVICE_TAGS = ("disk", "serial", "console", "channel", "hostdev")


def parse_device(device_xml: str) -> etree._Element:
    """The one device element of ``device_xml`` (no entities, no network)."""
    try:
        el = etree.fromstring(device_xml.encode(),
                              etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise XMLError(f"device XML: {exc}") from None
    if el.tag not in DEVICE_TAGS:
        raise UnsupportedConfigError(f"<{el.tag}> cannot be attached or detached; give one of "
                                     + ", ".join(f"<{t}>" for t in DEVICE_TAGS))
    return el


def with_element(domain: Domain, el: etree._Element) -> tuple[Domain, etree._Element]:
    """The live domain with a copy of ``el`` appended to ``<devices>``, and that copy."""
    tree = etree.fromstring(domain.to_xml(live=True).encode())
    devices = tree.find("devices")
    if devices is None:
        devices = etree.SubElement(tree, "devices")
    devices.append(copy.deepcopy(el))
    new = parse_domain(etree.tostring(tree).decode(), source="<attach-device>", live=True)
    new_devices = new.root.find("devices")
    assert new_devices is not None
    return new, new_devices[-1]


def without_element(domain: Domain, el: etree._Element) -> Domain:
    """The live domain without ``el`` (an element of ``domain``'s own tree)."""
    tree = etree.fromstring(domain.to_xml(live=True).encode())
    for found in tree.getroottree().xpath(domain.tree.getpath(el)):
        found.getparent().remove(found)
    return parse_domain(etree.tostring(tree).decode(), source="<detach-device>", live=True)


def with_device(domain: Domain, device_xml: str) -> tuple[Domain, Disk]:
    """The live domain with ``device_xml`` (one ``<disk>``) added, and that disk."""
    el = parse_device(device_xml)
    if el.tag != "disk":
        raise UnsupportedConfigError(f"<{el.tag}> is not a <disk>")
    target = el.find("target")
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise XMLError("device XML: <disk> needs <target dev='...'/>")
    if any(d.target == dev for d in domain.disks):
        raise UnsupportedConfigError(f"target {dev} already exists in domain "
                                     f"'{domain.name}'")
    new, _el = with_element(domain, el)
    return new, next(d for d in new.disks if d.target == dev)


def without_disk(domain: Domain, target: str) -> tuple[Domain, Disk]:
    """The live domain without disk ``target``, and that disk (as the domain had it)."""
    disk = next((d for d in domain.disks if d.target == target), None)
    if disk is None:
        raise UnsupportedConfigError(f"domain '{domain.name}' has no disk {target}")
    tree = etree.fromstring(domain.to_xml(live=True).encode())
    for el in tree.iterfind("devices/disk"):
        t = el.find("target")
        if t is not None and t.get("dev") == target:
            el.getparent().remove(el)
    return parse_domain(etree.tostring(tree).decode(), source="<detach-device>",
                        live=True), disk


def plan_disk(domain: Domain, config: Any, disk: Disk, first_node: int) -> DiskPlan:
    """The QMP commands for ``disk`` of ``domain``; node names continue after
    ``first_node`` so they never collide with the nodes QEMU has."""
    if disk.bus not in HOTPLUG_BUSES:
        raise UnsupportedConfigError(
            f"disk {disk.target}: bus '{disk.bus}' cannot be hotplugged; use bus='virtio' or "
            "bus='scsi' (with a <controller type='scsi' model='virtio-scsi'/>)")
    return plan_drive(domain, config, disk, first_node)


def plan_drive(domain: Domain, config: Any, disk: Disk, first_node: int) -> DiskPlan:
    """:func:`plan_disk` for a disk on any bus (a removable medium changes on IDE too)."""
    arch = guest_arch(domain)
    machine = domain.os.machine or _DEFAULT_MACHINES.get(arch, "")
    b = Builder(domain=domain, config=config, machine=machine, arch=arch)
    add_controllers(b)  # the buses the device plugs into, as at start
    b.args = []
    b.node_count = first_node
    device = disk_device(b, disk)
    if b.q35 and disk.bus == "virtio":  # its own free root port (libvirt's Q35 topology)
        addr = pci.hotplug_address(domain, disk.element)
        device.update({"bus": addr.bus_id(), "addr": addr.addr()})
    plan = DiskPlan(disk, device=device)
    for opt, value in zip(b.args[::2], b.args[1::2], strict=True):
        if opt == "-blockdev":
            plan.blockdevs.append(json.loads(value))
    return plan
