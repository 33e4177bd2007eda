"""DAC end to end through the CLI: QEMU runs as the QEMU account without capabilities, owns its
files while it runs, and every file is given back after destroy, guest poweroff, or a SIGKILL of
vmconfine followed by the next command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, proc_status, qemu_pid
from tests.host.test_argv_qmp import fake_bzimage
from tests.unit.test_dac_support import qemu_ids, snapshot, xattrs

pytestmark = pytest.mark.host

REF = "trusted.vmconfine.security.ref_dac"


class Guest:
    """A domain with an overlay on a backing file, kernel/initrd, a serial file, a readonly
    and a shareable disk, and a data disk: each file owned by another uid."""

    def __init__(self, vm_dir: VmDir, name: str, *, stay: bool = True, kernel: bool = True,
                 data: Path | None = None, data_label: str = "",
                 shared_kernel: Path | None = None) -> None:
        d = vm_dir.path
        self.name = name
        self.base = vm_dir.image(f"{name}-base.img", stay=stay)
        self.overlay = d / f"{name}-overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base),
                        "-F", "raw", str(self.overlay)], check=True)
        self.ro = _file(d / f"{name}-ro.img", 1103, 0o644, 1 << 20)
        self.shared = _file(d / f"{name}-shared.img", 1104, 0o660, 1 << 20)
        self.serial = _file(d / f"{name}.serial", 1105, 0o640, 0)
        self.data = data
        self.kernel = self.initrd = None
        os.chown(self.base, 1101, 1101)
        os.chown(self.overlay, 1102, 1102)
        os.chmod(self.overlay, 0o600)
        os_extra = ""
        if shared_kernel is not None:
            self.kernel = shared_kernel
            os_extra = f"<kernel>{self.kernel}</kernel>"
        elif kernel:
            self.kernel = d / f"{name}-vmlinuz"
            fake_bzimage(self.kernel)
            os.chown(self.kernel, 1106, 1106)
            self.initrd = _file(d / f"{name}-initrd", 1107, 0o644, 4096)
            os_extra = f"<kernel>{self.kernel}</kernel><initrd>{self.initrd}</initrd>"
        data_disk = ""
        if data is not None:
            label = (f"<seclabel model='dac'><label>{data_label}</label></seclabel>"
                     if data_label else "")
            data_disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                         f"<source file='{data}'>{label}</source>"
                         "<target dev='vdd' bus='virtio'/></disk>")
        self.xml = d / f"{name}.xml"
        self.xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>{os_extra}</os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{self.overlay}'/>
      <backingStore type='file'><format type='raw'/><source file='{self.base}'/>
        <backingStore/></backingStore>
      <target dev='hda' bus='ide'/>
    </disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{self.ro}'/><target dev='vdb' bus='virtio'/><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{self.shared}'/><target dev='vdc' bus='virtio'/><shareable/></disk>
    {data_disk}
    <serial type='file'><source path='{self.serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")

    @property
    def restored(self) -> list[Path]:
        out = [self.overlay, self.serial]
        out += [p for p in (self.kernel, self.initrd, self.data) if p is not None]
        return out

    @property
    def kept(self) -> list[Path]:
        return [self.base, self.ro, self.shared]

    def check_given_back(self, before: dict[str, tuple[int, int, int, dict[str, bytes]]],
                         ) -> None:
        uid, gid = qemu_ids()
        after = snapshot([*self.restored, *self.kept])
        for p in self.restored:
            assert after[str(p)] == before[str(p)], f"{p} was not given back"
        for p in self.kept:  # backing/readonly/shareable: libvirt never restores them
            assert after[str(p)][:2] == (uid, gid), p
            assert after[str(p)][2:] == before[str(p)][2:], p


def _file(path: Path, uid: int, mode: int, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def _check_running(embed: Embed, g: Guest) -> int:
    uid, gid = qemu_ids()
    pid = qemu_pid(embed, g.name)
    st = proc_status(pid)
    assert st["Uid"].split() == [str(uid)] * 4
    assert st["Gid"].split() == [str(gid)] * 4
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[key], 16) == 0, key
    assert st["NoNewPrivs"] == "1"
    for p in [*g.restored, *g.kept]:
        if p == g.serial:  # opened by vmconfine, QEMU writes through the fd: never chowned
            assert os.stat(p).st_uid == 1105, p
            continue
        assert (os.stat(p).st_uid, os.stat(p).st_gid) == (uid, gid), p
    assert xattrs(g.overlay)[REF] == b"1"
    assert f"+{uid}:+{gid}" in embed.cli("dominfo", g.name, check=True).stdout
    return pid


def _gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_running_then_destroy(embed: Embed, vm_dir: VmDir) -> None:
    g = Guest(vm_dir, "dac1")
    before = snapshot([*g.restored, *g.kept])
    run = embed.start(g.xml, "--paused")
    pid = _check_running(embed, g)
    embed.cli("destroy", g.name, check=True)
    assert run.wait(timeout=60) == 0
    assert _gone(pid)
    g.check_given_back(before)


def test_guest_poweroff_gives_everything_back(embed: Embed, vm_dir: VmDir) -> None:
    g = Guest(vm_dir, "dac2", stay=False, kernel=False)
    before = snapshot([*g.restored, *g.kept])
    proc = embed.cli("run", str(g.xml), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hello from the test guest" in g.serial.read_text()
    before[str(g.serial)] = snapshot([g.serial])[str(g.serial)]  # the guest wrote to it
    g.check_given_back(before)
    assert os.stat(g.serial).st_uid == 1105


def test_sigkill_of_vmconfine_then_next_command(embed: Embed, vm_dir: VmDir) -> None:
    g = Guest(vm_dir, "dac3")
    before = snapshot([*g.restored, *g.kept])
    run = embed.start(g.xml, "--paused")
    pid = _check_running(embed, g)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert _gone(pid)
    embed.cli("list", check=True)  # finishes the teardown from the journal
    g.check_given_back(before)


def test_two_domains_share_a_kernel(embed: Embed, vm_dir: VmDir) -> None:
    """Two running QEMUs use one file: counted in xattrs, given back when the last stops.
    (A writable image cannot be shared: QEMU's image locks refuse a second writer.)"""
    uid, gid = qemu_ids()
    kernel = vm_dir.path / "common-vmlinuz"
    fake_bzimage(kernel)
    os.chown(kernel, 1200, 1201)
    before = snapshot([kernel])
    a = Guest(vm_dir, "share-a", shared_kernel=kernel)
    b = Guest(vm_dir, "share-b", shared_kernel=kernel)
    run_a = embed.start(a.xml, "--paused")
    run_b = embed.start(b.xml, "--paused")
    assert xattrs(kernel)[REF] == b"2"
    assert xattrs(kernel)["trusted.vmconfine.security.dac"] == b"+1200:+1201"
    embed.cli("destroy", a.name, check=True)
    assert run_a.wait(timeout=60) == 0
    assert (os.stat(kernel).st_uid, os.stat(kernel).st_gid) == (uid, gid)
    assert xattrs(kernel)[REF] == b"1"
    embed.cli("destroy", b.name, check=True)
    assert run_b.wait(timeout=60) == 0
    assert snapshot([kernel]) == before


def test_different_owner_for_disk_in_use_is_refused(embed: Embed, vm_dir: VmDir) -> None:
    common = _file(vm_dir.path / "common.img", 1200, 0o666, 1 << 20)
    before = snapshot([common])
    a = Guest(vm_dir, "use-a", kernel=False, data=common)
    b = Guest(vm_dir, "use-b", kernel=False, data=common, data_label="+4321:+4321")
    b_before = snapshot([*b.restored, *b.kept])
    run_a = embed.start(a.xml, "--paused")
    proc = embed.cli("run", str(b.xml))
    assert proc.returncode == 1
    assert (f"Setting different DAC user or group on {common} which is already in use"
            in proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert xattrs(common)[REF] == b"1"
    b_after = snapshot([b.overlay, b.serial])
    assert b_after == {k: v for k, v in b_before.items() if k in b_after}
    embed.cli("destroy", a.name, check=True)
    assert run_a.wait(timeout=60) == 0
    assert snapshot([common]) == before


def test_preflight_names_the_unsearchable_directory(embed: Embed, vm_dir: VmDir) -> None:
    private = vm_dir.path / "private"
    private.mkdir(mode=0o700)
    img = private / "disk.img"
    xml = vm_dir.domain_xml("pre", image=vm_dir.image("private/disk.img"))
    os.chown(img, 1300, 1300)
    before = snapshot([img, private])
    proc = embed.cli("run", str(xml))
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line
    assert f"cannot search directory {private}" in line and f"chmod o+x {private}" in line
    assert snapshot([img, private]) == before


def test_live_xml_shows_the_dac_label(embed: Embed, vm_dir: VmDir) -> None:
    uid, gid = qemu_ids()
    xml = vm_dir.domain_xml("live", extra="<seclabel type='dynamic' model='dac'/>")
    run = embed.start(xml, "--paused")
    live = embed.cli("dumpxml", "live", check=True).stdout
    assert f"<label>+{uid}:+{gid}</label>" in live
    assert f"<imagelabel>+{uid}:+{gid}</imagelabel>" in live
    inactive = embed.cli("dumpxml", "--inactive", "live", check=True).stdout
    assert "<imagelabel>" not in inactive
    embed.cli("destroy", "live", check=True)
    assert run.wait(timeout=60) == 0
