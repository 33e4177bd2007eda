"""Q35 PCI addresses (vmconfine.qemu.pci) against libvirt 9.0's for the same XML.

``tests/data/pci/NAME.xml`` are held-out Q35 domains; ``NAME.libvirt.xml`` is what libvirt 9.0
(Debian 12, QEMU 7.2) made of each: ``virsh define`` + ``virsh dumpxml`` on an embedded driver
(``qemu:///embed?root=DIR``, run as nobody; the host tier runs libvirt itself, see
tests/host/test_argv_libvirt.py). Every PCI address and every generated PCI controller
(model, index, chassis, port, address) must be the same; libvirt's own output given back to
vmconfine must stay as it is (``<address>`` honoured, no controller added).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.unit.test_argv import bindir, command_paths, config_for, no_image_reads  # noqa: F401
from vmconfine.domain import Domain, parse_domain
from vmconfine.domain.chardev import fill_channel_paths, record_pty
from vmconfine.errors import XMLError
from vmconfine.qemu.argv import QemuCommand, build_command
from vmconfine.qemu.pci import PciAddressError, hotplug_address

DATA = Path(__file__).resolve().parent.parent / "data" / "pci"
CASES = sorted(p.name.removesuffix(".libvirt.xml") for p in DATA.glob("*.libvirt.xml"))


def build(xml: str, bindir: Path) -> tuple[Domain, QemuCommand]:  # noqa: F811
    domain = parse_domain(xml, "test.xml")
    fill_channel_paths(domain.chardevs, "/run/vmconfine/channel")
    return domain, build_command(domain, config_for("q35", bindir), command_paths("q35"))


def pci_map(root: etree._Element) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Every device element with a PCI address → (bus, slot, function, multifunction), plus
    chassis/port for root ports; devices named by kind and position (controllers by type,
    index and model). libvirt's built-in SATA controller 00:1f.2 is left out (vmconfine adds
    no element for it)."""
    out: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    seen: dict[str, int] = {}
    devices = root.find("devices")
    assert devices is not None
    for el in devices:
        n = seen[el.tag] = seen.get(el.tag, -1) + 1
        addr = el.find("address")
        if el.tag == "controller":
            name: tuple[Any, ...] = ("controller", el.get("type"), int(el.get("index", "0")),
                                     el.get("model"))
            if el.get("type") == "sata" and el.get("index") == "0":
                continue
        else:
            name = (el.tag, n)
        if el.get("model") == "pcie-root":
            out[name] = ()
            continue
        if addr is None or addr.get("type") != "pci":
            continue
        value = tuple(int(addr.get(k), 16) for k in ("bus", "slot", "function"))
        value += (addr.get("multifunction"),)
        target = el.find("target")
        if el.get("model") == "pcie-root-port":
            assert target is not None
            value += (int(target.get("chassis")), int(target.get("port"), 16),
                      el.find("model").get("name"))
        out[name] = value
    return out


@pytest.mark.parametrize("case", CASES)
def test_addresses_are_libvirts(case: str, bindir: Path) -> None:  # noqa: F811
    domain, _cmd = build((DATA / f"{case}.xml").read_text(), bindir)
    ours = pci_map(domain.root)
    theirs = pci_map(etree.fromstring((DATA / f"{case}.libvirt.xml").read_bytes()))
    assert ours == theirs


@pytest.mark.parametrize("case", CASES)
def test_libvirts_own_xml_is_kept(case: str, bindir: Path) -> None:  # noqa: F811
    """Addresses and controllers in the XML are honoured: a defined or live XML gives the
    same topology again (and nothing is added)."""
    text = (DATA / f"{case}.libvirt.xml").read_text()
    domain, _cmd = build(text, bindir)
    theirs = pci_map(etree.fromstring(text.encode()))
    assert pci_map(domain.root) == theirs
    again, _cmd = build(domain.to_xml(), bindir)
    assert pci_map(again.root) == theirs


def devices(cmd: QemuCommand) -> dict[str, dict[str, Any]]:
    a = cmd.args
    out = [json.loads(a[i + 1]) for i, x in enumerate(a[:-1])
           if x == "-device" and a[i + 1].startswith("{")]
    return {d["id"]: d for d in out}


def test_command_line_places_devices_behind_root_ports(bindir: Path) -> None:  # noqa: F811
    _domain, cmd = build((DATA / "legacy.xml").read_text(), bindir)
    devs = devices(cmd)
    # libvirt's line for the same XML (virsh domxml-to-native)
    assert devs["pci.1"] == {"driver": "pcie-root-port", "port": 16, "chassis": 1,
                             "id": "pci.1", "bus": "pcie.0", "multifunction": True,
                             "addr": "0x2"}
    assert devs["pci.2"] == {"driver": "pcie-pci-bridge", "id": "pci.2", "bus": "pci.1",
                             "addr": "0x0"}
    assert devs["pci.3"]["addr"] == "0x2.0x1" and "multifunction" not in devs["pci.3"]
    want = {"usb": ("pci.3", "0x0"), "scsi0": ("pci.2", "0x1"),
            "virtio-disk0": ("pci.4", "0x0"), "input0": ("pci.7", "0x0"),
            "video0": ("pcie.0", "0x1"), "watchdog0": ("pci.2", "0x2"),
            "balloon0": ("pci.5", "0x0"), "rng0": ("pci.6", "0x0")}
    assert {k: (devs[k]["bus"], devs[k]["addr"]) for k in want} == want
    assert "pci.8" in devs and not any(d.get("bus") == "pci.8" for d in devs.values())
    # the controllers come before every other device, so QEMU has their buses
    order = list(devs)
    assert order[:8] == [f"pci.{i}" for i in range(1, 9)]


def test_i440fx_is_left_to_qemu(bindir: Path) -> None:  # noqa: F811
    text = (DATA / "legacy.xml").read_text().replace("machine='q35'", "machine='pc'")
    domain, cmd = build(text, bindir)
    assert not any("bus" in d and d["bus"].startswith("pci") for d in devices(cmd).values())
    assert b"pcie-root-port" not in etree.tostring(domain.root)


@pytest.mark.parametrize(("address", "message"), [
    ("<address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>",
     "used twice"),
    ("<address type='pci' domain='0x0000' bus='0x00' slot='0x20' function='0x0'/>",
     "cannot take this device"),
    ("<address type='pci' domain='0x0001' bus='0x00' slot='0x05' function='0x0'/>",
     "PCI domain other than 0"),
])
def test_bad_addresses_are_refused(address: str, message: str,
                                   bindir: Path) -> None:  # noqa: F811
    text = (DATA / "explicit.xml").read_text().replace(
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>", address)
    with pytest.raises(XMLError, match=message):
        build(text, bindir)


def test_hotplug_takes_the_free_root_port(bindir: Path) -> None:  # noqa: F811
    domain, _cmd = build((DATA / "mixed.xml").read_text(), bindir)
    new = etree.fromstring(b"<disk type='file' device='disk'><target dev='vdb' bus='virtio'/>"
                           b"</disk>")
    addr = hotplug_address(domain, new)
    assert (addr.bus_id(), addr.addr()) == ("pci.9", "0x0")  # libvirt's spare port
    assert new.find("address").get("bus") == "0x09"
    domain.root.find("devices").append(new)
    with pytest.raises(PciAddressError, match="no free pcie-root-port"):
        hotplug_address(domain, etree.fromstring(b"<disk/>"))


def test_live_pty_paths_leave_the_inactive_xml() -> None:
    domain = parse_domain(
        "<domain type='qemu'><name>p</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><serial type='pty'><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console></devices></domain>")
    serial = next(c for c in domain.chardevs if c.kind == "serial")
    domain.generated_paths += record_pty(domain.chardevs, serial, "/dev/pts/7")
    live = etree.fromstring(domain.to_xml(live=True).encode())
    assert live.find("devices/serial/source").get("path") == "/dev/pts/7"
    console = live.find("devices/console")
    assert console.get("tty") == console.find("source").get("path") == "/dev/pts/7"
    inactive = domain.to_xml()
    assert "/dev/pts/7" not in inactive and "tty=" not in inactive
