"""change-media, chardev and USB hostdev hotplug through the daemon on one real, paused QEMU
(Landlock enforcing, DAC, cgroups, the private /dev of the namespaces driver): every device
reaches QEMU as a descriptor, goes through every driver's per-device hooks, and detach or
eject gives everything back.

The USB refusals need no device and run here; a real USB attach and detach needs a USB device,
which a CI host may not have (no USB subsystem at all), so it runs in the lsm tier against the
guest's emulated one (tests/lsm/guest_usb_hotplug.py, in the AppArmor boot)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import SCRATCH_PARENT, VMCONFINE, Embed
from tests.host.test_daemon import Daemon, destroy_running
from tests.host.usb_hostdev import Env
from tests.support import REPO, require

pytestmark = pytest.mark.host

NAME = "hpdev"


def image(path: Path) -> Path:
    path.write_bytes(bytes(1 << 20))
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require(os.geteuid() == 0, "needs root (a system-like embed instance)")
    path = Path(tempfile.mkdtemp(prefix="vmconfine-hpdev-", dir=SCRATCH_PARENT))
    os.chmod(path, 0o755)
    e = Embed(path / "instance")
    e.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    d = Daemon(e)
    d.start()
    old = image(path / "old.iso")
    floppy = image(path / "old.img")
    xml = path / "dom.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{NAME}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        f"<source file='{old}'/><target dev='hdc' bus='ide'/><readonly/></disk>"
        "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>"
        f"<source file='{floppy}'/><target dev='fda' bus='fdc'/></disk>"
        "<controller type='virtio-serial'/><controller type='scsi' model='virtio-scsi'/>"
        "<memballoon model='none'/></devices></domain>")
    d.cli("define", str(xml))
    d.cli("start", "--paused", NAME)
    try:
        yield Env(d, path, NAME)
    finally:
        destroy_running(e)
        d.stop()
        e.cleanup()
        shutil.rmtree(path, ignore_errors=True)


def test_change_media_eject_insert_update(env: Env) -> None:
    old, new, other = env.path / "old.img", image(env.path / "new.img"), \
        image(env.path / "other.iso")
    owner = (new.stat().st_uid, new.stat().st_gid)
    assert old.stat().st_uid != 0  # DAC gave the start's medium to QEMU's account
    # a compromised QEMU cannot open the new medium itself: Landlock was fixed at exec
    denied = env.qmp("blockdev-add", driver="file", filename=str(new), **{"node-name": "evil"})
    assert "Permission denied" in json.dumps(denied), denied
    # control: the medium it was started with is in its ruleset, so the same command works
    ctl = env.qmp("blockdev-add", driver="file", filename=str(env.path / "old.iso"),
                  **{"node-name": "ctl", "read-only": True})
    assert ctl == {"return": {}}, ctl
    assert env.qmp("blockdev-del", **{"node-name": "ctl"}) == {"return": {}}

    out = env.cli("change-media", NAME, "fda", str(new), "--update")
    assert out.returncode == 0 and out.stdout.strip() == "Successfully updated media.", out.stderr
    assert (env.medium("fdc0-0-0") or "").startswith("/dev/fdset/")
    assert new.stat().st_uid != owner[0]  # labelled for QEMU
    assert old.stat().st_uid == 0  # the old medium's owner given back
    assert str(new) in env.cli("dumpxml", NAME).stdout
    assert str(old) in env.cli("dumpxml", "--inactive", NAME).stdout  # --live only
    report = env.cli("confinement", NAME)
    assert report.returncode == 0 and str(new) in report.stdout and str(old) not in \
        report.stdout, report.stdout + report.stderr
    # QEMU reads the new medium through the fd
    assert "error" not in env.qmp("human-monitor-command",
                                  **{"command-line": 'qemu-io fdc0-0-0 "read 0 512"'})

    out = env.cli("change-media", NAME, "fda", "--eject")
    assert out.stdout.strip() == "Successfully ejected media.", out.stderr
    assert env.medium("fdc0-0-0") is None
    assert (new.stat().st_uid, new.stat().st_gid) == owner
    # the medium's nodes are gone (QEMU closes removed fd sets only while the guest runs)
    assert "new.img" not in json.dumps(env.qmp("query-named-block-nodes"))
    assert "new.img" not in env.cli("dumpxml", NAME).stdout
    again = env.cli("change-media", NAME, "fda", "--eject")
    assert again.returncode == 1 and "doesn't have media" in again.stderr

    # a CD-ROM (read-only media keep their label, as in libvirt); --config too
    out = env.cli("change-media", NAME, "hdc", str(other), "--update", "--live", "--config")
    assert out.returncode == 0, out.stderr
    assert (env.medium("ide0-1-0") or "").startswith("/dev/fdset/")
    assert str(other) in env.cli("dumpxml", NAME).stdout
    assert str(other) in env.cli("dumpxml", "--inactive", NAME).stdout
    # refusals change nothing
    for args, words in ((("hdc", str(new), "--insert"), "already has media"),
                        (("fda", str(env.path / "missing.img")), "No such file"),
                        (("hdz", str(new)), "No disk found"),
                        (("fda", str(env.path)), "neither a regular file")):
        bad = env.cli("change-media", NAME, *args)
        assert bad.returncode == 1 and words in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert env.medium("fdc0-0-0") is None and env.medium("ide0-1-0")
    assert (new.stat().st_uid, new.stat().st_gid) == owner


def test_chardev_channel_socket_passed_and_removed(env: Env) -> None:
    sock = env.path / "agent.sock"
    dev = env.path / "channel.xml"
    dev.write_text(f"<channel type='unix'><source mode='bind' path='{sock}'/>"
                   "<target type='virtio' name='org.example.agent'/></channel>")
    out = env.cli("attach-device", NAME, str(dev), "--live")
    assert out.returncode == 0, out.stderr
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert "channel0" in env.peripherals()
    chardevs = {c["label"] for c in env.qmp("query-chardev")["return"]}
    assert "charchannel0" in chardevs
    with socket.socket(socket.AF_UNIX) as s:  # QEMU holds the listening socket vmconfine made
        s.connect(str(sock))
    live = env.cli("dumpxml", NAME).stdout
    assert "org.example.agent" in live and "<alias name=\"channel0\"/>" in live
    assert str(sock) in env.cli("confinement", NAME).stdout

    # a generated path when none is given
    gen = env.path / "gen.xml"
    gen.write_text("<channel type='unix'><target type='virtio' name='org.example.gen'/>"
                   "</channel>")
    assert env.cli("attach-device", NAME, str(gen)).returncode == 0
    live = env.cli("dumpxml", NAME).stdout
    generated = [p for p in live.split("'") + live.split('"') if p.endswith("org.example.gen")
                 and p.startswith("/")]
    assert generated and Path(generated[0]).is_socket(), live

    # --config: the definition gains and loses the channel; the running domain is untouched
    assert env.cli("attach-device", NAME, str(dev), "--config").returncode == 0
    assert "org.example.agent" in env.cli("dumpxml", "--inactive", NAME).stdout
    assert env.cli("detach-device", NAME, str(dev), "--config").returncode == 0
    assert "org.example.agent" not in env.cli("dumpxml", "--inactive", NAME).stdout
    assert "channel0" in env.peripherals()

    for xml in (dev, gen):
        out = env.cli("detach-device", NAME, str(xml))
        assert out.returncode == 0, out.stderr
    assert not sock.exists() and not Path(generated[0]).exists()
    assert "channel0" not in env.peripherals()
    assert "charchannel0" not in {c["label"] for c in env.qmp("query-chardev")["return"]}
    assert "org.example" not in env.cli("dumpxml", NAME).stdout

    # a virtio console and a PCI serial port over passed sockets
    con = env.path / "console.xml"
    con.write_text(f"<console type='unix'><source mode='bind' path='{env.path}/con.sock'/>"
                   "<target type='virtio'/></console>")
    assert env.cli("attach-device", NAME, str(con)).returncode == 0
    assert "console0" in env.peripherals()
    assert env.cli("detach-device", NAME, str(con)).returncode == 0
    assert "console0" not in env.peripherals() and not (env.path / "con.sock").exists()
    # a pty needs /dev/ptmx, which Landlock (fixed at exec) grants only to a domain started
    # with a pty: refused with one line, nothing left behind
    pty = env.path / "pty.xml"
    pty.write_text("<console type='pty'><target type='virtio'/></console>")
    out = env.cli("attach-device", NAME, str(pty))
    assert out.returncode == 1 and "may not open /dev/ptmx" in out.stderr, out.stderr
    assert "console0" not in env.peripherals()
    assert "charconsole0" not in {c["label"] for c in env.qmp("query-chardev")["return"]}
    pci = env.path / "pci-serial.xml"
    pci.write_text(f"<serial type='unix'><source mode='bind' path='{env.path}/pci.sock'/>"
                   "<target type='pci-serial'/></serial>")
    out = env.cli("attach-device", NAME, str(pci), "--live")
    assert out.returncode == 0, out.stderr
    assert "serial0" in env.peripherals() and (env.path / "pci.sock").is_socket()
    # (a PCI device leaves only with the guest's ACPI help: this paused guest keeps it)

    # refusals: nothing is left behind
    isa = env.path / "isa.xml"
    isa.write_text(f"<serial type='unix'><source mode='bind' path='{env.path}/s.sock'/>"
                   "</serial>")
    bad = env.cli("attach-device", NAME, str(isa))
    assert bad.returncode == 1 and "pci-serial" in bad.stderr, bad.stderr
    assert not (env.path / "s.sock").exists()


def test_compromised_qemu_cannot_connect_to_a_socket(env: Env) -> None:
    """A hotplugged channel's socket is vmconfine's (root, 0600): QEMU holds it as a listening
    descriptor but cannot connect to it (or any such socket) by path. Control: the same
    chardev-add reaches a socket whose mode lets QEMU's account in, so the denial is real."""
    path = env.path / "victim.sock"
    dev = env.path / "victim.xml"
    dev.write_text(f"<channel type='unix'><source mode='bind' path='{path}'/>"
                   "<target type='virtio' name='org.example.victim'/></channel>")
    assert env.cli("attach-device", NAME, str(dev)).returncode == 0

    def connect(cid: str, target: Path) -> dict:
        return env.qmp("chardev-add", id=cid, backend={"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(target)}}, "server": False}})

    denied = connect("evil", path)
    assert "Permission denied" in json.dumps(denied), denied
    assert env.cli("detach-device", NAME, str(dev)).returncode == 0
    control = env.path / "open.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(control))
        os.chmod(control, 0o666)
        s.listen(1)
        reached = connect("control", control)
        assert reached == {"return": {}}, reached
    assert env.qmp("chardev-remove", id="control") == {"return": {}}
    control.unlink()


def test_usb_hostdev_refused_when_absent(env: Env) -> None:
    dev = env.path / "usb.xml"
    dev.write_text("<hostdev mode='subsystem' type='usb'><source><vendor id='0xfeed'/>"
                   "<product id='0xbeef'/></source></hostdev>")
    before = env.peripherals()
    out = env.cli("attach-device", NAME, str(dev))
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "USB device feed:beef is not on this host" \
        in out.stderr, out.stderr
    assert env.peripherals() == before
    assert "hostdev" not in env.cli("dumpxml", NAME).stdout
    addr = env.path / "usb-addr.xml"
    addr.write_text("<hostdev mode='subsystem' type='usb'><source>"
                    "<address bus='250' device='250'/></source></hostdev>")
    out = env.cli("attach-device", NAME, str(addr))
    assert out.returncode == 1 and "bus 250 device 250 is not on this host" in out.stderr
    out = env.cli("detach-device", NAME, str(dev))
    assert out.returncode == 1 and "no USB host device feed:beef" in out.stderr
    for text, words in (("<hostdev mode='subsystem' type='usb'><source>", "device XML"),
                        ("<interface type='user'/>", "cannot be attached or detached"),
                        ("<hostdev mode='subsystem' type='pci'><source><address domain='0' "
                         "bus='0' slot='9' function='0'/></source></hostdev>",
                         "only mode='subsystem' type='usb'")):
        dev.write_text(text)
        out = env.cli("attach-device", NAME, str(dev))
        assert out.returncode == 1 and words in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert env.peripherals() == before


def test_block_disk_node_follows_into_private_dev(env: Env) -> None:
    pid = env.pid()
    require(os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
            "the namespaces driver is not in the stack (no private /dev)")
    losetup = shutil.which("losetup") or "/usr/sbin/losetup"
    require(os.path.exists(losetup) and os.path.exists("/dev/loop-control"),
            "no loop devices (losetup, /dev/loop-control)")
    backing = image(env.path / "loop.img")
    loop = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        name = os.path.basename(loop)
        assert name not in os.listdir(f"/proc/{pid}/root/dev")
        dev = env.path / "block.xml"
        dev.write_text("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                       f"<source dev='{loop}'/><target dev='sdb' bus='scsi'/></disk>")
        out = env.cli("attach-device", NAME, str(dev))
        assert out.returncode == 0, out.stderr
        inside = os.stat(f"/proc/{pid}/root/dev/{name}")
        assert stat.S_ISBLK(inside.st_mode) and inside.st_rdev == os.stat(loop).st_rdev
        assert inside.st_uid != 0  # the host's node, as DAC labelled it (a bind, not a copy)
        assert "scsi0-0-0-1" in env.peripherals()
        # a restarted daemon re-verifies QEMU's /dev against the plan, which has the node
        env.d.stop()
        env.d.start()
        assert "not managed" not in env.d.log.read_text(), env.d.log.read_text()[-2000:]
        out = env.cli("detach-device", NAME, str(dev))
        assert out.returncode == 0, out.stderr
        assert name not in os.listdir(f"/proc/{pid}/root/dev")
        assert os.stat(loop).st_uid == 0
    finally:
        subprocess.run([losetup, "-d", loop], check=False)


def _restart_paused_at(env: Env, step: str) -> float:
    """Restart the daemon so that it pauses at ``step``; return the deadline for waiting."""
    d = env.d
    d.stop()
    logf = open(d.log, "a")
    d.proc = subprocess.Popen([VMCONFINE, "-c", d.embed.uri, "daemon"],
                              env={**os.environ, "VMCONFINE_PAUSE_AT": step},
                              stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=REPO,
                              start_new_session=True)
    logf.close()
    deadline = time.monotonic() + 60
    while not (d.rw.exists() and d.log.read_text().count("reconnected") >= 1):
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log.read_text()
        time.sleep(0.05)
    return deadline


def _kill_when_paused(env: Env, step: str, command: list[str], deadline: float) -> None:
    d = env.d
    seen = d.log.read_text().count(f"paused at {step}")
    proc = subprocess.Popen([VMCONFINE, "-c", d.embed.uri, *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    while d.log.read_text().count(f"paused at {step}") == seen:
        assert time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.05)
    d.stop(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == 1


def test_kill_during_change_media_is_rolled_back_at_reconnect(env: Env) -> None:
    """kill -9 of the daemon after the new medium is labelled: the next daemon rolls it back
    (labels given back, the drive empty, as QEMU has it) and manages the domain again."""
    new = image(env.path / "crash.img")
    before = new.stat().st_uid
    if env.medium("fdc0-0-0") is None:
        assert env.cli("change-media", NAME, "fda", str(image(env.path / "x.img")),
                       "--insert").returncode == 0
    deadline = _restart_paused_at(env, "media-labelled")
    _kill_when_paused(env, "media-labelled", ["change-media", NAME, "fda", str(new)], deadline)
    env.d.start()
    assert "media change of fda rolled back" in env.d.log.read_text()
    assert new.stat().st_uid == before
    assert env.medium("fdc0-0-0") is None
    assert "crash.img" not in env.cli("dumpxml", NAME).stdout
    assert env.cli("change-media", NAME, "fda", str(new), "--insert").returncode == 0
    assert env.cli("change-media", NAME, "fda", "--eject").returncode == 0
    assert new.stat().st_uid == before


def test_kill_during_chardev_attach_is_rolled_back_at_reconnect(env: Env) -> None:
    """The same for a channel killed after its socket is made and labelled: the next daemon
    removes the socket and the device never appears."""
    sock = env.path / "crash.sock"
    dev = env.path / "crash-channel.xml"
    dev.write_text(f"<channel type='unix'><source mode='bind' path='{sock}'/>"
                   "<target type='virtio' name='org.example.crash'/></channel>")
    deadline = _restart_paused_at(env, "hotplug-labelled")
    _kill_when_paused(env, "hotplug-labelled", ["attach-device", NAME, str(dev)], deadline)
    assert sock.is_socket()  # made, not handed to QEMU
    env.d.start()
    assert "attach of chardev channel0 rolled back" in env.d.log.read_text()
    assert not sock.exists()
    assert "channel0" not in env.peripherals()
    assert "org.example.crash" not in env.cli("dumpxml", NAME).stdout
    assert env.cli("attach-device", NAME, str(dev)).returncode == 0
    assert env.cli("detach-device", NAME, str(dev)).returncode == 0
    assert not sock.exists()


def test_nested_node_and_refusal_outside_the_dev_tmpfs(env: Env) -> None:
    """What a USB node needs (directories on its way, /dev/bus/usb/BBB/DDD), made and removed
    in QEMU's running /dev by the namespaces driver's primitive; a path whose directory is not
    on the view's tmpfs (devpts) is refused, nothing created."""
    from vmconfine_namespaces import live
    from vmconfine_namespaces.plan import Entry

    pid = env.pid()
    require(os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
            "the namespaces driver is not in the stack (no private /dev)")
    root = f"/proc/{pid}/root/dev"
    entries = [Entry("/dev/vmc-bus", "dir"), Entry("/dev/vmc-bus/001", "dir"),
               Entry("/dev/vmc-bus/001/002", "bind", "/dev/null", readonly=False)]
    live.add(pid, False, entries)
    node = os.stat(f"{root}/vmc-bus/001/002")
    assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.stat("/dev/null").st_rdev
    live.remove(pid, False, entries)
    assert "vmc-bus" not in os.listdir(root)
    with pytest.raises(OSError, match="not on QEMU's /dev tmpfs"):
        live.add(pid, False, [Entry("/dev/pts/vmc-evil", "bind", "/dev/null", readonly=False)])
    assert "vmc-evil" not in os.listdir(f"{root}/pts")
