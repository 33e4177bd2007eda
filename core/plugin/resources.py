"""Every host resource QEMU will open, derived from the domain model the argv is built from.

Drivers map these to their own rules (DAC owners, SELinux labels, AppArmor rules, Landlock
access, cgroup device rules, the confinement report), so a path QEMU opens is never missing
from one driver while present in another.

Each resource has a :class:`Role` (a ``StrEnum``: it compares equal to, formats as and
serialises to JSON as its string value, e.g. ``Role.DISK == "disk"``).

``passed``: vmconfine opens the resource itself and QEMU only gets a file descriptor
(libvirt 9's fd passing, :mod:`vmconfine.qemu.fdpass`): ``"listen"`` (a listening unix socket
vmconfine creates: chardevs in ``mode='bind'``), ``"fdset"`` (a file chardev or a chardev
``<log>``, opened by vmconfine), ``"qmp"`` (the VNC socket, handed over QMP). QEMU never opens
such a path: drivers that grant path access (DAC owners, Landlock rules, directory checks)
skip it; drivers that check the use of a descriptor (SELinux file labels, AppArmor rules,
which the kernel revalidates for inherited files at exec) still cover it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.domain.chardev import log_passed, passed_kind

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vmconfine.domain import Chardev, DeviceSecLabel, Disk, Domain, Hostdev

log = logging.getLogger(__name__)

#: device nodes any QEMU may open; /dev/kvm only for type='kvm'
BASE_DEVNODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
#: those QEMU only reads (entropy; AppArmor's abstractions/base grants them ``r`` too)
READ_ONLY_DEVNODES = frozenset({"/dev/random", "/dev/urandom"})


class Role(StrEnum):
    """What a resource is to QEMU."""

    DISK = "disk"  #: a disk's top image
    BACKING = "backing"  #: a lower layer of a disk's backing chain
    KERNEL = "kernel"
    INITRD = "initrd"
    DTB = "dtb"
    LOADER = "loader"  #: firmware (``<loader>``)
    NVRAM = "nvram"
    CHARDEV = "chardev"  #: a character device's file, pipe, socket or device
    CHARDEV_LOG = "chardev_log"  #: a chardev's ``<log file>``
    HOSTDEV = "hostdev"  #: a host device's nodes (USB, VFIO)
    INPUT = "input"  #: evdev passthrough
    RNG = "rng"  #: a host entropy source
    TPM = "tpm"  #: a passthrough TPM device
    GRAPHICS = "graphics"  #: the VNC and SPICE sockets, the SPICE TLS certificates
    RUNTIME_DIR = "runtime_dir"  #: the domain's runtime and home directories
    DEVNODE = "devnode"  #: device nodes every QEMU needs (/dev/null, /dev/kvm, ...)
    OTHER = "other"  #: a path the domain model does not list (diagnosing a denial)


@dataclass
class Resource:
    """One host path QEMU uses, and how. A ``role`` given as a string becomes a
    :class:`Role` (an unknown one is an error)."""

    path: str
    role: Role
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
    passed: str | None = None  # "listen" | "fdset" | "qmp": QEMU gets an fd, not the path

    def __post_init__(self) -> None:
        self.role = Role(self.role)

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
                role=Role.DISK if top else Role.BACKING,
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
        return [Resource(path or "", Role.HOSTDEV, "rw", hostdev=hostdev)] if path else []
    if hostdev.type == "pci":
        group = vfio_group_path(hostdev)
        out = [Resource("/dev/vfio/vfio", Role.HOSTDEV, "rw", hostdev=hostdev)]
        if group:
            out.append(Resource(group, Role.HOSTDEV, "rw", hostdev=hostdev))
        return out
    return []


def chardev_resources(chardevs: Iterable[Chardev]) -> list[Resource]:
    """The host side of character devices (one of them on hotplug): sources, then logs."""
    chardevs = list(chardevs)
    out: list[Resource] = []
    for chardev in chardevs:
        path = chardev.path
        if not path or chardev.type not in ("file", "dev", "unix", "pipe"):
            continue
        labels = list(chardev.seclabels)
        if chardev.type == "pipe":
            pin, pout = f"{path}.in", f"{path}.out"
            paths = [pin, pout] if os.path.exists(pin) and os.path.exists(pout) else [path]
            for p in paths:
                out.append(Resource(p, Role.CHARDEV, "rw", source=chardev, seclabels=labels))
            continue
        out.append(Resource(path, Role.CHARDEV, "rw", source=chardev, seclabels=labels,
                            passed=passed_kind(chardev)))
    for chardev in chardevs:
        if log_passed(chardev):
            out.append(Resource(str(chardev.log_file), Role.CHARDEV_LOG, "rw", source=chardev,
                                passed="fdset"))
    return out


def device_resources(domain: Domain) -> list[Resource]:
    """Host devices QEMU opens for inputs, entropy and TPM passthrough."""
    out: list[Resource] = []
    for inp in getattr(domain, "inputs", []):
        if getattr(inp, "evdev", None):
            out.append(Resource(inp.evdev, Role.INPUT, "rw", source=inp))
    for rng in getattr(domain, "rngs", []):
        # /dev/random and /dev/urandom are base device nodes already (read-write)
        if rng.backend_model == "random" and rng.path and rng.path not in BASE_DEVNODES:
            out.append(Resource(rng.path, Role.RNG, "ro", source=rng))
    for tpm in getattr(domain, "tpms", []):
        if getattr(tpm, "backend", None) == "passthrough" and tpm.device_path:
            out.append(Resource(tpm.device_path, Role.TPM, "rw", source=tpm))
    return out


def graphics_resources(domain: Domain, home_dir: Path | str | None,
                       spice_x509_dir: str | None) -> list[Resource]:
    """Display sockets and certificates. The VNC socket is vmconfine's (passed over QMP);
    the SPICE socket is created by QEMU itself (QEMU 7.2's ``-spice`` takes no fd): in the
    domain's home directory (its generated path) it needs no resource of its own, elsewhere
    QEMU creates it in that directory; the TLS certificate directory is read."""
    out: list[Resource] = []
    home = os.path.normpath(str(home_dir)) + "/" if home_dir is not None else None
    for g in domain.graphics:
        if g.type == "vnc" and g.socket:
            out.append(Resource(g.socket, Role.GRAPHICS, "rw", source=g, passed="qmp"))
        elif g.type == "spice" and g.socket and not (
                home and os.path.normpath(g.socket).startswith(home)):
            out.append(Resource(g.socket, Role.GRAPHICS, "rw", source=g, create=True))
    if spice_x509_dir:
        out.append(Resource(spice_x509_dir, Role.GRAPHICS, "ro", is_dir=True, readonly=True))
    return out


def domain_resources(domain: Domain, runtime_dir: Path | None = None,
                     home_dir: Path | None = None,
                     hugepage_dir: str | None = None,
                     spice_x509_dir: str | None = None) -> list[Resource]:
    """All resources of ``domain``, in libvirt's DAC SetAllLabel order.

    ``spice_x509_dir``: qemu.conf ``spice_tls_x509_cert_dir`` when the SPICE display has a
    TLS port.

    ``runtime_dir`` (sockets), ``home_dir`` (QEMU's HOME) and ``hugepage_dir`` (guest RAM of
    a ``<hugepages/>`` domain, on hugetlbfs) are the per-domain directories the pipeline
    creates and removes; they have the role ``runtime_dir``.
    """
    out: list[Resource] = []
    for disk in domain.disks:
        out.extend(disk_resources(disk))
    for hostdev in domain.hostdevs:
        out.extend(hostdev_resources(hostdev))
    out.extend(chardev_resources(domain.chardevs))
    out.extend(device_resources(domain))
    out.extend(graphics_resources(domain, home_dir, spice_x509_dir))
    os_ = domain.os
    if os_.loader is not None and os_.loader.path:
        out.append(
            Resource(os_.loader.path, Role.LOADER, "ro" if os_.loader.readonly else "rw",
                     readonly=bool(os_.loader.readonly), source=os_.loader)
        )
    if os_.nvram:  # ``source``: the <os>, whose nvram_template makes a missing NVRAM at start
        out.append(Resource(os_.nvram, Role.NVRAM, "rw", source=os_))
    for role in (Role.KERNEL, Role.INITRD, Role.DTB):
        path = getattr(os_, role.value)
        if path:
            out.append(Resource(path, role, "ro", readonly=True))
    for d in (runtime_dir, home_dir, hugepage_dir):
        if d is not None:
            out.append(Resource(str(d), Role.RUNTIME_DIR, "rw", is_dir=True, create=True))
    nodes = list(BASE_DEVNODES)
    if domain.virt_type == "kvm":
        nodes.append("/dev/kvm")
    if any(c.type == "pty" for c in domain.chardevs):
        nodes.append("/dev/ptmx")
    out.extend(Resource(n, Role.DEVNODE, "ro" if n in READ_ONLY_DEVNODES else "rw")
               for n in nodes)
    return out
