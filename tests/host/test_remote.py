"""Remote URIs against real servers on loopback: Debian's sshd on a free 127.0.0.1 port with
throwaway keys (no host sshd configuration touched), and the daemon's TLS listener with
certificates made by the test. The daemon serves an embed root; the client reaches it only
through the remote transport."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import VMCONFINE, Embed, VmDir
from tests.host.test_daemon import Daemon, destroy_running
from tests.support import interruptible, require

pytestmark = pytest.mark.host

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
            f"/O=vmconfine tests/CN={name}", cwd=d)
    return key, cert


def make_cert(d: Path, name: str, subject: str, ca: tuple[Path, Path], *,
              server: bool = False) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}-cert.pem"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", subject, cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                   if server else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=d)
    return key, cert


def pki_dir(d: Path, name: str, cacert: Path, cert: tuple[Path, Path]) -> Path:
    out = d / name
    out.mkdir()
    shutil.copy(cacert, out / "cacert.pem")
    shutil.copy(cert[1], out / "clientcert.pem")
    shutil.copy(cert[0], out / "clientkey.pem")
    return out


@pytest.fixture
def tls(vm_dir: VmDir) -> Iterator[tuple[Daemon, dict[str, str]]]:
    require(shutil.which("openssl") is not None, "needs openssl")
    pki = vm_dir.path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "ca")
    other_ca = make_ca(pki, "otherca")
    server = make_cert(pki, "server", "/O=vmconfine tests/CN=localhost", ca, server=True)
    good = make_cert(pki, "client1", "/C=GB/O=vmconfine tests/CN=client1", ca)
    intruder = make_cert(pki, "intruder", "/C=GB/O=vmconfine tests/CN=intruder", ca)
    forged = make_cert(pki, "forged", "/C=GB/O=vmconfine tests/CN=client1", other_ca)
    # signed by the right CA, with a value that reads as the allowed DN when not escaped
    comma = make_cert(pki, "comma", "/C=GB/O=vmconfine tests,CN=client1", ca)
    port = free_port()
    e = Embed(vm_dir.path / "instance")
    e.configure('security_driver = "landlock"\n')
    (e.root / "etc" / "vmconfined.conf").write_text(
        f'listen_tls = 1\nlisten_addr = "127.0.0.1"\ntls_port = {port}\n'
        f'key_file = "{server[0]}"\ncert_file = "{server[1]}"\nca_file = "{ca[1]}"\n'
        'tls_allowed_dn_list = ["C=GB,O=vmconfine tests,CN=client1"]\n')
    d = Daemon(e)
    d.start()
    base = f"qemu+tls://127.0.0.1:{port}/embed?root={e.root}"
    uris = {
        "good": f"{base}&pkipath={pki_dir(pki, 'good', ca[1], good)}",
        "intruder": f"{base}&pkipath={pki_dir(pki, 'intruder', ca[1], intruder)}",
        "forged": f"{base}&pkipath={pki_dir(pki, 'forged', ca[1], forged)}",
        "comma": f"{base}&pkipath={pki_dir(pki, 'comma', ca[1], comma)}",
        "untrusting": f"{base}&pkipath={pki_dir(pki, 'untrusting', other_ca[1], good)}",
        "closed": f"qemu+tls://127.0.0.1:{free_port()}/embed?root={e.root}&pkipath="
                  f"{pki / 'good'}",
        "other-root": f"qemu+tls://127.0.0.1:{port}/embed?root={vm_dir.path}/elsewhere"
                      f"&pkipath={pki / 'good'}",
    }
    yield d, uris
    destroy_running(e)
    d.stop()
    e.cleanup()


def run(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMCONFINE, "-c", uri, *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd="/")


def one_line_error(out: subprocess.CompletedProcess[str], text: str) -> None:
    assert out.returncode == 1, out
    assert out.stderr.startswith("error: ") and text in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def lifecycle_over(uri: str, d: Daemon, vm_dir: VmDir, name: str) -> None:
    """list, define, start, dominfo, event, destroy through a remote URI."""
    xml = vm_dir.domain_xml(name)
    events = subprocess.Popen([VMCONFINE, "-c", uri, "event", "--loop", "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd="/", stdin=subprocess.DEVNULL, preexec_fn=interruptible)
    time.sleep(1.5)
    out = run(uri, "define", str(xml))
    assert out.returncode == 0 and f"Domain '{name}' defined" in out.stdout, out.stderr
    assert re.search(rf"^\s*-\s+{name}\s+shut off$", run(uri, "list", "--all").stdout, re.M)
    assert run(uri, "start", name).returncode == 0
    info = run(uri, "dominfo", name).stdout
    pid = int(re.search(r"^PID:\s+(\d+)", info, re.M).group(1))  # type: ignore[union-attr]
    assert Path(f"/proc/{pid}").exists()
    assert re.search(r"^Security model: landlock$", info, re.M)
    assert run(uri, "destroy", name).stdout.strip() == f"Domain '{name}' destroyed"
    assert not re.search(rf"^\s*\d+\s+{name}\s", run(uri, "list").stdout, re.M)
    time.sleep(0.5)
    events.send_signal(signal.SIGINT)
    got, _ = events.communicate(timeout=30)
    for expected in ("Defined Added", "Started Booted", "Stopped Destroyed"):
        assert f"event 'lifecycle' for domain '{name}': {expected}" in got, got


def test_tls_verbs_and_refusals(tls: tuple[Daemon, dict[str, str]], vm_dir: VmDir) -> None:
    d, uris = tls
    lifecycle_over(uris["good"], d, vm_dir, "overtls")
    one_line_error(run(uris["intruder"], "list"),
                   "'C=GB,O=vmconfine tests,CN=intruder' is not on the server's list of "
                   "allowed clients")
    one_line_error(run(uris["forged"], "list"), "TLS handshake with 127.0.0.1:")
    one_line_error(run(uris["comma"], "list"),
                   "'C=GB,O=vmconfine tests\\,CN=client1' is not on the server's list")
    one_line_error(run(uris["untrusting"], "list"), "is not trusted")
    one_line_error(run(uris["closed"], "list"), "connection refused")
    one_line_error(run(uris["other-root"], "list"), "this daemon serves qemu:///embed?root=")
    log = d.log.read_text()
    assert "dn='C=GB,O=vmconfine tests,CN=client1'" in log
    assert "refused, DN not in tls_allowed_dn_list" in log
    assert "TLS handshake failed" in log  # the forged client, logged by the server too


def test_remote_uri_refusals() -> None:
    one_line_error(run("qemu+tcp://127.0.0.1/system", "list"),
                   "qemu+tcp:// is plain, unauthenticated TCP")
    one_line_error(run("qemu+libssh2://h/system", "list"), "use qemu+ssh://")
    one_line_error(run("qemu+tls://no-such-host.invalid/system?no_verify=1&pkipath=/nonexistent",
                       "list"), "clientcert.pem is missing")
    one_line_error(run("qemu+ssh://127.0.0.1/system", "confinement", "x.xml"),
                   "is a remote URI: this verb runs on the host itself")


@pytest.fixture
def sshd(vm_dir: VmDir) -> Iterator[dict[str, str]]:
    require(os.path.exists(SSHD), "needs openssh-server (scripts/setup.sh installs it)")
    d = vm_dir.path / "ssh"
    d.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "stranger")],
                   check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host.pub').read_text()}")
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"),
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, \
            (d / "sshd.log").read_text()
        time.sleep(0.05)
    yield {"port": str(port), "key": str(d / "user"), "stranger": str(d / "stranger"),
           "known_hosts": str(d / "known_hosts"), "dir": str(d)}
    proc.terminate()
    proc.wait(timeout=30)


def test_ssh_verbs_console_and_refusals(sshd: dict[str, str], vm_dir: VmDir) -> None:
    e = Embed(vm_dir.path / "instance")
    e.configure('security_driver = "landlock"\n')
    d = Daemon(e)
    d.start()
    try:
        base = (f"qemu+ssh://root@127.0.0.1:{sshd['port']}/embed?root={e.root}"
                f"&known_hosts={sshd['known_hosts']}&command={VMCONFINE}")
        uri = f"{base}&keyfile={sshd['key']}"
        lifecycle_over(uri, d, vm_dir, "overssh")
        # the console, relayed over ssh
        image = vm_dir.image("sshcon.img", stay=True, greeting="hello over ssh")
        xml = vm_dir.path / "sshcon.xml"
        xml.write_text(
            "<domain type='qemu'><name>sshcon</name><memory unit='MiB'>32</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>"
            "</os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{image}'/><target dev='hda' bus='ide'/></disk>"
            "<serial type='pty'><target port='0'/></serial><memballoon model='none'/>"
            "</devices></domain>")
        assert run(uri, "create", "--paused", str(xml)).returncode == 0
        console = subprocess.Popen([VMCONFINE, "-c", uri, "console", "sshcon"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd="/")
        assert console.stdout is not None and console.stdin is not None
        assert console.stdout.readline().startswith(b"Connected to domain 'sshcon'")
        time.sleep(1)
        assert run(uri, "resume", "sshcon").returncode == 0
        seen = b""
        deadline = time.monotonic() + 60
        while b"hello over ssh" not in seen and time.monotonic() < deadline:
            seen += os.read(console.stdout.fileno(), 4096)
        assert b"hello over ssh" in seen
        console.stdin.write(b"\x1d")
        console.stdin.flush()
        assert console.wait(timeout=30) == 0
        assert run(uri, "destroy", "sshcon").returncode == 0
        # read-only over ssh: the bridge uses the read-only socket
        one_line_error(run(uri, "-r", "start", "overssh"), "this connection is read-only")
        one_line_error(run(f"{base}&keyfile={sshd['stranger']}", "list"),
                       "ssh to 127.0.0.1 failed: ")
    finally:
        destroy_running(e)
        d.stop()
        e.cleanup()
