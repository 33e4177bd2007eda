"""PCI addresses of a Q35 guest, assigned as libvirt 9.0 assigns them
(``src/qemu/qemu_domain_address.c``, ``src/conf/domain_addr.c``).

On a machine with a PCI Express root (``pcie.0``) libvirt leaves only integrated devices on the
root bus (the ICH9 ISA bridge 00:1f.0, SATA controller 00:1f.2, SMBus 00:1f.3, and the primary
video card at 00:01.0) and plugs every other PCI device into a bus of its own, so each one can
be unplugged and a new one plugged in:

* a PCI Express device (every virtio device, qemu-xhci, e1000e, vfio-pci, bochs) behind its own
  ``pcie-root-port``;
* a conventional PCI device (e1000, rtl8139, lsilogic, i6300esb, cirrus/VGA as a second card,
  pci-serial, UHCI/EHCI USB, a second AHCI controller) on a ``pcie-to-pci-bridge`` (slots
  1-31), which itself sits behind a root port.

The algorithm is libvirt's: a dry run over the devices in libvirt's order (PCI controllers,
network interfaces, device controllers, virtio disks, host devices, the memballoon, RNGs, the
watchdog, further video cards, virtio inputs, PCI serial ports) adds a bus whenever no free
compatible slot is left (for the first conventional device a root port and a
pcie-to-pci-bridge); a domain whose XML had no PCI controllers gets one spare, empty root port
(hotplug); then the new controllers are numbered by index and everything is placed for real,
first free compatible slot first. Root ports aggregate as the functions of one slot on
``pcie.0`` (00:02.0-7 when a video card takes 00:01.0, else 00:01.0-7), their ``chassis`` is
the controller index and ``port`` is ``slot << 3 | function``. An ``<address type='pci'>`` in
the XML is honoured (and reserved before anything is assigned), as are PCI controllers
(``pcie-root-port``, ``pcie-to-pci-bridge``) given in the XML: so a started or defined domain
whose XML holds the generated controllers and addresses gets the same topology again.

:func:`assign` writes the result into the domain's XML tree, as libvirt does: an ``<address>``
on every PCI device and the generated ``<controller type='pci'>`` elements (with ``<model
name>``, ``<target chassis port>`` and their own addresses), plus an element for each PCI
device vmconfine adds by default (the USB controller, the memballoon, virtio-serial and SCSI
controllers implied by devices, the video card of a graphical guest), so the live and the
defined XML (:func:`vmconfine.launch.pipeline.define_domain`) describe the guest's PCI tree.
The command line (:func:`vmconfine.qemu.argv.build_command`)
places each device with ``bus``/``addr`` from :class:`Plan`; :func:`hotplug_address` finds a
hotplugged device its free root port.

Not done: more than 31 conventional PCI devices (libvirt would chain a pci-bridge; refused),
PCI controller models other than pcie-root, pcie-root-port and pcie-to-pci-bridge (refused),
isolation groups of host devices (every device is placed as libvirt places an emulated one),
the ICH9 USB2 companion slots (UHCI/EHCI are placed as ordinary PCI devices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxml import etree

from vmconfine.errors import XMLError

if TYPE_CHECKING:
    from vmconfine.domain import Domain

#: device kinds (libvirt's connect flags)
PCIE, PCI, ROOT_PORT, PCI_BRIDGE = "pcie", "pci", "pcie-root-port", "pcie-to-pci-bridge"
#: the PCI controller models vmconfine places (QEMU device of each)
CONTROLLER_DEVICES = {ROOT_PORT: "pcie-root-port", PCI_BRIDGE: "pcie-pci-bridge"}
#: NIC models that are PCI Express devices (virtio: a modern virtio device on Q35)
PCIE_NICS = ("virtio", "e1000e")
PCIE_USB = ("qemu-xhci", "nec-xhci")
PCIE_VIDEO = ("virtio", "bochs")


class PciAddressError(XMLError):
    """A PCI address in the XML cannot be used, or no address is left."""


@dataclass(frozen=True)
class Address:
    """A PCI address (domain 0)."""

    bus: int
    slot: int
    function: int = 0

    def bus_id(self) -> str:
        """QEMU's name of the bus (``pcie.0``, ``pci.N``)."""
        return "pcie.0" if self.bus == 0 else f"pci.{self.bus}"

    def addr(self) -> str:
        """QEMU's ``addr`` (``0x2``, ``0x2.0x1``)."""
        return f"{self.slot:#x}" + (f".{self.function:#x}" if self.function else "")

    def __str__(self) -> str:
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass
class Device:
    """A PCI device of the guest: its QEMU id, kind, XML element (made when vmconfine adds
    the device by default) and the address the XML gives."""

    key: str
    kind: str
    element: etree._Element | None
    make: Callable[[], etree._Element] | None = None
    wanted: Address | None = None
    multifunction: bool | None = None


@dataclass
class Controller:
    """A PCI controller (bus ``index``) other than pcie.0."""

    index: int
    model: str
    element: etree._Element | None = None
    address: Address | None = None

    @property
    def key(self) -> str:
        return f"pci.{self.index}"


@dataclass
class Plan:
    """Where every PCI device goes: ``addresses`` by QEMU id, ``multifunction`` ids, the PCI
    controllers in index order."""

    addresses: dict[str, Address] = field(default_factory=dict)
    multifunction: set[str] = field(default_factory=set)
    controllers: list[Controller] = field(default_factory=list)

    def place(self, props: dict[str, object]) -> dict[str, object]:
        """``props`` of a ``-device`` with ``bus``/``addr`` (and ``multifunction``) added."""
        addr = self.addresses.get(str(props.get("id")))
        if addr is None:
            return props
        props["bus"] = addr.bus_id()
        if props["id"] in self.multifunction:
            props["multifunction"] = True
        props["addr"] = addr.addr()
        return props

    def controller_devices(self) -> list[dict[str, object]]:
        """The ``-device`` properties of the PCI controllers, libvirt's way."""
        out: list[dict[str, object]] = []
        for c in self.controllers:
            addr = self.addresses[c.key]
            props: dict[str, object] = {"driver": CONTROLLER_DEVICES[c.model]}
            if c.model == ROOT_PORT:
                props.update({"port": port_of(addr), "chassis": c.index})
            props["id"] = c.key
            out.append(self.place(props))
        return out


def port_of(addr: Address) -> int:
    """A root port's ``port`` (libvirt: ``slot << 3 | function``)."""
    return addr.slot << 3 | addr.function


# ---------------------------------------------------------------------------- the bus set


@dataclass
class _Bus:
    model: str
    accepts: frozenset[str]
    min_slot: int
    max_slot: int
    auto: frozenset[str]
    used: dict[int, set[int]] = field(default_factory=dict)
    aggregate: set[int] = field(default_factory=set)

    def empty(self) -> bool:
        return not any(self.used.values())


def _bus(model: str) -> _Bus:
    if model == "pcie-root":
        return _Bus(model, frozenset({PCIE, PCI, ROOT_PORT}), 1, 31, frozenset({ROOT_PORT}))
    if model == ROOT_PORT:
        return _Bus(model, frozenset({PCIE, PCI_BRIDGE}), 0, 0, frozenset({PCIE, PCI_BRIDGE}))
    if model == PCI_BRIDGE:
        return _Bus(model, frozenset({PCI}), 1, 31, frozenset({PCI}))
    raise PciAddressError(
        f"PCI controller model '{model}' is not supported on Q35; use pcie-root-port or "
        f"pcie-to-pci-bridge (or leave the PCI controllers to vmconfine)")


class _Buses:
    def __init__(self, models: list[str], dry: bool) -> None:
        self.buses = [_bus(m) for m in models]
        self.dry = dry

    def reserve(self, addr: Address, kind: str) -> None:
        while self.dry and addr.bus >= len(self.buses):
            if kind != PCIE:
                raise PciAddressError(f"PCI address {addr}: there is no PCI controller with "
                                      f"index {addr.bus}; add it to the XML")
            self.buses.append(_bus(ROOT_PORT))
        if addr.bus >= len(self.buses):
            raise PciAddressError(f"PCI address {addr}: there is no PCI controller with index "
                                  f"{addr.bus}; add it to the XML")
        bus = self.buses[addr.bus]
        if kind not in bus.accepts or not bus.min_slot <= addr.slot <= bus.max_slot \
                or not 0 <= addr.function <= 7:
            raise PciAddressError(
                f"PCI address {addr} cannot take this device: bus {addr.bus} is a "
                f"{bus.model} (slots {bus.min_slot}-{bus.max_slot}); fix or remove the "
                f"<address>")
        functions = bus.used.setdefault(addr.slot, set())
        if addr.function in functions:
            raise PciAddressError(f"PCI address {addr} is used twice; fix the <address>es")
        if not functions and kind == ROOT_PORT:
            bus.aggregate.add(addr.slot)
        functions.add(addr.function)

    def in_use(self, addr: Address) -> bool:
        return bool(self.buses[addr.bus].used.get(addr.slot))

    def next(self, kind: str) -> Address:
        for n, bus in enumerate(self.buses):
            if kind not in bus.auto:
                continue
            for slot in range(bus.min_slot, bus.max_slot + 1):
                used = bus.used.get(slot)
                if not used:
                    return Address(n, slot)
                if kind == ROOT_PORT and slot in bus.aggregate and len(used) < 8:
                    return Address(n, slot, min(set(range(8)) - used))
        if not self.dry:
            raise PciAddressError("no PCI slot is left for a device; remove devices or give "
                                  "them <address>es")
        if kind == PCIE:
            self.buses.append(_bus(ROOT_PORT))
            return Address(len(self.buses) - 1, 0)
        if kind == PCI and not any(b.model == PCI_BRIDGE for b in self.buses):
            port = _bus(ROOT_PORT)
            port.auto = frozenset({PCI_BRIDGE})  # only the bridge goes there (libvirt)
            self.buses += [port, _bus(PCI_BRIDGE)]
            return Address(len(self.buses) - 1, 1)
        raise PciAddressError("more than 31 conventional PCI devices: vmconfine adds no "
                              "further pci-bridge; give the devices <address>es on "
                              "pcie-to-pci-bridge controllers of your own")

    def take(self, kind: str) -> Address:
        addr = self.next(kind)
        self.reserve(addr, kind)
        return addr


# ---------------------------------------------------------------------------- the domain


def _child(el: etree._Element | None, tag: str) -> etree._Element | None:
    if el is None:
        return None
    return next((c for c in el if c.tag == tag), None)


def _int(text: str | None, what: str) -> int:
    try:
        return int(text or "0", 0)
    except ValueError:
        raise PciAddressError(f"PCI address {what}='{text}' is not a number") from None


def wanted_address(el: etree._Element | None) -> Address | None:
    """The ``<address type='pci'>`` of a device element, or None."""
    a = _child(el, "address")
    if a is None or a.get("type") != "pci":
        return None
    if _int(a.get("domain"), "domain") != 0:
        raise PciAddressError("PCI domain other than 0 is not supported; use domain='0x0000'")
    return Address(_int(a.get("bus"), "bus"), _int(a.get("slot"), "slot"),
                   _int(a.get("function"), "function"))


def _devices_el(domain: Domain) -> etree._Element:
    el = _child(domain.root, "devices")
    if el is None:
        el = etree.SubElement(domain.root, "devices")
    return el


def _maker(domain: Domain, tag: str, attrs: dict[str, str],
           model: str | None = None) -> Callable[[], etree._Element]:
    def make() -> etree._Element:
        devices = _devices_el(domain)
        el = etree.Element(tag, attrs)
        if model is not None:
            etree.SubElement(el, "model", type=model)
        if tag == "controller":
            last = [c for c in devices if c.tag in ("controller", "disk", "emulator")]
            if last:
                last[-1].addnext(el)
                return el
        devices.append(el)
        return el

    return make


def _controller_el(domain: Domain, ctype: str, index: int) -> etree._Element | None:
    for el in _devices_el(domain):
        if el.tag == "controller" and el.get("type") == ctype and \
                _int(el.get("index"), "index") == index:
            return el
    return None


#: QEMU device → kind, for the PCI devices vmconfine's command line has
KINDS = {
    **dict.fromkeys((
        "virtio-blk-pci", "virtio-net-pci", "e1000e", "qemu-xhci", "nec-usb-xhci",
        "virtio-scsi-pci", "virtio-serial-pci", "virtio-balloon-pci", "virtio-rng-pci",
        "vfio-pci", "virtio-vga", "virtio-gpu-pci", "bochs-display", "virtio-tablet-pci",
        "virtio-mouse-pci", "virtio-keyboard-pci", "virtio-input-host-pci"), PCIE),
    **dict.fromkeys((
        "e1000", "rtl8139", "ne2k_pci", "pcnet", "vmxnet3", "piix3-usb-uhci",
        "piix4-usb-uhci", "usb-ehci", "ich9-usb-ehci1", "ich9-usb-uhci1", "ich9-usb-uhci2",
        "ich9-usb-uhci3", "pci-ohci", "lsi53c895a", "ahci", "i6300esb", "VGA", "cirrus-vga",
        "vmware-svga", "qxl-vga", "qxl", "pci-serial", "intel-hda", "ich9-intel-hda", "AC97"),
        PCI),
}
#: libvirt's placement order, by QEMU id prefix (controllers: see :func:`_controller_order`)
ORDER = ("net", "sound", "controller", "virtio-disk", "hostdev", "balloon", "rng", "watchdog",
         "video", "input", "serial")
#: QEMU id prefix of a device controller → its <controller type>
CONTROLLER_IDS = {"usb": "usb", "sata": "sata", "scsi": "scsi", "virtio-serial": "virtio-serial"}
#: QEMU device → the <controller model> of a controller vmconfine adds by default
CONTROLLER_MODELS = {
    "qemu-xhci": "qemu-xhci", "nec-usb-xhci": "nec-xhci", "piix3-usb-uhci": "piix3-uhci",
    "virtio-scsi-pci": "virtio-scsi", "lsi53c895a": "lsilogic",
}


def _split_id(qid: str) -> tuple[str, int]:
    """``virtio-serial0`` → ("virtio-serial", 0); ``usb`` → ("usb", 0)."""
    stem = qid.rstrip("0123456789")
    return stem, int(qid[len(stem):] or 0)


def _category(qid: str) -> str:
    stem, _n = _split_id(qid)
    return "controller" if stem in CONTROLLER_IDS else stem


def _controller_order(domain: Domain, devs: list[Device]) -> list[Device]:
    """Device controllers in libvirt's order: the XML's in document order, then the implied
    USB controller, then the other implied ones (libvirt adds them in that order)."""
    declared: list[tuple[str, int]] = []
    for el in _devices_el(domain):
        if el.tag == "controller" and el.get("type") != "pci":
            declared.append((str(el.get("type")), _int(el.get("index"), "index")))

    def where(dev: Device) -> tuple[int, int]:
        stem, n = _split_id(dev.key)
        key = (CONTROLLER_IDS[stem], n)
        if key in declared:
            return (0, declared.index(key))
        return (1 if stem == "usb" else 2, 0)

    return sorted(devs, key=where)


def inventory(domain: Domain, devices: list[dict[str, object]],
              elements: dict[str, etree._Element]) -> list[Device]:
    """The PCI devices among the command line's ``-device`` properties, in libvirt's order,
    with their XML elements (``elements`` by QEMU id; controllers, video cards and the
    memballoon are found in the tree, or made when vmconfine adds them by default)."""
    found: dict[str, list[Device]] = {c: [] for c in ORDER}
    videos = [el for el in _devices_el(domain) if el.tag == "video"]
    for props in devices:
        qid, driver = str(props.get("id", "")), str(props.get("driver", ""))
        kind = KINDS.get(driver)
        category = _category(qid)
        if kind is None or category not in found:
            continue
        el = elements.get(qid)
        make = None
        stem, n = _split_id(qid)
        if category == "controller":
            ctype = CONTROLLER_IDS[stem]
            el = _controller_el(domain, ctype, n)
            attrs = {"type": ctype, "index": str(n)}
            if driver in CONTROLLER_MODELS:
                attrs["model"] = CONTROLLER_MODELS[driver]
            make = _maker(domain, "controller", attrs)
        elif category == "video":
            el = videos[n] if n < len(videos) else None
            make = _maker(domain, "video", {}, model="cirrus")
        elif category == "balloon":
            el = next((x for x in _devices_el(domain) if x.tag == "memballoon"), None)
            make = _maker(domain, "memballoon", {"model": "virtio"})
        found[category].append(Device(qid, kind, el, None if el is not None else make,
                                      wanted_address(el)))
    found["controller"] = _controller_order(domain, found["controller"])
    return [dev for category in ORDER for dev in found[category]]


def _pci_controllers(domain: Domain) -> dict[int, Controller]:
    out: dict[int, Controller] = {}
    for el in _devices_el(domain):
        if el.tag != "controller" or el.get("type") != "pci":
            continue
        index = _int(el.get("index"), "index")
        model = el.get("model") or ("pcie-root" if index == 0 else ROOT_PORT)
        if index == 0:
            if model != "pcie-root":
                raise PciAddressError(f"the Q35 root bus is a pcie-root, not a {model}; fix "
                                      f"<controller type='pci' index='0'>")
            continue
        _bus(model)  # refuses models vmconfine does not place
        out[index] = Controller(index, model, el, wanted_address(el))
    return out


def _place_devices(buses: _Buses, devices: list[Device], controllers: list[Controller],
                   out: dict[str, Address] | None) -> None:
    """Reserve what the XML gives and the chipset's own slots, then place the rest (libvirt's
    qemuDomainCollectPCIAddress, ...ValidateDevicePCISlotsQ35, ...AssignDevicePCISlots)."""
    for c in controllers:
        if c.address is not None:
            buses.reserve(c.address, c.model)
    for dev in devices:
        if dev.wanted is not None:
            buses.reserve(dev.wanted, dev.kind)
    for fn in (0, 2, 3):  # ISA bridge, SATA (AHCI 0), SMBus
        buses.reserve(Address(0, 0x1F, fn), PCIE)
    placed: dict[str, Address] = {}
    video = next((d for d in devices if d.key == "video0"), None)
    if video is not None and video.wanted is None:  # the primary video card: 00:01.0
        slot1 = Address(0, 1)
        if buses.in_use(slot1):
            placed[video.key] = buses.take(video.kind)
        else:
            buses.reserve(slot1, PCIE)
            placed[video.key] = slot1
    sound = next((d for d in devices if d.key == "sound0"), None)
    if sound is not None and sound.wanted is None and sound.element is not None and \
            sound.element.get("model") == "ich9":  # the first sound card, ICH9 HDA: 00:1b.0
        slot = Address(0, 0x1B)
        if not buses.in_use(slot):
            buses.reserve(slot, PCIE)
            placed[sound.key] = slot
    for c in controllers:
        if c.address is None:
            placed[c.key] = buses.take(c.model)
    for dev in devices:
        if dev.wanted is None and dev.key not in placed:
            placed[dev.key] = buses.take(dev.kind)
    if out is not None:
        out.update(placed)
        out.update({c.key: c.address for c in controllers if c.address is not None})
        out.update({d.key: d.wanted for d in devices if d.wanted is not None})


def assign(domain: Domain, devices: list[Device]) -> Plan:
    """libvirt's PCI addresses for a Q35 ``domain`` whose PCI devices are ``devices`` (see
    :func:`inventory`), written into the XML tree (see the module docstring)."""
    existing = _pci_controllers(domain)
    # 1st pass (dry run): how many buses, of which models
    dry = _Buses(["pcie-root"] + [existing[i].model if i in existing else ROOT_PORT
                                  for i in range(1, max(existing, default=0) + 1)], dry=True)
    _place_devices(dry, devices, [existing[i] for i in sorted(existing)], None)
    if not existing and len(dry.buses) > 1:
        dry.take(PCIE)  # one empty root port for hotplug (new domains only)
    controllers = dict(existing)
    for index in range(1, len(dry.buses)):
        if index not in controllers:
            controllers[index] = Controller(index, dry.buses[index].model)
    ordered = [controllers[i] for i in sorted(controllers)]
    # 2nd pass: the real thing
    buses = _Buses(["pcie-root"] + [c.model for c in ordered], dry=False)
    plan = Plan(controllers=ordered)
    _place_devices(buses, devices, ordered, plan.addresses)
    _multifunction(plan)
    _write(domain, plan, devices)
    return plan


def _multifunction(plan: Plan) -> None:
    slots: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for key, addr in plan.addresses.items():
        slots.setdefault((addr.bus, addr.slot), []).append((addr.function, key))
    for users in slots.values():
        if len(users) > 1:
            plan.multifunction.update(key for fn, key in users if fn == 0)


def _set_address(el: etree._Element, addr: Address, multi: bool) -> None:
    old = _child(el, "address")
    if old is not None:
        el.remove(old)
    attrs = {"type": "pci", "domain": "0x0000", "bus": f"{addr.bus:#04x}",
             "slot": f"{addr.slot:#04x}", "function": f"{addr.function:#x}"}
    if multi:
        attrs["multifunction"] = "on"
    etree.SubElement(el, "address", attrs)


def _write(domain: Domain, plan: Plan, devices: list[Device]) -> None:
    anchor = _controller_el(domain, "pci", 0)
    if anchor is None:
        anchor = _maker(domain, "controller", {"type": "pci", "index": "0",
                                               "model": "pcie-root"})()
    for c in plan.controllers:
        if c.element is None:
            c.element = etree.Element("controller", type="pci", index=str(c.index),
                                      model=c.model)
            anchor.addnext(c.element)
        anchor = el = c.element
        addr = plan.addresses[c.key]
        if _child(el, "model") is None:
            etree.SubElement(el, "model", name=CONTROLLER_DEVICES[c.model])
        if c.model == ROOT_PORT and _child(el, "target") is None:
            etree.SubElement(el, "target", chassis=str(c.index), port=f"{port_of(addr):#x}")
        _set_address(el, addr, c.key in plan.multifunction)
    for dev in devices:
        el = dev.element
        if el is None and dev.make is not None:
            el = dev.element = dev.make()
        if el is not None:
            _set_address(el, plan.addresses[dev.key], dev.key in plan.multifunction)


def hotplug_address(domain: Domain, element: etree._Element | None) -> Address:
    """Where a device hotplugged into a running Q35 ``domain`` goes: its own ``<address>``,
    else slot 0 of the first pcie-root-port no device uses (libvirt leaves one free for this;
    pcie.0 takes no hotplug), written into ``element``."""
    wanted = wanted_address(element)
    if wanted is not None:
        return wanted
    ports: list[int] = []
    used: set[int] = set()
    for el in _devices_el(domain):
        addr = wanted_address(el) if el is not element else None
        if addr is not None:
            used.add(addr.bus)
        if el.tag == "controller" and el.get("type") == "pci" and \
                el.get("model") == ROOT_PORT:
            ports.append(_int(el.get("index"), "index"))
    free = [p for p in sorted(ports) if p not in used]
    if not free:
        raise PciAddressError(
            f"domain '{domain.name}' has no free pcie-root-port to plug the device into; "
            "add a <controller type='pci' model='pcie-root-port'/> to its definition and "
            "restart it")
    addr = Address(free[0], 0)
    if element is not None:
        _set_address(element, addr, False)
    return addr
