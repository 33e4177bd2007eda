"""Connection URIs and instances: where each instance keeps its config and state.

``qemu:///system`` (root only), ``qemu:///session`` (any user), ``qemu:///embed?root=DIR``
(everything under DIR; privileged when run by root, like libvirt's embedded driver).
``qemu+unix:///...`` is the same as the local form. Remote forms (``qemu+ssh://``,
``qemu+tls://``, and ``qemu://HOST/`` which is TLS, as in libvirt) are parsed into a
:class:`RemoteURI` that the client uses to reach that host's daemon; ``qemu+tcp://`` is refused
(libvirt needs SASL to make it safe). Every path an instance uses is defined here and nowhere
else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qs, urlencode, urlsplit

from vmconfine.config.layout import (
    DAEMON_SOCKETS,
    DOMAIN_DIR,
    EMBED_DIRS,
    LOG_FILE,
    SYSTEM_DIRS,
    default_uri,
    session_run_dir,
    xdg_dir,
)
from vmconfine.config.settings import QemuConfig, load_config
from vmconfine.errors import URIError

if TYPE_CHECKING:
    from vmconfine.config.keys import Setting

REMOTE_TRANSPORTS = ("ssh", "tcp", "tls", "libssh", "libssh2", "ext")
#: URI parameters the client consumes (libvirt's names); the rest go to the remote side
CLIENT_PARAMS = ("keyfile", "no_verify", "socket", "command", "known_hosts", "pkipath",
                 "no_tty", "netcat", "sshauth", "mode", "proxy")
TLS_PORT = 16514


@dataclass(frozen=True)
class RemoteURI:
    """A remote connection: how to reach the host, and the local URI of its instance."""

    uri: str
    transport: str  # ssh | tls
    host: str
    port: int | None
    user: str | None
    remote_uri: str  # e.g. qemu:///system, as the remote side opens it
    params: dict[str, str]

    @property
    def no_verify(self) -> bool:
        return self.params.get("no_verify", "0") not in ("", "0")


@dataclass(frozen=True)
class ParsedURI:
    uri: str
    kind: str  # system | session | embed
    root: Path | None = None


def _split(uri: str) -> SplitResult:
    try:
        return urlsplit(uri)
    except ValueError as exc:  # e.g. "qemu://[/system": Invalid IPv6 URL
        raise URIError(f"malformed connection URI '{uri}': {exc} (e.g. qemu:///system, "
                       "qemu+ssh://host/system or qemu:///embed?root=DIR)") from None


def parse_uri(uri: str) -> ParsedURI:
    """Parse a connection URI; refuse remote and unknown forms with a one-line reason."""
    parts = _split(uri)
    scheme = parts.scheme
    driver, _, transport = scheme.partition("+")
    if driver != "qemu":
        raise URIError(
            f"unsupported connection URI '{uri}': vmconfine drives QEMU only "
            "(use qemu:///system, qemu:///session or qemu:///embed?root=DIR)"
        )
    if parts.netloc or (transport and transport != "unix"):
        if transport and transport not in REMOTE_TRANSPORTS:
            raise URIError(f"unknown transport '{transport}' in URI '{uri}'")
        raise URIError(
            f"'{uri}' is a remote URI: this verb runs on the host itself; remote "
            "connections serve the daemon's verbs (list, dominfo, start, destroy, console, "
            "event...)"
        )
    path = parts.path.rstrip("/") or "/"
    query = parse_qs(parts.query, keep_blank_values=True)
    if path == "/system":
        return ParsedURI(uri, "system")
    if path == "/session":
        return ParsedURI(uri, "session")
    if path == "/embed":
        roots = query.get("root", [])
        if len(roots) != 1 or not roots[0]:
            raise URIError(f"URI '{uri}' needs exactly one root=DIR parameter")
        root = Path(roots[0])
        if not root.is_absolute():
            raise URIError(f"embed root '{roots[0]}' in URI '{uri}' must be an absolute path")
        return ParsedURI(uri, "embed", Path(os.path.normpath(root)))
    raise URIError(
        f"unknown instance path '{parts.path}' in URI '{uri}' "
        "(expected /system, /session or /embed?root=DIR)"
    )


def parse_remote(uri: str) -> RemoteURI | None:
    """A remote URI's parts, or None for a local URI. Refuses what libvirt refuses (or what
    would be unsafe) with a one-line reason."""
    parts = _split(uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu" or not (parts.netloc or transport not in ("", "unix")):
        return None
    if transport == "tcp":
        raise URIError(f"'{uri}': qemu+tcp:// is plain, unauthenticated TCP (libvirt needs "
                       "SASL to make it safe); use qemu+ssh://HOST/system or "
                       "qemu+tls://HOST/system")
    if transport in ("libssh", "libssh2", "ext"):
        raise URIError(f"'{uri}': transport '{transport}' is not supported; use qemu+ssh:// "
                       "(the system's OpenSSH client) or qemu+tls://")
    if transport and transport not in REMOTE_TRANSPORTS:
        raise URIError(f"unknown transport '{transport}' in URI '{uri}'")
    transport = transport or "tls"  # libvirt: a host without a transport means TLS
    try:
        host, port, user = parts.hostname, parts.port, parts.username
    except ValueError as exc:
        raise URIError(f"'{uri}': {exc}") from None
    if not host:
        raise URIError(f"'{uri}' names no host")
    if any(c.isspace() or c in "'\"`$;&|<>" for c in host) or host.startswith("-") or (
            user and (user.startswith("-") or any(c.isspace() for c in user))):
        raise URIError(f"'{uri}': not a valid host or user name")
    query = parse_qs(parts.query, keep_blank_values=True)
    params = {k: v[-1] for k, v in query.items() if k in CLIENT_PARAMS}
    rest = {k: v[-1] for k, v in query.items() if k not in CLIENT_PARAMS}
    local = f"qemu://{parts.path}" + (f"?{urlencode(rest, safe='/')}" if rest else "")
    parse_uri(local)  # the remote side's instance must be a valid local URI
    return RemoteURI(uri, transport, host, port, user, local, params)


def _xdg(var: str, fallback: str) -> Path:
    return Path(xdg_dir(var, fallback))


@dataclass
class Instance:
    """One vmconfine instance: its URI, privilege, config file and state directories."""

    uri: str
    kind: str
    privileged: bool
    config_path: Path
    run_dir: Path
    lib_dir: Path
    cache_dir: Path
    log_dir: Path
    root: Path | None = None
    caller_uid: int = field(default_factory=os.getuid)
    caller_gid: int = field(default_factory=os.getgid)
    _config: QemuConfig | None = field(default=None, repr=False)
    #: the installed drivers' qemu.conf keys, once a plugin host declared them
    _drivers: list[tuple[str, tuple[Setting, ...]]] | None = field(default=None, repr=False)

    # ---- configuration -------------------------------------------------------------------
    @property
    def config(self) -> QemuConfig:
        """qemu.conf, loaded on first use with the keys the installed drivers declared; each
        unknown key is warned about once (with the nearest known key)."""
        if self._config is None:
            path = self.config_path if self.config_path.exists() else None
            self._config = load_config(
                path,
                privileged=self.privileged,
                caller_uid=self.caller_uid,
                caller_gid=self.caller_gid,
                drivers=self._drivers or (),
            )
            if self._drivers is not None:
                self._config.warn_unknown()
        return self._config

    def declare_drivers(self, drivers: list[tuple[str, tuple[Setting, ...]]]) -> None:
        """Make the installed drivers' qemu.conf keys known (the plugin host does this before
        anything reads the configuration; a configuration read earlier gets them too)."""
        self._drivers = list(drivers)
        if self._config is not None:
            for name, settings in self._drivers:
                self._config.declare(name, settings)
            self._config.warn_unknown()

    # ---- per-domain paths (the only place they are spelled) --------------------------------
    def status_path(self, name: str) -> Path:
        """Live status XML of a running domain."""
        return self.run_dir / f"{name}.xml"

    def journal_path(self, name: str) -> Path:
        """Journal of every host change made for the domain (crash-safe teardown)."""
        return self.run_dir / f"{name}.journal"

    def lock_path(self, name: str) -> Path:
        """Held (flock) by the supervising vmconfine process for the domain's lifetime."""
        return self.run_dir / f"{name}.lock"

    def destroy_marker_path(self, name: str) -> Path:
        """Exists while a destroy the admin asked for is under way (not a crash)."""
        return self.run_dir / f"{name}.destroy"

    def domain_run_dir(self, name: str) -> Path:
        """Per-domain runtime directory (monitor sockets, VNC socket); removed at teardown."""
        return self.run_dir / DOMAIN_DIR.format(name=name)

    def monitor_path(self, name: str) -> Path:
        """QMP socket the supervising process uses."""
        return self.domain_run_dir(name) / "monitor.sock"

    def user_monitor_path(self, name: str) -> Path:
        """Second QMP socket for qemu-monitor-command and queries from other processes."""
        return self.domain_run_dir(name) / "monitor-user.sock"

    def qmp_lock_path(self, name: str) -> Path:
        """Serialises users of the second QMP socket; in the root-owned run dir (never in a
        directory QEMU can write)."""
        return self.run_dir / f".{name}.qmp.lock"

    def domain_lib_dir(self, name: str) -> Path:
        """QEMU's HOME (libvirt: /var/lib/libvirt/qemu/domain-N-NAME)."""
        return self.lib_dir / DOMAIN_DIR.format(name=name)

    def channel_dir(self, name: str) -> Path:
        """Where a virtio channel's unix socket without a path is generated (libvirt:
        ``/var/lib/libvirt/qemu/channel/target/domain-N-NAME/``); created ``0700`` for the
        domain's start and removed at teardown: QEMU uses the sockets only through fds.

        A unix socket path holds at most 107 bytes, so, as libvirt's short domain name
        (``N-`` and the first 20 characters), a name longer than 20 characters is cut to 20
        and made unique again with 8 hex digits of its SHA-256."""
        if len(name) > SHORT_NAME:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            name = f"{name[:SHORT_NAME]}-{digest}"
        return self.lib_dir / "channel" / "target" / f"domain-{name}"

    @property
    def nvram_dir(self) -> Path:
        """Where auto-selected firmware's NVRAM files live (libvirt:
        ``/var/lib/libvirt/qemu/nvram``); they outlive the domain's runs."""
        return self.lib_dir / "nvram"

    def log_path(self, name: str) -> Path:
        return self.log_dir / LOG_FILE.format(name=name)

    # ---- the daemon and persistent definitions (libvirt: /etc/libvirt/qemu/NAME.xml) --------
    @property
    def daemon_dir(self) -> Path:
        """Where the instance's daemon keeps its sockets and pid file."""
        return self.run_dir.parent

    @property
    def daemon_socket_path(self) -> Path:
        """The daemon's read-write API socket (libvirt: libvirt-sock)."""
        return self.daemon_dir / DAEMON_SOCKETS[0]

    @property
    def daemon_ro_socket_path(self) -> Path:
        """The daemon's read-only API socket (libvirt: libvirt-sock-ro)."""
        return self.daemon_dir / DAEMON_SOCKETS[1]

    @property
    def daemon_pid_path(self) -> Path:
        return self.daemon_dir / "vmconfined.pid"

    @property
    def daemon_config_path(self) -> Path:
        """The daemon's own settings (libvirt: virtqemud.conf / libvirtd.conf)."""
        return self.config_path.parent / "vmconfined.conf"

    @property
    def definitions_dir(self) -> Path:
        """Persistent domain definitions, one ``NAME.xml`` each."""
        return self.config_path.parent / "qemu"

    @property
    def networks_dir(self) -> Path:
        """Network definitions (libvirt's network XML, ``NAME.xml``) that ``<interface
        type='network'>`` names: ``/etc/vmconfine/qemu/networks`` for the system instance
        (libvirt: ``/etc/libvirt/qemu/networks``), ``ROOT/etc/qemu/networks`` for an embed one."""
        return self.definitions_dir / "networks"

    def definition_path(self, name: str) -> Path:
        return self.definitions_dir / f"{name}.xml"

    def autostart_path(self, name: str) -> Path:
        """A symlink to the definition while the domain is marked autostart."""
        return self.definitions_dir / "autostart" / f"{name}.xml"

    @property
    def instance_lock_path(self) -> Path:
        return self.run_dir / ".instance.lock"

    def ensure_dirs(self) -> None:
        """Create the state directories (0755, owned by the caller)."""
        for d in (self.run_dir, self.lib_dir, self.cache_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)


#: the longest domain name used as is in socket directories (libvirt's short name: 20)
SHORT_NAME = 20


def open_instance(uri: str | None = None) -> Instance:
    """Resolve ``uri`` (default: $VMCONFINE_DEFAULT_URI, else system for root, session
    otherwise) to an :class:`Instance`."""
    parsed = parse_uri(uri or default_uri())
    euid = os.geteuid()
    if parsed.kind == "system":
        if euid != 0:
            raise URIError(
                f"'{parsed.uri}' needs root (you are uid {euid}); use qemu:///session "
                "or qemu:///embed?root=DIR"
            )
        config_path, run_dir, lib_dir, cache_dir, log_dir = (Path(d) for d in SYSTEM_DIRS)
        return Instance(
            uri=parsed.uri,
            kind="system",
            privileged=True,
            config_path=config_path,
            run_dir=run_dir,
            lib_dir=lib_dir,
            cache_dir=cache_dir,
            log_dir=log_dir,
        )
    if parsed.kind == "session":
        config = _xdg("XDG_CONFIG_HOME", ".config") / "vmconfine"
        cache = _xdg("XDG_CACHE_HOME", ".cache") / "vmconfine" / "qemu"
        run_dir = Path(session_run_dir())
        return Instance(
            uri=parsed.uri,
            kind="session",
            privileged=False,
            config_path=config / "qemu.conf",
            run_dir=run_dir,
            lib_dir=_xdg("XDG_DATA_HOME", ".local/share") / "vmconfine" / "qemu",
            cache_dir=cache,
            log_dir=cache / "log",
        )
    root = parsed.root
    assert root is not None
    return Instance(
        uri=parsed.uri,
        kind="embed",
        privileged=euid == 0,
        config_path=root / EMBED_DIRS[0],
        run_dir=root / EMBED_DIRS[1],
        lib_dir=root / EMBED_DIRS[2],
        cache_dir=root / EMBED_DIRS[3],
        log_dir=root / EMBED_DIRS[4],
        root=root,
    )
