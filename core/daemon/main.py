"""``vmconfine daemon``: serve one instance until stopped (or idle, with ``--timeout``).

Start-up: take the instance's pid file lock (one daemon per instance), open the instance (its
connection finishes the teardown of domains whose QEMU died), reconnect to every running domain
a daemon started, listen on the read-write and read-only sockets, start the autostart domains.
SIGTERM/SIGINT stop it: the sockets close, QMP connections close, the domains' locks are
released — and every guest keeps running, for the next daemon to reconnect to (libvirt does
the same). ``--daemon`` forks into the background once the sockets listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import fcntl
import grp
import logging
import os
import resource
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.config.conf import parse_conf
from vmconfine.config.instance import TLS_PORT, Instance, open_instance
from vmconfine.daemon.api import make_app
from vmconfine.daemon.events import EventBus
from vmconfine.daemon.httpserver import MAX_CLIENTS, MAX_HANDSHAKING, Server
from vmconfine.daemon.manager import DomainManager
from vmconfine.errors import ConfigError, VmconfineError
from vmconfine.launch.connection import Connection
from vmconfine.plugin.context import DomainContext
from vmconfine.report.build import open_failure_hint

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger(__name__)

#: descriptors kept out of the clients' share: domains' QMP sockets, ptys, journals, files
FD_RESERVE = 512
#: the most descriptors asked for when the hard limit is unlimited (the kernel's nr_open)
FD_CEILING = 1 << 20


def client_budget(servers: int) -> int:
    """Connections each of ``servers`` listening servers may hold: the open-file limit (soft;
    a service manager's LimitNOFILE, ``ulimit -n``) less :data:`FD_RESERVE`, shared out — so
    that clients can never take the descriptors the daemon needs (accept failing with EMFILE
    on every socket, QMP and files unopenable). At most libvirtd's max_clients (5000) each,
    at least 16. The limit is not raised here: QEMU and every helper would inherit it."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = FD_CEILING
    return max(16, min(MAX_CLIENTS, (soft - FD_RESERVE) // max(1, servers)))


@dataclass
class DaemonConfig:
    """``vmconfined.conf``: libvirt's virtqemud.conf / libvirtd.conf keys of the same names
    and defaults."""

    unix_sock_group: str | None = None
    unix_sock_ro_perms: int = 0o777
    unix_sock_rw_perms: int = 0o700
    listen_tls: int = 0
    listen_addr: str = "0.0.0.0"
    tls_port: int = TLS_PORT
    key_file: str = "/etc/pki/libvirt/private/serverkey.pem"
    cert_file: str = "/etc/pki/libvirt/servercert.pem"
    ca_file: str = "/etc/pki/CA/cacert.pem"
    tls_allowed_dn_list: list[str] | None = None  #: None: any certificate the CA signed
    max_clients: int = MAX_CLIENTS  #: connections per socket (less when the fd limit is low)
    max_anonymous_clients: int = MAX_HANDSHAKING  #: TLS clients not yet authenticated

    @classmethod
    def load(cls, path: Path) -> DaemonConfig:
        cfg = cls()
        if not path.exists():
            return cfg
        conf = parse_conf(path.read_text(), str(path))
        kinds = {f.name: f.type for f in fields(cls)}
        for entry in conf.entries:
            where = f"{path}:{entry.line}"
            name, value = entry.name, entry.value
            if name not in kinds:
                close = difflib.get_close_matches(name, kinds, 1)
                raise ConfigError(f"{where}: unknown setting '{name}'"
                                  + (f" (did you mean {close[0]}?)" if close else ""))
            if name in ("unix_sock_ro_perms", "unix_sock_rw_perms"):
                try:
                    perms = int(value, 8) if isinstance(value, str) else -1
                except ValueError:
                    perms = -1
                if not 0 <= perms <= 0o777:
                    raise ConfigError(f"{where}: {name} must be an octal mode such as "
                                      f"\"0770\", not {value!r}")
                value = perms
            elif name in ("max_clients", "max_anonymous_clients"):
                if isinstance(value, bool) or not isinstance(value, int) or not \
                        1 <= value <= 1_000_000:
                    raise ConfigError(f"{where}: {name} must be a number of connections "
                                      f"(1-1000000), not {value!r}")
            elif name in ("listen_tls", "tls_port"):
                if not isinstance(value, int) or not 0 <= value <= 65535 or (
                        name == "listen_tls" and value not in (0, 1)):
                    raise ConfigError(f"{where}: {name} must be "
                                      + ("0 or 1" if name == "listen_tls" else
                                         "a port number") + f", not {value!r}")
            elif name == "tls_allowed_dn_list":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}: tls_allowed_dn_list must be a list of "
                                      "strings, e.g. [\"C=GB,O=Example,CN=admin*\"]")
            elif not isinstance(value, str):
                raise ConfigError(f"{where}: {name} must be a string")
            if name == "unix_sock_group":
                try:
                    grp.getgrnam(str(value))
                except KeyError:
                    raise ConfigError(f"{where}: unix_sock_group '{value}' is not a group on "
                                      "this host") from None
            setattr(cfg, name, value)
        return cfg

    def tls_context(self) -> ssl.SSLContext:
        """Mutual TLS: the server's certificate, client certificates signed by the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        for what, path in (("CA certificate (ca_file)", self.ca_file),
                           ("server certificate (cert_file)", self.cert_file),
                           ("server key (key_file)", self.key_file)):
            if not Path(path).is_file():
                raise ConfigError(f"listen_tls = 1 needs the {what} {path}; create it (libvirt's "
                                  "PKI layout) or set its path in vmconfined.conf")
        try:
            ctx.load_verify_locations(cafile=self.ca_file)
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"listen_tls = 1: cannot load {self.cert_file} / {self.key_file} "
                              f"/ {self.ca_file}: {getattr(exc, 'reason', None) or exc}"
                              ) from None
        return ctx


class Daemon:
    def __init__(self, instance: Instance, *, idle_timeout: float = 0,
                 pm: pluggy.PluginManager | None = None) -> None:
        self.instance = instance
        self.pm = pm
        self.config = DaemonConfig.load(instance.daemon_config_path)
        self.idle_timeout = idle_timeout
        self.events = EventBus()
        self.stop = asyncio.Event()
        self.servers: list[Server] = []
        self.consoles: set[str] = set()  #: domains with a console session, on any socket
        self.conn: Connection | None = None
        self.manager: DomainManager | None = None

    async def run(self, ready: int | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_quiet_resource_errors())
        self.conn = conn = Connection(self.instance, pm=self.pm)
        conn.stack  # noqa: B018 - a stack that cannot be built stops the daemon here

        def diagnose(ctx: DomainContext, tail: str) -> str:
            return open_failure_hint(conn, ctx, tail)

        self.manager = DomainManager(conn, self.events, diagnose=diagnose)
        back = await self.manager.reconnect()
        if back:
            log.info("reconnected to %d running domain(s): %s", len(back), ", ".join(back))
        await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
        log.info("vmconfine daemon serving %s on %s (pid %d)", self.instance.uri,
                 self.instance.daemon_socket_path, os.getpid())
        if ready is not None:
            os.write(ready, b"1")
            os.close(ready)
        await self.manager.autostart()
        idle = asyncio.ensure_future(self._idle_watch()) if self.idle_timeout > 0 else None
        try:
            await self.stop.wait()
        finally:
            if idle is not None:
                idle.cancel()
            await self._shutdown()

    async def _listen(self) -> None:
        assert self.manager is not None
        inst = self.instance
        inst.daemon_dir.mkdir(parents=True, exist_ok=True)
        gid = grp.getgrnam(self.config.unix_sock_group).gr_gid if \
            self.config.unix_sock_group else -1
        budget = min(self.config.max_clients,
                     client_budget(3 if self.config.listen_tls else 2))
        for path, readonly, perms in (
                (inst.daemon_socket_path, False, self.config.unix_sock_rw_perms),
                (inst.daemon_ro_socket_path, True, self.config.unix_sock_ro_perms)):
            path.unlink(missing_ok=True)  # stale: the pid file lock says no daemon runs
            server = Server(make_app(self.manager, self.events, readonly=readonly,
                                     consoles=self.consoles), max_clients=budget)
            self.servers.append(server)
            old = os.umask(0o177)  # never reachable with wider permissions, not even briefly
            try:
                await server.listen_unix(str(path))
            finally:
                os.umask(old)
            os.chown(path, -1, gid)
            os.chmod(path, perms)
        if self.config.listen_tls:
            ctx = self.config.tls_context()
            server = Server(make_app(self.manager, self.events, readonly=False,
                                     tls_dn_list=self.config.tls_allowed_dn_list or ["*"],
                                     consoles=self.consoles), max_clients=budget,
                            max_handshaking=self.config.max_anonymous_clients)
            self.servers.append(server)
            await server.listen_tcp(self.config.listen_addr, self.config.tls_port, ctx)
            log.info("listening for TLS clients on %s:%d", self.config.listen_addr,
                     self.config.tls_port)

    async def _idle_watch(self) -> None:
        """Exit after ``idle_timeout`` seconds with no running domain and no client."""
        assert self.manager is not None
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout))
            busy = self.manager.running_count() > 0 or self.events.subscribers > 0 or any(
                server.connections for server in self.servers)
            if busy:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_timeout:
                log.info("idle for %ss with no running domain: exiting", self.idle_timeout)
                self.stop.set()
                return

    async def _shutdown(self) -> None:
        # all at once: none accepts or starts work while another waits for its requests
        await asyncio.gather(*(server.close() for server in self.servers),
                             return_exceptions=True)
        for path in (self.instance.daemon_socket_path, self.instance.daemon_ro_socket_path):
            path.unlink(missing_ok=True)
        if self.manager is not None:
            await self.manager.detach_all()
        log.info("vmconfine daemon stopped; running guests keep running")


def _quiet_resource_errors() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The event loop's error handler: asyncio reports every failed ``accept`` for lack of
    descriptors with a traceback, as often as it retries; say it once per 10 s instead."""
    last = [0.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            now = time.monotonic()
            if now - last[0] >= 10:
                last[0] = now
                log.warning("accepting a connection failed: %s (open-file limit reached; "
                            "raise LimitNOFILE / ulimit -n)", context.get("exception"))
            return
        loop.default_exception_handler(context)

    return handler


def _lock_pid_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise VmconfineError(f"a vmconfine daemon already serves this instance (pid {other}, "
                             f"pid file {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _detach(log_path: Path) -> int:
    """Fork into the background; the caller's process waits until the sockets listen.
    Returns (in the daemon) the write end of the readiness pipe."""
    r, w = os.pipe()
    if os.fork() > 0:  # the command the admin ran
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok == b"1" else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    os.chdir("/")
    return w


def serve(uri: str | None, *, background: bool = False, pid_file: str | None = None,
          idle_timeout: float = 0, pm: pluggy.PluginManager | None = None) -> int:
    """Run the daemon for ``uri`` until SIGTERM/SIGINT (or idle). ``pm``: a plugin manager
    of the caller's (tests and embedders), else the installed plugins."""
    instance = open_instance(uri)
    instance.ensure_dirs()
    pid_path = Path(pid_file) if pid_file else instance.daemon_pid_path
    ready = None
    if background:
        probe = _lock_pid_file(pid_path)  # fail in the foreground when one already runs
        os.close(probe)
        ready = _detach(instance.log_dir / "vmconfined.log")
    pid_fd = _lock_pid_file(pid_path)
    if not logging.getLogger().handlers:
        logging.basicConfig()
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s vmconfined[%(process)d]: %(levelname)s: %(message)s"))
    try:
        asyncio.run(Daemon(instance, idle_timeout=idle_timeout, pm=pm).run(ready))
    except VmconfineError as exc:
        log.error("%s", exc.message)
        if ready is not None:
            with contextlib.suppress(OSError):
                os.close(ready)
        raise
    finally:
        with contextlib.suppress(OSError):
            pid_path.unlink()
        os.close(pid_fd)
        sys.stdout.flush()
    return 0
