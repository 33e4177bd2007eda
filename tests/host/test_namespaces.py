"""The namespaces driver on the real kernel: QEMU's private /dev, the per-domain root view in
system and session mode, a compromised QEMU (real QEMU driven over QMP) that cannot reach
another domain's image or socket, with control runs that show the attack works without the
view, and kill -9 at every pipeline step leaving no mount, node or file behind."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.mkbootimg import write_image
from tests.host.conftest import DOMAIN_TEMPLATE, Embed, VmDir, qemu_pid
from tests.host.test_landlock_cli import Session, checkout_searchable, wait_for_text
from tests.support import require
from vmconfine.launch.pipeline import STEPS
from vmconfine.plugin.devacl import DEFAULT_DEVICE_ACL
from vmconfine_namespaces.driver import check_process
from vmconfine_namespaces.plan import Entry, View

__all__ = ["checkout_searchable"]  # a fixture the session tests use

SYSTEM_CONF = 'security_driver = "none"\nnamespaces = [ {ns} ]\n'
VIEW = '"mount", "root"'
DEV_ALWAYS = {"fd", "stdin", "stdout", "stderr", "pts", "shm"}


def expected_dev(*, root_view: bool) -> set[str]:
    """What QEMU's /dev must hold with the default device ACL, computed from the host."""
    names = {p[len("/dev/"):] for p in DEFAULT_DEVICE_ACL if os.path.exists(p)}
    if not root_view and os.path.isdir("/dev/mqueue"):
        names.add("mqueue")
    return names | DEV_ALWAYS


def mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if text in line]


def domain_xml(d: Path, name: str, *, extra_devices: str = "", greeting: str = "") -> Path:
    """A domain whose image, serial log and XML live in ``d`` (a directory of its own)."""
    d.mkdir(mode=0o755, exist_ok=True)
    img = d / f"{name}.img"
    write_image(str(img), greeting or f"hello from {name}", poweroff=False)
    xml = d / f"{name}.xml"
    xml.write_text(DOMAIN_TEMPLATE.format(
        name=name, uuid=str(uuidlib.uuid4()), image=img, serial=d / f"{name}.serial",
        virt_type="qemu", extra_devices=extra_devices, extra=""))
    return xml


def unix_serial(path: Path) -> str:
    return (f"<serial type='unix'><source mode='bind' path='{path}'/>"
            "<target port='1'/></serial>")


def assert_view_mount_flags(pid: int) -> None:
    """The read-only binds of QEMU's root view are nosuid, except the emulator binary it is
    exec'd from (an SELinux domain transition from a nosuid mount is refused:
    docs/namespaces.md)."""
    opts = {f[4]: f[5].split(",") for f in (
        ln.split() for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())}
    exe = [m for m in opts if m.endswith("/qemu-system-x86_64")]
    assert len(exe) == 1 and "ro" in opts[exe[0]] and "nosuid" not in opts[exe[0]], opts
    others = [m for m, o in opts.items() if "ro" in o and m not in (exe[0], "/")]
    assert others and all("nosuid" in opts[m] for m in others), opts


def attack(monitor, victim_img: Path, victim_sock: Path) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    """Domain B's QEMU, driven over QMP, tries A's image and A's socket; True = it worked."""
    add_disk = {"execute": "blockdev-add", "arguments": {
        "driver": "file", "node-name": "stolen", "filename": str(victim_img)}}
    add_chr = {"execute": "chardev-add", "arguments": {"id": "stolen", "backend": {
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(victim_sock)}},
                                   "server": False}}}}
    out = {}
    for what, cmd in (("image", add_disk), ("socket", add_chr)):
        proc = monitor(json.dumps(cmd))
        reply = json.loads(proc.stdout or "{}")
        out[what] = "return" in reply
        assert ("return" in reply) or ("error" in reply), proc.stdout + proc.stderr
    return out


# ---- system mode ----------------------------------------------------------------------------

def test_private_dev_holds_exactly_the_expected_nodes(embed: Embed, vm_dir: VmDir) -> None:
    """libvirt's namespaces = ["mount"] (the system default): QEMU's /dev is a tmpfs with the
    ACL's nodes; a c 1:1 node made on the host (a /dev/mem stand-in) is nowhere in it."""
    scratch = vm_dir.path / "scratch"
    scratch.mkdir()
    os.mknod(scratch / "mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1))
    embed.configure('security_driver = "none"\n')  # namespaces: the privileged default
    xml = domain_xml(vm_dir.path / "dev", "devs")
    embed.start(xml)
    pid = qemu_pid(embed, "devs")
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    qemu_dev = Path(f"/proc/{pid}/root/dev")
    assert set(os.listdir(qemu_dev)) == expected_dev(root_view=False)
    assert {"tty", "vda", "console"} & set(os.listdir("/dev"))  # the host has more
    rdevs = {os.lstat(p).st_rdev for p in qemu_dev.iterdir()}
    assert os.makedev(1, 1) not in rdevs
    assert os.makedev(1, 3) in rdevs  # /dev/null is the host's node (bind, same inode)
    assert os.stat(qemu_dev / "null").st_ino == os.stat("/dev/null").st_ino
    # the checks verify_process runs are real: a view that wants one more node fails
    view = View("mount", entries=[Entry("/dev", "tmpfs")] + [
        Entry(f"/dev/{n}", "bind", f"/dev/{n}") for n in expected_dev(root_view=False)])
    assert check_process(view, pid) == []
    view.entries.append(Entry("/dev/mem", "bind", str(scratch / "mem")))
    assert check_process(view, pid) == ["/dev in QEMU's view lacks: mem"]
    assert "runs in vmconfine's own mount namespace" in check_process(view, os.getpid())[0]
    info = embed.cli("dominfo", "devs", check=True).stdout
    assert "Confinement (namespaces):own mount namespace" in info
    report = json.loads(embed.cli("confinement", "devs", "--json", check=True).stdout)
    rows = [r for r in json.dumps(report["process"]).split("},") if "in QEMU's view" in r]
    assert rows and all('"differs": false' in r for r in rows), rows
    assert report["drivers"]["namespaces"]["dev"] == sorted(expected_dev(root_view=False))
    assert embed.cli("destroy", "devs").returncode == 0


@pytest.fixture
def system_pair(vm_dir: VmDir) -> Iterator[tuple[Embed, VmDir]]:
    e = Embed(vm_dir.path / "instance")
    yield e, vm_dir
    e.cleanup()


@pytest.mark.parametrize("namespaces,stolen", [(VIEW, False), ('"mount"', True)],
                         ids=["root-view", "control-without-view"])
def test_system_compromised_qemu_cannot_reach_other_domain(
        system_pair: tuple[Embed, VmDir], namespaces: str, stolen: bool) -> None:
    """dac + cgroups + namespaces: both QEMUs run as the same qemu.conf user, so DAC alone
    lets B open A's image and connect to A's socket (the control shows it); with the root
    view neither exists for B. B's own disk still boots its guest."""
    embed, vm_dir = system_pair
    embed.configure(SYSTEM_CONF.format(ns=namespaces))
    # A's bind sockets are vmconfine's own (root, 0600: pre-opened), so B's target is a
    # service socket A connects to, owned by the QEMU account like a vhost-user or swtpm one
    (vm_dir.path / "a").mkdir(mode=0o755)
    sock = vm_dir.path / "a" / "service.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(8)
    qemu_user = pwd.getpwnam("vmconfine-qemu")
    os.chown(sock, qemu_user.pw_uid, qemu_user.pw_gid)
    os.chmod(sock, 0o600)
    a = domain_xml(vm_dir.path / "a", "nsa", extra_devices=(
        f"<serial type='unix'><source mode='connect' path='{sock}'/><target port='1'/>"
        "</serial>"))
    b = domain_xml(vm_dir.path / "b", "nsb", greeting="hello from nsb")
    embed.start(a)
    embed.start(b)
    wait_for_text(vm_dir.path / "b" / "nsb.serial", "hello from nsb")
    assert sock.exists()
    result = attack(lambda cmd: embed.cli("qemu-monitor-command", "nsb", cmd),
                    vm_dir.path / "a" / "nsa.img", sock)
    assert result == {"image": stolen, "socket": stolen}
    pid = qemu_pid(embed, "nsb")
    if not stolen:
        view_root = Path(f"/proc/{pid}/root")
        assert not (view_root / str(vm_dir.path / "a").lstrip("/")).exists()
        assert (view_root / str(vm_dir.path / "b" / "nsb.img").lstrip("/")).exists()
        assert set(os.listdir(view_root / "dev")) == expected_dev(root_view=True)
        assert set(os.listdir(view_root / "proc")) == {"self", "thread-self", str(pid)}
        assert os.readlink(view_root / "proc" / "self") == str(pid)
        assert_view_mount_flags(pid)
    for name in ("nsa", "nsb"):
        assert embed.cli("destroy", name).returncode == 0
    listener.close()


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_leaves_no_mount_node_or_file(vm_dir: VmDir, step: str) -> None:
    embed = Embed(vm_dir.path / "instance")
    try:
        embed.configure(SYSTEM_CONF.format(ns=VIEW))
        xml = domain_xml(vm_dir.path / "k", "nskill")
        before = set(os.listdir(vm_dir.path / "k"))
        env = dict(os.environ, VMCONFINE_PAUSE_AT=step)
        run = embed.start(xml, env=env, wait_for=f"paused at {step}")
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        proc = embed.cli("list", check=True)
        assert "nskill" not in proc.stdout
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and mounts_mentioning(str(vm_dir.path)):
            time.sleep(0.05)
        assert mounts_mentioning(str(vm_dir.path)) == []
        assert set(os.listdir(vm_dir.path / "k")) <= before | {"nskill.serial"}
        run_dir = embed.root / "run" / "qemu"
        assert [p.name for p in run_dir.iterdir() if not p.name.startswith(".")] == []
    finally:
        embed.cleanup()


# ---- session mode ---------------------------------------------------------------------------

@pytest.fixture
def session_ns(vm_dir: VmDir, checkout_searchable: None) -> Iterator[Session]:
    s = Session(vm_dir.path)
    yield s
    s.cleanup()


def _userns_ok() -> bool:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "unshare", "-Ur", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("namespaces,stolen", [(VIEW, False), ("", True)],
                         ids=["root-view", "control-without-view"])
def test_session_compromised_qemu_cannot_reach_other_domain(
        session_ns: Session, namespaces: str, stolen: bool) -> None:
    """qemu:///session as uid 65534, no LSM, no Landlock: both QEMUs run as that user, so
    B reaches A's image and A's socket (the control); in its per-domain view it cannot."""
    require(_userns_ok(), "unprivileged user namespaces are disabled on this host")
    s = session_ns
    s.configure('security_driver = "none"\n' + (f"namespaces = [ {namespaces} ]\n"
                                                  if namespaces else ""))
    sock = Path(s.env["XDG_RUNTIME_DIR"]) / "vmconfine" / "qemu" / "domain-sesa" / "a.sock"
    a = s.domain("sesa", stay=True, extra="")
    a.write_text(a.read_text().replace("<memballoon", unix_serial(sock) + "<memballoon"))
    # B lives in a directory of its own (A's image sits in s.guest)
    bdir = s.home / "b"
    bdir.mkdir()
    s.own(bdir)
    b = domain_xml(bdir, "sesb", greeting="hello from sesb")
    for p in bdir.iterdir():
        s.own(p)
    run_a = s.start("run", str(a))
    s.start("run", str(b))
    wait_for_text(bdir / "sesb.serial", "hello from sesb")
    wait_for_text(s.guest / "sesa.serial", "hello from sesa")
    assert sock.exists(), run_a.stderr.read() if run_a.poll() is not None else "no socket"
    result = attack(lambda cmd: s.cli("qemu-monitor-command", "sesb", cmd),
                    s.guest / "sesa.img", sock)
    assert result == {"image": stolen, "socket": stolen}
    info = s.cli("dominfo", "sesb").stdout
    if not stolen:
        assert "in a user namespace, no capabilities" in info
        pid = int(next(x.split()[1] for x in info.splitlines() if x.startswith("PID:")))
        status = Path(f"/proc/{pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
        assert_view_mount_flags(pid)  # in a user namespace: the host's locked flags are kept
    for name in ("sesa", "sesb"):
        assert s.cli("destroy", name).returncode == 0
