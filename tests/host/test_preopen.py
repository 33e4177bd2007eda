"""Pre-opened resources end to end: real QEMU, real uid switch, real kernel.

vmconfine creates every listening socket of a domain itself (root-owned, 0600) and hands QEMU
the descriptor, so another domain's QEMU — same uid, confined by dac + cgroups + landlock —
cannot connect to it, while the admin still can. A compromised QEMU is played by real QEMU
over QMP (``chardev-add`` of a socket backend that connects to the other domain's socket).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.support import require
from vmconfine_landlock import syscalls

pytestmark = pytest.mark.host

GUEST_AGENT = ("<channel type='unix'><source mode='bind'/>"
               "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")


def devices(vm_dir: VmDir, name: str) -> str:
    """A serial console on a unix socket (bind), a channel in a root-owned 0755 directory,
    the virt-install guest-agent channel (no path) and a VNC display on a unix socket."""
    d = vm_dir.path
    return (f"<channel type='unix'><source mode='bind' path='{d}/{name}-agent.sock'/>"
            f"<target type='virtio' name='org.example.{name}'/></channel>"
            f"{GUEST_AGENT}<graphics type='vnc' socket='{d}/{name}-vnc.sock'/>"
            "<video><model type='none'/></video>")


def domain(vm_dir: VmDir, name: str) -> Path:
    xml = vm_dir.domain_xml(name, extra_devices=devices(vm_dir, name))
    text = re.sub(r"<serial type='file'>.*?</serial>",
                  f"<serial type='unix'><source mode='bind' path='{vm_dir.path}/{name}-serial"
                  ".sock'/><target port='0'/></serial>", xml.read_text(), flags=re.S)
    xml.write_text(text)
    return xml


def qmp(e: Embed, name: str, command: str, **arguments: object) -> dict:
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    proc = e.cli("qemu-monitor-command", name, json.dumps(msg))
    if proc.returncode == 0:
        return json.loads(proc.stdout)
    return {"error": proc.stdout + proc.stderr}


def connect_from(e: Embed, name: str, path: Path, chardev_id: str) -> dict:
    """The compromised QEMU of ``name``: connect a new chardev to ``path``."""
    return qmp(e, name, "chardev-add", id=chardev_id, backend={
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(path)}},
                                   "server": False}})


@pytest.fixture
def confined(embed: Embed) -> Embed:
    """System-like embed instance as root: landlock + dac (appended) + cgroups."""
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    embed.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    return embed


def test_other_domains_qemu_cannot_connect_to_passed_sockets(confined: Embed,
                                                             vm_dir: VmDir) -> None:
    e, d = confined, vm_dir.path
    os.chmod(d, 0o755)
    assert os.stat(d).st_uid == 0  # a root-owned 0755 directory QEMU cannot write
    run_a = e.start(domain(vm_dir, "pa"), "--paused")
    e.start(vm_dir.domain_xml("pb"))
    pid_a, pid_b = qemu_pid(e, "pa"), qemu_pid(e, "pb")
    qemu_uid = os.stat(f"/proc/{pid_b}").st_uid
    assert os.stat(f"/proc/{pid_a}").st_uid == qemu_uid != 0  # both QEMUs: one uid

    sockets = {n: d / f"pa-{n}.sock" for n in ("serial", "agent", "vnc")}
    live = e.cli("dumpxml", "pa", check=True).stdout
    generated = e.root / "lib" / "qemu" / "channel" / "target" / "domain-pa" / \
        "org.qemu.guest_agent.0"
    assert f"path=\"{generated}\"" in live
    assert str(generated) not in e.cli("dumpxml", "--inactive", "pa", check=True).stdout
    sockets["guest-agent"] = generated
    for what, path in sockets.items():
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode), what
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), what
    assert stat.S_IMODE(os.stat(generated.parent).st_mode) == 0o700

    # the compromised QEMU of domain B: every socket of A is out of reach
    for what, path in sockets.items():
        reply = connect_from(e, "pb", path, f"evil-{what}")
        assert "Permission denied" in json.dumps(reply), (what, reply)

    # A's own sockets work for the admin: the guest's output on the serial socket, VNC, QMP
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(str(sockets["serial"]))
        assert qmp(e, "pa", "cont") == {"return": {}}
        seen = b""
        while b"hello from the test guest" not in seen:
            chunk = client.recv(4096)
            assert chunk, seen
            seen += chunk
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(str(sockets["vnc"]))
        assert client.recv(12) == b"RFB 003.008\n"
    chardevs = {c["label"]: c["filename"] for c in qmp(e, "pa", "query-chardev")["return"]}
    assert str(sockets["agent"]) in chardevs["charchannel0"]
    assert str(generated) in chardevs["charchannel1"]
    assert qmp(e, "pa", "query-vnc")["return"]["service"] == str(sockets["vnc"])

    # control: the same socket owned by the qemu user, as libvirt leaves it — B connects
    os.chown(sockets["agent"], qemu_uid, -1)
    os.chmod(sockets["agent"], 0o775)
    assert connect_from(e, "pb", sockets["agent"], "control") == {"return": {}}

    e.cli("destroy", "pa", check=True)
    assert run_a.wait(timeout=60) == 0
    for what, path in sockets.items():
        assert not os.path.lexists(path), what
    assert not generated.parent.exists()
    e.cli("destroy", "pb", check=True)


def test_virt_install_guest_agent_channel_converts_and_starts(embed: Embed,
                                                              vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("ga", extra_devices=GUEST_AGENT)
    native = embed.cli("domxml-to-native", "qemu-argv", str(xml), check=True).stdout
    generated = embed.root / "lib" / "qemu" / "channel" / "target" / "domain-ga" / \
        "org.qemu.guest_agent.0"
    assert f"socket,id=charchannel0,path={generated},server=on,wait=off" in native
    assert "virtserialport" in native and "org.qemu.guest_agent.0" in native
    embed.start(xml)
    pid = qemu_pid(embed, "ga")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(re.fullmatch(rb"socket,id=charchannel0,fd=\d+,server=on,wait=off", a)
               for a in cmdline)
    # the guest agent's host end is a real listening socket, reachable by the admin
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(generated))
    embed.cli("destroy", "ga", check=True)
    deadline = time.monotonic() + 30
    while generated.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not generated.parent.exists()


def test_unusable_socket_paths_fail_in_one_line_and_change_nothing(embed: Embed,
                                                                    vm_dir: VmDir) -> None:
    notes = vm_dir.path / "notes.txt"
    notes.write_text("keep me")
    for name, path, message in (
            ("bad1", notes, f"cannot create socket {notes}: something that is not a socket"),
            ("bad2", vm_dir.path / "missing" / "x.sock",
             f"create the directory {vm_dir.path / 'missing'}")):
        xml = vm_dir.domain_xml(name, extra_devices=(
            f"<channel type='unix'><source mode='bind' path='{path}'/>"
            "<target type='virtio' name='org.example.x'/></channel>"))
        proc = embed.cli("run", str(xml))
        assert proc.returncode == 1, proc.stdout
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert notes.read_text() == "keep me"
    assert not (vm_dir.path / "missing").exists()
    run = embed.root / "run" / "qemu"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == []
