"""Domain XML model: fields, libvirt defaults and rules, seclabels, round trips, live XML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lxml import etree

from vmconfine.domain import (
    QEMU_NS,
    VMCONFINE_NS,
    Domain,
    default_disk_bus,
    find_device_seclabel,
    memory_to_kib,
    parse_domain,
    unit_scale,
)
from vmconfine.domain.devices import parse_c_uint
from vmconfine.errors import VmconfineError, XMLError

DATA = Path(__file__).resolve().parent.parent / "data" / "domains"


def load(name: str, **kw: bool) -> Domain:
    return parse_domain((DATA / name).read_bytes(), name, **kw)


def mk(devices: str = "", extra: str = "", os_extra: str = "", head: str = "",
       root_attrs: str = "type='kvm'", **kw: bool) -> Domain:
    """A minimal valid domain with pieces inserted."""
    xml = (f"<domain {root_attrs}>\n  <name>t</name>\n{head}  <memory>1024</memory>\n"
           f"  <os>\n    <type>hvm</type>\n{os_extra}  </os>\n"
           f"  <devices>\n{devices}  </devices>\n{extra}</domain>\n")
    return parse_domain(xml, "t.xml", **kw)


def err(**kw: str) -> str:
    with pytest.raises(XMLError) as info:
        mk(**kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("t.xml: line ")
    return msg


# --------------------------------------------------------------------------- seed examples


def test_seed_to_native_example() -> None:
    d = load("seed-to-native.xml")
    assert (d.name, d.uuid, d.virt_type) == ("QEMUGuest1",
                                             "c7a5fdbd-edaf-9455-926a-d65c16db1809", "qemu")
    assert not d.uuid_generated
    assert (d.memory_kib, d.current_memory_kib, d.vcpus) == (219200, 219200, 1)
    assert (d.os.type, d.os.arch, d.os.machine, d.os.boot_devs) == ("hvm", "i686", "pc", ["hd"])
    assert d.clock_offset == "utc"
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert d.emulator == "/usr/bin/qemu"
    (disk,) = d.disks
    assert (disk.type, disk.device, disk.target, disk.bus) == ("block", "disk", "hda", "ide")
    assert disk.source is not None
    assert (disk.source.path, disk.source.type, disk.source.format) == (
        "/dev/HostVG/QEMUGuest1", "block", "raw")
    assert d.graphics == [] and d.seclabels == [] and d.qemu_args == []


def test_seed_from_native_output_has_no_name() -> None:
    with pytest.raises(XMLError, match=r"^seed-from-native.xml: line 1: missing domain name"):
        load("seed-from-native.xml")


def test_seed_qemu_commandline_example() -> None:
    d = load("seed-qemu-commandline.xml")
    assert d.name == "QEmu-fedora-i686" and d.virt_type == "qemu"
    assert d.uuid_generated
    assert d.uuid == str(__import__("uuid").UUID(d.uuid))
    assert f"<uuid>{d.uuid}</uuid>" in d.to_xml()
    assert d.current_memory_kib == d.memory_kib == 219200
    assert d.vcpus == 1 and d.graphics == [] and d.disks == []
    assert d.emulator == "/usr/bin/qemu-system-x86_64"
    assert d.qemu_args == ["-newarg"]
    assert d.qemu_env == [("QEMU_ENV", "VAL")]


def test_seed_qemu_emulated_example() -> None:
    d = load("seed-qemu-emulated.xml")
    assert d.vcpus == 2 and d.os.boot_devs == ["cdrom"]
    cdrom, disk = d.disks
    assert (cdrom.device, cdrom.target, cdrom.bus, cdrom.readonly) == ("cdrom", "hdc", "ide", True)
    assert cdrom.source is not None and cdrom.source.path == "/home/user/boot.iso"
    assert (disk.target, disk.bus, disk.readonly) == ("hda", "ide", False)
    (nic,) = d.interfaces
    assert (nic.type, nic.source, nic.mac) == ("network", "default", None)
    (vnc,) = d.graphics
    assert (vnc.type, vnc.port, vnc.autoport) == ("vnc", -1, True)


def test_seed_kvm_example() -> None:
    d = load("seed-kvm-i686.xml")
    assert d.virt_type == "kvm" and d.os.arch == "i686" and d.os.machine is None
    assert d.uuid == "4dea24b3-1d52-d8f3-2516-782e98a23fa0"
    assert d.memory_kib == 131072 and d.current_memory_kib == 131072
    assert d.clock_offset == "utc"  # legacy sync= is not an offset
    (nic,) = d.interfaces
    assert nic.mac == "24:42:53:21:52:45" and nic.source == "default"
    (vnc,) = d.graphics
    assert (vnc.port, vnc.autoport, vnc.keymap) == (-1, True, "de")
    assert d.disks[0].source is not None
    assert d.disks[0].source.path == "/var/lib/libvirt/images/demo2.img"


# --------------------------------------------------------------------------- every field


@pytest.fixture(scope="module")
def full() -> Domain:
    return load("full.xml")


def test_full_top_level(full: Domain) -> None:
    d = full
    assert d.uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"  # lowercase canonical
    assert (d.title, d.description) == ("Everything", "A domain that uses every modelled field.")
    assert (d.memory_kib, d.current_memory_kib, d.max_memory_kib) == (2097152, 1048576, 8388608)
    assert (d.vcpus, d.vcpus_current) == (4, 2)
    assert d.features == ["acpi", "apic", "vmport"]
    assert d.clock_offset == "localtime"
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("preserve", "destroy", "coredump-restart")
    assert d.memballoon == "virtio"
    assert d.qemu_args == ["-newarg", "-device", "pvpanic"]
    assert d.qemu_env == [("QEMU_ENV", "VAL"), ("_NOVALUE", None)]


def test_full_os(full: Domain) -> None:
    o = full.os
    assert (o.arch, o.machine, o.firmware) == ("x86_64", "pc-q35-7.2", "efi")
    assert o.boot_devs == ["cdrom", "hd", "network"]
    assert (o.kernel, o.initrd, o.dtb) == ("/boot/vmlinuz-test", "/boot/initrd-test.img",
                                           "/boot/test.dtb")
    assert o.cmdline == "console=ttyS0 root=/dev/vda1"
    assert o.loader is not None
    assert (o.loader.path, o.loader.readonly, o.loader.type) == (
        "/usr/share/OVMF/OVMF_CODE.fd", True, "pflash")
    assert o.nvram == "/var/lib/vmconfine/nvram/full_VARS.fd"
    assert o.nvram_template == "/usr/share/OVMF/OVMF_VARS.fd"


def test_full_disks_and_backing_chain(full: Domain) -> None:
    top = full.disks[0]
    assert (top.driver_name, top.format, top.cache, top.serial) == (
        "qemu", "qcow2", "none", "DISK-SERIAL-1")
    chain = top.chain()
    assert [(s.path, s.type, s.format) for s in chain] == [
        ("/var/lib/images/top.qcow2", "file", "qcow2"),
        ("/var/lib/images/mid.qcow2", "file", "qcow2"),
        ("/dev/vg0/base", "block", "raw")]
    assert chain[-1].backing is None and chain[-1].backing_declared
    assert [(s.model, s.relabel, s.label) for s in chain[0].seclabels] == [
        ("dac", False, None),
        ("selinux", True, "system_u:object_r:svirt_image_custom_t:s0:c41,c264")]
    assert chain[1].seclabel("dac") is not None and chain[1].seclabel("dac").label == "+107:+107"
    assert chain[1].seclabel("selinux") is None
    shared, cdrom, floppy, dirdisk, net, vol = full.disks[1:]
    assert (shared.type, shared.bus, shared.shareable, shared.source.path) == (  # type: ignore
        "block", "scsi", True, "/dev/sdb")
    assert not shared.source.backing_declared  # type: ignore[union-attr]
    assert cdrom.source is None and cdrom.readonly and cdrom.chain() == []
    assert floppy.bus == "fdc" and floppy.readonly
    assert floppy.source.path == "../relative/./floppy.img"  # type: ignore[union-attr]
    assert (dirdisk.type, dirdisk.source.path) == ("dir", "/srv/fat")  # type: ignore
    assert (net.source.path, net.source.protocol, net.source.name) == (  # type: ignore
        None, "nbd", "export")
    assert (vol.source.pool, vol.source.volume) == ("default", "vol1.img")  # type: ignore


def test_full_chardevs(full: Domain) -> None:
    got = [(c.kind, c.type, c.path, c.mode, c.target_type, c.target_name, c.target_port)
           for c in full.chardevs]
    assert got == [
        ("serial", "pty", None, None, "isa-serial", None, 0),
        ("serial", "file", "/var/log/vmconfine/full-serial.log", None, None, None, 1),
        ("serial", "tcp", None, "bind", None, None, 2),
        ("serial", "udp", None, None, None, None, 3),
        ("console", "pty", None, None, "serial", None, 0),
        ("console", "stdio", None, None, "virtio", None, 1),
        ("parallel", "pipe", "/srv/vmconfine-test/full-parallel", None, None, None, 0),
        ("parallel", "null", None, None, None, None, 1),
        ("channel", "unix", "/run/vmconfine/full/org.qemu.guest_agent.0", "bind", "virtio",
         "org.qemu.guest_agent.0", None),
        ("channel", "unix", None, "connect", "virtio", "org.example.auto", None),
        ("serial", "dev", "/dev/ttyS0", None, None, None, 4),
        ("serial", "unix", "/srv/vmconfine-test/full-serial.sock", "connect", None, None, 5),
    ]
    filedev = full.chardevs[1]
    assert filedev.log_file == "/var/log/vmconfine/full-serial1.log"
    assert filedev.seclabel("dac") is not None and not filedev.seclabel("dac").relabel
    tcp = full.chardevs[2]
    assert (tcp.host, tcp.service) == ("127.0.0.1", "4555")


def test_full_graphics_interfaces_inputs(full: Domain) -> None:
    g = [(x.type, x.port, x.autoport, x.listen, x.listen_type, x.socket) for x in full.graphics]
    assert g == [("vnc", 5901, False, "127.0.0.1", "address", None),
                 ("vnc", None, False, None, "socket", "/run/vmconfine/full/vnc.sock"),
                 ("vnc", None, False, None, "socket", "/run/vmconfine/full/vnc2.sock")]
    assert [(i.type, i.model, i.mac, i.source, i.target_dev) for i in full.interfaces] == [
        ("user", "virtio", None, None, None),
        ("network", "e1000", "52:54:00:12:34:56", "default", None),
        ("bridge", None, None, "br0", None)]  # vnet7: a generated name, dropped (libvirt)
    assert [(i.type, i.bus, i.evdev) for i in full.inputs] == [
        ("tablet", "usb", None), ("passthrough", "virtio", "/dev/input/event1"),
        ("evdev", None, "/dev/input/event2")]


def test_full_hostdevs_controllers_misc(full: Domain) -> None:
    usb_ids, usb_addr, pci = full.hostdevs
    assert (usb_ids.mode, usb_ids.type, usb_ids.managed) == ("subsystem", "usb", True)
    assert (usb_ids.vendor, usb_ids.product) == (0x1234, 0xBEEF)
    assert (usb_addr.bus, usb_addr.device, usb_addr.managed) == (1, 8, False)  # '010' is octal
    assert (pci.type, pci.driver, pci.managed) == ("pci", "vfio", True)
    assert (pci.domain, pci.bus, pci.slot, pci.function) == (0, 6, 0x12, 5)
    assert (pci.pci_domain, pci.pci_bus, pci.pci_slot, pci.pci_function) == (0, 6, 0x12, 5)
    assert (pci.usb_bus, usb_addr.pci_bus) == (None, None)
    assert (usb_ids.usb_vendor, usb_ids.usb_product, usb_addr.usb_bus, usb_addr.usb_device) == (
        0x1234, 0xBEEF, 1, 8)
    assert [(c.type, c.index, c.model) for c in full.controllers] == [
        ("usb", 0, "qemu-xhci"), ("pci", 0, "pcie-root")]
    assert [(t.model, t.backend, t.device_path) for t in full.tpms] == [
        ("tpm-tis", "passthrough", "/dev/tpm0")]
    assert [(r.backend_model, r.path) for r in full.rngs] == [("random", "/dev/urandom")]
    fs = full.filesystems[0]
    assert (fs.source, fs.target, fs.readonly, fs.accessmode) == (
        "/srv/share", "share", True, "passthrough")


def test_full_seclabels(full: Domain) -> None:
    sel, dac = full.seclabels
    assert (sel.model, sel.type, sel.relabel, sel.label, sel.baselabel) == (
        "selinux", "dynamic", True, None, "system_u:system_r:svirt_t:s0")
    assert (dac.model, dac.type, dac.relabel, dac.label) == ("dac", "static", True, "+107:+107")
    assert full.seclabel("dac") is dac and full.seclabel("apparmor") is None
    assert not sel.implicit


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(("value", "unit", "kib"), [
    ("219200", None, 219200), ("7", "", 7),
    ("1", "b", 1), ("1024", "bytes", 1), ("1025", "byte", 2), ("0", "b", 0),
    ("1", "k", 1), ("1", "KiB", 1), ("1", "KB", 1), ("2", "KB", 2), ("2048", "kb", 2000),
    ("1", "M", 1024), ("1", "MiB", 1024), ("1", "MB", 977), ("1", "mib", 1024),
    ("1", "G", 1048576), ("1", "GiB", 1048576), ("1", "GB", 976563),
    ("1", "T", 1073741824), ("1", "TiB", 1073741824), ("1", "TB", 976562500),
    ("1", "P", 1024**4), ("1", "EiB", 1024**5), (" 12 ", "MiB", 12 * 1024),
])
def test_memory_units(value: str, unit: str | None, kib: int) -> None:
    assert memory_to_kib(value, unit) == kib


@pytest.mark.parametrize("unit", ["XB", "KiBB", "kilobytes", "Mi", "q", "KBB", "iB", "\uff4b"])
def test_unknown_units(unit: str) -> None:
    assert unit_scale(unit) is None
    msg = err(head=f"  <currentMemory unit='{unit}'>1</currentMemory>\n")
    assert msg.startswith("t.xml: line 3: <currentMemory>: unknown unit")


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "1_0", "٣", "0x10"])
def test_bad_memory_values(value: str) -> None:
    msg = err(head=f"  <currentMemory>{value}</currentMemory>\n")
    assert "is not a non-negative integer" in msg and "line 3" in msg


def test_memory_overflow_and_missing() -> None:
    assert "too large" in err(head="  <currentMemory unit='EiB'>8</currentMemory>\n")
    with pytest.raises(XMLError, match="Memory size must be specified"):
        parse_domain("<domain type='kvm'><name>a</name><os><type>hvm</type></os></domain>")
    with pytest.raises(XMLError, match="Memory size must be specified"):
        parse_domain("<domain type='kvm'><name>a</name><memory>0</memory>"
                     "<os><type>hvm</type></os></domain>")


def test_numa_cells_define_memory_and_current_is_clamped() -> None:
    d = mk(head="  <currentMemory unit='GiB'>64</currentMemory>\n",
           extra="  <cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/>"
                 "<cell id='1' cpus='1' memory='512' unit='MiB'/></numa></cpu>\n")
    assert d.memory_kib == 1024 * 1024 + 512 * 1024
    assert d.current_memory_kib == d.memory_kib


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    d = mk()
    assert (d.vcpus, d.vcpus_current, d.memory_kib, d.current_memory_kib) == (1, None, 1024, 1024)
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert d.os.boot_devs == ["hd"] and d.os.loader is None and d.os.nvram is None
    assert d.emulator is None and d.memballoon is None and d.features == []
    assert d.graphics == []  # no <graphics>: no display
    assert d.id is None and d.state == {} and d.live is False


@pytest.mark.parametrize(("device", "target", "bus"), [
    ("disk", "hda", "ide"), ("disk", "sdb", "scsi"), ("disk", "vdz", "virtio"),
    ("disk", "xvda", "xen"), ("disk", "ubda", "uml"), ("floppy", "fda", "fdc"),
    ("floppy", "hdb", "fdc"), ("disk", "fda", "ide"), ("cdrom", "sdc", "scsi"),
    ("disk", "weird0", "ide"),
])
def test_default_disk_bus(device: str, target: str, bus: str) -> None:
    assert default_disk_bus(device, target) == bus
    d = mk(devices=f"    <disk device='{device}'><source file='/x'/>"
                   f"<target dev='{target}'/></disk>\n")
    assert d.disks[0].bus == bus and d.disks[0].type == "file"


def test_disk_defaults_and_boot_order() -> None:
    d = mk(devices="    <disk><source file='/img'/><target dev='vda'/><boot order='2'/></disk>\n"
                   "    <serial/>\n    <channel type='unix'><target type='virtio'/></channel>\n")
    disk = d.disks[0]
    assert (disk.type, disk.device, disk.format, disk.boot_order) == ("file", "disk", "raw", 2)
    assert disk.source is not None and not disk.source.format_given
    assert d.os.boot_devs == []  # per-device boot replaces the default
    assert (d.chardevs[0].type, d.chardevs[1].mode) == ("pty", "connect")


def test_graphics_autoport_rules() -> None:
    d = mk(devices="    <graphics type='vnc'/>\n"
                   "    <graphics type='vnc' port='5905' autoport='yes'/>\n"
                   "    <graphics type='vnc' autoport='no'/>\n"
                   "    <graphics type='vnc' port='-1' listen='0.0.0.0'/>\n")
    assert [(g.port, g.autoport, g.listen) for g in d.graphics] == [
        (-1, True, None), (-1, True, None), (0, False, None), (-1, True, "0.0.0.0")]
    live = mk(devices="    <graphics type='vnc' port='5905' autoport='yes'/>\n", live=True)
    assert (live.graphics[0].port, live.graphics[0].autoport) == (5905, True)


@pytest.mark.parametrize(("text", "value"), [
    ("0x1f", 31), ("0X1F", 31), ("010", 8), ("0", 0), ("12", 12), (" 7 ", 7), ("+5", 5),
    ("08", None), ("0x", None), ("-1", None), ("1_0", None), ("", None), ("٣", None),
])
def test_c_style_integers(text: str, value: int | None) -> None:
    assert parse_c_uint(text) == value


def test_find_device_seclabel_prefers_exact_model() -> None:
    d = mk(devices="    <disk><source file='/img'><seclabel relabel='no'/>"
                   "<seclabel model='selinux'><label>x_t</label></seclabel></source>"
                   "<target dev='vda'/></disk>\n")
    labels = d.disks[0].source.seclabels  # type: ignore[union-attr]
    assert find_device_seclabel(labels, "selinux").label == "x_t"  # type: ignore[union-attr]
    assert find_device_seclabel(labels, "dac").model is None  # type: ignore[union-attr]


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(("kw", "needle"), [
    ({"head": "  <uuid>not-a-uuid</uuid>\n"}, "line 3: malformed uuid 'not-a-uuid'"),
    ({"head": "  <uuid>4dea24b3-1d52-d8f3-2516-782e98a23fa</uuid>\n"}, "malformed uuid"),
    ({"head": "  <uuid>4dea24b3-1d52-d8f3-2516-782e98a23fa0aa</uuid>\n"}, "malformed uuid"),
    ({"root_attrs": "type='xen'"}, "line 1: domain type 'xen' is not supported"),
    ({"root_attrs": "type='lxc'"}, "type='kvm' or type='qemu'"),
    ({"root_attrs": ""}, "<domain> has no type attribute"),
    ({"head": "  <vcpu>two</vcpu>\n"}, "line 3: maximum vcpus count must be an integer"),
    ({"head": "  <vcpu>1.5</vcpu>\n"}, "maximum vcpus count must be an integer"),
    ({"head": "  <vcpu>0</vcpu>\n"}, "at least 1 vCPU"),
    ({"head": "  <vcpu current='3'>2</vcpu>\n"}, "current vcpus (3)"),
    ({"extra": "  <on_crash>explode</on_crash>\n"}, "invalid <on_crash> action 'explode'"),
    ({"extra": "  <on_reboot>coredump-destroy</on_reboot>\n"}, "invalid <on_reboot> action"),
    ({"os_extra": "    <boot dev='usb'/>\n"}, "unknown boot device 'usb'"),
    ({"os_extra": "    <boot/>\n"}, "missing boot device"),
    ({"os_extra": "    <boot dev='hd'/>\n",
      "devices": "    <disk><source file='/a'/><target dev='vda'/><boot order='1'/></disk>\n"},
     "per-device boot elements cannot be used together with os/boot"),
    ({"devices": "    <disk><source file='/a'/></disk>\n"}, "line 8: disk has no <target"),
    ({"devices": "    <disk><source file='/a'/><target dev='vda'/></disk>\n"
                 "    <disk><source file='/b'/><target dev='vda'/></disk>\n"},
     "line 9: disk target 'vda' is used twice (also at line 8)"),
    ({"devices": "    <disk type='tape'><target dev='vda'/></disk>\n"}, "unknown disk type"),
    ({"devices": "    <disk device='tape'><target dev='vda'/></disk>\n"}, "unknown disk device"),
    ({"devices": "    <disk><source file='/a'/><target dev='vda'/><boot order='x'/></disk>\n"},
     "disk boot order 'x' is not a non-negative integer"),
    ({"devices": "    <disk><source file='/a'/><backingStore type='file'><source file='/b'/>"
                 "</backingStore><target dev='vda'/></disk>\n"}, "has no <format type=...>"),
    ({"devices": "    <disk><source file='/a'/><backingStore type='file'><format type='raw'/>"
                 "<source file='/a'/></backingStore><target dev='vda'/></disk>\n"},
     "backing chain of disk 'vda' repeats '/a'"),
    ({"devices": "    <serial type='file'><target port='0'/></serial>\n"},
     "<serial type='file'> needs <source path=...>"),
    ({"devices": "    <serial type='unix'/>\n"}, "<serial type='unix'> needs <source path"),
    ({"devices": "    <serial type='socket'/>\n"}, "unknown <serial> type 'socket'"),
    ({"devices": "    <channel type='unix'><source mode='listen' path='/s'/></channel>\n"},
     "unknown <channel> source mode 'listen'"),
    ({"devices": "    <serial><target port='x'/></serial>\n"}, "target port 'x'"),
    ({"devices": "    <graphics/>\n"}, "<graphics> has no type"),
    ({"devices": "    <graphics type='vnc' port='abc'/>\n"}, "vnc port 'abc' is not an integer"),
    ({"devices": "    <graphics type='vnc' autoport='maybe'/>\n"}, "invalid autoport value"),
    ({"devices": "    <graphics type='vnc' listen='1.2.3.4'><listen type='address' "
                 "address='5.6.7.8'/></graphics>\n"}, "must match the first <listen"),
    ({"devices": "    <interface/>\n"}, "<interface> has no type"),
    ({"devices": "    <input/>\n"}, "<input> has no type"),
    ({"devices": "    <hostdev type='usb'><source><vendor id='0xzz'/><product id='1'/>"
                 "</source></hostdev>\n"}, "usb vendor id '0xzz' is not a non-negative"),
    ({"devices": "    <hostdev type='usb'><source><vendor id='1'/></source></hostdev>\n"},
     "needs both <vendor id=...> and <product id=...>"),
    ({"devices": "    <hostdev type='usb'><source><address bus='1'/></source></hostdev>\n"},
     "usb address needs a device attribute"),
    ({"devices": "    <hostdev type='usb'><source/></hostdev>\n"}, "usb hostdev needs"),
    ({"devices": "    <hostdev type='pci'><source><address bus='08'/></source></hostdev>\n"},
     "pci bus '08' is not a non-negative integer"),
    ({"devices": "    <hostdev type='pci'><source/></hostdev>\n"}, "pci hostdev needs <address"),
    ({"devices": "    <hostdev type='pci' managed='true'/>\n"}, "invalid managed value 'true'"),
    ({"devices": "    <controller type='usb' index='one'/>\n"}, "controller index 'one'"),
    ({"devices": "    <memballoon/>\n"}, "<memballoon> needs a model"),
])
def test_invalid_definitions(kw: dict[str, str], needle: str) -> None:
    assert needle in err(**kw)


@pytest.mark.parametrize(("name", "needle"), [
    ("a/b", "domain name 'a/b' must not contain '/'"),
    ("a&#10;b", "must not contain a newline"),
    ("", "missing domain name"),
])
def test_bad_names(name: str, needle: str) -> None:
    xml = f"<domain type='kvm'>\n<name>{name}</name><memory>1</memory><os><type>hvm</type></os>"
    with pytest.raises(XMLError) as info:
        parse_domain(xml + "</domain>", "n.xml")
    assert str(info.value).startswith("n.xml: line 2: ") and needle in str(info.value)
    assert isinstance(info.value, VmconfineError)


def test_uuid_forms_and_os_errors() -> None:
    d = mk(head="  <uuid> 4DEA24B31D52D8F3 2516782E98A23FA0 </uuid>\n")
    assert d.uuid == "4dea24b3-1d52-d8f3-2516-782e98a23fa0" and not d.uuid_generated
    for body, needle in [("<os/>", "an os <type> must be specified"),
                         ("<os><type>linux</type></os>", "os type 'linux' is not supported")]:
        with pytest.raises(XMLError, match=needle):
            parse_domain(f"<domain type='qemu'><name>a</name><memory>1</memory>{body}</domain>")


def test_backing_chain_depth_limit() -> None:
    def chain(n: int) -> str:
        inner = "<backingStore/>"
        for i in range(n):
            inner = (f"<backingStore type='file'><format type='qcow2'/>"
                     f"<source file='/l{i}'/>{inner}</backingStore>")
        return f"    <disk><source file='/top'/>{inner}<target dev='vda'/></disk>\n"

    assert len(mk(devices=chain(120)).disks[0].chain()) == 121
    assert len(mk(devices=chain(199)).disks[0].chain()) == 200
    assert "backing chain of disk 'vda' is deeper than 200 layers" in err(devices=chain(200))


# --------------------------------------------------------------------------- seclabels


def seclabel(xml: str, live: bool = False) -> Domain:
    return mk(extra=f"  {xml}\n", live=live)


@pytest.mark.parametrize(("xml", "typ", "relabel"), [
    ("<seclabel model='selinux'/>", "dynamic", True),
    ("<seclabel type='dynamic' model='selinux'/>", "dynamic", True),
    ("<seclabel type='dynamic' model='selinux' relabel='yes'/>", "dynamic", True),
    ("<seclabel type='static' model='selinux'><label>a:b:c:s0</label></seclabel>",
     "static", False),
    ("<seclabel type='static' model='dac' relabel='yes'><label>+1:+1</label></seclabel>",
     "static", True),
    ("<seclabel type='none' model='selinux'/>", "none", False),
    ("<seclabel type='none' model='dac' relabel='no'/>", "none", False),
    ("<seclabel type='none'/>", "none", False),
    ("<seclabel type='dynamic'/>", "dynamic", True),
    ("<seclabel model='none'/>", "none", False),
    ("<seclabel type='dynamic' model='none' relabel='yes'/>", "none", False),
])
def test_seclabel_types_and_relabel_defaults(xml: str, typ: str, relabel: bool) -> None:
    (sec,) = seclabel(xml).seclabels
    assert (sec.type, sec.relabel) == (typ, relabel)


@pytest.mark.parametrize(("xml", "needle"), [
    ("<seclabel type='dynamic' model='selinux' relabel='no'/>",
     "dynamic label type must use resource relabeling"),
    ("<seclabel model='dac' relabel='no'/>", "dynamic label type must use resource relabeling"),
    ("<seclabel type='none' model='selinux' relabel='yes'/>",
     "resource relabeling is not compatible with 'none' label type"),
    ("<seclabel type='static' model='selinux'/>", "missing <label> for static label type"),
    ("<seclabel type='static' model='selinux'><label></label></seclabel>", "missing <label>"),
    ("<seclabel type='static' model='dac'><label>+1:+1</label><baselabel>x</baselabel>"
     "</seclabel>", "<baselabel> is only valid with type='dynamic'"),
    ("<seclabel type='none' model='dac'><baselabel>x</baselabel></seclabel>",
     "<baselabel> is only valid"),
    ("<seclabel type='bogus' model='dac'/>", "invalid security type 'bogus'"),
    ("<seclabel model='dac' relabel='maybe'/>", "invalid relabel value 'maybe'"),
    ("<seclabel model='dac'/><seclabel model='dac'/>", "seclabel for model 'dac' is already"),
    ("<seclabel model='dac'/><seclabel type='none'/>",
     "missing security model when using multiple labels"),
    ("<seclabel type='static'><label>x</label></seclabel>",
     "missing security model in domain seclabel"),
    ("<seclabel><baselabel>a:b:c</baselabel></seclabel>", "missing security model"),
])
def test_seclabel_errors(xml: str, needle: str) -> None:
    with pytest.raises(XMLError) as info:
        seclabel(xml)
    assert needle in str(info.value) and str(info.value).startswith("t.xml: line 9: ")


def test_seclabel_model_none_live_rules() -> None:
    with pytest.raises(XMLError, match="unsupported type='dynamic' to model 'none'"):
        seclabel("<seclabel type='dynamic' model='none'/>", live=True)
    (sec,) = seclabel("<seclabel type='none' model='none'/>", live=True).seclabels
    assert sec.type == "none"


def test_device_seclabel_rules() -> None:
    with pytest.raises(XMLError, match="cannot specify a <label> when relabel='no'"):
        mk(devices="    <disk><source file='/a'><seclabel model='dac' relabel='no'>"
                   "<label>+1:+1</label></seclabel></source><target dev='vda'/></disk>\n")
    with pytest.raises(XMLError, match="seclabel for model 'dac' is already provided"):
        mk(devices="    <serial type='file'><source path='/l'><seclabel model='dac'/>"
                   "<seclabel model='dac'/></source></serial>\n")
    d = mk(devices="    <disk><source file='/a'><seclabel model='dac' labelskip='yes'/></source>"
                   "<target dev='vda'/></disk>\n", live=True)
    assert d.disks[0].source.seclabels[0].labelskip  # type: ignore[union-attr]
    assert 'labelskip' not in d.to_xml(live=False) and 'labelskip="yes"' in d.to_xml(live=True)


LABELLED = ("<seclabel type='dynamic' model='selinux' relabel='yes'><label>u:r:svirt_t:s0:c1,c2"
            "</label><imagelabel>u:object_r:svirt_image_t:s0:c1,c2</imagelabel></seclabel>"
            "<seclabel type='static' model='dac' relabel='yes'><label>+107:+107</label>"
            "<imagelabel>+107:+107</imagelabel></seclabel>")


def test_inactive_parse_drops_generated_labels() -> None:
    d = seclabel(LABELLED)
    sel, dac = d.seclabels
    assert (sel.label, sel.imagelabel) == (None, None)
    assert (dac.label, dac.imagelabel) == ("+107:+107", None)
    xml = d.to_xml()
    assert "svirt" not in xml and xml.count("+107:+107") == 1


def test_live_parse_keeps_labels_and_inactive_output_drops_them() -> None:
    d = seclabel(LABELLED, live=True)
    sel, dac = d.seclabels
    assert (sel.label, sel.imagelabel) == ("u:r:svirt_t:s0:c1,c2",
                                           "u:object_r:svirt_image_t:s0:c1,c2")
    assert dac.imagelabel == "+107:+107"
    live = d.to_xml(live=True)
    assert "u:r:svirt_t:s0:c1,c2" in live and live.count("+107:+107") == 2
    inactive = d.to_xml(live=False)
    assert "svirt" not in inactive and inactive.count("+107:+107") == 1
    assert parse_domain(inactive).to_xml() == inactive


def test_seclabel_is_element_backed() -> None:
    d = seclabel("<seclabel model='selinux'>\n    <baselabel>u:r:base_t:s0</baselabel>\n"
                 "  </seclabel>")
    sec = d.seclabels[0]
    sec.imagelabel = "u:object_r:img_t:s0:c3,c4"
    sec.label = "u:r:base_t:s0:c3,c4"
    el = sec.element
    assert [c.tag for c in el] == ["label", "imagelabel", "baselabel"]
    assert el.find("label").text == "u:r:base_t:s0:c3,c4"  # type: ignore[union-attr]
    sec.label = "u:r:other_t:s0:c3,c4"
    assert len(el.findall("label")) == 1 and sec.label == "u:r:other_t:s0:c3,c4"
    live = d.to_xml(live=True)
    assert live.index("<label>") < live.index("<imagelabel>") < live.index("<baselabel>")
    assert '<seclabel type="dynamic" model="selinux" relabel="yes">' in live
    sec.type = "static"
    assert el.get("type") == "static" and sec.relabel is False  # static's default
    sec.relabel = True
    sec.type = "static"
    assert sec.relabel is True  # an explicit relabel valid for the new type is kept
    sec.type = "none"
    assert el.get("relabel") is None and sec.relabel is False
    sec.type = "dynamic"
    assert el.get("relabel") == "yes" and sec.relabel
    sec.relabel = False
    assert el.get("relabel") == "no"
    sec.label = None
    assert el.find("label") is None and sec.label is None
    sec.model = "apparmor"
    assert el.get("model") == "apparmor" and d.seclabel("apparmor") is sec
    with pytest.raises(ValueError, match="seclabel type"):
        sec.type = "weird"


def test_add_and_remove_seclabel() -> None:
    d = mk(extra="  <qemu:commandline xmlns:qemu='" + QEMU_NS + "'/>\n")
    sel = d.add_seclabel("selinux")
    dac = d.add_seclabel("dac", type="static", implicit=False)
    none = d.add_seclabel("apparmor", type="none")
    assert (sel.implicit, dac.implicit, sel.relabel, dac.relabel) == (True, False, True, False)
    assert none.element.get("relabel") is None
    root = d.root
    tags = [c.tag for c in root if isinstance(c.tag, str)]
    assert tags[tags.index("devices") + 1: tags.index("devices") + 4] == ["seclabel"] * 3
    assert tags[-1] == f"{{{QEMU_NS}}}commandline"
    with pytest.raises(ValueError, match="already has a seclabel"):
        d.add_seclabel("selinux")
    sel.label, sel.imagelabel = "u:r:t:s0:c1,c2", "u:object_r:i:s0:c1,c2"
    dac.label = "+107:+107"
    inactive = d.to_xml()
    assert 'model="selinux"' not in inactive and 'model="apparmor"' not in inactive
    assert 'model="dac"' in inactive
    live = d.to_xml(live=True)
    assert live.count("<seclabel") == 3 and "u:r:t:s0:c1,c2" in live
    assert parse_domain(live, live=True).to_xml(live=True) == live
    d.remove_seclabel(sel)
    assert d.seclabel("selinux") is None and 'model="selinux"' not in d.to_xml(live=True)
    # added elements follow the document's indentation
    assert "\n  <seclabel" in d.to_xml(live=True)


def test_add_seclabel_without_devices_or_seclabels() -> None:
    d = parse_domain("<domain type='kvm'><name>a</name><memory>1</memory>"
                     "<os><type>hvm</type></os></domain>")
    d.add_seclabel("dac")
    assert d.root[-1].tag == "seclabel"


# --------------------------------------------------------------------------- qemu namespace


@pytest.mark.parametrize(("env", "needle"), [
    ("<qemu:env value='x'/>", "No qemu environment name specified"),
    ("<qemu:env name=''/>", "Empty qemu environment name specified"),
    ("<qemu:env name='1ABC'/>",
     "Invalid environment name, it must begin with a letter or underscore"),
    ("<qemu:env name='-X'/>", "it must begin with a letter or underscore"),
    ("<qemu:env name='A-B'/>",
     "Invalid environment name, it must contain only alphanumerics and underscore"),
    ("<qemu:env name='A B'/>", "must contain only alphanumerics and underscore"),
    ("<qemu:env name='ÄB'/>", "must begin with a letter or underscore"),
    ("<qemu:arg/>", "No qemu command-line argument specified"),
])
def test_qemu_env_rules(env: str, needle: str) -> None:
    msg = err(root_attrs=f"type='kvm' xmlns:qemu='{QEMU_NS}'",
              extra=f"  <qemu:commandline>\n    {env}\n  </qemu:commandline>\n")
    assert needle in msg and msg.startswith("t.xml: line 10: ")


def test_qemu_namespace_any_prefix_and_other_namespaces_ignored() -> None:
    d = mk(root_attrs=f"type='kvm' xmlns:q='{QEMU_NS}' xmlns:o='urn:other'",
           extra="  <q:commandline><q:arg value='-a'/><q:env name='_x1' value=''/>"
                 "<q:env name='Y'/></q:commandline>\n"
                 "  <o:commandline><o:arg value='-ignored'/></o:commandline>\n"
                 "  <q:commandline><q:arg value='-b'/></q:commandline>\n")
    assert d.qemu_args == ["-a", "-b"]
    assert d.qemu_env == [("_x1", ""), ("Y", None)]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["unknown.xml", "full.xml", "seed-qemu-commandline.xml",
                                  "seed-kvm-i686.xml"])
@pytest.mark.parametrize("live", [False, True])
def test_round_trip_is_stable(name: str, live: bool) -> None:
    first = load(name, live=live).to_xml(live=live)
    second = parse_domain(first, "again.xml", live=live).to_xml(live=live)
    assert second == first
    assert parse_domain(second.encode(), "bytes.xml", live=live).to_xml(live=live) == first


def test_unknown_content_survives() -> None:
    d = load("unknown.xml", live=True)
    xml = d.to_xml(live=True)
    for piece in ['x:flag="on"', 'futureattr="1"', "<futureElement mode=\"x\">",
                  '<nested a="b">text</nested>', "<futureOsThing/>", 'futureDiskAttr="7"',
                  "<x:annotation>extension data</x:annotation>", '<futureDevice kind="new"/>',
                  "<!-- leading comment -->", "<!-- comment inside devices -->",
                  "<!-- trailing comment -->", '<?vmconfine-test keep="me"?>',
                  "kept &amp; escaped &lt;text&gt;", 'xmlns:app="urn:example:app"',
                  '<x:extension><x:item n="1"/></x:extension>', "/images/ünïcode disk.img",
                  '<qemu:arg value="-S"/>']:
        assert piece in xml, piece
    assert d.disks[0].source.path == "/images/ünïcode disk.img"  # type: ignore[union-attr]
    inactive = load("unknown.xml").to_xml()
    assert "<futureElement" in inactive and "svirt_t" not in inactive and "+0:+0" in inactive
    reparsed = etree.fromstring(xml.encode())
    assert reparsed.get("{urn:example:x}flag") == "on"


def test_round_trip_preserves_views() -> None:
    a = load("full.xml")
    b = parse_domain(a.to_xml(), "again.xml")
    for attr in ("name", "uuid", "memory_kib", "vcpus", "features", "qemu_args", "qemu_env",
                 "on_crash", "memballoon"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert [d.chain() for d in a.disks] == [d.chain() for d in b.disks]
    assert a.chardevs == b.chardevs and a.hostdevs == b.hostdevs and a.graphics == b.graphics


# --------------------------------------------------------------------------- live XML


def test_live_xml_id_and_state() -> None:
    d = load("seed-kvm-i686.xml")
    sec = d.add_seclabel("dac")
    sec.label = sec.imagelabel = "+107:+107"
    live = d.to_xml(live=True, extra={"id": 7, "taints": ["custom-argv", "high-privileges"],
                                      "pid": 4242, "privileged": True, "skip": None})
    assert live.startswith('<domain type="kvm" id="7">')
    assert f'<vmconfine:state xmlns:vmconfine="{VMCONFINE_NS}" pid="4242" privileged="yes">' \
        in live
    assert '<vmconfine:taints value="custom-argv"/>' in live and "skip" not in live
    assert "<label>+107:+107</label>" in live and "<imagelabel>+107:+107</imagelabel>" in live
    again = parse_domain(live, "status.xml", live=True)
    assert again.id == 7
    assert again.state == {"pid": "4242", "privileged": "yes",
                           "taints": ["custom-argv", "high-privileges"]}
    assert again.seclabel("dac").label == "+107:+107"  # type: ignore[union-attr]
    assert again.to_xml(live=True) == live  # state kept when extra has none
    replaced = again.to_xml(live=True, extra={"taints": []})
    assert "pid=" not in replaced and "taints" not in replaced  # replaced by an empty state
    assert parse_domain(replaced, live=True).state == {}
    replaced = again.to_xml(live=True, extra={"pid": 1})
    assert 'pid="1"' in replaced and "taints" not in replaced
    inactive = again.to_xml(live=False)
    assert ' id="' not in inactive and "vmconfine" not in inactive and "<metadata" not in inactive
    assert "+107:+107" not in inactive  # a dynamic label's generated values are gone
    assert d.to_xml() == load("seed-kvm-i686.xml").to_xml()  # implicit label left out


def test_live_xml_keeps_user_metadata() -> None:
    d = load("unknown.xml", live=True)
    live = d.to_xml(live=True, extra={"id": 3, "taints": ["custom-argv"]})
    assert 'type="kvm" id="3" x:flag="on" futureattr="1">' in live
    inactive = parse_domain(live, live=True).to_xml()
    assert "<metadata>" in inactive and "app:info" in inactive and "vmconfine:state" not in inactive


def test_inactive_parse_ignores_id_and_live_rejects_bad_id() -> None:
    assert mk(root_attrs="type='kvm' id='5'").id is None
    assert mk(root_attrs="type='kvm' id='5'", live=True).id == 5
    with pytest.raises(XMLError, match="domain id 'x'"):
        mk(root_attrs="type='kvm' id='x'", live=True)


@pytest.mark.parametrize("extra", [{"id": True}, {"id": -2}, {"id": "3"}, {"bad key": 1},
                                   {"x": {"nested": 1}}, {"taints": [None]}])
def test_live_extra_validation(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        mk().to_xml(live=True, extra=extra)


def test_live_xml_is_detected_without_a_flag() -> None:
    """Status and journal copies are re-read with plain parse_domain(text, source)."""
    d = load("seed-kvm-i686.xml")
    sec = d.add_seclabel("selinux")
    sec.label, sec.imagelabel = "u:r:svirt_t:s0:c5,c6", "u:object_r:svirt_image_t:s0:c5,c6"
    journal_copy = d.to_xml(live=True)  # no extra: still marked live
    assert f'<vmconfine:state xmlns:vmconfine="{VMCONFINE_NS}"/>' in journal_copy
    again = parse_domain(journal_copy, "journal")
    assert again.live and again.runtime_state() == {}
    assert again.seclabel("selinux").label == "u:r:svirt_t:s0:c5,c6"  # type: ignore[union-attr]
    assert parse_domain(journal_copy, live=False).seclabel("selinux").label is None  # type: ignore
    # a config that merely has an id (e.g. virsh dumpxml output) is read as a config
    config = mk(root_attrs="type='kvm' id='4'", extra=LABELLED)
    assert (config.live, config.id, config.seclabel("selinux").label) == (  # type: ignore
        False, None, None)
    dumped = journal_copy.replace("<metadata>", "").replace("</metadata>", "")
    dumped = re.sub(r"\s*<vmconfine:state[^>]*/>", "", dumped)
    assert not parse_domain(dumped).live
    assert parse_domain(dumped).seclabel("selinux").label is None  # type: ignore[union-attr]


def test_status_state_mapping_round_trip() -> None:
    d = load("seed-qemu-emulated.xml")
    state = {"id": "3", "pid": "4242", "starttime": "", "taints": "custom-argv,high-privileges"}
    status = d.to_xml(live=True, extra={"id": 3, "state": state})
    back = parse_domain(status, "status.xml")
    assert back.id == 3 and back.runtime_state() == state
    got = back.runtime_state()
    got["pid"] = "1"
    assert back.runtime_state()["pid"] == "4242"  # a copy
    state["taints"] = "custom-argv,high-privileges,custom-monitor"
    rewritten = back.to_xml(live=True, extra={"id": back.id, "state": state})
    assert parse_domain(rewritten).runtime_state()["taints"].endswith("custom-monitor")
    assert rewritten.count("vmconfine:state") == 1
    with pytest.raises(ValueError):
        d.to_xml(live=True, extra={"state": {"bad key": "x"}})
