"""``domxml-from-native``: QEMU command lines back to domain XML
(vmconfine.qemu.fromnative.convert).

Golden files: tests/data/fromnative/NAME.args converts to NAME.xml with the warning line in
NAME.warning (``VMCONFINE_REGEN_GOLDEN=1`` rewrites them; review the diff). The round trip
runs over the domxml-to-native corpus (tests/data/argv/): to-native, from-native, to-native
again must give the same command line.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.unit.test_argv import CASES as ARGV_CASES
from tests.unit.test_argv import CONFIG_OVERRIDES, command_paths, corpus_xml, fake_header
from vmconfine.cli import main
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import chain, parse_domain
from vmconfine.qemu.argv import build_command
from vmconfine.qemu.fromnative.convert import (
    NativeArgsError,
    NativeResult,
    convert_file,
    from_argv,
    from_native,
    tokenize,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "fromnative"
GOLDEN = sorted(p.stem for p in DATA.glob("*.args"))
REGEN = os.environ.get("VMCONFINE_REGEN_GOLDEN", "") not in ("", "0")
QEMU = "/usr/bin/qemu-system-x86_64"


def conv(args: str, env: str = "") -> NativeResult:
    return from_native(f"{env} {QEMU} {args}")


def test_a_command_line_without_uuid_gets_a_fresh_random_one() -> None:
    """Two guests converted from the same line can run side by side (distinct UUIDs); a
    ``-uuid`` given is kept."""
    line = f"{QEMU} -m 128 -netdev user,id=n0 -device e1000,netdev=n0,mac=52:54:00:aa:bb:cc"
    first, second = from_native(line), from_native(line)
    assert first.domain.uuid != second.domain.uuid
    for res in (first, second):
        assert uuidlib.UUID(res.domain.uuid).version == 4
        [iface] = devices(res, "interface")
        assert iface.get("type") == "user"
        assert iface.find("model").get("type") == "e1000"
        assert iface.find("mac").get("address") == "52:54:00:aa:bb:cc"
    given = "4ae09e91-8bf2-54b0-bc5e-5a83d503cc2e"
    assert from_native(f"{line} -uuid {given}").domain.uuid == given


def no_uuid(xml: str) -> str:
    """The XML without its (random) ``<uuid>``."""
    return re.sub(r"<uuid>[^<]*</uuid>", "", xml)


def devices(res: NativeResult, tag: str) -> list:  # type: ignore[type-arg]
    return res.domain.root.findall(f"devices/{tag}")


# --------------------------------------------------------------------------- the seed example


def test_seed_example_converts_to_the_seed_domain() -> None:
    res = convert_file(DATA / "seed-demo.args")
    d = res.domain
    seed = parse_domain((DATA / "seed-demo.expected.xml").read_text().replace(
        "<uuid>", "<name>unnamed</name><uuid>"))
    assert d.name == seed.name == "unnamed"
    # the seed's all-zero UUID is libvirt's; vmconfine gives a fresh random one
    assert seed.uuid == "00000000-0000-0000-0000-000000000000"
    assert uuidlib.UUID(d.uuid).version == 4
    assert d.memory_kib == d.current_memory_kib == seed.memory_kib == 219136
    assert d.vcpus == seed.vcpus == 1
    assert d.virt_type == seed.virt_type == "qemu"
    assert (d.os.type, d.os.arch, d.os.machine) == ("hvm", "i686", "pc")
    assert (seed.os.arch, seed.os.machine) == ("i686", "pc")
    assert d.os.boot_devs == seed.os.boot_devs == ["hd"]
    assert d.emulator == seed.emulator == "/usr/bin/qemu"
    assert [(x.type, x.device, x.source.path if x.source else None, x.target, x.bus)
            for x in d.disks] == [(x.type, x.device, x.source.path if x.source else None,
                                   x.target, x.bus) for x in seed.disks] == [
        ("block", "disk", "/dev/HostVG/QEMUGuest1", "hda", "ide")]
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert (seed.on_poweroff, seed.on_reboot, seed.on_crash) == ("destroy", "restart",
                                                                 "destroy")
    assert d.clock_offset == "utc"
    assert d.interfaces == [] and d.chardevs == [] and d.graphics == []
    assert "acpi" not in d.features  # -no-acpi
    assert d.qemu_args == [] and d.qemu_env == []
    assert res.warning is None
    # the HMP monitor is recognised (vmconfine adds its own monitors), not a qemu:arg
    assert [(m.protocol, m.kind) for m in res.monitors] == [("hmp", "pty")]


def test_seed_example_on_one_line_is_the_same() -> None:
    text = (DATA / "seed-demo.args").read_text()
    one_line = text.replace("\\\n", "")
    assert "\\" not in one_line
    assert no_uuid(from_native(one_line).xml) == no_uuid(from_native(text).xml)


@pytest.mark.parametrize("case", GOLDEN)
def test_golden(case: str) -> None:
    res = convert_file(DATA / f"{case}.args")
    xml_path, warn_path = DATA / f"{case}.xml", DATA / f"{case}.warning"
    if REGEN:
        xml_path.write_text(res.xml)
        warn_path.write_text((res.warning or "") + "\n")
    assert no_uuid(res.xml) == no_uuid(xml_path.read_text())
    assert (res.warning or "") + "\n" == warn_path.read_text()
    assert "\n" not in (res.warning or "")


# --------------------------------------------------------------------------- tokenizing


def test_tokenizer_quotes_escapes_and_continuations() -> None:
    text = "A='x y' B=\"q\\\"z\" /usr/bin/qemu-system-x86_64 \\\n -name 'it'\\''s' \\\r\n -m 64"
    assert tokenize(text) == ["A=x y", 'B=q"z', QEMU, "-name", "it's", "-m", "64"]
    assert tokenize("a\\ b 'c\"d' \"e'f\"") == ["a b", 'c"d', "e'f"]
    assert tokenize("''") == [""]


# --------------------------------------------------------------------------- legacy options


def test_legacy_disk_options() -> None:
    res = conv("-hda /img/a.img -hdb /dev/sdb -hdd /img/d.qcow2 -cdrom /img/cd.iso "
               "-fda /img/fd.img -fdb /img/fd2.img")
    got = [(d.target, d.bus, d.device, d.type, d.source.path if d.source else None,
            d.readonly) for d in res.domain.disks]
    assert got == [("hda", "ide", "disk", "file", "/img/a.img", False),
                   ("hdb", "ide", "disk", "block", "/dev/sdb", False),
                   ("hdd", "ide", "disk", "file", "/img/d.qcow2", False),
                   ("hdc", "ide", "cdrom", "file", "/img/cd.iso", True),
                   ("fda", "fdc", "floppy", "file", "/img/fd.img", False),
                   ("fdb", "fdc", "floppy", "file", "/img/fd2.img", False)]
    assert "no format= given, raw assumed" in (res.warning or "")
    assert "-cdrom" not in (res.warning or "")  # CD-ROM images are raw


def test_positional_image_is_hda() -> None:
    assert [d.target for d in conv("-m 64 /img/disk.img").domain.disks] == ["hda"]


def test_legacy_drive_option() -> None:
    res = conv("-drive file=/i/a.qcow2,if=virtio,format=qcow2 "
               "-drive file=/i/b.img,if=virtio,format=raw,readonly=on "
               "-drive file=/i/c.img,if=ide,bus=1,unit=1,format=raw "
               "-drive file=/i/d.iso,index=2,media=cdrom "
               "-drive file=/i/e.img,if=scsi,index=3,format=raw "
               "-drive file=/i/f.img,if=floppy,format=raw "
               "-drive if=ide,index=0,media=cdrom")
    got = [(d.target, d.bus, d.device, d.format, d.readonly) for d in res.domain.disks]
    assert got == [("vda", "virtio", "disk", "qcow2", False),
                   ("vdb", "virtio", "disk", "raw", True),
                   ("hdd", "ide", "disk", "raw", False),
                   ("hdc", "ide", "cdrom", "raw", True),
                   ("sdd", "scsi", "disk", "raw", False),
                   ("fda", "fdc", "floppy", "raw", False),
                   ("hda", "ide", "cdrom", None, True)]
    assert [(c.type, c.index, c.model) for c in res.domain.controllers
            if c.type == "scsi"] == [("scsi", 0, "lsilogic")]  # QEMU's if=scsi controller


def test_pflash_drives_and_bios() -> None:
    d = conv("-M q35 -drive if=pflash,unit=0,format=raw,readonly=on,file=/fw/CODE.fd "
             "-drive if=pflash,unit=1,format=raw,file=/fw/VARS.fd").domain
    assert d.os.loader is not None
    assert (d.os.loader.path, d.os.loader.type, d.os.loader.readonly) == (
        "/fw/CODE.fd", "pflash", True)
    assert d.os.nvram == "/fw/VARS.fd"
    rom = conv("-bios /fw/bios.bin").domain.os.loader
    assert rom is not None and (rom.path, rom.type) == ("/fw/bios.bin", "rom")


def test_legacy_network() -> None:
    d = conv("-net nic,model=virtio,macaddr=52:54:00:12:34:56 -net user "
             "-net nic,model=rtl8139 -net tap,ifname=tap3,script=no").domain
    assert [(i.type, i.model, i.mac, i.target_dev) for i in d.interfaces] == [
        ("user", "virtio", "52:54:00:12:34:56", None), ("ethernet", "rtl8139", None, "tap3")]
    assert conv("-net none").domain.interfaces == []
    nic = conv("-nic user,model=e1000,mac=52:54:00:00:00:09").domain.interfaces
    assert [(i.type, i.model, i.mac) for i in nic] == [("user", "e1000", "52:54:00:00:00:09")]
    assert [i.model for i in conv("-M q35 -net nic -net user").domain.interfaces] == ["e1000e"]


def test_boot_order() -> None:
    assert conv("-boot c").domain.os.boot_devs == ["hd"]
    assert conv("-boot order=dcn,menu=on").domain.os.boot_devs == ["cdrom", "hd", "network"]
    res = conv("-boot d,menu=on")
    assert res.domain.qemu_args == ["-boot", "menu=on"]  # QEMU merges repeated -boot


def test_direct_kernel_boot() -> None:
    os_ = conv("-kernel /b/vmlinuz -initrd /b/initrd -append 'console=ttyS0 quiet' "
               "-dtb /b/x.dtb").domain.os
    assert (os_.kernel, os_.initrd, os_.cmdline, os_.dtb) == (
        "/b/vmlinuz", "/b/initrd", "console=ttyS0 quiet", "/b/x.dtb")


@pytest.mark.parametrize(("value", "kib"), [
    ("214", 219136), ("1G", 1048576), ("512M", 524288), ("2048k", 2048), ("1.5G", 1572864),
    ("size=220160k", 220160), ("1073741824b", 1048576), ("4g", 4194304)])
def test_memory_sizes(value: str, kib: int) -> None:
    d = conv(f"-m {value}").domain
    assert d.memory_kib == d.current_memory_kib == kib


def test_memory_default_is_qemus() -> None:
    assert conv("-smp 1").domain.memory_kib == 128 * 1024


def test_smp() -> None:
    assert conv("-smp 4").domain.vcpus == 4
    res = conv("-smp cpus=2,maxcpus=4,sockets=1")
    assert res.domain.vcpus == 2
    assert res.domain.qemu_args == ["-smp", "maxcpus=4,sockets=1"]
    assert conv("-smp sockets=2,cores=2").domain.vcpus == 4


def test_machine_and_accelerator() -> None:
    d = conv("-M q35").domain
    assert (d.os.machine, d.virt_type) == ("q35", "qemu")
    for args in ("-machine pc,accel=kvm", "-enable-kvm", "-accel kvm", "-accel tcg -enable-kvm"):
        assert conv(args).domain.virt_type == "kvm", args
    assert conv("-machine q35,accel=kvm -accel tcg").domain.virt_type == "qemu"
    kvm = from_native("/usr/bin/kvm -m 64").domain
    assert kvm.virt_type == "kvm" and kvm.os.arch
    assert from_native("/usr/bin/qemu-system-aarch64 -M virt").domain.os.arch == "aarch64"
    assert from_native("/usr/bin/qemu-system-i386 -m 64").domain.os.arch == "i686"
    assert conv("-cpu qemu32").domain.os.arch == "i686"
    res = conv("-machine pc,hpet=off,acpi=off")
    assert res.domain.qemu_args == ["-machine", "hpet=off"]
    assert "acpi" not in res.domain.features


def test_name_uuid_and_lifecycle() -> None:
    d = conv("-name guest=web,debug-threads=on,process=qemu:web "
             "-uuid C7A5FDBD-EDAF-9455-926A-D65C16DB1809 -no-reboot -no-acpi").domain
    assert (d.name, d.uuid) == ("web", "c7a5fdbd-edaf-9455-926a-d65c16db1809")
    assert d.on_reboot == "destroy" and "acpi" not in d.features
    assert conv("-name legacy").domain.name == "legacy"
    assert "acpi" in conv("-m 64").domain.features


def test_serial_parallel_and_monitors() -> None:
    res = conv("-serial pty -serial file:/l/s1.log -serial unix:/r/s2.sock,server,nowait "
               "-serial tcp:127.0.0.1:4555,server,nowait -serial /dev/ttyS0 -serial none "
               "-parallel file:/l/lp.log -monitor stdio -qmp unix:/r/q.sock,server=on,wait=off")
    got = [(c.kind, c.type, c.path, c.mode, c.host, c.service, c.target_port)
           for c in res.domain.chardevs if c.kind != "console"]
    assert got == [
        ("serial", "pty", None, None, None, None, 0),
        ("serial", "file", "/l/s1.log", None, None, None, 1),
        ("serial", "unix", "/r/s2.sock", "bind", None, None, 2),
        ("serial", "tcp", None, "bind", "127.0.0.1", "4555", 3),
        ("serial", "dev", "/dev/ttyS0", None, None, None, 4),
        ("parallel", "file", "/l/lp.log", None, None, None, 0)]
    assert [(m.protocol, m.kind, m.path, m.server) for m in res.monitors] == [
        ("hmp", "stdio", None, False), ("qmp", "unix", "/r/q.sock", True)]
    assert res.domain.qemu_args == []


def test_graphics() -> None:
    g = conv("-vnc :3").domain.graphics[0]
    assert (g.type, g.port, g.autoport, g.listen) == ("vnc", 5903, False, "0.0.0.0")
    g = conv("-vnc 127.0.0.1:0,to=99").domain.graphics[0]
    assert (g.port, g.autoport, g.listen) == (-1, True, "127.0.0.1")
    assert conv("-vnc unix:/r/vnc.sock").domain.graphics[0].socket == "/r/vnc.sock"
    assert conv("-display vnc=:1").domain.graphics[0].port == 5901
    for args in ("-nographic", "-display none"):
        res = conv(args)
        assert res.domain.graphics == [] and res.domain.qemu_args == []
    # without -nodefaults QEMU adds a VGA card; with it there is none
    assert [v.find("model").get("type") for v in devices(conv("-vnc :1"), "video")] == ["vga"]
    assert [v.find("model").get("type")
            for v in devices(conv("-nodefaults -vnc :1"), "video")] == ["none"]
    assert [v.find("model").get("type")
            for v in devices(conv("-vnc :1 -vga cirrus"), "video")] == ["cirrus"]


def test_usb() -> None:
    none = [(c.type, c.model) for c in conv("-m 64").domain.controllers]
    assert none == [("usb", "none")]
    assert conv("-usb").domain.controllers == []  # the machine's default controller
    assert conv("-machine pc,usb=on").domain.controllers == []
    d = conv("-usbdevice tablet").domain
    assert [(i.type, i.bus) for i in d.inputs] == [("tablet", "usb")]
    assert d.controllers == []


# --------------------------------------------------------------------------- modern options


def test_blockdev_chain_and_device() -> None:
    d = conv("-blockdev driver=file,filename=/i/base.raw,node-name=bf "
             "-blockdev driver=raw,file=bf,node-name=b,read-only=on "
             """-blockdev '{"driver":"file","filename":"/i/top.qcow2","node-name":"tf"}' """
             """-blockdev '{"driver":"qcow2","file":"tf","backing":"b","node-name":"t"}' """
             "-device virtio-blk-pci,drive=t,id=virtio-disk1,bootindex=1 "
             "-blockdev driver=qcow2,node-name=s,file.driver=file,file.filename=/i/s.qcow2 "
             """-device '{"driver":"virtio-blk-pci","drive":"s","serial":"S1"}'""").domain
    assert [(x.target, x.format, x.serial) for x in d.disks] == [
        ("vdb", "qcow2", None), ("vda", "qcow2", "S1")]
    assert [(s.path, s.format) for s in d.disks[0].chain()] == [
        ("/i/top.qcow2", "qcow2"), ("/i/base.raw", "raw")]
    assert d.disks[0].source is not None and d.disks[0].source.backing_declared


def test_drive_if_none_with_device() -> None:
    d = conv("-drive file=/i/a.qcow2,format=qcow2,if=none,id=drive-virtio-disk0 "
             "-device virtio-blk-pci,drive=drive-virtio-disk0,id=virtio-disk0").domain
    assert [(x.target, x.format) for x in d.disks] == [("vda", "qcow2")]
    assert d.qemu_args == []


def test_disk_buses_from_device_ids() -> None:
    d = conv("-M q35 -device ahci,id=sata1 -device virtio-scsi-pci,id=scsi0 "
             "-blockdev driver=file,filename=/i/a,node-name=a "
             "-blockdev driver=file,filename=/i/b,node-name=b "
             "-blockdev driver=file,filename=/i/c,node-name=c "
             "-device ide-hd,drive=a,bus=ide.2 -device ide-hd,drive=b,bus=sata1.1 "
             "-device scsi-hd,drive=c,bus=scsi0.0,channel=0,scsi-id=0,lun=5 "
             "-device ide-cd,bus=ide.4").domain
    assert [(x.target, x.bus, x.device) for x in d.disks] == [
        ("sdc", "sata", "disk"), ("sdh", "sata", "disk"), ("sdf", "scsi", "disk"),
        ("sde", "sata", "cdrom")]


def test_netdev_and_nics() -> None:
    res = conv("-netdev user,id=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc "
               "-netdev tap,id=n1,ifname=tap0,script=no -device e1000,netdev=n1 "
               "-netdev bridge,id=n2,br=br1 -device rtl8139,netdev=n2 "
               "-netdev user,id=n3,hostfwd=tcp::2222-:22 -device e1000,netdev=n3")
    got = [(i.type, i.model, i.mac, i.target_dev, i.source) for i in res.domain.interfaces]
    assert got == [("user", "virtio", "52:54:00:aa:bb:cc", None, None),
                   ("ethernet", "e1000", None, "tap0", None),
                   ("bridge", "rtl8139", None, None, "br1")]
    # user networking with port forwards cannot be expressed: kept whole, both options
    assert res.domain.qemu_args == ["-netdev", "user,id=n3,hostfwd=tcp::2222-:22",
                                    "-device", "e1000,netdev=n3"]


def test_chardevs_and_their_devices() -> None:
    d = conv("-chardev pty,id=c0 -device isa-serial,chardev=c0,index=1 "
             "-chardev socket,id=c1,path=/r/ga.sock,server=on,wait=off "
             "-device virtio-serial-pci,id=virtio-serial0 "
             "-device virtserialport,chardev=c1,name=org.qemu.guest_agent.0 "
             "-chardev file,id=c2,path=/l/hvc.log -device virtconsole,chardev=c2,id=console1 "
             "-chardev pipe,id=c3,path=/r/p -device isa-parallel,chardev=c3").domain
    got = [(c.kind, c.type, c.path, c.target_type, c.target_name, c.target_port)
           for c in d.chardevs]
    assert got == [
        ("serial", "pty", None, None, None, 1), ("parallel", "pipe", "/r/p", None, None, 0),
        ("console", "pty", None, "serial", None, 0),
        ("console", "file", "/l/hvc.log", "virtio", None, None),
        ("channel", "unix", "/r/ga.sock", "virtio", "org.qemu.guest_agent.0", None)]


def test_objects_hostdevs_inputs_video_balloon() -> None:
    d = conv("-object rng-random,id=r0,filename=/dev/hwrng -device virtio-rng-pci,rng=r0 "
             "-device vfio-pci,host=06:12.5,bootindex=2 -device qemu-xhci,id=usb "
             "-device usb-host,hostbus=1,hostaddr=3 -device usb-tablet,bus=usb.0 "
             "-device virtio-keyboard-pci -device virtio-balloon-pci -vnc :0 "
             "-device virtio-vga").domain
    assert [(r.model, r.backend_model, r.path) for r in d.rngs] == [
        ("virtio", "random", "/dev/hwrng")]
    assert [(h.type, h.bus, h.slot, h.function, h.device) for h in d.hostdevs] == [
        ("pci", 6, 18, 5, None), ("usb", 1, None, None, 3)]
    assert [(i.type, i.bus) for i in d.inputs] == [("tablet", "usb"), ("keyboard", "virtio")]
    assert [(c.type, c.model) for c in d.controllers] == [("usb", "qemu-xhci")]
    assert d.memballoon is None  # virtio, the default
    assert conv("-m 64").domain.memballoon == "none"


def test_environment_becomes_qemu_env() -> None:
    res = conv("-m 64", env="LC_ALL=C PATH=/bin HOME=/h USER=u LOGNAME=u QEMU_AUDIO_DRV=none "
                            "EMPTY=")
    assert res.domain.qemu_env == [("QEMU_AUDIO_DRV", "none"), ("EMPTY", "")]


def test_unknown_options_are_kept_with_a_warning() -> None:
    res = conv("-m 64 -rtc clock=vm -no-hpet -foo bar -global x.y=1 "
               "-device usb-storage,drive=stick "
               "-blockdev driver=file,filename=/i/stick.img,node-name=stick")
    assert res.domain.qemu_args == ["-rtc", "clock=vm", "-no-hpet", "-foo", "bar",
                                    "-global", "x.y=1", "-device", "usb-storage,drive=stick",
                                    "-blockdev", "driver=file,filename=/i/stick.img,"
                                    "node-name=stick"]
    warning = res.warning or ""
    assert warning.startswith("kept as <qemu:arg>")
    for word in ("-rtc clock=vm", "-no-hpet", "-foo bar", "-global x.y=1",
                 "usb-storage"):
        assert word in warning
    assert res.domain.disks == []  # the blockdev belongs to the device that is kept


def test_options_vmconfine_adds_are_dropped() -> None:
    res = conv("-S -no-user-config -nodefaults -msg timestamp=on -display none "
               "-sandbox on,obsolete=deny -boot strict=on -name guest=x,debug-threads=on "
               "-chardev socket,id=charmonitor,path=/r/m.sock,server=on,wait=off "
               "-mon chardev=charmonitor,id=monitor,mode=control "
               "-chardev socket,id=charusermonitor,fd=5,server=on,wait=off "
               "-mon chardev=charusermonitor,id=usermonitor,mode=control")
    assert res.domain.qemu_args == [] and res.warning is None
    assert [(m.protocol, m.kind, m.path) for m in res.monitors] == [
        ("qmp", "unix", "/r/m.sock"), ("qmp", "fd", None)]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("text", "message"), [
    ("qemu-system-x86_64 -hda '/img/a.img", "unbalanced ' quote in the argument starting "
                                            "\"'/img/a.img\""),
    ('qemu-system-x86_64 -append "console=ttyS0', 'unbalanced " quote'),
    ("/usr/bin/python3 -m http.server", "'/usr/bin/python3' is not a QEMU binary"),
    ("qemu-system-x86_64 -m 64 -hda", "QEMU option -hda needs a value"),
    ("qemu-system-x86_64 -m", "QEMU option -m needs a value"),
    ("LC_ALL=C PATH=/bin", "no QEMU command found after the environment variables"),
    ("", "empty"),
    ("qemu-system-x86_64 -uuid not-a-uuid", "-uuid 'not-a-uuid' is not a UUID"),
    ("qemu-system-x86_64 -m lots", "-m 'lots' is not a memory size"),
    ("qemu-system-x86_64 -name a/b", "-name 'a/b': a domain name cannot contain '/'"),
    ("qemu-system-x86_64 -append $'\\x01'", "control character"),
    ("BAD-NAME=1 qemu-system-x86_64", "'BAD-NAME' is not a valid name"),
    ("qemu-system-x86_64 -vnc localhost", "-vnc 'localhost' has no valid display number"),
    ("qemu-system-x86_64 -vnc :99999", "-vnc ':99999' has no valid display number"),
    ("qemu-system-x86_64 -m 99999999999999T", "-m '99999999999999T' is too large"),
])
def test_bad_input(text: str, message: str) -> None:
    text = text.replace("$'\\x01'", "\x01")
    with pytest.raises(NativeArgsError) as exc:
        from_native(text, "t.args")
    assert message in exc.value.message
    assert "\n" not in exc.value.message


def test_bad_input_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nul = tmp_path / "nul.args"
    nul.write_bytes(b"qemu-system-x86_64 -hda /img/a\x00b.img\n")
    cases = {
        nul: "NUL byte at offset 30 in the argument '/img/a\\x00b.img'",
        tmp_path / "missing.args": "no such file",
        tmp_path: "is a directory",
    }
    for path, message in cases.items():
        assert main(["domxml-from-native", "qemu-argv", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert main(["domxml-from-native", "vmware", str(nul)]) == 1
    assert "unsupported native format 'vmware'" in capsys.readouterr().err


def test_cli_prints_xml_and_one_warning_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = tmp_path / "x.args"
    args.write_text(f"{QEMU} -name cli -m 64 -rtc clock=vm -hda /i/a.img\n")
    assert main(["domxml-from-native", "qemu-argv", str(args)]) == 0
    out, err = capsys.readouterr()
    assert parse_domain(out).name == "cli"
    assert err.count("\n") == 1 and err.startswith("warning: kept as <qemu:arg>")
    assert "-rtc clock=vm" in err and "raw assumed" in err


def test_from_argv_skips_environment_it_cannot_hold() -> None:
    res = from_argv([("GOOD", "1"), ("BAD.NAME", "x"), ("CTRL", "a\x01b")],
                    [QEMU, "-m", "64"], skip_bad_env=True)
    assert res.domain.qemu_env == [("GOOD", "1")]
    assert "environment variable BAD.NAME" in (res.warning or "")


# --------------------------------------------------------------------------- round trip


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("qemu-system-x86_64", "qemu-system-i386"):
        (d / name).write_text("#!/bin/sh\nexit 1\n")
        (d / name).chmod(0o755)
    return d


#: to-native cases domxml-from-native cannot turn back into the same XML, and why
NO_ROUND_TRIP = {
    "platform": "the guest-platform flags (-cpu model and flags, -smp topology, -rtc driftfix, "
                "-global kvm-pit, -no-hpet, vmport, the watchdog, disk cache/aio/discard) are "
                "not converted back yet: they are kept as <qemu:arg>",
}


def test_cases_without_round_trip_still_convert_with_a_warning(
        bindir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "read_image_header", fake_header)
    monkeypatch.setattr(chain, "path_exists", lambda path: True)
    cfg = QemuConfig(emulator_search_path=[str(bindir)])
    for case in NO_ROUND_TRIP:
        res = from_native(build_command(parse_domain(corpus_xml(case)), cfg,
                                        command_paths(case), symbolic=True).format_native(),
                          f"{case}.args")
        assert res.warning and "kept as <qemu:arg>" in res.warning


@pytest.mark.parametrize("case", [c for c in ARGV_CASES if c not in NO_ROUND_TRIP])
def test_round_trip_over_the_to_native_corpus(case: str, bindir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "read_image_header", fake_header)
    monkeypatch.setattr(chain, "path_exists", lambda path: True)
    cfg = QemuConfig(emulator_search_path=[str(bindir)], **CONFIG_OVERRIDES.get(case, {}))
    paths = command_paths(case)  # per-domain paths normalised to the case's
    first = build_command(parse_domain(corpus_xml(case)), cfg, paths, symbolic=True)
    res = from_native(first.format_native(), f"{case}.args")
    again = build_command(parse_domain(res.xml), cfg, paths, symbolic=True)
    assert again.args == first.args
    assert again.env == first.env
    assert again.emulator == first.emulator
    fds = {p.name: 7 + n for n, p in enumerate(first.inherited)}
    assert again.argv(fds=fds) == first.argv(fds=fds)  # the fd-passing form as well


# --------------------------------------------------------------------------- qemu-attach helpers


def test_attach_finds_the_qmp_socket_qemu_listens_on() -> None:
    from vmconfine.launch.attach import qmp_socket

    pid = os.getpid()
    res = conv("-chardev socket,id=q,path=/r/q.sock,server=on,wait=off "
               "-mon chardev=q,mode=control")
    assert qmp_socket(res, pid) == "/r/q.sock"
    res = conv("-qmp unix:rel.sock,server,nowait")  # relative: QEMU's cwd (here: ours)
    assert qmp_socket(res, pid) == os.path.join(os.getcwd(), "rel.sock")


@pytest.mark.parametrize(("args", "found"), [
    ("-m 64", "none"),
    ("-qmp unix:/r/c.sock", "-qmp unix:/r/c.sock"),  # QEMU connects out: not usable
    ("-qmp tcp:127.0.0.1:4444,server=on,wait=off -monitor unix:/r/h.sock,server,nowait",
     "-qmp tcp:127.0.0.1:4444,server=on,wait=off"),
    ("-chardev socket,id=m,fd=3,server=on,wait=off -mon chardev=m,mode=control",
     "-mon chardev=m,mode=control"),
])
def test_attach_refuses_without_a_usable_qmp_socket(args: str, found: str) -> None:
    from vmconfine.launch.attach import AttachError, qmp_socket

    with pytest.raises(AttachError) as exc:
        qmp_socket(conv(args), 4242)
    msg = exc.value.message
    assert msg.startswith("QEMU process 4242 has no QMP monitor on a unix socket it listens on")
    assert f"(QMP monitors found: {found})" in msg
    assert msg.endswith("start QEMU with -qmp unix:PATH,server=on,wait=off")


def test_attach_pid_argument() -> None:
    from vmconfine.launch.attach import AttachError, parse_pid

    assert parse_pid("1234") == 1234
    for bad in ("0", "-5", "abc", "12x", ""):
        with pytest.raises(AttachError, match="PID must be a positive integer"):
            parse_pid(bad)
