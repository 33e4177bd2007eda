"""The landlock driver through `vmconfine run`: a session instance run by an unprivileged user,
and an embed instance as root where DAC and cgroups are stacked after it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.mkbootimg import write_image
from tests.host.conftest import VMCONFINE, Embed, VmDir, proc_status, qemu_pid
from tests.support import REPO, require, require_binary
from vmconfine_landlock import syscalls

NOBODY = 65534
LABEL = re.compile(r"landlock:abi\d+:[0-9a-f]{12}")

XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{disk}'/><target dev='hda' bus='ide'/></disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/></devices>{extra}</domain>
"""


class Session:
    """qemu:///session of uid 65534: HOME and the XDG dirs are temp dirs it owns."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(base / "xdg-run"), "XDG_CONFIG_HOME": str(base / "xdg-cfg"),
            "XDG_CACHE_HOME": str(base / "xdg-cache"), "XDG_DATA_HOME": str(base / "xdg-data"),
        }
        for key in ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
                    "XDG_DATA_HOME"):
            d = Path(self.env[key])
            d.mkdir(mode=0o700)
            os.chown(d, NOBODY, NOBODY)
        self.guest = self.home / "guest"
        self.outside = self.home / "private"
        self.procs: list[subprocess.Popen[str]] = []

    def own(self, path: Path) -> Path:
        os.chown(path, NOBODY, NOBODY)
        return path

    def configure(self, text: str) -> None:
        cfg = Path(self.env["XDG_CONFIG_HOME"]) / "vmconfine"
        cfg.mkdir(exist_ok=True)
        self.own(cfg)
        (cfg / "qemu.conf").write_text(text)
        self.own(cfg / "qemu.conf")

    def argv(self, *args: str) -> list[str]:
        setpriv = require_binary("setpriv")
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                VMCONFINE, "-c", "qemu:///session", *args]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO)

    def start(self, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=self.env, stdin=subprocess.DEVNULL, cwd=REPO,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def domain(self, name: str, *, stay: bool, extra: str = "") -> Path:
        for d in (self.guest, self.outside):
            if not d.exists():
                d.mkdir()
                self.own(d)
        disk = self.guest / f"{name}.img"
        write_image(str(disk), f"hello from {name}", poweroff=not stay)
        xml = self.guest / f"{name}.xml"
        xml.write_text(XML.format(name=name, disk=disk, serial=self.guest / f"{name}.serial",
                                  extra=extra))
        self.own(disk)
        return self.own(xml)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        if self.procs:
            self.cli("list")


@pytest.fixture
def checkout_searchable() -> Iterator[None]:
    """uid 65534 runs the checkout's .venv/bin/vmconfine: make the checkout's parent
    directories searchable for the test if they are not (e.g. a clone under /root), and put
    their modes back afterwards."""
    changed: list[tuple[Path, int]] = []
    for d in [*reversed(REPO.parents), REPO]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            changed.append((d, mode))
            os.chmod(d, (mode & 0o7777) | 0o001)
    try:
        yield
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, mode & 0o7777)


@pytest.fixture
def session(vm_dir: VmDir, checkout_searchable: None) -> Iterator[Session]:
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    s = Session(vm_dir.path)
    s.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    yield s
    s.cleanup()


def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_session_guest_boots_confined(session: Session) -> None:
    xml = session.domain("boot", stay=False)
    proc = session.cli("run", str(xml))
    assert proc.returncode == 0, proc.stderr
    assert "hello from boot" in (session.guest / "boot.serial").read_text()


def test_session_label_and_process(session: Session) -> None:
    xml = session.domain("live", stay=True)
    run = session.start("run", str(xml))
    wait_for_text(session.guest / "live.serial", "hello from live")
    info = session.cli("dominfo", "live")
    assert info.returncode == 0, info.stderr
    assert "landlock" in info.stdout and LABEL.search(info.stdout), info.stdout
    pid = next(int(line.split()[1]) for line in info.stdout.splitlines()
               if line.startswith("PID:"))
    status = proc_status(pid)
    assert status["NoNewPrivs"] == "1"
    assert status["Uid"].split()[0] == str(NOBODY)
    live = session.cli("dumpxml", "live").stdout
    assert "model='landlock'" in live.replace('"', "'") and LABEL.search(live)
    assert session.cli("destroy", "live").returncode == 0
    assert run.wait(timeout=60) == 0


def test_session_qemu_denied_outside_file(session: Session) -> None:
    secret = session.base / "home" / "secret.img"
    secret.write_bytes(b"\0" * 4096)
    session.own(secret)
    extra = ("<qemu:commandline><qemu:arg value='-drive'/>"
             f"<qemu:arg value='file={secret},if=none,format=raw,id=extra'/></qemu:commandline>")
    xml = session.domain("deny", stay=False, extra=extra)
    proc = session.cli("run", str(xml))
    assert proc.returncode != 0
    logs = list(Path(session.env["XDG_CACHE_HOME"]).rglob("deny.log"))
    text = proc.stderr + "".join(p.read_text(errors="replace") for p in logs)
    assert str(secret) in text and "Permission denied" in text, text
    # the same file is readable by the same user outside the sandbox
    assert subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "head", "-c1", str(secret)],
                          capture_output=True).returncode == 0


@pytest.fixture
def landlock_embed(embed: Embed) -> Embed:
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    embed.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    return embed


def test_root_embed_stacked_with_dac_and_cgroups(landlock_embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("stacked", stay=False)
    proc = landlock_embed.cli("run", str(xml))
    assert proc.returncode == 0, proc.stderr
    assert "hello from the test guest" in (vm_dir.path / "stacked.serial").read_text()


def test_root_embed_stack_and_label(landlock_embed: Embed, vm_dir: VmDir) -> None:
    drivers = landlock_embed.cli("drivers", check=True).stdout
    assert re.search(r"^landlock\s+security", drivers, re.M)
    xml = vm_dir.domain_xml("stacked2")
    landlock_embed.start(xml)
    pid = qemu_pid(landlock_embed, "stacked2")
    info = landlock_embed.cli("dominfo", "stacked2", check=True).stdout
    assert LABEL.search(info), info
    assert "dac" in info  # DAC appended after landlock in a privileged instance
    status = proc_status(pid)
    assert status["NoNewPrivs"] == "1"
    assert status["Uid"].split()[0] != "0"  # DAC switched the uid before Landlock applied
    assert status["CapEff"] == "0000000000000000"
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert "stacked2" in cgroups or "machine" in cgroups, cgroups
    landlock_embed.cli("destroy", "stacked2", check=True)
