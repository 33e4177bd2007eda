"""Every host resource QEMU will open, derived from the domain model the argv is built from.

Drivers map these to their own rules (DAC owners, SELinux labels, AppArmor rules, Landlock
access, cgroup device rules, the confinement report), so a path QEMU opens is never missing
from one driver while present in another.

Roles: ``disk`` (top image), ``backing`` (lower layers), ``kernel``, ``initrd``, ``dtb``,
``loader``, ``nvram``, ``chardev``, ``chardev_log`` (a chardev's ``<log file>``), ``hostdev``,
``input`` (evdev passthrough), ``rng`` (host entropy source), ``tpm`` (passthrough device),
``graphics`` (VNC socket), ``runtime_dir`` (the domain's runtime directories), ``devnode``
(device nodes every QEMU needs, e.g. /dev/kvm).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmconfine.domain import DeviceSecLabel, Disk, Domain, Hostdev

log = logging.getLogger(__name__)

#: device nodes any QEMU may open; /dev/kvm only for type='kvm'
BASE_DEVNODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
#: those QEMU only reads (entropy; AppArmor's abstractions/base grants them ``r`` too)
READ_ONLY_DEVNODES = frozenset({"/dev/random", "/dev/urandom"})


@dataclass
class Resource:
    """One host path QEMU uses, and how."""

    path: str
    role: str
    access: str  # "rw" | "ro"
    chain_top: bool = True
    readonly: bool = False
    shared: bool = False
    disk: Disk | None = None
    hostdev: Hostdev | None = None
    source: Any = None
    seclabels: list[DeviceSecLabel] = field(default_factory=list)
    create: bool = False  # QEMU may create the path (bind sockets, missing chardev files)
    is_dir: bool = False

    @property
    def writable(self) -> bool:
        return self.access == "rw"

    def seclabel(self, model: str) -> DeviceSecLabel | None:
        for s in self.seclabels:
            if s.model == model or s.model is None:
                return s
        return None


def disk_resources(disk: Disk) -> list[Resource]:
    if disk.source is None or disk.type not in ("file", "block"):
        if disk.type == "dir":
            log.warning("disk %s: directory disks are not relabelled", disk.target)
        return []
    out = []
    chain = disk.chain()
    top_labels = list(chain[0].seclabels) if chain else []
    for depth, src in enumerate(chain):
        if not src.path:
            continue
        top = depth == 0
        labels = list(src.seclabels) or top_labels  # libvirt: parent's label for backing layers
        out.append(
            Resource(
                path=src.path,
                role="disk" if top else "backing",
                access="rw" if top and not disk.readonly else "ro",
                chain_top=top,
                readonly=disk.readonly or not top,
                shared=disk.shareable,
                disk=disk,
                source=src,
                seclabels=labels,
            )
        )
    return out


def usb_device_path(hostdev: Hostdev) -> str | None:
    """/dev/bus/usb/BBB/DDD for a USB hostdev given by address or by vendor/product."""
    bus, dev = getattr(hostdev, "usb_bus", None), getattr(hostdev, "usb_device", None)
    if bus is None or dev is None:
        vendor = getattr(hostdev, "usb_vendor", None)
        product = getattr(hostdev, "usb_product", None)
        if vendor is None or product is None:
            return None
        base = Path("/sys/bus/usb/devices")
        for d in sorted(base.glob("*")) if base.exists() else []:
            try:
                v = int((d / "idVendor").read_text(), 16)
                p = int((d / "idProduct").read_text(), 16)
            except (OSError, ValueError):
                continue
            if v == vendor and p == product:
                bus = int((d / "busnum").read_text())
                dev = int((d / "devnum").read_text())
                break
        else:
            return None
    return f"/dev/bus/usb/{int(bus):03d}/{int(dev):03d}"


def pci_address(hostdev: Hostdev) -> str:
    return (
        f"{int(getattr(hostdev, 'pci_domain', 0) or 0):04x}:{int(hostdev.pci_bus):02x}:"
        f"{int(hostdev.pci_slot):02x}.{int(hostdev.pci_function):x}"
    )


def vfio_group_path(hostdev: Hostdev) -> str | None:
    """/dev/vfio/N of a PCI hostdev's IOMMU group, or None when the device is missing."""
    link = Path("/sys/bus/pci/devices") / pci_address(hostdev) / "iommu_group"
    try:
        return f"/dev/vfio/{os.path.basename(os.readlink(link))}"
    except OSError:
        return None


def hostdev_resources(hostdev: Hostdev) -> list[Resource]:
    if hostdev.type == "usb":
        path = usb_device_path(hostdev)
        return [Resource(path or "", "hostdev", "rw", hostdev=hostdev)] if path else []
    if hostdev.type == "pci":
        group = vfio_group_path(hostdev)
        out = [Resource("/dev/vfio/vfio", "hostdev", "rw", hostdev=hostdev)]
        if group:
            out.append(Resource(group, "hostdev", "rw", hostdev=hostdev))
        return out
    return []


def chardev_resources(domain: Domain) -> list[Resource]:
    out: list[Resource] = []
    for chardev in domain.chardevs:
        path = chardev.path
        if not path or chardev.type not in ("file", "dev", "unix", "pipe"):
            continue
        labels = list(chardev.seclabels)
        if chardev.type == "pipe":
            pin, pout = f"{path}.in", f"{path}.out"
            paths = [pin, pout] if os.path.exists(pin) and os.path.exists(pout) else [path]
            for p in paths:
                out.append(Resource(p, "chardev", "rw", source=chardev, seclabels=labels))
            continue
        create = chardev.type == "file" or (
            chardev.type == "unix" and (chardev.mode or "bind") == "bind"
        )
        out.append(
            Resource(path, "chardev", "rw", source=chardev, seclabels=labels, create=create)
        )
    for chardev in domain.chardevs:
        log_file = getattr(chardev, "log_file", None)
        if log_file:
            out.append(Resource(log_file, "chardev_log", "rw", source=chardev, create=True))
    return out


def device_resources(domain: Domain) -> list[Resource]:
    """Host devices QEMU opens for inputs, entropy and TPM passthrough."""
    out: list[Resource] = []
    for inp in getattr(domain, "inputs", []):
        if getattr(inp, "evdev", None):
            out.append(Resource(inp.evdev, "input", "rw", source=inp))
    for rng in getattr(domain, "rngs", []):
        # /dev/random and /dev/urandom are base device nodes already (read-write)
        if rng.backend_model == "random" and rng.path and rng.path not in BASE_DEVNODES:
            out.append(Resource(rng.path, "rng", "ro", source=rng))
    for tpm in getattr(domain, "tpms", []):
        if getattr(tpm, "backend", None) == "passthrough" and tpm.device_path:
            out.append(Resource(tpm.device_path, "tpm", "rw", source=tpm))
    return out


def domain_resources(domain: Domain, runtime_dir: Path | None = None,
                     home_dir: Path | None = None,
                     hugepage_dir: str | None = None) -> list[Resource]:
    """All resources of ``domain``, in libvirt's DAC SetAllLabel order.

    ``runtime_dir`` (sockets), ``home_dir`` (QEMU's HOME) and ``hugepage_dir`` (guest RAM of
    a ``<hugepages/>`` domain, on hugetlbfs) are the per-domain directories the pipeline
    creates and removes; they have the role ``runtime_dir``.
    """
    out: list[Resource] = []
    for disk in domain.disks:
        out.extend(disk_resources(disk))
    for hostdev in domain.hostdevs:
        out.extend(hostdev_resources(hostdev))
    out.extend(chardev_resources(domain))
    out.extend(device_resources(domain))
    for g in domain.graphics:
        if g.type == "vnc" and g.socket:
            out.append(Resource(g.socket, "graphics", "rw", source=g, create=True))
    os_ = domain.os
    if os_.loader is not None and os_.loader.path:
        out.append(
            Resource(os_.loader.path, "loader", "ro" if os_.loader.readonly else "rw",
                     readonly=bool(os_.loader.readonly), source=os_.loader)
        )
    if os_.nvram:
        out.append(Resource(os_.nvram, "nvram", "rw"))
    for role in ("kernel", "initrd", "dtb"):
        path = getattr(os_, role)
        if path:
            out.append(Resource(path, role, "ro", readonly=True))
    for d in (runtime_dir, home_dir, hugepage_dir):
        if d is not None:
            out.append(Resource(str(d), "runtime_dir", "rw", is_dir=True, create=True))
    nodes = list(BASE_DEVNODES)
    if domain.virt_type == "kvm":
        nodes.append("/dev/kvm")
    if any(c.type == "pty" for c in domain.chardevs):
        nodes.append("/dev/ptmx")
    out.extend(Resource(n, "devnode", "ro" if n in READ_ONLY_DEVNODES else "rw")
               for n in nodes)
    return out
