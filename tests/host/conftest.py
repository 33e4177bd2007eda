"""Host-tier fixtures: embed instances, boot images, and `vmconfine run` in the background."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.mkbootimg import write_image
from tests.support import REPO, VENV_BIN, require_root
from vmconfine.launch.runtime import proc_status  # noqa: F401 (used by the host tests)

VMCONFINE = str(VENV_BIN / "vmconfine")
#: scratch dirs are made here, each a fresh mkdtemp (never a fixed, guessable path)
SCRATCH_PARENT = "/var/tmp"

DOMAIN_TEMPLATE = """<domain type='{virt_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{image}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
    {extra_devices}
  </devices>
  {extra}
</domain>
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/host/" in str(item.fspath):
            item.add_marker(pytest.mark.host)


class VmDir:
    """A world-searchable scratch dir (the QEMU account must reach the images in it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def image(self, name: str = "disk.img", *, stay: bool = True,
              greeting: str = "hello from the test guest") -> Path:
        p = self.path / name
        write_image(str(p), greeting, poweroff=not stay)
        return p

    def domain_xml(self, name: str = "t1", *, stay: bool = True, virt_type: str = "qemu",
                   extra_devices: str = "", extra: str = "", image: Path | None = None,
                   uuid: str | None = None) -> Path:
        img = image or self.image(f"{name}.img", stay=stay)
        xml = DOMAIN_TEMPLATE.format(
            name=name, uuid=uuid or str(uuidlib.uuid4()), image=img,
            serial=self.path / f"{name}.serial", virt_type=virt_type,
            extra_devices=extra_devices, extra=extra)
        p = self.path / f"{name}.xml"
        p.write_text(xml)
        return p


@pytest.fixture
def vm_dir() -> Iterator[VmDir]:
    require_root()
    d = Path(tempfile.mkdtemp(prefix="vmconfine-tests-", dir=SCRATCH_PARENT))
    os.chmod(d, 0o755)
    yield VmDir(d)
    shutil.rmtree(d, ignore_errors=True)


def wait_for_line(proc: subprocess.Popen[str], text: str, *, stderr: bool = False,
                  timeout: float = 60) -> str:
    """Read a background `vmconfine run`'s stdout (or stderr) until a line holds ``text``;
    return that line. On EOF or timeout kill it and fail with everything it printed."""
    stream = proc.stderr if stderr else proc.stdout
    assert stream is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line
    proc.kill()
    out, err = proc.communicate(timeout=60)
    raise AssertionError(f"vmconfine run never said {text!r}: {''.join(seen)}{out}{err}")


class Embed:
    """An embed instance rooted in a fresh dir, driven through the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"qemu:///embed?root={root}"
        self.procs: list[subprocess.Popen[str]] = []
        #: run every command under this prefix (``ip netns exec NS``)
        self.prefix: list[str] = []

    def configure(self, text: str) -> None:
        (self.root / "etc").mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "qemu.conf").write_text(text)

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.prefix, VMCONFINE, "-c", self.uri, *args],
                              capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                              cwd=REPO)
        if check:
            assert proc.returncode == 0, f"vmconfine {' '.join(args)}: {proc.stderr}"
        return proc

    def start(self, xml: Path, *extra: str, env: dict[str, str] | None = None,
              wait_for: str = "started") -> subprocess.Popen[str]:
        """`vmconfine run` in the background; return once it printed ``wait_for``."""
        p = subprocess.Popen([*self.prefix, VMCONFINE, "-c", self.uri, "run", str(xml), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                             start_new_session=True)
        self.procs.append(p)
        wait_for_line(p, wait_for, stderr=wait_for.startswith("paused"))
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        # the next command finishes any teardown a killed supervisor left behind
        subprocess.run([*self.prefix, VMCONFINE, "-c", self.uri, "list"], capture_output=True,
                       timeout=120)


@pytest.fixture
def embed(vm_dir: VmDir) -> Iterator[Embed]:
    e = Embed(vm_dir.path / "instance")
    e.configure('security_driver = "none"\n')
    yield e
    e.cleanup()


def qemu_pid(e: Embed, name: str) -> int:
    out = e.cli("dominfo", name, check=True).stdout
    for line in out.splitlines():
        if line.startswith("PID:"):
            return int(line.split()[1])
    raise AssertionError(out)
