"""The daemon on a real host: lifecycle verbs on real QEMU, events, guests that outlive the
daemon (kill -9 and reconnect), access control, and a server that never dies of a client."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import VMCONFINE, Embed, VmDir
from tests.host.test_landlock_cli import Session, checkout_searchable  # noqa: F401 (fixture)
from tests.support import REPO, interruptible
from vmconfine.launch.runtime import same_process

pytestmark = pytest.mark.host

STACK = 'security_driver = "landlock"\n'


class Daemon:
    """``vmconfine daemon`` in the foreground for an embed root, and the CLI against it."""

    def __init__(self, embed: Embed) -> None:
        self.embed = embed
        self.proc: subprocess.Popen[str] | None = None
        self.rw = embed.root / "run" / "vmconfine-sock"
        self.ro = embed.root / "run" / "vmconfine-sock-ro"
        self.log = embed.root / "daemon.log"

    def start(self, timeout: float = 60) -> None:
        logf = open(self.log, "a")
        self.proc = subprocess.Popen([VMCONFINE, "-c", self.embed.uri, "daemon"],
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     cwd=REPO, start_new_session=True, text=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()}")
            if self.rw.exists() and _connects(self.rw):
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon did not listen: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def cli(self, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
        return self.embed.cli(*args, check=check, **kw)  # type: ignore[arg-type]

    def qemu_pid(self, name: str) -> int:
        return dominfo_pid(self.cli("dominfo", name).stdout)

    def state(self, name: str) -> str:
        return self.cli("domstate", "--reason", name).stdout.strip()


def dominfo_pid(dominfo: str) -> int:
    """The QEMU pid in ``dominfo``'s output."""
    return int(re.search(r"^PID:\s+(\d+)", dominfo, re.M).group(1))  # type: ignore[union-attr]


def destroy_running(e: Embed) -> None:
    """Destroy every running domain of the instance (test cleanup)."""
    for line in e.cli("list").stdout.splitlines()[2:]:
        if line.split() and line.split()[0].isdigit():
            e.cli("destroy", line.split()[1])


def _connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def daemon(vm_dir: VmDir) -> Iterator[Daemon]:
    e = Embed(vm_dir.path / "instance")
    e.configure(STACK)
    d = Daemon(e)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        destroy_running(e)
        d.stop()
    e.cleanup()


def owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def events_process(d: Daemon) -> subprocess.Popen[str]:
    p = subprocess.Popen([VMCONFINE, "-c", d.embed.uri, "event", "--loop", "--timeout", "90"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         stdin=subprocess.DEVNULL, preexec_fn=interruptible)
    time.sleep(0.5)  # subscribed before anything happens
    return p


def test_lifecycle_verbs_on_real_qemu(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    xml = vm_dir.domain_xml("life")
    image = vm_dir.path / "life.img"
    before = owner(image)
    events = events_process(d)

    out = d.cli("define", str(xml)).stdout
    assert out.strip() == f"Domain 'life' defined from {xml}"
    assert (d.embed.root / "etc" / "qemu" / "life.xml").exists()
    assert re.search(r"^\s*-\s+life\s+shut off$", d.cli("list", "--all").stdout, re.M)
    assert "life" not in d.cli("list").stdout

    assert d.cli("start", "--paused", "life").stdout.strip() == "Domain 'life' started"
    assert d.state("life") == "paused (user)"
    assert re.search(r"^\s*\d+\s+life\s+paused$", d.cli("list").stdout, re.M)
    pid = d.qemu_pid("life")
    assert owner(image) != before  # DAC gave the image to the QEMU account
    reply = d.cli("qemu-monitor-command", "life", '{"execute":"query-status"}').stdout
    assert '"status": "prelaunch"' in reply or '"status": "paused"' in reply

    d.cli("resume", "life")
    assert d.state("life").startswith("running")
    d.cli("suspend", "life")
    assert d.state("life") == "paused (user)"
    assert re.search(r"^\s*\d+\s+life\s+paused$", d.cli("list").stdout, re.M)
    d.cli("resume", "life")
    assert d.state("life") == "running (unpaused)"
    # QEMU paused behind the daemon's back (QMP stop from another client) shows as paused
    d.cli("qemu-monitor-command", "life", '{"execute":"stop"}')
    deadline = time.monotonic() + 10
    while d.state("life") != "paused (user)" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.state("life") == "paused (user)"
    d.cli("resume", "life")

    info = d.cli("dominfo", "life").stdout
    assert re.search(r"^Persistent:\s+yes$", info, re.M)
    assert re.search(r"^Security model: landlock$", info, re.M)
    live = d.cli("dumpxml", "life").stdout
    assert 'model="dac"' in live and "<label>" in live
    assert "<label>" not in d.cli("dumpxml", "--inactive", "life").stdout

    assert "marked as autostarted" in d.cli("autostart", "life").stdout
    assert (d.embed.root / "etc" / "qemu" / "autostart" / "life.xml").is_symlink()
    assert "unmarked" in d.cli("autostart", "--disable", "life").stdout

    assert d.cli("reset", "life").stdout.strip() == "Domain 'life' was reset"
    assert d.cli("destroy", "life").stdout.strip() == "Domain 'life' destroyed"
    assert not same_process(pid, None) or not Path(f"/proc/{pid}").exists()
    assert owner(image) == before  # given back
    assert d.state("life") == "shut off (unknown)"
    assert d.cli("undefine", "life").stdout.strip() == "Domain 'life' has been undefined"
    assert "life" not in d.cli("list", "--all").stdout

    events.send_signal(signal.SIGINT)
    out, _ = events.communicate(timeout=30)
    got = [ln for ln in out.splitlines() if ln.startswith("event ")]
    expected = ["Defined Added", "Started Booted", "Suspended Paused", "Resumed Unpaused",
                "Suspended Paused", "Resumed Unpaused", "Suspended Paused",
                "Resumed Unpaused", "Stopped Destroyed", "Undefined Removed"]
    assert [ln.split("': ", 1)[1] for ln in got] == expected, out


def test_create_transient_guest_powers_off(daemon: Daemon, vm_dir: VmDir) -> None:
    """A transient domain whose guest powers off by itself: stopped (shutdown), then gone."""
    d = daemon
    xml = vm_dir.domain_xml("transient", stay=False)
    image = vm_dir.path / "transient.img"
    before = owner(image)
    events = events_process(d)
    assert "Domain 'transient' created from" in d.cli("create", str(xml)).stdout
    deadline = time.monotonic() + 60
    while "transient" in d.cli("list", "--all").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "transient" not in d.cli("list", "--all").stdout
    assert owner(image) == before
    assert "hello from the test guest" in (vm_dir.path / "transient.serial").read_text()
    events.send_signal(signal.SIGINT)
    out, _ = events.communicate(timeout=30)
    assert "event 'lifecycle' for domain 'transient': Started Booted" in out
    assert "event 'lifecycle' for domain 'transient': Stopped Shutdown" in out


def test_guests_outlive_a_killed_daemon_and_are_reconnected(daemon: Daemon,
                                                            vm_dir: VmDir) -> None:
    d = daemon
    names = [f"keep{i}" for i in range(4)]
    images = {}
    for name in names:
        d.cli("define", str(vm_dir.domain_xml(name)))
        images[name] = vm_dir.path / f"{name}.img"
    before = {n: owner(images[n]) for n in names}
    for name in names:
        d.cli("start", name)
    pids = {n: d.qemu_pid(n) for n in names}
    d.cli("suspend", "keep1")

    d.stop(signal.SIGKILL)
    for pid in pids.values():  # QEMU is not tied to the daemon
        assert Path(f"/proc/{pid}").exists()
    os.kill(pids["keep3"], signal.SIGKILL)  # dies while no daemon runs
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pids['keep3']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    d.start()
    listing = d.cli("list", "--all").stdout
    for name in ("keep0", "keep2"):
        assert re.search(rf"^\s*\d+\s+{name}\s+running$", listing, re.M), listing
    assert re.search(r"^\s*\d+\s+keep1\s+paused$", listing, re.M), listing
    assert re.search(r"^\s*-\s+keep3\s+shut off$", listing, re.M), listing
    assert owner(images["keep3"]) == before["keep3"]  # torn down at restart
    for name in ("keep0", "keep1", "keep2"):
        assert d.qemu_pid(name) == pids[name]
        reply = d.cli("qemu-monitor-command", name, '{"execute":"query-name"}').stdout
        assert f'"name": "{name}"' in reply
    d.cli("resume", "keep1")
    assert d.state("keep1") == "running (unpaused)"
    log = d.log.read_text()
    assert "reconnected to 3 running domain(s)" in log

    # a graceful stop leaves them running too
    d.stop()
    assert all(Path(f"/proc/{pids[n]}").exists() for n in ("keep0", "keep1", "keep2"))
    d.start()
    for name in ("keep0", "keep1", "keep2"):
        d.cli("destroy", name)
        assert owner(images[name]) == before[name]
    run_dir = d.embed.root / "run" / "qemu"
    assert not [p for p in run_dir.iterdir() if p.suffix in (".xml", ".journal")]


def test_reconnect_refuses_a_domain_whose_confinement_changed(daemon: Daemon,
                                                              vm_dir: VmDir) -> None:
    """Fail closed: QEMU no longer confined as recorded (its uid changed) is not managed."""
    d = daemon
    d.cli("define", str(vm_dir.domain_xml("drift")))
    d.cli("start", "drift")
    pid = d.qemu_pid("drift")
    d.stop(signal.SIGKILL)
    status = d.embed.root / "run" / "qemu" / "drift.xml"
    text = status.read_text()
    # what vmconfine recorded now differs from the kernel's view of the process
    status.write_text(re.sub(r"<label>\+\d+:\+\d+</label>", "<label>+4242:+4242</label>", text))
    d.start()
    assert re.search(r"^\s*-\s+drift\s+unmanaged$", d.cli("list").stdout, re.M)
    assert "no longer matches" in d.cli("domstate", "--reason", "drift").stdout
    assert "not managed" in d.log.read_text()
    d.cli("destroy", "drift")
    assert not Path(f"/proc/{pid}").exists() or not same_process(pid, None)


def test_read_only_socket_and_socket_group(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    d.cli("define", str(vm_dir.domain_xml("acl")))
    ro = d.cli("-r", "start", "acl", check=False)
    assert ro.returncode == 1 and ro.stderr.strip().startswith("error: this connection is "
                                                              "read-only")
    assert "acl" in d.cli("-r", "list", "--all").stdout
    assert os.stat(d.rw).st_mode & 0o777 == 0o700
    assert os.stat(d.ro).st_mode & 0o777 == 0o777

    # unix_sock_group + 0770: a member may change domains, another user is refused
    d.stop()
    group = "vmconfine-qemu"
    gid = grp.getgrnam(group).gr_gid
    (d.embed.root / "etc" / "vmconfined.conf").write_text(
        f'unix_sock_group = "{group}"\nunix_sock_rw_perms = "0770"\n')
    d.start()
    assert os.stat(d.rw).st_gid == gid and os.stat(d.rw).st_mode & 0o777 == 0o770
    os.chmod(d.embed.root, 0o755)
    os.chmod(d.embed.root / "run", 0o755)

    def as_user(*groups: int) -> subprocess.CompletedProcess[str]:
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534",
               "--groups", ",".join(map(str, groups)) if groups else "--clear-groups",
               VMCONFINE, "-c", d.embed.uri, "domstate", "acl"]
        if not groups:
            cmd.remove("--groups")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")

    refused = as_user()
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: permission denied connecting to the "
                                             "vmconfine daemon")
    assert "Traceback" not in refused.stderr
    member = as_user(gid)
    assert member.returncode == 0 and member.stdout.strip() == "shut off", member.stderr
    assert re.search(r"uid=65534 gid=65534 pid=\d+ GET /v1/domains/acl/state -> 200",
                     d.log.read_text())


def test_graphics_passwords_only_with_security_info_and_never_read_only(daemon: Daemon,
                                                                          vm_dir: VmDir
                                                                          ) -> None:
    """As libvirt: dumpxml leaves ``<graphics passwd>`` out unless --security-info is asked
    for, and the read-only socket (any local user) refuses --security-info."""
    d = daemon
    xml = vm_dir.domain_xml("secret", extra_devices="<graphics type='spice' autoport='yes' "
                                                    "passwd='s3cret-ticket'/>")
    d.cli("define", str(xml))
    for ro in ([], ["-r"]):
        shown = d.cli(*ro, "dumpxml", "--inactive", "secret").stdout
        assert "<graphics" in shown and "s3cret-ticket" not in shown, shown
    full = d.cli("dumpxml", "--inactive", "--security-info", "secret").stdout
    assert "passwd=\"s3cret-ticket\"" in full or "passwd='s3cret-ticket'" in full, full
    refused = d.cli("-r", "dumpxml", "--inactive", "--security-info", "secret", check=False)
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert "s3cret-ticket" not in refused.stdout + refused.stderr
    # and straight over HTTP on the read-only socket, as any client would ask
    answer = _raw(d.ro, b"GET /v1/domains/secret/xml?inactive=1&secure=1 HTTP/1.1\r\n"
                        b"Host: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ") and b"s3cret-ticket" not in answer


def _raw(path: Path, data: bytes, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _post(path: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_server_survives_garbage_oversized_and_slow_clients(daemon: Daemon,
                                                            vm_dir: VmDir) -> None:
    d = daemon
    d.cli("define", str(vm_dir.domain_xml("sturdy")))
    slow = []
    for _ in range(20):  # clients that connect and say nothing (bounded)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(d.rw))
        slow.append(s)
    try:
        answers = {
            "not json": _raw(d.rw, _post("/v1/domains", b"{nope")),
            "not an object": _raw(d.rw, _post("/v1/domains", b"[1]")),
            "bad xml": _raw(d.rw, _post("/v1/domains", json.dumps(
                {"xml": "<domain><name>x</name>"}).encode())),
            "bad flag": _raw(d.rw, _post("/v1/domains/sturdy/start", b'{"paused": "yes"}')),
            "unknown path": _raw(d.rw, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n"),
            "unknown domain": _raw(d.rw, b"GET /v1/domains/nope HTTP/1.1\r\nHost: x\r\n"
                                         b"Connection: close\r\n\r\n"),
            "oversized": _raw(d.rw, _post("/v1/domains", b"x" * (11 * 1024 * 1024))),
            "not http": _raw(d.rw, b"\x00\x01\x02garbage\r\n\r\n"),
        }
        for what, answer in answers.items():
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
            assert 400 <= status < 500, (what, answer[:200])
            if status != 400 or b"{" in answer:
                body = answer.split(b"\r\n\r\n", 1)[1]
                assert b'"error"' in body, (what, answer[:300])
        assert b"line" in answers["bad xml"]  # the parser's one-line message
        # other clients were never blocked, and the daemon still serves
        for _ in range(20):
            assert "sturdy" in d.cli("list", "--all").stdout
    finally:
        for s in slow:
            s.close()
    assert d.proc is not None and d.proc.poll() is None
    assert "Traceback" not in d.log.read_text()


def _fd_limit_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    os.setsid()


def test_a_flood_of_idle_connections_cannot_take_the_daemons_descriptors(vm_dir: VmDir
                                                                         ) -> None:
    """With the open-file limit at 1024 (systemd's default soft limit), 700 idle connections
    to the world-reachable read-only socket are refused past the socket's share (256) instead
    of exhausting the daemon's descriptors: the read-write socket keeps serving, the refusals
    are logged without a traceback flood, and the read-only socket serves again once the flood
    goes. Control: the share is reached (connections really were refused)."""
    e = Embed(vm_dir.path / "instance")
    e.configure(STACK)
    d = Daemon(e)
    logf = open(d.log, "a")
    d.proc = subprocess.Popen([VMCONFINE, "-c", e.uri, "daemon"], stdin=subprocess.DEVNULL,
                              stdout=logf, stderr=logf, cwd=REPO, preexec_fn=_fd_limit_1024,
                              text=True)
    logf.close()
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while not (d.rw.exists() and _connects(d.rw)) and time.monotonic() < deadline:
            assert d.proc.poll() is None, d.log.read_text()
            time.sleep(0.05)
        for _ in range(700):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.ro))
            flood.append(s)
        time.sleep(1)
        assert d.cli("list", "--all").returncode == 0  # the read-write socket still serves
        fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        assert fds < 1024 - 256, fds
        refused = d.cli("-r", "list", check=False)  # the read-only share is taken
        assert refused.returncode == 1
        log = d.log.read_text()
        assert "(max_clients)" in log and "Traceback" not in log, log[-2000:]
        assert log.count("(max_clients)") < 10
    finally:
        for s in flood:
            s.close()
    time.sleep(0.5)
    assert d.cli("-r", "list").returncode == 0  # served again
    d.stop()


def test_max_clients_of_vmconfined_conf(vm_dir: VmDir) -> None:
    """libvirt's max_clients in vmconfined.conf caps each socket: the 13th idle connection to
    the read-only socket is refused while the read-write socket serves."""
    e = Embed(vm_dir.path / "instance")
    e.configure(STACK)
    (e.root / "etc" / "vmconfined.conf").write_text("max_clients = 12\n")
    d = Daemon(e)
    d.start()
    held = []
    try:
        for _ in range(12):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.ro))
            held.append(s)
        time.sleep(0.5)
        assert d.cli("-r", "list", check=False).returncode == 1  # the 13th: refused
        assert d.cli("list").returncode == 0
        held.pop().close()
        held.pop().close()  # two: the CLI connects twice (a probe, then its request)
        time.sleep(0.5)
        assert d.cli("-r", "list").returncode == 0  # control: places free again
        assert "(max_clients)" in d.log.read_text()
    finally:
        for s in held:
            s.close()
        d.stop()
        e.cleanup()


def test_daemon_errors_are_one_line(daemon: Daemon, vm_dir: VmDir) -> None:
    d = daemon
    for args, message in (
            (("start", "ghost"), "error: Domain not found"),
            (("define", str(vm_dir.path / "missing.xml")), "error: "),
            (("suspend", "ghost"), "error: Domain not found")):
        out = d.cli(*args, check=False)
        assert out.returncode == 1 and out.stderr.startswith(message), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    d.cli("define", str(vm_dir.domain_xml("twice")))
    d.cli("start", "twice")
    again = d.cli("start", "twice", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    second = subprocess.run([VMCONFINE, "-c", d.embed.uri, "daemon"], capture_output=True,
                            text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert "a vmconfine daemon already serves this instance" in second.stderr


def test_system_verbs_without_a_daemon_say_how_to_start_it(vm_dir: VmDir) -> None:
    e = Embed(vm_dir.path / "nodaemon")
    e.configure(STACK)
    out = e.cli("start", "x")
    assert out.returncode == 1
    assert out.stderr.strip() == (f"error: no vmconfine daemon serves {e.uri}; start it with "
                                  f"'vmconfine -c \"{e.uri}\" daemon --daemon'")
    assert e.cli("list").returncode == 0  # in-process without a daemon


@pytest.mark.usefixtures("checkout_searchable")
def test_session_daemon_spawns_on_first_use_and_exits_when_idle(vm_dir: VmDir) -> None:
    """As an unprivileged user: the first daemon verb starts the session daemon, which runs
    QEMU as that user and exits by itself once idle with no running domain."""
    s = Session(vm_dir.path)
    s.configure('security_driver = "landlock"\n')
    s.env["VMCONFINE_SESSION_DAEMON_TIMEOUT"] = "2"
    sock = Path(s.env["XDG_RUNTIME_DIR"]) / "vmconfine" / "vmconfine-sock"
    pid_file = sock.parent / "vmconfined.pid"
    xml = s.domain("sess", stay=True)
    try:
        out = s.cli("define", str(xml))
        assert out.returncode == 0 and "Domain 'sess' defined" in out.stdout, out.stderr
        daemon_pid = int(pid_file.read_text())
        status = Path(f"/proc/{daemon_pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M)
        out = s.cli("start", "sess")
        assert out.returncode == 0, out.stderr
        listing = s.cli("list").stdout
        assert re.search(r"^\s*\d+\s+sess\s+running$", listing, re.M), listing
        qemu = int(re.search(r"^PID:\s+(\d+)", s.cli("dominfo", "sess").stdout,
                             re.M).group(1))  # type: ignore[union-attr]
        assert re.search(r"^Uid:\s+65534\s",
                         Path(f"/proc/{qemu}/status").read_text(), re.M)
        time.sleep(3)  # a running domain keeps the daemon up
        assert Path(f"/proc/{daemon_pid}").exists()
        assert s.cli("destroy", "sess").returncode == 0
        deadline = time.monotonic() + 30
        while Path(f"/proc/{daemon_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{daemon_pid}").exists(), "the idle session daemon stayed"
        assert not sock.exists()
        # the definition stays; the next verb starts a daemon again
        listing = s.cli("list", "--all").stdout
        assert re.search(r"^\s*-\s+sess\s+shut off$", listing, re.M), listing
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                pid = int(pid_file.read_text())
                s.cli("destroy", "sess")
                os.kill(pid, signal.SIGTERM)
        s.cleanup()


def test_client_verbs_import_no_lxml_pluggy_or_driver(daemon: Daemon) -> None:
    """The CLI is a thin client of a running daemon: start-up cost stays the interpreter's.
    A query answered by the daemon imports neither the heavy libraries nor the standard
    library's slow ones (http.client with email and ssl, logging, typing, subprocess,
    dataclasses, shutil) nor the instance module (qemu.conf's settings)."""
    code = ("import sys\nfrom vmconfine.cli import main\n"
            f"uri = {daemon.embed.uri!r}\n"
            "rc = [main(['-c', uri, *v]) for v in (['list', '--all'], ['dominfo', 'nope'], "
            "['domstate', 'nope'], ['-r', 'list'])]\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lxml', 'pluggy', 'h11', 'wsproto', 'qemu', 'asyncio', 'http', 'email', 'ssl', "
            "'logging', 'typing', 'subprocess', 'dataclasses', 'shutil') "
            "or m.startswith('vmconfine_') or m.startswith('vmconfine.domain') "
            "or m.startswith('vmconfine.plugin') or m.startswith('vmconfine.config.instance')"
            " or m.startswith('vmconfine.config.settings'))\n"
            "print('HEAVY', heavy, rc)\n")
    out = subprocess.run([str(Path(VMCONFINE).with_name("python")), "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "HEAVY [] [0, 1, 1, 0]" in out.stdout, out.stdout + out.stderr
    assert out.stderr.count("error: Domain not found") == 2, out.stderr
    # the same check, in-process without a daemon, does import them: the test can fail
    daemon.stop()
    out = subprocess.run([str(Path(VMCONFINE).with_name("python")), "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "HEAVY []" not in out.stdout and "lxml" in out.stdout, out.stdout + out.stderr
    assert "'logging'" in out.stdout, out.stdout


def test_console_shows_the_serial_pty_and_detaches_on_ctrl_bracket(daemon: Daemon,
                                                                   vm_dir: VmDir) -> None:
    d = daemon
    image = vm_dir.image("con.img", stay=True, greeting="hello on the console")
    xml = vm_dir.path / "con.xml"
    xml.write_text(
        "<domain type='qemu'><name>con</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'>"
        f"<driver name='qemu' type='raw'/><source file='{image}'/>"
        "<target dev='hda' bus='ide'/></disk><serial type='pty'><target port='0'/></serial>"
        "<memballoon model='none'/></devices></domain>")
    d.cli("define", str(xml))
    d.cli("start", "--paused", "con")
    console = subprocess.Popen([VMCONFINE, "-c", d.embed.uri, "console", "con"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO)
    assert console.stdout is not None and console.stdin is not None
    first = console.stdout.readline()
    assert first.startswith(b"Connected to domain 'con'"), first
    time.sleep(0.5)
    busy = d.cli("console", "con", check=False)
    assert busy.returncode == 1
    assert busy.stderr.strip() == "error: an active console session exists for domain 'con'"
    ro = d.cli("-r", "console", "con", check=False)
    assert ro.returncode == 1 and "read-only" in ro.stderr
    d.cli("resume", "con")
    seen = b""
    deadline = time.monotonic() + 60
    while b"hello on the console" not in seen and time.monotonic() < deadline:
        seen += os.read(console.stdout.fileno(), 4096)
    assert b"hello on the console" in seen
    console.stdin.write(b"\x1d")  # ^] detaches
    console.stdin.flush()
    assert console.wait(timeout=30) == 0
    assert d.state("con") == "running (unpaused)"  # detaching leaves the guest running
    none = d.cli("console", "con", check=False)  # the session ended: a new one may start
    assert "active console session" not in none.stderr
    d.cli("destroy", "con")
    nopty = vm_dir.domain_xml("nopty")
    d.cli("define", str(nopty))
    d.cli("start", "nopty")
    out = d.cli("console", "nopty", check=False)
    assert out.returncode == 1 and "has no serial console of type pty" in out.stderr


def test_mcs_pairs_stay_reserved_across_a_killed_daemon(vm_dir: VmDir) -> None:
    """selinux (fake backend, real MCS registry) + dac + cgroups: after kill -9 and restart
    every domain is managed again with its own pair, and a new domain gets another one."""
    e = Embed(vm_dir.path / "mcs")
    e.configure('security_driver = "selinux"\n')
    policy = vm_dir.path / "policy"
    d = Daemon(e)

    def start_daemon() -> None:
        logf = open(d.log, "a")
        d.proc = subprocess.Popen(
            [str(Path(VMCONFINE).with_name("python")), "-m", "tests.host.daemon_fake_selinux",
             e.uri, str(policy)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            cwd=REPO, start_new_session=True, text=True)
        logf.close()
        deadline = time.monotonic() + 60
        while not (d.rw.exists() and _connects(d.rw)):
            assert d.proc.poll() is None and time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.05)

    def level(name: str) -> str:
        info = d.cli("dominfo", name).stdout
        label = re.search(r"^Security label: (\S+:svirt\S*)$", info, re.M)
        assert label, info
        return label.group(1).split(":", 3)[3]

    start_daemon()
    try:
        names = ["m0", "m1", "m2"]
        for name in names:
            d.cli("define", str(vm_dir.domain_xml(name)))
            d.cli("start", name)
        before = {n: level(n) for n in names}
        assert len(set(before.values())) == 3
        d.stop(signal.SIGKILL)
        start_daemon()
        assert "reconnected to 3 running domain(s)" in d.log.read_text()
        assert {n: level(n) for n in names} == before
        d.cli("define", str(vm_dir.domain_xml("m3")))
        d.cli("start", "m3")
        assert level("m3") not in before.values()
        for name in [*names, "m3"]:
            d.cli("destroy", name)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            destroy_running(e)
            d.stop()
        e.cleanup()
