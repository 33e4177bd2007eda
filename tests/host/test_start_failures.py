"""QEMU exiting during start-up is one error line through the real CLI, whichever step notices
it first (the QMP handshake, the library's own ConnectError, the exit watcher): "QEMU exited
during start-up" with QEMU's last log lines — never ``internal error: ConnectError`` or a
traceback from the QMP library — and nothing is left changed on the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from examples.mkbootimg import write_image
from tests.host.conftest import Embed, VmDir

#: a stand-in for QEMU that takes the QMP connection, drops it mid-handshake, then exits:
#: the library fails first (ConnectError), QEMU's exit is seen only afterwards
DROPS_QMP = """#!/usr/bin/python3
import os, re, socket, sys, time
if "-L" in sys.argv:  # answers a probe like QEMU
    print("/usr/share/qemu")
    sys.exit(0)
if sys.argv[1:] == ["-machine", "help"]:  # the machine types, as QEMU 7.2 lists them
    print("Supported machines are:")
    print("pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)")
    print("pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)")
    sys.exit(0)
fd = int(re.search(r"id=charmonitor,fd=(\\d+)", " ".join(sys.argv)).group(1))
listener = socket.socket(fileno=fd)
listener.settimeout(30)
conn, _ = listener.accept()
conn.close()
print("fake qemu: dropped the monitor connection", file=sys.stderr, flush=True)
time.sleep(0.5)
sys.exit(1)
"""


def domain(vm_dir: VmDir, name: str, *, disks: int = 1, kernel: Path | None = None,
           emulator: str = "/usr/bin/qemu-system-x86_64") -> tuple[Path, Path]:
    img = vm_dir.path / f"{name}.img"
    write_image(str(img), "hello", poweroff=False)
    os.chown(img, 1301, 1301)
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{img}'/><target dev='hd{chr(ord('a') + i)}' bus='ide'/></disk>"
        for i in range(disks))
    kernel_xml = f"<kernel>{kernel}</kernel>" if kernel else ""
    xml = vm_dir.path / f"{name}.xml"
    xml.write_text(f"""<domain type='qemu'><name>{name}</name>
  <memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{kernel_xml}</os>
  <devices><emulator>{emulator}</emulator>{disk_xml}<memballoon model='none'/></devices>
</domain>
""")
    return xml, img


def assert_start_failure(embed: Embed, xml: Path, img: Path, name: str, log_text: str) -> None:
    proc = embed.cli("run", str(xml), timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: domain '{name}': QEMU exited during start-up "
                               "(exit status 1); QEMU log: "), proc.stderr
    assert log_text in lines[0], proc.stderr
    for bad in ("Traceback", "internal error", "ConnectError", "CRITICAL"):
        assert bad not in proc.stderr + proc.stdout
    # nothing left behind: the image is given back, no domain is listed
    assert os.stat(img).st_uid == 1301
    assert name not in embed.cli("list", check=True).stdout


@pytest.mark.parametrize("attempt", range(2))
def test_same_image_as_two_rw_disks(embed: Embed, vm_dir: VmDir, attempt: int) -> None:
    name = f"twodisks{attempt}"
    xml, img = domain(vm_dir, name, disks=2)
    assert_start_failure(embed, xml, img, name, 'Failed to get "write" lock')


def junk_kernel(size: int = 4096) -> bytes:
    """Random bytes QEMU's x86 loader refuses ("invalid kernel header"). Not any random bytes:
    without the "HdrS" magic QEMU takes the file as a protocol-0 kernel whose setup is
    (byte 0x1f1 + 1) x 512 bytes long, and refuses it only when that exceeds the file — with
    a byte below 8 (1 time in 32) it loads the junk and runs it."""
    data = bytearray(os.urandom(size))
    data[0x1F1] = 0xFF  # setup of 128 KiB: longer than the file
    data[0x202:0x206] = b"junk"  # never the "HdrS" magic of a real kernel
    return bytes(data)


def test_junk_kernel_is_always_refused_by_the_loaders_rule() -> None:
    for _ in range(64):
        data = junk_kernel()
        assert data[0x202:0x206] != b"HdrS"
        assert (data[0x1F1] + 1) * 512 > len(data)


@pytest.mark.parametrize("attempt", range(2))
def test_unloadable_kernel(embed: Embed, vm_dir: VmDir, attempt: int) -> None:
    kernel = vm_dir.path / f"junk-kernel{attempt}"
    kernel.write_bytes(junk_kernel())
    os.chmod(kernel, 0o644)
    name = f"badkernel{attempt}"
    xml, img = domain(vm_dir, name, kernel=kernel)
    assert_start_failure(embed, xml, img, name, "invalid kernel header")


def test_qmp_dropped_mid_handshake_then_exit(embed: Embed, vm_dir: VmDir) -> None:
    fake = vm_dir.path / "drops-qmp"
    fake.write_text(DROPS_QMP)
    os.chmod(fake, 0o755)
    assert subprocess.run([str(fake), "-L", "help"], capture_output=True).returncode == 0
    xml, img = domain(vm_dir, "dropsqmp", emulator=str(fake))
    assert_start_failure(embed, xml, img, "dropsqmp", "dropped the monitor connection")
