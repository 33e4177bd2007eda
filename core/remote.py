"""Remote transports of the client: ``qemu+ssh://`` and ``qemu+tls://`` (libvirt's URI forms).

ssh: the system's OpenSSH client (BatchMode, the user's agent and keys) runs
``vmconfine -c <the remote instance's URI> daemon-bridge`` on the host, which relays its
stdin/stdout to the daemon's unix socket (libvirt's virt-ssh-helper). The local end is one
side of a socketpair whose other side is ssh's stdin and stdout, so HTTP flows over ssh
unchanged. Authentication and authorization are ssh's and the remote socket's permissions.

tls: mutual TLS with Python's ssl module against a daemon listening with ``listen_tls = 1``;
libvirt's PKI layout (``/etc/pki/CA/cacert.pem``, ``/etc/pki/libvirt/clientcert.pem``,
``/etc/pki/libvirt/private/clientkey.pem``; ``~/.pki/libvirt/`` for other users, or
``pkipath=DIR``), ``no_verify=1`` to skip checking the server's certificate.

Standard library only, like :mod:`vmconfine.client`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from vmconfine.client import Transport
from vmconfine.config.instance import TLS_PORT, RemoteURI
from vmconfine.errors import VmconfineError

SSH = "ssh"


class SSHTransport(Transport):
    def __init__(self, remote: RemoteURI, *, readonly: bool) -> None:
        self.remote = remote
        self.readonly = readonly
        self.where = f"the vmconfine daemon of {remote.remote_uri} on {remote.host} (ssh)"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        r = self.remote
        cmd = [SSH, "-T", "-e", "none", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        if r.port:
            cmd += ["-p", str(r.port)]
        if r.user:
            cmd += ["-l", r.user]
        if r.params.get("keyfile"):
            cmd += ["-i", r.params["keyfile"], "-o", "IdentitiesOnly=yes"]
        if r.params.get("known_hosts"):
            cmd += ["-o", f"UserKnownHostsFile={r.params['known_hosts']}"]
        if r.no_verify:
            cmd += ["-o", "StrictHostKeyChecking=no"]
        remote = [r.params.get("command") or "vmconfine", "-c", r.remote_uri,
                  *(["--readonly"] if self.readonly else []), "daemon-bridge"]
        if r.params.get("socket"):
            remote += ["--socket", r.params["socket"]]
        return [*cmd, "--", r.host, shlex.join(remote)]

    def connect(self, timeout: float) -> socket.socket:
        mine, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(self.command(), stdin=theirs, stdout=theirs,
                                          stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            mine.close()
            raise VmconfineError("qemu+ssh:// needs the OpenSSH client: apt-get install "
                                 "openssh-client") from None
        finally:
            theirs.close()
        mine.settimeout(timeout)
        return mine

    def failure(self) -> str | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if proc.returncode == 255:  # ssh's own failure
            return f"ssh to {self.remote.host} failed: {lines[-1] if lines else 'exit 255'}"
        if lines:
            return lines[-1].removeprefix("error: ")
        return None


def pki_files(remote: RemoteURI) -> tuple[Path, Path, Path]:
    """(CA certificate, client certificate, client key) in libvirt's layout."""
    if remote.params.get("pkipath"):
        base = Path(remote.params["pkipath"])
        return base / "cacert.pem", base / "clientcert.pem", base / "clientkey.pem"
    if os.geteuid() == 0:
        return (Path("/etc/pki/CA/cacert.pem"), Path("/etc/pki/libvirt/clientcert.pem"),
                Path("/etc/pki/libvirt/private/clientkey.pem"))
    base = Path.home() / ".pki" / "libvirt"
    return base / "cacert.pem", base / "clientcert.pem", base / "clientkey.pem"


class TLSTransport(Transport):
    def __init__(self, remote: RemoteURI) -> None:
        self.remote = remote
        self.port = remote.port or TLS_PORT
        self.where = f"the vmconfine daemon at {remote.host}:{self.port} (TLS)"
        self.headers = {"X-Vmconfine-URI": remote.remote_uri}
        self._context: ssl.SSLContext | None = None
        self._handshake_done = False

    def context(self) -> ssl.SSLContext:
        if self._context is not None:
            return self._context
        ca, cert, key = pki_files(self.remote)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.remote.no_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            _need(ca, "the CA certificate")
            ctx.load_verify_locations(cafile=str(ca))
        _need(cert, "the client certificate")
        _need(key, "the client key")
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise VmconfineError(f"TLS: cannot use client certificate {cert} with key {key}: "
                                 f"{getattr(exc, 'reason', None) or exc}") from None
        self._context = ctx
        return ctx

    def connect(self, timeout: float) -> socket.socket:
        host, port = self.remote.host, self.port
        ctx = self.context()
        try:
            raw = socket.create_connection((host, port), timeout=min(timeout, 30))
        except socket.gaierror:
            raise VmconfineError(f"cannot resolve host '{host}'") from None
        except ConnectionRefusedError:
            raise VmconfineError(f"cannot connect to {host}:{port}: connection refused (does "
                                 "its daemon listen with listen_tls = 1?)") from None
        except OSError as exc:
            raise VmconfineError(f"cannot connect to {host}:{port}: "
                                 f"{exc.strerror or exc}") from None
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise VmconfineError(f"the certificate of {host}:{port} is not trusted: "
                                 f"{exc.verify_message} (check cacert.pem, or pkipath=DIR)"
                                 ) from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise VmconfineError(f"TLS handshake with {host}:{port} failed: {reason} (the "
                                 "server may not trust this client's certificate)") from None
        tls.settimeout(timeout)
        self._handshake_done = True
        return tls

    def failure(self) -> str | None:
        if not self._handshake_done:
            return None
        # TLS 1.3: the server judges the client's certificate after the client's handshake
        # completed, so its refusal shows as a closed connection on the first read
        return (f"the server closed the TLS connection: TLS handshake with "
                f"{self.remote.host}:{self.port} failed on its side (it does not accept this "
                "client's certificate: is clientcert.pem signed by the server's CA?)")


def _need(path: Path, what: str) -> None:
    if not path.is_file():
        raise VmconfineError(f"TLS: {what} {path} is missing; put it there (libvirt's PKI "
                             "layout) or point pkipath=DIR at a directory holding cacert.pem, "
                             "clientcert.pem and clientkey.pem")


@contextlib.contextmanager
def unix_relay(transport: Transport) -> Iterator[Path]:
    """A private unix socket whose one connection is relayed over ``transport`` (for
    clients, like the console's WebSocket, that speak to a unix socket path)."""
    with tempfile.TemporaryDirectory(prefix="vmconfine-relay-") as d:
        path = Path(d) / "sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        upstream = transport.connect(600)
        upstream.settimeout(None)

        def serve() -> None:
            with contextlib.suppress(OSError):
                local, _ = listener.accept()
                pumps = [threading.Thread(target=_pump, args=(local, upstream), daemon=True),
                         threading.Thread(target=_pump, args=(upstream, local), daemon=True)]
                for p in pumps:
                    p.start()
                for p in pumps:
                    p.join()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
