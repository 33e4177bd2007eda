"""Hotplug through the daemon on real QEMU: a disk attached to and detached from a running
domain goes through every driver's per-device hooks, reaches QEMU as a passed fd (so Landlock,
fixed at exec, still refuses any other path), and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import VMCONFINE, Embed, VmDir
from tests.host.test_daemon import Daemon, destroy_running
from tests.support import REPO

pytestmark = pytest.mark.host

PATTERN = b"vmconfine-hotplug-pattern"


def domain_xml(d: Path, name: str) -> Path:
    (d / f"{name}.img").write_bytes(bytes(1 << 20))
    xml = d / f"{name}.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{d / name}.img'/><target dev='hda' bus='ide'/></disk>"
        "<controller type='scsi' model='virtio-scsi'/><memballoon model='none'/></devices>"
        "</domain>")
    return xml


def disk_xml(d: Path, name: str, target: str = "sdb", bus: str = "scsi") -> Path:
    image = d / f"{name}.img"
    image.write_bytes(PATTERN + bytes((1 << 20) - len(PATTERN)))
    os.chmod(image, 0o600)
    xml = d / f"{name}-disk.xml"
    xml.write_text(f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                   f"<source file='{image}'/><target dev='{target}' bus='{bus}'/></disk>")
    return xml


@pytest.fixture
def daemon(vm_dir: VmDir) -> Iterator[Daemon]:
    e = Embed(vm_dir.path / "instance")
    e.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    d = Daemon(e)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        destroy_running(e)
        d.stop()
    e.cleanup()


def qmp(d: Daemon, name: str, command: str, **args: object) -> dict:
    payload = {"execute": command, **({"arguments": args} if args else {})}
    out = d.cli("qemu-monitor-command", name, json.dumps(payload), check=False)
    return json.loads(out.stdout) if out.stdout.strip() else {"error": out.stderr}


def hmp(d: Daemon, name: str, text: str) -> str:
    return d.cli("qemu-monitor-command", name, "--hmp", text).stdout


def devices(d: Daemon, name: str) -> dict[str, str]:
    """query-block by device id (virtio devices show as /machine/peripheral/ID/...)."""
    out = {}
    for b in qmp(d, name, "query-block")["return"]:
        qdev = b["qdev"].removeprefix("/machine/peripheral/").split("/")[0]
        out[qdev] = b.get("inserted", {}).get("file", "")
    return out


def test_attach_detach_disk_landlock_dac_cgroups(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    d.cli("define", str(domain_xml(vm_dir.path, "hp")))
    d.cli("start", "hp")
    dev = disk_xml(vm_dir.path, "extra")
    image = vm_dir.path / "extra.img"
    before = (image.stat().st_uid, image.stat().st_mode & 0o777)
    nodes_before = [n["node-name"] for n in qmp(d, "hp", "query-named-block-nodes")["return"]]

    # a compromised QEMU cannot open the image by path: Landlock was fixed at exec
    denied = qmp(d, "hp", "blockdev-add", driver="file", filename=str(image),
                 **{"node-name": "evil"})
    assert "error" in denied and "Permission denied" in json.dumps(denied), denied

    assert d.cli("attach-device", "hp", str(dev), "--live").stdout.strip() == \
        "Device attached successfully"
    found = devices(d, "hp")
    assert found.get("scsi0-0-0-1", "").startswith("/dev/fdset/"), found  # passed as an fd
    assert image.stat().st_uid != before[0]  # DAC gave it to QEMU's account
    # QEMU reads the image through the passed fd (qemu-io prints to QEMU's own log)
    hmp(d, "hp", "qemu-io -d scsi0-0-0-1 \"read -v 0 32\"")
    qemu_log = d.embed.root / "log" / "qemu" / "hp.log"
    deadline = time.monotonic() + 10
    while b"vmconfine.hotplu" not in qemu_log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"vmconfine.hotplu" in qemu_log.read_bytes(), qemu_log.read_text()[-500:]
    live = d.cli("dumpxml", "hp").stdout
    assert "<target dev=\"sdb\" bus=\"scsi\"/>" in live
    assert "sdb" not in d.cli("dumpxml", "--inactive", "hp").stdout  # --live only

    # the same path by name is still refused after the attach
    again = qmp(d, "hp", "blockdev-add", driver="file", filename=str(image),
                **{"node-name": "evil2"})
    assert "error" in again, again

    assert d.cli("detach-device", "hp", str(dev), "--live").stdout.strip() == \
        "Device detached successfully"
    assert "scsi0-0-0-1" not in devices(d, "hp")
    assert (image.stat().st_uid, image.stat().st_mode & 0o777) == before
    assert "sdb" not in d.cli("dumpxml", "hp").stdout
    nodes = [n["node-name"] for n in qmp(d, "hp", "query-named-block-nodes")["return"]]
    assert sorted(nodes) == sorted(nodes_before), nodes
    fdsets = qmp(d, "hp", "query-fdsets")["return"]
    assert fdsets == [], fdsets


def test_attach_config_and_persistent(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    d.cli("define", str(domain_xml(vm_dir.path, "cfg")))
    dev = disk_xml(vm_dir.path, "cfgdisk", target="vdb", bus="virtio")
    d.cli("attach-device", "cfg", str(dev))  # not running: --current is the definition
    assert "<target dev=\"vdb\" bus=\"virtio\"/>" in d.cli("dumpxml", "--inactive",
                                                          "cfg").stdout
    d.cli("start", "cfg")
    assert "virtio-disk1" in devices(d, "cfg")  # started with it
    d.cli("detach-device", "cfg", str(dev), "--config")
    assert "vdb" not in d.cli("dumpxml", "--inactive", "cfg").stdout
    assert "virtio-disk1" in devices(d, "cfg")  # the running domain keeps it
    live = d.cli("attach-device", "cfg", str(dev), "--live", check=False)
    assert live.returncode == 1 and "target vdb already exists" in live.stderr


def test_q35_hotplug_uses_a_free_root_port(daemon: Daemon, vm_dir: VmDir) -> None:
    """A Q35 guest is defined with its canonical machine type and started with libvirt's
    topology; a virtio disk attached live goes into the free pcie-root-port (pcie.0 takes no
    hotplug)."""
    d = daemon
    xml = domain_xml(vm_dir.path, "hq")
    xml.write_text(xml.read_text().replace("machine='pc'", "machine='q35'").replace(
        "bus='ide'", "bus='sata'"))
    d.cli("define", str(xml))
    defined = d.cli("dumpxml", "--inactive", "hq").stdout
    machine = re.search(r"machine=\"([^\"]+)\"", defined)
    assert machine is not None and re.fullmatch(r"pc-q35-\d+\.\d+", machine.group(1))
    assert defined.count("model=\"pcie-root-port\"") >= 2  # libvirt's topology, at define
    d.cli("start", "hq")
    live = d.cli("dumpxml", "hq").stdout
    assert re.findall(r"<address [^>]*>", live) == re.findall(r"<address [^>]*>", defined)
    ports = re.findall(r"<controller type=\"pci\" index=\"(\d+)\" model=\"pcie-root-port\"",
                       live)
    used = {int(b, 16) for b in re.findall(r"<address type=\"pci\" domain=\"0x0000\" "
                                           r"bus=\"(0x[0-9a-f]+)\"", live)}
    free = [int(p) for p in ports if int(p) not in used]
    assert free, live
    dev = disk_xml(vm_dir.path, "hqdisk", target="vdb", bus="virtio")
    assert d.cli("attach-device", "hq", str(dev), "--live").stdout.strip() == \
        "Device attached successfully"
    parent = qmp(d, "hq", "qom-get", path="/machine/peripheral/virtio-disk1",
                 property="parent_bus")
    assert parent["return"] == f"/machine/peripheral/pci.{free[0]}/pci.{free[0]}", parent
    assert f'bus="{free[0]:#04x}"' in d.cli("dumpxml", "hq").stdout
    # (a PCIe unplug waits for the guest OS to release the device; this guest has none)


def test_failed_attach_leaves_nothing(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    xml = domain_xml(vm_dir.path, "fail")
    xml.write_text(xml.read_text().replace(
        "<controller type='scsi' model='virtio-scsi'/>", ""))
    d.cli("define", str(xml))
    d.cli("start", "fail")
    dev = disk_xml(vm_dir.path, "faildisk")
    image = vm_dir.path / "faildisk.img"
    before = image.stat()
    nodes_before = qmp(d, "fail", "query-named-block-nodes")["return"]
    out = d.cli("attach-device", "fail", str(dev), "--live", check=False)
    assert out.returncode == 1 and "has no controller 'scsi0'" in out.stderr, out.stderr
    assert image.stat().st_uid == before.st_uid
    assert qmp(d, "fail", "query-named-block-nodes")["return"] == nodes_before
    ide = disk_xml(vm_dir.path, "idedisk", target="hdb", bus="ide")
    out = d.cli("attach-device", "fail", str(ide), "--live", check=False)
    assert out.returncode == 1 and "bus 'ide' cannot be hotplugged" in out.stderr
    assert "hdb" not in d.cli("dumpxml", "fail").stdout


def test_kill_during_attach_is_rolled_back_at_reconnect(vm_dir: VmDir) -> None:
    e = Embed(vm_dir.path / "crash")
    e.configure('security_driver = "landlock"\n')
    d = Daemon(e)
    d.start()
    try:
        d.cli("define", str(domain_xml(vm_dir.path, "crash")))
        d.cli("start", "crash")
        d.stop()
        # the daemon pauses right after the labels are set, and is killed there
        env = {**os.environ, "VMCONFINE_PAUSE_AT": "hotplug-labelled"}
        logf = open(d.log, "a")
        d.proc = subprocess.Popen([VMCONFINE, "-c", e.uri, "daemon"], env=env, stdout=logf,
                                  stderr=logf, stdin=subprocess.DEVNULL, cwd=REPO,
                                  start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 60
        while not d.rw.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        dev = disk_xml(vm_dir.path, "crashdisk")
        image = vm_dir.path / "crashdisk.img"
        before = image.stat().st_uid
        attach = subprocess.Popen([VMCONFINE, "-c", e.uri, "attach-device", "crash", str(dev),
                                   "--live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=REPO)
        deadline = time.monotonic() + 60
        while "paused at hotplug-labelled" not in d.log.read_text():
            assert time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.05)
        assert image.stat().st_uid != before  # labelled, not attached
        d.stop(signal.SIGKILL)
        attach.wait(timeout=60)
        assert attach.returncode == 1
        d.start()
        assert "attach of sdb rolled back" in d.log.read_text()
        assert image.stat().st_uid == before
        assert "sdb" not in d.cli("dumpxml", "crash").stdout
        assert re.search(r"^\s*\d+\s+crash\s+running$", d.cli("list").stdout, re.M)
    finally:
        destroy_running(e)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        e.cleanup()
