"""What a started Q35 guest's live XML records, as libvirt's does: the canonical machine type,
the PCI topology (pcie-root-ports and addresses), the pseudo-terminals QEMU allocated (which
``run`` prints too); and ``domxml-to-native`` for images that do not exist yet."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

from lxml import etree

from tests.host.conftest import Embed, VmDir, qemu_pid, wait_for_line
from vmconfine.qemu.machines import parse_machine_help

QEMU = "/usr/bin/qemu-system-x86_64"

Q35 = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{qemu}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='1'/></console>
  </devices>
</domain>
"""


def canonical(alias: str) -> str:
    out = subprocess.run([QEMU, "-machine", "help"], capture_output=True, text=True,
                         check=True).stdout
    name = parse_machine_help(out).canonical(alias)
    assert name and name != alias and re.fullmatch(r"pc-(q35|i440fx)-\d+\.\d+", name)
    return name


def test_live_xml_records_machine_pci_topology_and_ptys(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.path / "fid.xml"
    xml.write_text(Q35.format(name="fid", qemu=QEMU, fmt="raw",
                              image=vm_dir.image("fid.img", stay=True)))
    run = embed.start(xml, "--paused")
    printed = {}
    for alias in ("serial0", "console1"):
        line = wait_for_line(run, f"  {alias}: ")
        printed[alias] = line.split(": ", 1)[1].strip()
    live = etree.fromstring(embed.cli("dumpxml", "fid", check=True).stdout.encode())
    q35 = canonical("q35")
    assert live.find("os/type").get("machine") == q35

    # the pseudo-terminals: printed by run, in the live XML, and QEMU's own (query-chardev)
    serial, con0, con1 = (live.find("devices/serial"), *live.findall("devices/console"))
    assert serial.find("source").get("path") == printed["serial0"]
    assert con0.get("tty") == con0.find("source").get("path") == printed["serial0"]
    assert con1.get("tty") == con1.find("source").get("path") == printed["console1"]
    assert printed["serial0"] != printed["console1"]
    pid = qemu_pid(embed, "fid")
    reply = json.loads(embed.cli("qemu-monitor-command", "fid",
                                 '{"execute":"query-chardev"}', check=True).stdout)
    qemu = {c["label"]: c["filename"] for c in reply["return"]}
    for alias, path in printed.items():
        # QEMU's own devpts instance (namespaces driver): reached through its root, never the
        # host's terminal of the same number
        inside = path.removeprefix(f"/proc/{pid}/root")
        assert re.fullmatch(r"/dev/pts/\d+", inside) and stat.S_ISCHR(os.stat(path).st_mode)
        assert qemu[f"char{alias}"] == f"pty:{inside}"
        assert (os.stat(f"/proc/{pid}/root/dev/pts").st_dev != os.stat("/dev/pts").st_dev) \
            == (path != inside)

    # libvirt's Q35 topology: every PCI device behind a root port, one port left free
    ports = [c for c in live.findall("devices/controller[@type='pci']")
             if c.get("model") == "pcie-root-port"]
    assert len(ports) >= 4
    for c in ports:
        assert c.find("address").get("bus") == "0x00"
        assert c.find("target").get("chassis") == c.get("index")
    disk_bus = int(live.find("devices/disk/address").get("bus"), 16)
    assert disk_bus in {int(c.get("index")) for c in ports}
    reply = json.loads(embed.cli("qemu-monitor-command", "fid",
                                 '{"execute":"qom-get","arguments":{"path":'
                                 '"/machine/peripheral/virtio-disk0","property":"parent_bus"}}',
                                 check=True).stdout)
    assert reply["return"] == f"/machine/peripheral/pci.{disk_bus}/pci.{disk_bus}"

    # the inactive XML has no terminals (they are per start) but keeps the machine type
    inactive = embed.cli("dumpxml", "--inactive", "fid", check=True).stdout
    assert "/dev/pts/" not in inactive and " tty=" not in inactive
    assert f"machine=\"{q35}\"" in inactive or f"machine='{q35}'" in inactive
    embed.cli("destroy", "fid", check=True)


def test_to_native_needs_no_images_but_run_does(embed: Embed, vm_dir: VmDir) -> None:
    missing = vm_dir.path / "later.qcow2"
    xml = vm_dir.path / "later.xml"
    xml.write_text(Q35.format(name="later", qemu=QEMU, fmt="qcow2", image=missing))
    native = embed.cli("domxml-to-native", "qemu-argv", str(xml))
    assert native.returncode == 0, native.stderr
    nodes = [json.loads(m) for m in re.findall(r"-blockdev '([^']+)'", native.stdout)]
    assert [n["driver"] for n in nodes] == ["file", "qcow2"]
    assert nodes[0]["filename"] == str(missing)
    assert f"-machine {canonical('q35')}," in native.stdout
    run = embed.cli("run", str(xml))
    assert run.returncode == 1
    assert run.stderr.strip() == (f"error: disk image {missing} does not exist (its qcow2 "
                                  "header names the backing chain); create the image or fix "
                                  "<source file=...>")
    assert not Path(missing).exists()
