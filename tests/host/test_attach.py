"""``vmconfine qemu-attach``: adopt a QEMU started by hand, in an embed instance (root).

The QEMU is started here as a plain subprocess (paused, no devices by default, a QMP socket);
vmconfine adopts it and must then list it, show its live XML and info (taint
``external-launch``, its current uid as the DAC label), pass QMP commands to it and destroy
it, without changing anything of the host before ``destroy``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import VMCONFINE, Embed, VmDir
from tests.support import REPO, require

pytestmark = pytest.mark.host

QEMU = "/usr/bin/qemu-system-x86_64"


class Qemus:
    """QEMU processes started by hand; all are killed at the end."""

    def __init__(self, vm_dir: VmDir) -> None:
        self.dir = vm_dir.path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *extra: str, qmp: bool = True) -> tuple[subprocess.Popen[bytes],
                                                                        Path]:
        sock = self.dir / f"{name}.qmp"
        argv = [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "pc", "-m", "64",
                "-name", f"guest={name}", "-uuid", str(uuidlib.uuid4()), *extra]
        if qmp:
            argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "VMC_TEST": "attach"}
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=self.dir)
        self.procs.append(proc)
        # Popen returns after exec; with a QMP socket, wait until QEMU answers a command on it.
        # A greeting alone is not enough: QMP greets from the monitor's own thread as soon as
        # the monitor exists, while the main thread may still be creating later backends (the
        # ``-serial file:`` is opened after the monitor). Commands run in the main loop, so an
        # answer means QEMU finished its start-up and every file of the command line exists.
        deadline = time.monotonic() + 60
        ready = not qmp
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            ready = answers(sock)
            if not ready:
                time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert ready, f"QEMU did not answer on {sock} within 60 s"
        return proc, sock

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def answers(sock: Path) -> bool:
    """True once QEMU's main loop answers ``query-status`` on the QMP socket ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock))
            reader = s.makefile("rb")
            if b'"QMP"' not in reader.readline():
                return False
            for command in (b'{"execute": "qmp_capabilities"}', b'{"execute": "query-status"}'):
                s.sendall(command + b"\n")
                line = reader.readline()
                while line and b'"event"' in line:
                    line = reader.readline()
                if b'"return"' not in line:
                    return False
            return True
    except OSError:
        return False


@pytest.fixture
def qemus(vm_dir: VmDir) -> Iterator[Qemus]:
    require(os.path.exists(QEMU), "qemu-system-x86_64 is not installed")
    q = Qemus(vm_dir)
    yield q
    q.cleanup()


def field(text: str, key: str) -> str:
    m = re.search(rf"^{re.escape(key)}:\s*(.*)$", text, re.M)
    assert m, f"{key} not in {text}"
    return m.group(1).strip()


def state(embed: Embed, name: str) -> dict[str, str]:
    xml = embed.cli("dumpxml", name, check=True).stdout
    m = re.search(r"<vmconfine:state ([^>]*?)/?>", xml)
    assert m, xml
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))


def alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return data.rsplit(")", 1)[1].split()[0] != "Z"


def snapshot(*paths: Path) -> list[tuple[int, int, int]]:
    return [(s.st_uid, s.st_gid, s.st_mode) for s in (p.stat() for p in paths)]


def test_attach_list_dumpxml_dominfo_monitor_destroy(embed: Embed, qemus: Qemus,
                                                     vm_dir: VmDir) -> None:
    image = vm_dir.path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    serial = vm_dir.path / "serial.log"
    proc, sock = qemus.start("adopted", "-drive", f"file={image},if=virtio,format=raw",
                             "-serial", f"file:{serial}", "-rtc", "base=localtime")
    before = snapshot(image, serial, sock)

    out = embed.cli("qemu-attach", str(proc.pid), check=True)
    assert f"Domain 'adopted' attached (id 1, pid {proc.pid})" in out.stdout
    assert f"QMP monitor: {sock} (QEMU status: prelaunch)" in out.stdout
    assert "tainted: external-launch" in out.stdout
    assert "-rtc" not in out.stderr  # converted, not kept as <qemu:arg> with a warning

    listing = embed.cli("list", check=True).stdout
    assert re.search(r"^\s*1\s+adopted\s+running$", listing, re.M), listing

    xml = embed.cli("dumpxml", "adopted", check=True).stdout
    assert "<name>adopted</name>" in xml and f"<source file=\"{image}\"/>" in xml
    assert '<clock offset="localtime"' in xml
    assert '<seclabel type="static" model="dac" relabel="no">' in xml
    assert "<label>+0:+0</label>" in xml  # the uid/gid QEMU runs as now (root here)
    assert '<qemu:env name="VMC_TEST" value="attach"/>' in xml
    st = state(embed, "adopted")
    assert st["qmp"] == str(sock) and st["pid"] == str(proc.pid)
    assert st["taints"].split(",")[0] == "external-launch"
    supervisor = int(st["supervisor"])
    assert supervisor != proc.pid and alive(supervisor)

    info = embed.cli("dominfo", "adopted", check=True).stdout
    assert field(info, "PID") == str(proc.pid)
    assert "external-launch" in field(info, "Tainted")
    uid = Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split()[1]
    gid = Path(f"/proc/{proc.pid}/status").read_text().split("Gid:")[1].split()[1]
    assert f"Security label: +{uid}:+{gid}" in info
    assert field(info, "QMP socket") == str(sock)
    assert "Confinement" not in info  # nothing vmconfine would have applied is claimed

    reply = embed.cli("qemu-monitor-command", "adopted", '{"execute":"query-status"}',
                      check=True).stdout
    assert '"status": "prelaunch"' in reply
    reply = embed.cli("qemu-monitor-command", "adopted", "--hmp", "info name",
                      check=True).stdout
    assert "adopted" in reply
    # adopting changed nothing: no relabel, no chown, QEMU untouched
    assert snapshot(image, serial, sock) == before
    assert proc.poll() is None

    out = embed.cli("destroy", "adopted", check=True)
    assert "Domain 'adopted' destroyed" in out.stdout
    proc.wait(timeout=30)
    assert proc.stderr is not None
    assert "terminating on signal 15" in proc.stderr.read().decode()  # killed by destroy
    deadline = time.monotonic() + 30
    while alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(supervisor)
    assert "adopted" not in embed.cli("list", check=True).stdout
    run_dir = embed.root / "run" / "qemu"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == []


def test_foreground_attach_waits_for_qemu(embed: Embed, qemus: Qemus) -> None:
    proc, _sock = qemus.start("fg")
    fg = subprocess.Popen([VMCONFINE, "-c", embed.uri, "qemu-attach", "--foreground",
                           str(proc.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL, cwd=REPO,
                          start_new_session=True)
    try:
        assert fg.stdout is not None
        line = fg.stdout.readline()
        assert f"Domain 'fg' attached (id 1, pid {proc.pid})" in line, line
        st = state(embed, "fg")
        assert st["supervisor"] == str(fg.pid)  # the command itself holds the lock
        assert "fg" in embed.cli("list", check=True).stdout
        proc.kill()  # QEMU exits by itself (not through vmconfine)
        out, err = fg.communicate(timeout=30)
        assert fg.returncode == 0, err
        assert "Domain 'fg' stopped: QEMU exited" in out
    finally:
        if fg.poll() is None:
            os.killpg(fg.pid, signal.SIGKILL)
            fg.wait(timeout=30)
    assert "fg" not in embed.cli("list", check=True).stdout


def test_foreground_attach_interrupted_leaves_qemu_running(embed: Embed,
                                                           qemus: Qemus) -> None:
    proc, _sock = qemus.start("keep")
    fg = subprocess.Popen([VMCONFINE, "-c", embed.uri, "qemu-attach", "--foreground",
                           str(proc.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL, cwd=REPO,
                          start_new_session=True)
    assert fg.stdout is not None
    assert "attached" in fg.stdout.readline()
    fg.send_signal(signal.SIGTERM)
    out, _err = fg.communicate(timeout=30)
    assert fg.returncode == 0 and "no longer supervised (QEMU keeps running)" in out
    assert proc.poll() is None  # vmconfine did not start it, so it does not stop it
    assert "keep" not in embed.cli("list", check=True).stdout


def test_refused_without_qmp(embed: Embed, qemus: Qemus) -> None:
    proc, _sock = qemus.start("noqmp", "-monitor", "none", qmp=False)
    out = embed.cli("qemu-attach", str(proc.pid))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert f"QEMU process {proc.pid} has no QMP monitor" in out.stderr
    assert "start QEMU with -qmp unix:PATH,server=on,wait=off" in out.stderr
    assert proc.poll() is None
    assert "noqmp" not in embed.cli("list", check=True).stdout
    run_dir = embed.root / "run" / "qemu"
    assert not run_dir.exists() or not any(p.suffix in (".xml", ".lock", ".journal")
                                           for p in run_dir.iterdir())


def test_refusals(embed: Embed, qemus: Qemus, vm_dir: VmDir) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        out = embed.cli("qemu-attach", str(sleeper.pid))
        assert out.returncode == 1 and "is not a QEMU binary" in out.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    out = embed.cli("qemu-attach", "not-a-pid")
    assert out.returncode == 1 and "PID must be a positive integer" in out.stderr
    out = embed.cli("qemu-attach", str(sleeper.pid))  # gone now
    assert out.returncode == 1 and f"no process {sleeper.pid}" in out.stderr

    proc, _sock = qemus.start("twice")
    embed.cli("qemu-attach", str(proc.pid), check=True)
    out = embed.cli("qemu-attach", str(proc.pid))
    assert out.returncode == 1
    assert f"process {proc.pid} is already domain 'twice'" in out.stderr
    embed.cli("destroy", "twice", check=True)
    proc.wait(timeout=30)
