"""The device half of the QEMU command line (see :mod:`vmconfine.qemu.argv`).

Every device becomes QEMU options the way libvirt 9's ``qemu_command.c`` writes them for
QEMU 7.x: storage as a ``-blockdev`` graph with an explicit ``driver`` on every layer (so
QEMU itself never opens or probes a backing file), front-ends as JSON ``-device`` objects,
host sides of character devices as ``-chardev``. Device ids follow libvirt's aliases
(``virtio-disk0``, ``ide0-1-0``, ``sata0-0-1``, ``scsi0-0-0-1``, ``charserial0``, ``net0``...),
so QMP answers look the same as for a libvirt-started guest.

Defaults are libvirt's (USB controller piix3-usb-uhci on i440FX and qemu-xhci on Q35, a
virtio memballoon, a cirrus video device for a guest with graphics but no ``<video>``,
rtl8139 NICs) except where noted. Differences from libvirt, on purpose:

- on i440FX (``pc``) machines PCI addresses are left to QEMU (on Q35 they are libvirt's, see
  :mod:`vmconfine.qemu.pci`);
- ``type='network'`` is resolved through a network definition file (its ``<bridge>``):
  vmconfine has no virtual-network daemon (:mod:`vmconfine.config.networks`);
- a SCSI controller without a model is virtio-scsi (libvirt picks lsilogic on x86);
- an interface without ``<mac>`` gets a MAC derived from the domain UUID (stable across
  starts) instead of a random one;
- a COW image at the bottom of a chain gets ``"backing": null`` so QEMU never opens a backing
  file named in an image header by itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from vmconfine.domain.chain import BACKING_FORMATS, qemu_format, resolve_chain
from vmconfine.domain.chardev import log_passed, passed_kind, virtio_serial_ports
from vmconfine.errors import XMLError
from vmconfine.qemu.fdpass import (
    CONNECTED,
    FDSET,
    LISTEN,
    Part,
    PassedFd,
    escape_opt,
    passed_fds,
    render,
)
from vmconfine.qemu.netdev import (
    NetConfigError,
    NetPlan,
    interface_plans,
    netdev_value,
    nic_props,
)

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.domain.devices import Chardev, Disk, StorageSource, Tpm


class UnsupportedConfigError(XMLError):
    """The domain XML asks for something vmconfine cannot express on the QEMU command line."""


def to_json(props: dict[str, Any]) -> str:
    """Compact JSON for ``-device``/``-blockdev``/``-object`` (key order is kept)."""
    return json.dumps(props, separators=(",", ":"))


def disk_index(target: str) -> int:
    """libvirt's ``virDiskNameToIndex``: hda → 0, sdb → 1, vdaa → 26 (letters after the prefix)."""
    for prefix in ("xvd", "ubd", "hd", "sd", "vd", "fd"):
        if target.startswith(prefix):
            letters = target[len(prefix):]
            break
    else:
        letters = ""
    if not letters or not letters.isalpha() or not letters.islower():
        raise UnsupportedConfigError(
            f"disk target '{target}' is not a disk name; use e.g. vda, sda, hdc or fda"
        )
    idx = 0
    for ch in letters:
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    return idx - 1


#: <interface><model type=...> → QEMU device
NIC_MODELS = {
    "virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139",
    "ne2k_pci": "ne2k_pci", "pcnet": "pcnet", "vmxnet3": "vmxnet3",
}
#: libvirt's default NIC model for x86 guests
DEFAULT_NIC_MODEL = "rtl8139"

#: <controller type='usb' model=...> → QEMU device
USB_MODELS = {
    "piix3-uhci": "piix3-usb-uhci", "piix4-uhci": "piix4-usb-uhci", "ehci": "usb-ehci",
    "ich9-ehci1": "ich9-usb-ehci1", "ich9-uhci1": "ich9-usb-uhci1",
    "ich9-uhci2": "ich9-usb-uhci2", "ich9-uhci3": "ich9-usb-uhci3", "pci-ohci": "pci-ohci",
    "nec-xhci": "nec-usb-xhci", "qemu-xhci": "qemu-xhci",
}

INPUT_DEVICES = {
    ("tablet", "usb"): "usb-tablet", ("mouse", "usb"): "usb-mouse",
    ("keyboard", "usb"): "usb-kbd", ("tablet", "virtio"): "virtio-tablet-pci",
    ("mouse", "virtio"): "virtio-mouse-pci", ("keyboard", "virtio"): "virtio-keyboard-pci",
}


@dataclass
class Builder:
    """Mutable state while one command line is built."""

    domain: Domain
    config: Any
    machine: str
    arch: str
    args: list[str] = field(default_factory=list)
    boot_index: dict[int, int] = field(default_factory=dict)
    usb_bus: str | None = None
    node_count: int = 0
    bios: str | None = None
    #: ``domxml-to-native``: images that do not exist give their top node only
    symbolic: bool = False
    #: character devices by QEMU chardev label (``charserial0``...)
    chardevs: dict[str, Chardev] = field(default_factory=dict)
    #: the XML element of each device, by QEMU id (where PCI addresses are written)
    elements: dict[str, etree._Element] = field(default_factory=dict)
    _scsi_models: dict[int, str] = field(default_factory=dict)
    #: args index → the parts of an option value with fd placeholders (see fdpass)
    slots: dict[int, tuple[Part, ...]] = field(default_factory=dict)
    passed: list[PassedFd] = field(default_factory=list)
    #: how each interface is connected (the host side opens the taps from these)
    networks: list[NetPlan] = field(default_factory=list)

    def add(self, *items: str) -> None:
        """Append options."""
        self.args.extend(items)

    def add_passed(self, option: str, parts: tuple[Part, ...]) -> None:
        """Append ``option`` with a value whose resources vmconfine opens (fd placeholders);
        ``args`` gets the symbolic form."""
        self.args.append(option)
        self.slots[len(self.args)] = parts
        self.args.append(render(parts, None, {}))
        self.passed.extend(passed_fds(parts))

    def device(self, props: dict[str, Any], element: etree._Element | None = None) -> None:
        """Append one ``-device`` (JSON); ``element``: the device's XML element."""
        if element is not None:
            self.elements[str(props["id"])] = element
        self.add("-device", to_json(props))

    def add_chardev(self, dev: Chardev, alias: str) -> None:
        """Append the ``-chardev`` of a character device (label ``char<alias>``)."""
        self.chardevs[f"char{alias}"] = dev
        self.add_passed("-chardev", chardev_backend(dev, alias))

    def insert(self, at: int, *items: str) -> None:
        """Insert options at ``args[at]`` (the fd slots after it move along)."""
        self.args[at:at] = items
        self.slots = {(i + len(items) if i >= at else i): parts
                      for i, parts in self.slots.items()}

    @property
    def q35(self) -> bool:
        """True for Q35 machine types (the ICH9 AHCI controller is built in, no IDE)."""
        return "q35" in self.machine

    @property
    def i440fx(self) -> bool:
        """True for the i440FX ``pc`` machine types (built-in IDE buses ide.0, ide.1)."""
        return self.arch in ("x86_64", "i686") and not self.q35 and self.machine.startswith("pc")

    def boot(self, props: dict[str, Any], dev: object) -> dict[str, Any]:
        """Add ``bootindex`` to ``props`` when ``dev`` is in the boot order."""
        idx = self.boot_index.get(id(dev))
        if idx is not None:
            props["bootindex"] = idx
        return props


# --------------------------------------------------------------------------- controllers


def _controllers(b: Builder, ctype: str) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for c in b.domain.controllers:
        if c.type == ctype:
            out[c.index or 0] = c.model
    return out


def _usb_ports(b: Builder, index: int, qdev: str) -> dict[str, int]:
    """``ports=N`` of an xHCI controller: USB 2 and USB 3 ports (``p2``/``p3``, libvirt)."""
    ports = next((c.ports for c in b.domain.controllers
                  if c.type == "usb" and (c.index or 0) == index), None)
    if ports is None:
        return {}
    if qdev not in ("qemu-xhci", "nec-usb-xhci"):
        raise UnsupportedConfigError(f"usb controller type {qdev} doesn't support 'ports' with "
                                     "this QEMU binary; use model='qemu-xhci'")
    return {"p2": ports, "p3": ports}


def add_controllers(b: Builder) -> None:
    """USB, SATA (AHCI), SCSI and virtio-serial controllers, declared or implied by devices."""
    usb = _controllers(b, "usb")
    if 0 not in usb:
        usb[0] = None
    for index, model in sorted(usb.items()):
        if model == "none":
            continue
        if model is None:
            qdev = "piix3-usb-uhci" if b.i440fx else "qemu-xhci"
        elif model in USB_MODELS:
            qdev = USB_MODELS[model]
        else:
            raise UnsupportedConfigError(
                f"USB controller model '{model}' is not supported; use one of "
                f"{', '.join(sorted(USB_MODELS))} or 'none'"
            )
        alias = "usb" if index == 0 else f"usb{index}"
        b.device({"driver": qdev, **_usb_ports(b, index, qdev), "id": alias})
        if b.usb_bus is None:
            b.usb_bus = f"{alias}.0"

    sata = set(_controllers(b, "sata"))
    scsi = _controllers(b, "scsi")
    for disk in b.domain.disks:
        if disk.bus == "sata":
            sata.add(disk_index(disk.target) // 6)
        elif disk.bus == "scsi":
            scsi.setdefault(disk_index(disk.target) // 7, None)
    for index in sorted(sata):
        if not (b.q35 and index == 0):
            b.device({"driver": "ahci", "id": f"sata{index}"})
    for index, model in sorted(scsi.items()):
        if model in (None, "virtio-scsi"):
            qdev = "virtio-scsi-pci"
        elif model == "lsilogic":
            qdev = "lsi53c895a"
        else:
            raise UnsupportedConfigError(
                f"SCSI controller model '{model}' is not supported; use 'virtio-scsi' or "
                f"'lsilogic'"
            )
        b._scsi_models[index] = qdev
        b.device({"driver": qdev, "id": f"scsi{index}"})

    vserial = set(_controllers(b, "virtio-serial"))
    if any(c.target_type == "virtio" for c in b.domain.chardevs if c.kind != "serial"):
        vserial.add(0)
    for index in sorted(vserial):
        b.device({"driver": "virtio-serial-pci", "id": f"virtio-serial{index}"})
    if any(d.bus == "fdc" for d in b.domain.disks) and b.q35:
        b.device({"driver": "isa-fdc", "id": "fdc0"})


# --------------------------------------------------------------------------- disks


#: <driver cache=...> → (cache.direct, cache.no-flush, the front end's write-cache), as libvirt's
#: qemuDomainDiskCachemodeFlags
CACHE_MODES = {
    "none": (True, False, True), "writeback": (False, False, True),
    "writethrough": (False, False, False), "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


def cache_mode(disk: Disk) -> str | None:
    """The disk's cache mode: ``<driver cache>``, else 'none' for a writable shareable disk
    (libvirt: the host page cache must not hide one guest's writes from another)."""
    if disk.cache is None and disk.shareable and not disk.readonly:
        return "none"
    return disk.cache


def _cache(disk: Disk) -> dict[str, Any]:
    mode = cache_mode(disk)
    if mode is None:
        return {}
    direct, no_flush, _ = CACHE_MODES[mode]
    return {"cache": {"direct": direct, "no-flush": no_flush}}


#: linux/cdrom.h
CDROM_GET_CAPABILITY = 0x5331


def is_cdrom_device(path: str | None) -> bool:
    """True when ``path`` is a CD-ROM drive (libvirt's virFileIsCDROM: a block device that
    answers CDROM_GET_CAPABILITY); QEMU's host_cdrom driver is only for those."""
    if not path:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return False
        fcntl.ioctl(fd, CDROM_GET_CAPABILITY, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _storage_props(src: StorageSource, node: str, cdrom: bool,
                   disk: Disk | None = None) -> dict[str, Any]:
    if src.type == "block":
        driver = "host_cdrom" if cdrom and is_cdrom_device(src.path) else "host_device"
    elif src.type == "file":
        driver = "file"
    else:
        raise UnsupportedConfigError(
            f"storage type '{src.type}' is not supported; use a file or block device"
        )
    if not src.path or not os.path.isabs(src.path):
        raise UnsupportedConfigError(
            f"disk image path {src.path!r} is not absolute; give the full path"
        )
    props: dict[str, Any] = {"driver": driver, "filename": src.path}
    if disk is not None and disk.io is not None:
        props["aio"] = disk.io
    props["node-name"] = f"{node}-storage"
    if disk is not None:
        props.update(_cache(disk))
    props.update({"auto-read-only": True, "discard": "unmap"})
    return props


def add_blockdevs(b: Builder, disk: Disk) -> str | None:
    """The ``-blockdev`` graph of one disk, bottom layer first; returns the top node name."""
    if disk.source is None:
        return None
    if disk.type not in ("file", "block"):
        raise UnsupportedConfigError(
            f"disk {disk.target}: type '{disk.type}' is not supported; use type='file' or "
            f"type='block'"
        )
    if disk.transient:
        raise UnsupportedConfigError(
            f"disk {disk.target}: <transient/> disks are not supported; remove <transient/>"
        )
    mode = cache_mode(disk)
    if disk.io == "native" and not (mode and CACHE_MODES[mode][0]):
        raise UnsupportedConfigError(
            f"disk {disk.target}: io='native' needs a cache mode that bypasses the host page "
            f"cache; add cache='none' or cache='directsync'"
        )
    chain = resolve_chain(disk.source, missing_ok=b.symbolic)
    names = []
    for _ in chain:
        b.node_count += 1
        names.append(f"vmc-{b.node_count}")
    below: str | None = None
    for depth in range(len(chain) - 1, -1, -1):
        src, node = chain[depth], names[depth]
        cdrom = disk.device == "cdrom"
        b.add("-blockdev", to_json(_storage_props(src, node, cdrom, disk)))
        fmt = qemu_format(src.format)
        readonly = disk.readonly or depth > 0
        props: dict[str, Any] = {"node-name": f"{node}-format", "read-only": readonly,
                                 **_cache(disk), **(_top_format_props(disk) if depth == 0
                                                    else {}),
                                 "driver": fmt, "file": f"{node}-storage"}
        if fmt in BACKING_FORMATS:
            props["backing"] = below  # None: QEMU must not open a backing file itself
        b.add("-blockdev", to_json(props))
        below = f"{node}-format"
    return below


def _top_format_props(disk: Disk) -> dict[str, Any]:
    """discard and detect-zeroes of the top format node (libvirt: 'unmap' zero detection
    needs discard='unmap', else it is 'on')."""
    props: dict[str, Any] = {}
    if disk.discard is not None:
        props["discard"] = disk.discard
    if disk.detect_zeroes is not None:
        zeroes = disk.detect_zeroes
        if zeroes == "unmap" and disk.discard != "unmap":
            zeroes = "on"
        props["detect-zeroes"] = zeroes
    return props


def _ide_like(b: Builder, disk: Disk, idx: int) -> dict[str, Any]:
    qdev = "ide-cd" if disk.device == "cdrom" else "ide-hd"
    if disk.bus == "ide":
        if not b.i440fx:
            raise UnsupportedConfigError(
                f"disk {disk.target}: IDE is not available on machine '{b.machine}'; use "
                f"bus='sata'"
            )
        if idx >= 4:
            raise UnsupportedConfigError(
                f"disk {disk.target}: the IDE controller has 4 units (hda-hdd)"
            )
        bus, unit = divmod(idx, 2)
        return {"driver": qdev, "bus": f"ide.{bus}", "unit": unit, "id": f"ide0-{bus}-{unit}"}
    controller, unit = divmod(idx, 6)
    busname = f"ide.{unit}" if b.q35 and controller == 0 else f"sata{controller}.{unit}"
    return {"driver": qdev, "bus": busname, "id": f"sata{controller}-0-{unit}"}


def _front_end(b: Builder, disk: Disk) -> dict[str, Any]:
    idx = disk_index(disk.target)
    cdrom = disk.device == "cdrom"
    if disk.device == "lun":
        raise UnsupportedConfigError(
            f"disk {disk.target}: device='lun' is not supported; use device='disk'"
        )
    if disk.bus in ("ide", "sata"):
        if disk.readonly and not cdrom:
            raise UnsupportedConfigError(
                f"disk {disk.target}: read-only {disk.bus} disks are not supported by QEMU; "
                f"use bus='virtio' or bus='scsi'"
            )
        return _ide_like(b, disk, idx)
    if disk.bus == "virtio":
        if cdrom:
            raise UnsupportedConfigError(
                f"disk {disk.target}: a cdrom cannot be on the virtio bus; use bus='sata' "
                f"or 'scsi'"
            )
        return {"driver": "virtio-blk-pci", "id": f"virtio-disk{idx}"}
    if disk.bus == "scsi":
        controller, unit = divmod(idx, 7)
        qdev = "scsi-cd" if cdrom else "scsi-hd"
        alias = f"scsi{controller}-0-0-{unit}"
        if b._scsi_models.get(controller) == "lsi53c895a":
            return {"driver": qdev, "bus": f"scsi{controller}.0", "scsi-id": unit, "id": alias}
        return {"driver": qdev, "bus": f"scsi{controller}.0", "channel": 0, "scsi-id": 0,
                "lun": unit, "id": alias}
    if disk.bus == "fdc":
        if disk.device != "floppy" or idx > 1:
            raise UnsupportedConfigError(
                f"disk {disk.target}: the floppy controller takes floppies fda and fdb"
            )
        return {"driver": "floppy", "unit": idx, "id": f"fdc0-0-{idx}"}
    raise UnsupportedConfigError(
        f"disk {disk.target}: bus '{disk.bus}' is not supported; use virtio, sata, scsi, ide "
        f"or fdc"
    )


def add_disks(b: Builder) -> None:
    """Every disk: its block graph, then its front-end device."""
    for disk in b.domain.disks:
        b.device(disk_device(b, disk), disk.element)


def disk_device(b: Builder, disk: Disk) -> dict[str, Any]:
    """One disk's ``-blockdev`` graph (appended to ``b``) and its front-end device's
    properties (returned): the same for a start and for a hotplug."""
    front = _front_end(b, disk)
    top = add_blockdevs(b, disk)
    props: dict[str, Any] = {"driver": front.pop("driver")}
    props.update(front)
    if top is not None:
        props["drive"] = top
    if disk.shareable:
        props["share-rw"] = True
    if disk.serial:
        props["serial"] = disk.serial
    b.boot(props, disk)
    mode = cache_mode(disk)
    if mode is not None:
        props["write-cache"] = "on" if CACHE_MODES[mode][2] else "off"
    return props


# --------------------------------------------------------------------------- network


def add_interfaces(b: Builder) -> None:
    """Network interfaces: a ``-netdev`` back end (user mode, or a tap whose descriptors
    vmconfine opens; :mod:`vmconfine.qemu.netdev`) and the NIC front end."""
    try:
        plans = interface_plans(b.domain, DEFAULT_NIC_MODEL)
    except NetConfigError as exc:
        raise UnsupportedConfigError(str(exc)) from None
    for plan in plans:
        if plan.iface.type != "user" and not plan.iface.tap:
            raise UnsupportedConfigError(
                f"interface type '{plan.iface.type}' is not supported; use type='network', "
                f"'bridge', 'ethernet', 'direct' or 'user'"
            )
        if plan.model not in NIC_MODELS:
            raise UnsupportedConfigError(
                f"interface model '{plan.model}' is not supported; use one of "
                f"{', '.join(sorted(NIC_MODELS))}"
            )
        value = netdev_value(plan)
        if isinstance(value, str):
            b.add("-netdev", value)
        else:
            b.add_passed("-netdev", value)
        b.device(b.boot(nic_props(plan, NIC_MODELS[plan.model]), plan.iface),
                 plan.iface.element)
    b.networks = plans


# --------------------------------------------------------------------------- chardevs


def chardev_backend(dev: Chardev, alias: str) -> tuple[Part, ...]:
    """The ``-chardev`` value for a character device's host side, as parts: a unix socket in
    ``mode='bind'``, a file and a ``<log file>`` are opened by vmconfine and passed as fds
    (:func:`vmconfine.domain.chardev.passed_kind`)."""
    cid = f"char{alias}"

    def need_path() -> str:
        if not dev.path:
            raise UnsupportedConfigError(f"<{dev.kind} type='{dev.type}'> needs a source path")
        return escape_opt(dev.path)

    kind = passed_kind(dev)
    parts: tuple[Part, ...]
    if dev.type in ("pty", "null", "vc", "stdio"):
        parts = (f"{dev.type},id={cid}",)
    elif dev.type == "spicevmc":
        if dev.kind != "channel" or dev.target_type != "virtio" or \
                (dev.target_name or SPICE_AGENT_CHANNEL) != SPICE_AGENT_CHANNEL:
            raise UnsupportedConfigError(
                f"<{dev.kind} type='spicevmc'> is only supported as the SPICE agent channel: "
                f"<channel type='spicevmc'><target type='virtio' name='{SPICE_AGENT_CHANNEL}'/>")
        parts = (f"spicevmc,id={cid},name=vdagent",)
    elif kind == FDSET:
        parts = (f"file,id={cid},path=",
                 PassedFd(FDSET, str(dev.path), f"{cid}-source",
                          append=bool(dev.append)))
        if dev.append is not None:
            parts += (f",append={'on' if dev.append else 'off'}",)
    elif dev.type == "pipe":
        parts = (f"pipe,id={cid},path={need_path()}",)
    elif dev.type == "dev":
        backend = "parallel" if dev.kind == "parallel" else "serial"
        parts = (f"{backend},id={cid},path={need_path()}",)
    elif kind == LISTEN:
        parts = (f"socket,id={cid},", PassedFd(LISTEN, str(dev.path), cid),
                 ",server=on,wait=off")
    elif dev.type == "unix":
        parts = (f"socket,id={cid},path={need_path()}",)
    elif dev.type == "tcp" and dev.host is not None and dev.service:
        out = f"socket,id={cid},host={escape_opt(dev.host)},port={escape_opt(dev.service)}"
        parts = (out + (",server=on,wait=off" if dev.mode == "bind" else ""),)
    else:
        raise UnsupportedConfigError(
            f"<{dev.kind} type='{dev.type}'> is not supported; use pty, file, unix, pipe, dev, "
            f"null or (for the SPICE agent channel) spicevmc"
        )
    if log_passed(dev):
        parts += (",logfile=", PassedFd(FDSET, str(dev.log_file), f"{cid}-log",
                                        append=bool(dev.log_append)))
        if dev.log_append is not None:
            parts += (f",logappend={'on' if dev.log_append else 'off'}",)
    return parts


#: the virtio port name of the SPICE agent channel (libvirt's default for spicevmc)
SPICE_AGENT_CHANNEL = "com.redhat.spice.0"
#: QEMU's ISA serial ports (MAX_ISA_SERIAL_PORTS)
MAX_ISA_SERIAL_PORTS = 4


def _serial_device(dev: Chardev, alias: str, index: int) -> dict[str, Any]:
    ttype = dev.target_type if dev.kind == "serial" else None
    if ttype in (None, "isa-serial", "serial"):
        if index >= MAX_ISA_SERIAL_PORTS:
            raise UnsupportedConfigError(
                f"serial port {index} is out of range: QEMU has ISA serial ports 0 to "
                f"{MAX_ISA_SERIAL_PORTS - 1}; fix <target port=...> or use "
                f"<target type='pci-serial'/>"
            )
        return {"driver": "isa-serial", "chardev": f"char{alias}", "id": alias, "index": index}
    if ttype == "pci-serial":
        return {"driver": "pci-serial", "chardev": f"char{alias}", "id": alias}
    raise UnsupportedConfigError(
        f"serial target type '{ttype}' is not supported; use isa-serial or pci-serial"
    )


def add_chardevs(b: Builder) -> None:
    """Serial ports, consoles, virtio channels and parallel ports."""
    chardevs = b.domain.chardevs
    serials = [c for c in chardevs if c.kind == "serial"]
    consoles = [c for c in chardevs if c.kind == "console"]
    virtio_consoles: list[tuple[int, Chardev]] = []
    for i, con in enumerate(consoles):
        ttype = con.target_type or "serial"
        if ttype == "serial":
            if i != 0:
                raise UnsupportedConfigError(
                    "only the first <console> can be a serial console; use "
                    "<target type='virtio'/> for the others"
                )
            if not serials:  # libvirt: a lone serial console is serial port 0
                serials.append(con)
        elif ttype == "virtio":
            virtio_consoles.append((i, con))
        else:
            raise UnsupportedConfigError(
                f"console target type '{ttype}' is not supported; use 'serial' or 'virtio'"
            )
    for n, dev in enumerate(serials):
        alias = f"serial{n}"
        port = dev.target_port if dev.kind == "serial" and dev.target_port is not None else n
        b.add_chardev(dev, alias)
        b.device(_serial_device(dev, alias, port), dev.element)
    for n, dev in enumerate(c for c in chardevs if c.kind == "parallel"):
        alias = f"parallel{n}"
        b.add_chardev(dev, alias)
        b.device({"driver": "isa-parallel", "chardev": f"char{alias}", "id": alias})
    for i, dev in virtio_consoles:
        alias = f"console{i}"
        b.add_chardev(dev, alias)
        b.device({"driver": "virtconsole", "chardev": f"char{alias}", "id": alias})
    ports = virtio_serial_ports(chardevs)
    for n, dev in enumerate(c for c in chardevs if c.kind == "channel"):
        if dev.target_type != "virtio":
            raise UnsupportedConfigError(
                f"channel target type '{dev.target_type}' is not supported; use "
                f"<target type='virtio' name='...'/>"
            )
        alias = f"channel{n}"
        b.add_chardev(dev, alias)
        props: dict[str, Any] = {"driver": "virtserialport", "bus": "virtio-serial0.0",
                                 "nr": ports[id(dev)], "chardev": f"char{alias}", "id": alias}
        name = dev.target_name or (SPICE_AGENT_CHANNEL if dev.type == "spicevmc" else None)
        if name:
            props["name"] = name
        b.device(props)


# --------------------------------------------------------------------------- input, display


def _need_usb(b: Builder, what: str) -> str:
    if b.usb_bus is None:
        raise UnsupportedConfigError(
            f"{what} needs a USB controller, but the USB controller model is 'none'; remove "
            f"<controller type='usb' model='none'/>"
        )
    return b.usb_bus


def add_inputs(b: Builder) -> None:
    """USB and virtio input devices (PS/2 mouse and keyboard are built into the machine)."""
    for i, inp in enumerate(b.domain.inputs):
        bus = inp.bus or ("ps2" if inp.type in ("mouse", "keyboard") else "usb")
        if bus == "ps2" and inp.type in ("mouse", "keyboard"):
            continue
        if inp.type == "passthrough" or inp.type == "evdev":
            if not inp.evdev:
                raise UnsupportedConfigError("<input type='passthrough'> needs <source evdev=...>")
            b.device({"driver": "virtio-input-host-pci", "id": f"input{i}",
                      "evdev": inp.evdev}, inp.element)
            continue
        qdev = INPUT_DEVICES.get((inp.type, bus))
        if qdev is None:
            raise UnsupportedConfigError(
                f"<input type='{inp.type}' bus='{bus}'> is not supported; use a usb or "
                f"virtio tablet, mouse or keyboard"
            )
        props: dict[str, Any] = {"driver": qdev, "id": f"input{i}"}
        if bus == "usb":
            props["bus"] = _need_usb(b, f"<input type='{inp.type}' bus='usb'>")
        b.device(props, inp.element)


def element_boot_order(obj: object) -> int | None:
    """``<boot order=N>`` of a device whose model keeps its element (interfaces, hostdevs)."""
    el = getattr(obj, "element", None)
    if el is None:
        return None
    boot = next((c for c in el if c.tag == "boot"), None)
    raw = boot.get("order") if boot is not None else None
    return int(raw) if raw is not None and raw.isdigit() and int(raw) > 0 else None


# --------------------------------------------------------------------------- hostdev, balloon


def add_hostdevs(b: Builder) -> None:
    """PCI (VFIO) and USB host devices."""
    for i, h in enumerate(b.domain.hostdevs):
        alias = f"hostdev{i}"
        if h.mode != "subsystem":
            raise UnsupportedConfigError(
                f"<hostdev mode='{h.mode}'> is not supported; use mode='subsystem'"
            )
        if h.type == "pci":
            if h.driver not in (None, "vfio"):
                raise UnsupportedConfigError(
                    f"PCI host device driver '{h.driver}' is not supported; use "
                    f"<driver name='vfio'/>"
                )
            host = f"{h.domain or 0:04x}:{h.bus or 0:02x}:{h.slot or 0:02x}.{h.function or 0:x}"
            b.device(b.boot({"driver": "vfio-pci", "host": host, "id": alias}, h), h.element)
        elif h.type == "usb":
            props: dict[str, Any] = {"driver": "usb-host", "id": alias,
                                     "bus": _need_usb(b, "a USB host device")}
            if h.bus is not None and h.device is not None:
                props.update({"hostbus": h.bus, "hostaddr": h.device})
            else:
                props.update({"vendorid": h.vendor, "productid": h.product})
            b.device(b.boot(props, h))
        else:
            raise UnsupportedConfigError(
                f"<hostdev type='{h.type}'> is not supported; use type='pci' or type='usb'"
            )


def add_rngs(b: Builder) -> None:
    """virtio-rng devices fed from a host entropy file (``<backend model='random'>``)."""
    for i, rng in enumerate(b.domain.rngs):
        if rng.model != "virtio" or rng.backend_model != "random":
            raise UnsupportedConfigError(
                f"<rng model='{rng.model}'> with backend '{rng.backend_model}' is not "
                f"supported; use model='virtio' with <backend model='random'>"
            )
        path = rng.path or "/dev/urandom"
        b.add("-object", to_json({"qom-type": "rng-random", "id": f"objrng{i}",
                                  "filename": path}))
        b.device({"driver": "virtio-rng-pci", "rng": f"objrng{i}", "id": f"rng{i}"},
                 rng.element)


TPM_MODELS = ("tpm-tis", "tpm-crb")
TPM_VERSIONS = ("2.0", "1.2")
#: the TPM emulator's control channel: QEMU gets one end of a socket pair, swtpm the other
TPM_CHARDEV = "chrtpm"


def tpm_version(tpm: Tpm) -> str:
    """The emulated TPM's version (libvirt's default for an emulator: 2.0)."""
    return tpm.version or "2.0"


def check_tpm(domain: Domain) -> Tpm | None:
    """The domain's emulated TPM (at most one), validated as libvirt validates it."""
    if not domain.tpms:
        return None
    if len(domain.tpms) > 1:
        raise UnsupportedConfigError("only one <tpm> device is supported; remove the others")
    tpm = domain.tpms[0]
    model = tpm.model or "tpm-tis"
    if model not in TPM_MODELS:
        raise UnsupportedConfigError(f"<tpm model='{model}'> is not supported; use one of "
                                     f"{', '.join(TPM_MODELS)}")
    version = tpm_version(tpm)
    if version not in TPM_VERSIONS:
        raise UnsupportedConfigError(f"<backend version='{version}'> of the TPM emulator is "
                                     f"not supported; use '2.0' or '1.2'")
    if model == "tpm-crb" and version == "1.2":
        raise UnsupportedConfigError("TPM 1.2 is not supported with the CRB interface; use "
                                     "model='tpm-tis' or version='2.0'")
    return tpm


def tpm_socket_path(runtime_dir: str) -> str:
    """Where a swtpm started by hand would listen (what ``domxml-to-native`` shows)."""
    return os.path.join(runtime_dir, "swtpm.sock")


def add_tpms(b: Builder, runtime_dir: str) -> None:
    """The emulated TPM as libvirt writes it: ``-chardev socket,id=chrtpm`` (here one end of a
    socket pair whose other end swtpm holds), ``-tpmdev emulator`` and the TIS/CRB device."""
    tpm = check_tpm(b.domain)
    if tpm is None:
        return
    b.add_passed("-chardev", (f"socket,id={TPM_CHARDEV},",
                              PassedFd(CONNECTED, tpm_socket_path(runtime_dir), TPM_CHARDEV)))
    b.add("-tpmdev", f"emulator,id=tpm-tpm0,chardev={TPM_CHARDEV}")
    b.device({"driver": tpm.model or "tpm-tis", "tpmdev": "tpm-tpm0", "id": "tpm0"})


def add_memballoon(b: Builder) -> None:
    """``virtio-balloon-pci`` (libvirt's default when ``<memballoon>`` is absent)."""
    model = b.domain.memballoon or "virtio"
    if model == "none":
        return
    if model != "virtio":
        raise UnsupportedConfigError(
            f"memballoon model '{model}' is not supported; use 'virtio' or 'none'"
        )
    b.device({"driver": "virtio-balloon-pci", "id": "balloon0"})
