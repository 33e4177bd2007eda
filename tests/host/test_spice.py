"""SPICE end to end as virt-install writes it: real QEMU (paused), real uid switch, confined by
landlock + dac + cgroups + namespaces, and libvirt's own command line for the same XML.

Domain A listens on a unix socket (``<listen type='socket'/>``, its path generated in A's
home directory) with a ticket from the XML; domain B on TCP 127.0.0.1 with ports allocated
from libvirt's range, a TLS port (``spice_tls``, a test PKI) and the ticket from qemu.conf's
``spice_password``. A SPICE client speaks the link protocol (``REDQ`` header, then the ticket
encrypted with the server's RSA key): the right ticket is accepted, a wrong one refused, and
no ticket is ever on QEMU's command line. B's QEMU, compromised (QMP ``chardev-add``),
cannot connect to A's SPICE socket; the control run gives the socket back to the qemu user,
as QEMU leaves it, and B connects.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import ssl
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.host.test_argv_libvirt import LibvirtEmbed, libvirt, split_native  # noqa: F401
from tests.support import require, require_binary
from vmconfine_landlock import syscalls

pytestmark = pytest.mark.host

#: what virt-install writes for --graphics spice (GRAPHICS is filled per domain)
DEVICES = """<controller type='usb' model='qemu-xhci'/>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    {graphics}
    <sound model='ich6'/>
    <audio id='1' type='spice'/>
    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'
                  primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <redirdev bus='usb' type='spicevmc'/>"""
SOCKET = ("<graphics type='spice' passwd='xml-ticket-A'><listen type='socket'/>"
          "<image compression='off'/></graphics>")
TCP = ("<graphics type='spice' autoport='yes'><listen type='address'/>"
       "<image compression='off'/></graphics>")
SPICE_LINK_ERR_OK, SPICE_LINK_ERR_PERMISSION_DENIED = 0, 7


def qmp(e: Embed, name: str, command: str, **arguments: object) -> dict:
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    proc = e.cli("qemu-monitor-command", name, json.dumps(msg))
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stdout +
                                                                          proc.stderr}


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"SPICE server closed the link after {out!r}"
        out += chunk
    return out


def link(s: socket.socket) -> tuple[bytes, bytes]:
    """Send a SPICE link message for the main channel; return (reply magic, reply body)."""
    mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # SpiceLinkMess, no capabilities
    s.sendall(b"REDQ" + struct.pack("<III", 2, 2, len(mess)) + mess)
    header = _recv(s, 16)
    (size,) = struct.unpack("<I", header[12:16])
    return header[:4], _recv(s, size)


def ticket_result(s: socket.socket, password: str) -> int:
    """The server's answer to ``password`` (RSA-OAEP with the key of its link reply)."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
    except ImportError:
        require(False, "python3-cryptography is missing (apt-get install python3-cryptography)")
    magic, body = link(s)
    assert magic == b"REDQ" and struct.unpack("<I", body[:4])[0] == SPICE_LINK_ERR_OK
    key = serialization.load_der_public_key(body[4:166])
    sha1 = hashes.SHA1()  # SPICE's ticket encryption
    s.sendall(key.encrypt(password.encode() + b"\0",  # type: ignore[union-attr]
                          padding.OAEP(mgf=padding.MGF1(sha1), algorithm=sha1, label=None)))
    return int(struct.unpack("<I", _recv(s, 4))[0])


def unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    return s


def make_pki(d: Path) -> Path:
    """A self-signed server certificate that is its own CA, readable by QEMU."""
    openssl = require_binary("openssl")
    pki = d / "pki"
    pki.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(pki / "server-key.pem"),
                    "-out", str(pki / "server-cert.pem")], check=True, capture_output=True)
    (pki / "ca-cert.pem").write_bytes((pki / "server-cert.pem").read_bytes())
    for f in pki.iterdir():
        os.chmod(f, 0o644)
    os.chmod(pki, 0o755)
    return pki


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_spice_socket_and_tls_ports_confined(embed: Embed, vm_dir: VmDir) -> None:
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    e, d = embed, vm_dir.path
    pki = make_pki(d)
    e.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\nspice_tls = 1\n'
                f'spice_tls_x509_cert_dir = "{pki}"\nspice_password = "conf-ticket-B"\n')
    xml_a = vm_dir.domain_xml("spa", extra_devices=DEVICES.format(graphics=SOCKET))
    xml_b = vm_dir.domain_xml("spb", extra_devices=DEVICES.format(graphics=TCP))
    run_a = e.start(xml_a, "--paused")
    e.start(xml_b, "--paused")
    pid_a, pid_b = qemu_pid(e, "spa"), qemu_pid(e, "spb")

    # A: on the generated socket in its home, with the XML's ticket
    sock = e.root / "lib" / "qemu" / "domain-spa" / "spice.sock"
    info = qmp(e, "spa", "query-spice")["return"]
    assert (info["enabled"], info["host"], info["auth"]) == (True, str(sock), "spice")
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    live_a = e.cli("dumpxml", "spa", check=True).stdout
    assert f'socket="{sock}"' in live_a
    assert "xml-ticket-A" not in live_a  # the ticket only with --security-info, as libvirt
    assert "xml-ticket-A" in e.cli("dumpxml", "--security-info", "spa", check=True).stdout
    assert str(sock) not in e.cli("dumpxml", "--inactive", "spa", check=True).stdout
    with unix(sock) as s:
        assert ticket_result(s, "xml-ticket-A") == SPICE_LINK_ERR_OK
    with unix(sock) as s:
        assert ticket_result(s, "not-the-ticket") == SPICE_LINK_ERR_PERMISSION_DENIED
    assert "ticket" not in cmdline(pid_a) and "-spice unix=on,addr=" in cmdline(pid_a)
    chardevs = {c["label"]: c["filename"] for c in qmp(e, "spa", "query-chardev")["return"]}
    assert {"charchannel0", "charredir0", "charredir1"} <= set(chardevs)
    peripherals = {p["name"]: p["type"] for p in qmp(
        e, "spa", "qom-list", path="/machine/peripheral")["return"]}
    assert {k: peripherals[k] for k in ("video0", "redir0", "redir1", "sound0", "channel0")} \
        == {"video0": "child<qxl-vga>", "redir0": "child<usb-redir>",
            "redir1": "child<usb-redir>", "sound0": "child<intel-hda>",
            "channel0": "child<virtserialport>"}

    # B: allocated ports on 127.0.0.1, plain and TLS, the qemu.conf ticket
    info = qmp(e, "spb", "query-spice")["return"]
    live = e.cli("dumpxml", "spb", check=True).stdout
    port, tls = int(info["port"]), int(info["tls-port"])
    assert (info["host"], info["auth"]) == ("127.0.0.1", "spice")
    assert 5900 <= port < tls <= 65535
    assert f'port="{port}"' in live and f'tlsPort="{tls}"' in live
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        assert ticket_result(s, "conf-ticket-B") == SPICE_LINK_ERR_OK
    tls_ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    tls_ctx.check_hostname = False
    with tls_ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls), timeout=30)) as s:
        assert link(s)[0] == b"REDQ"
    assert "ticket" not in cmdline(pid_b)
    assert f"tls-port={tls}" in cmdline(pid_b) and f"x509-dir={pki}" in cmdline(pid_b)

    # B's compromised QEMU (same uid as A's) cannot reach A's SPICE socket...
    qemu_uid = os.stat(f"/proc/{pid_b}").st_uid
    assert os.stat(f"/proc/{pid_a}").st_uid == qemu_uid != 0
    attack = {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                         "server": False}}
    reply = qmp(e, "spb", "chardev-add", id="evil", backend=attack)
    assert "Permission denied" in json.dumps(reply), reply
    # ...control: the socket as QEMU itself leaves it (its uid) — B connects
    os.chown(sock, qemu_uid, -1)
    assert qmp(e, "spb", "chardev-add", id="control", backend=attack) == {"return": {}}

    e.cli("destroy", "spa", check=True)
    assert run_a.wait(timeout=60) == 0
    assert not sock.parent.exists()
    e.cli("destroy", "spb", check=True)


def _options(value: str) -> dict[str, str]:
    """``a=b,flag`` → {"a": "b", "flag": "on"} (libvirt writes a bare ``unix``)."""
    return dict(p.split("=", 1) if "=" in p else (p, "on") for p in value.split(","))


def _display_args(argv: list[str]) -> dict[str, object]:
    """-spice options, spicevmc chardevs, audio backends and the SPICE devices (without the
    PCI/USB placement libvirt gives and vmconfine leaves to QEMU)."""
    devices = {}
    for i, arg in enumerate(argv[:-1]):
        if arg == "-device" and argv[i + 1].startswith("{"):
            props = json.loads(argv[i + 1])
            if props["driver"] in ("qxl-vga", "usb-redir", "intel-hda", "hda-duplex",
                                   "virtserialport"):
                devices[props["id"]] = {k: v for k, v in props.items()
                                        if k not in ("bus", "addr", "port")
                                        or props["driver"] == "hda-duplex"}
    spice = [_options(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "-spice"]
    return {
        "spice": spice,
        "chardev": [argv[i + 1] for i, a in enumerate(argv[:-1])
                    if a == "-chardev" and argv[i + 1].startswith("spicevmc")],
        "audiodev": [json.loads(argv[i + 1]) for i, a in enumerate(argv[:-1])
                     if a == "-audiodev"],
        "devices": devices,
    }


def test_command_line_matches_libvirts(libvirt: LibvirtEmbed,  # noqa: F811
                                       embed: Embed, vm_dir: VmDir) -> None:
    pki = libvirt.root / "pki"
    pki.mkdir(exist_ok=True)
    conf = f'spice_tls = 1\nspice_tls_x509_cert_dir = "{pki}"\n'
    embed.configure(f'security_driver = "none"\n{conf}')
    graphics = ("<graphics type='spice' port='5930' tlsPort='5931' autoport='no' "
                "passwd='p' defaultMode='any'><listen type='address' address='127.0.0.1'/>"
                "<channel name='main' mode='secure'/><image compression='auto_glz'/>"
                "<jpeg compression='never'/><zlib compression='always'/>"
                "<playback compression='off'/><streaming mode='filter'/>"
                "<mouse mode='client'/><clipboard copypaste='no'/>"
                "<filetransfer enable='no'/><gl enable='no'/></graphics>")
    for name, display in (("spl", graphics), ("sps", SOCKET)):
        xml = vm_dir.domain_xml(name, extra_devices=DEVICES.format(graphics=display))
        text = re.sub(r"\s*<serial .*?</serial>", "", xml.read_text(), flags=re.S)
        xml.write_text(text)
        theirs = split_native(libvirt.domxml_to_native(name, text, {}, conf))[1]
        ours = split_native(embed.cli("domxml-to-native", "qemu-argv", str(xml),
                                      check=True).stdout)[1]
        mine, lv = _display_args(ours), _display_args(theirs)
        if name == "sps":  # each generates the socket in its own domain directory
            for side in (mine, lv):
                addr = side["spice"][0].pop("addr")  # type: ignore[index]
                assert addr.endswith("/spice.sock"), addr
        assert mine == lv, (name, mine, lv)
        assert mine["devices"] and mine["spice"]


def test_spice_socket_of_the_xml_in_a_root_view(vm_dir: VmDir) -> None:
    """A socket path the XML names, in a directory of QEMU's account, under the per-domain
    root view (QEMU's SPICE modules and their libraries must be in the view)."""
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    e = Embed(vm_dir.path / "instance-root")
    e.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n'
                'namespaces = [ "mount", "root" ]\n')
    try:
        own = vm_dir.path / "qemu-sockets"
        own.mkdir(mode=0o700)
        probe = e.cli("config", check=True).stdout
        user = re.search(r'^user = "([^"]+)"', probe, re.M)
        assert user is not None, probe
        account = pwd.getpwnam(user.group(1)) if not user.group(1).startswith("+") else None
        uid = account.pw_uid if account else int(user.group(1)[1:])
        os.chown(own, uid, 0)
        sock = own / "spice.sock"
        graphics = f"<graphics type='spice'><listen type='socket' socket='{sock}'/></graphics>"
        run = e.start(vm_dir.domain_xml("spr", extra_devices=DEVICES.format(
            graphics=graphics)), "--paused")
        info = qmp(e, "spr", "query-spice")["return"]
        assert (info["enabled"], info["host"], info["auth"]) == (True, str(sock), "none")
        st = os.lstat(sock)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        with unix(sock) as s:
            assert link(s)[0] == b"REDQ"
        e.cli("destroy", "spr", check=True)
        assert run.wait(timeout=60) == 0
        assert not os.path.lexists(sock)  # journaled: teardown removes what QEMU made
    finally:
        e.cleanup()
