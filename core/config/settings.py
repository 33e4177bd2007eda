"""Typed ``qemu.conf`` settings with libvirt's defaults, each remembering where it came from.

:func:`load_config` reads a qemu.conf (virConf syntax, :mod:`vmconfine.config.conf`) into a
:class:`QemuConfig`: one typed field per instance-wide setting (:data:`KNOWN_KEYS`), and one
:class:`~vmconfine.config.keys.DriverSettings` per driver for the keys that driver declared
when it registered (:meth:`QemuConfig.driver_settings`). Types are checked as libvirt's
``virConfGetValue*`` getters check them, with the same messages prefixed by ``FILE:LINE``
(:mod:`vmconfine.config.keys`). Only the first occurrence of a key counts (libvirt's rule).

Core owns only what the whole instance uses: the stack (``security_*``), the account QEMU runs
as (``user``/``group``, which the launch, the emulator probes and the permission checks need,
as libvirt's qemu driver does), owner remembering (shared by every driver that remembers
owners or labels), the process, device, graphics and path settings, and
``shutdown_timeout``. Every driver-specific key (``dynamic_ownership``, ``cgroup_*``,
``apparmor_*``, ``selinux_mode``, ``landlock_mode``, a third-party driver's keys) belongs to
its driver.

Defaults are libvirt's, except:

* ``user`` / ``group`` default to ``vmconfine-qemu`` (the account ``scripts/setup.sh`` creates)
  for a privileged instance, and to the caller's ``+UID`` / ``+GID`` for an unprivileged one;
* ``swtpm_user`` / ``swtpm_group`` default to ``tss`` (privileged) or the caller's ids;
* the keys vmconfine adds (documented on the fields below).

Unprivileged instances also get ``remember_owner = 0`` (and the DAC driver
``dynamic_ownership = 0``, the namespaces driver no ``namespaces``), as in libvirt's session
daemon.

Settings libvirt knows but vmconfine does not use (VNC TLS, SPICE, migration ports, ...) are
type-checked like libvirt would and otherwise ignored. An unknown setting (no core key, no key of
an installed driver) is kept with its location and warned about, with the nearest known key
(``did you mean security_driver?``); :meth:`QemuConfig.check` lists both. A missing file
means all defaults (libvirt's rule); a file that exists but cannot be read is an error
(libvirt would silently use defaults, which could drop settings such as
``security_require_confined``).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmconfine.config.conf import ConfEntry, ConfFile, format_value, parse_conf, read_conf_file
from vmconfine.config.keys import (
    UINT_MAX,
    DriverSettings,
    Setting,
    Spec,
    absolute,
    apply,
    enum,
    error,
    pattern,
    positive,
    typed,
)
from vmconfine.errors import ConfigError

log = logging.getLogger(__name__)

#: Account QEMU runs as in a privileged instance unless qemu.conf says otherwise.
SYSTEM_ACCOUNT = "vmconfine-qemu"

#: A driver's name and the keys it declared (``DriverRegistry.settings()``).
Declarations = Iterable[tuple[str, Iterable[Setting]]]



@dataclass
class QemuConfig:
    """Effective qemu.conf settings. Field defaults are those of a privileged instance."""

    # -- security drivers (libvirt) ---------------------------------------------------------
    security_driver: list[str] | None = None  #: None = autodetect (the drivers' own order)
    security_default_confined: bool = True
    security_require_confined: bool = False
    # -- the account QEMU runs as, owner remembering (libvirt) -------------------------------
    user: str = SYSTEM_ACCOUNT  #: a user name or "+UID"
    group: str = SYSTEM_ACCOUNT  #: a group name or "+GID"
    remember_owner: bool = True
    # -- process (libvirt) ------------------------------------------------------------------
    clear_emulator_capabilities: bool = True
    seccomp_sandbox: int = -1  #: -1 = QEMU's default, 0 = off, 1 = on
    set_process_name: bool = False
    max_processes: int = 0  #: 0 = leave the limit alone
    max_files: int = 0
    max_threads_per_process: int = 0
    max_core: int | str = "unlimited"  #: bytes, or "unlimited"
    dump_guest_core: bool = False
    stdio_handler: str = "logd"  #: "logd" or "file"
    sched_core: str = "none"  #: "none", "vcpus", "emulator" or "full"
    # -- devices (libvirt) ------------------------------------------------------------------
    relaxed_acs_check: bool = False
    mac_filter: bool = False
    allow_disk_format_probing: bool = False  #: 1 is refused, as in libvirt
    lock_manager: str | None = None  #: None = no disk locking
    swtpm_user: str = "tss"
    swtpm_group: str = "tss"
    shared_filesystems: list[str] = field(default_factory=list)
    # -- graphics / audio (libvirt) ---------------------------------------------------------
    vnc_listen: str = "127.0.0.1"
    vnc_auto_unix_socket: bool = False
    vnc_allow_host_audio: bool = False
    nographics_allow_host_audio: bool = False
    spice_listen: str = "127.0.0.1"
    spice_auto_unix_socket: bool = False
    spice_tls: bool = False
    spice_tls_x509_cert_dir: str = "/etc/pki/qemu"
    spice_password: str | None = None
    spice_sasl: bool = False  #: SASL is not implemented: 1 refuses SPICE domains
    remote_display_port_min: int = 5900  #: SPICE ports are allocated from this range
    remote_display_port_max: int = 65535
    # -- helpers and paths (libvirt) --------------------------------------------------------
    memory_backing_dir: str | None = None  #: None = the instance's default
    hugetlbfs_mount: list[str] | None = None  #: None = autodetect
    bridge_helper: str = "qemu-bridge-helper"
    pr_helper: str = "qemu-pr-helper"
    slirp_helper: str = "slirp-helper"
    dbus_daemon: str = "dbus-daemon"
    # -- vmconfine's own settings -----------------------------------------------------------
    #: Directories searched for qemu-system-* when the domain XML has no <emulator>.
    emulator_search_path: list[str] = field(
        default_factory=lambda: ["/usr/bin", "/usr/local/bin"]
    )
    #: XATTR name prefix for remembered owners/labels (libvirt: trusted.libvirt.security).
    remember_owner_xattr_prefix: str = "trusted.vmconfine.security"
    #: Seconds a guest gets to power off before QEMU is killed.
    shutdown_timeout: int = 30
    #: Domain XML elements and attributes vmconfine does not implement: "warn" = one warning
    #: line each and the guest runs without them; "error" = refuse the domain.
    unsupported_xml: str = "warn"

    # -- bookkeeping (not settings) ---------------------------------------------------------
    path: str | None = field(default=None, compare=False)
    privileged: bool = field(default=True, compare=False)
    unknown: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    ignored: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _notes: list[tuple[int, str]] = field(default_factory=list, compare=False, repr=False)
    #: driver name -> its declared keys' values, in declaration order
    _drivers: dict[str, DriverSettings] = field(default_factory=dict, compare=False,
                                                repr=False)
    #: keys no one declared yet: name -> (raw value, FILE:LINE, line)
    _raw: dict[str, tuple[Any, str, int]] = field(default_factory=dict, compare=False,
                                                  repr=False)
    _warned: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def defaults(cls, *, privileged: bool, caller_uid: int, caller_gid: int,
                 drivers: Declarations = ()) -> QemuConfig:
        """All-default settings for a privileged (system) or unprivileged (session) instance,
        with the keys ``drivers`` declare."""
        cfg = cls(privileged=privileged)
        if not privileged:
            cfg.user = cfg.swtpm_user = f"+{caller_uid}"
            cfg.group = cfg.swtpm_group = f"+{caller_gid}"
            cfg.remember_owner = False
        for name, settings in drivers:
            cfg.declare(name, settings)
        return cfg

    # -- driver keys ------------------------------------------------------------------------
    def declare(self, driver: str, settings: Iterable[Setting]) -> None:
        """Add ``driver``'s keys (idempotent): defaults first, then the values this file set,
        type-checked (a bad value raises ``FILE:LINE: ...``)."""
        if driver in self._drivers:
            return
        values = DriverSettings(driver, settings, self.privileged)
        for key in values:
            if key in _SPECS or self.owner(key) is not None:
                raise ConfigError(
                    f"driver '{driver}' declares qemu.conf key '{key}', which "
                    f"{self.owner(key) or 'core'} already owns; rename the driver's key")
        for key, spec in values.specs.items():
            raw = self._raw.get(key)
            if raw is None:
                continue
            value, where, line = raw
            values.set(key, apply(spec, key, value, where, self.privileged), where)
            del self._raw[key]
            self.unknown.pop(key, None)
            if key in self.ignored:
                self.ignored.pop(key)
                self._notes = [n for n in self._notes if n[0] != line]
            if spec.privileged_only and not self.privileged:
                self._notes.append((line, f"{where}: '{key}' has no effect in an unprivileged "
                                          "instance (QEMU runs as the caller, without DAC "
                                          "relabelling)"))
        self._drivers[driver] = values

    def driver_settings(self, driver: str) -> DriverSettings:
        """The typed values of the keys ``driver`` declared (empty when it declared none)."""
        found = self._drivers.get(driver)
        if found is None:  # not declared (yet): no keys
            return DriverSettings(driver, (), self.privileged)
        return found

    def owner(self, key: str) -> str | None:
        """The driver that declared ``key``, or None (a core key, or nobody's)."""
        for name, values in self._drivers.items():
            if key in values:
                return name
        return None

    # -- reading ----------------------------------------------------------------------------
    def source(self, key: str) -> str:
        """``"default"`` or ``"FILE:LINE"`` of the statement that set ``key``."""
        owner = self.owner(key)
        if owner is not None:
            return self._drivers[owner].source(key)
        if key not in _SPECS:
            raise KeyError(f"unknown qemu.conf setting {key!r}")
        return self._sources.get(key, "default")

    def known_keys(self) -> list[str]:
        """Core keys, then each driver's keys, in :meth:`format` order."""
        return [*KNOWN_KEYS, *(k for values in self._drivers.values() for k in values)]

    def values(self) -> dict[str, Any]:
        """The settings (core and every driver's) as a ``{key: value}`` dict."""
        out = {key: getattr(self, key) for key in KNOWN_KEYS}
        for values in self._drivers.values():
            out.update(values.values())
        return out

    def check(self) -> list[str]:
        """Problems that do not stop vmconfine: unknown, unused and repeated settings, in file
        order."""
        notes = list(self._notes)
        notes.extend((line, f"{where}: {_unknown_text(key, self._candidates())}")
                     for key, (_v, where, line) in self._raw.items() if key in self.unknown)
        return [text for _line, text in sorted(notes, key=lambda n: n[0])]

    def warn_unknown(self) -> None:
        """Log one warning per unknown key (once per loaded configuration)."""
        if self._warned:
            return
        self._warned = True
        candidates = self._candidates()
        for key, where in self.unknown.items():
            log.warning("%s: %s", _one_line(where), _unknown_text(key, candidates))

    def _candidates(self) -> list[str]:
        return [*self.known_keys(), *LIBVIRT_UNUSED_KEYS]

    def format(self, unset: Mapping[str, str] | None = None) -> str:
        """The effective settings as a valid qemu.conf, each line saying where it came from;
        ``unset`` words what an unset key means where the caller knows better (the installed
        drivers' autodetection order)."""
        kind = "privileged" if self.privileged else "unprivileged"
        origin = f"read from {self.path}" if self.path else "no configuration file was read"
        out = [f"# vmconfine settings in effect ({kind} instance; {origin})\n"]
        out.extend(_format_key(key, getattr(self, key), _SPECS[key], self.source(key),
                               (unset or {}).get(key))
                   for key in KNOWN_KEYS)
        for driver, values in self._drivers.items():
            if not values.specs:
                continue
            out.append(f"# -- keys of the '{driver}' driver --\n")
            for key, spec in values.specs.items():
                out.append(f"## {_one_line(spec.doc)}\n")
                out.append(_format_key(key, values[key], spec, values.source(key)))
        for title, table in (("libvirt settings vmconfine does not use", self.ignored),
                             ("unknown settings", self.unknown)):
            if table:
                out.append(f"# {title}:\n")
                out.extend(f"#{name} # {_one_line(where)}\n" for name, where in table.items())
        return "".join(out)


#: keys whose value ``vmconfine config`` never prints
SECRET_KEYS = frozenset({"spice_password"})


def _format_key(key: str, value: Any, spec: Spec, where: str, unset: str | None = None) -> str:
    if value is not None and key in SECRET_KEYS:
        return f"#{key} = (set, not shown) # {_one_line(where)}\n"
    if value is None:
        return f"#{key} = ({unset or spec.unset}) # {_one_line(where)}\n"
    return f"{key} = {format_value(value)} # {_one_line(where)}\n"


def _unknown_text(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = (f"did you mean {close[0]}?" if close else
            "check the spelling; 'vmconfine config' lists the known settings")
    return f"unknown setting '{key}' is ignored ({hint})"


# -- key specifications -------------------------------------------------------------------

def _account(key: str, value: Any, where: str, privileged: bool) -> Any:
    if value == "":
        raise error(where, f"'{key}' is empty (give a name, or +ID for a numeric id)")
    if value.startswith("+") and not (value[1:].isascii() and value[1:].isdigit()):
        raise error(where, f"'{key}' value '{value}' is not +ID with a decimal id (e.g. +107)")
    if value.startswith("+") and int(value[1:]) > UINT_MAX - 1:
        raise error(where, f"'{key}' id {value} is out of range")
    return value


def _security_driver(key: str, value: Any, where: str, privileged: bool) -> Any:
    for i, name in enumerate(value):
        if name in value[i + 1 :]:
            raise error(where, f"Duplicate security driver {name} (list each driver once)")
    if "none" in value and len(value) > 1:
        raise error(where, '"none" cannot appear in a list of drivers (write '
                           'security_driver = "none" on its own)')
    return value or None  # an empty list means autodetect, as in libvirt


def _display_port(key: str, value: Any, where: str, privileged: bool) -> Any:
    """libvirt's range of display ports: [5900, 65535]."""
    if value < 5900:
        raise error(where, f"{key}: port must be greater than or equal to 5900")
    if value > 65535:
        raise error(where, f"{key}: port must be less than or equal to 65535")
    return value


def _no_probing(key: str, value: Any, where: str, privileged: bool) -> Any:
    if value:
        raise error(where, "allow_disk_format_probing is no longer supported (remove it and "
                           "give each disk's format in the domain XML)")
    return value


_SPECS: dict[str, Spec] = {
    "security_driver": Spec("strlist_compat", _security_driver,
                            "autodetect"),
    "security_default_confined": Spec("bool"),
    "security_require_confined": Spec("bool"),
    "user": Spec("string", _account),
    "group": Spec("string", _account),
    "remember_owner": Spec("bool"),
    "clear_emulator_capabilities": Spec("bool"),
    "seccomp_sandbox": Spec("int"),
    "set_process_name": Spec("bool"),
    "max_processes": Spec("uint"),
    "max_files": Spec("uint"),
    "max_threads_per_process": Spec("uint"),
    "max_core": Spec("max_core"),
    "dump_guest_core": Spec("bool"),
    "stdio_handler": Spec("string", enum("logd", "file",
                                         message="Unknown stdio handler {value}")),
    "sched_core": Spec("string", enum("none", "vcpus", "emulator", "full",
                                      message="Unknown sched_core value {value}")),
    "relaxed_acs_check": Spec("bool"),
    "mac_filter": Spec("bool"),
    "allow_disk_format_probing": Spec("bool", _no_probing),
    "lock_manager": Spec("string", None, "no disk locking"),
    "swtpm_user": Spec("string", _account),
    "swtpm_group": Spec("string", _account),
    "shared_filesystems": Spec("strlist", absolute),
    "vnc_listen": Spec("string"),
    "vnc_auto_unix_socket": Spec("bool"),
    "vnc_allow_host_audio": Spec("bool"),
    "nographics_allow_host_audio": Spec("bool"),
    "spice_listen": Spec("string"),
    "spice_auto_unix_socket": Spec("bool"),
    "spice_tls": Spec("bool"),
    "spice_tls_x509_cert_dir": Spec("string", absolute),
    "spice_password": Spec("string", None, "no password"),
    "spice_sasl": Spec("bool"),
    "remote_display_port_min": Spec("uint", _display_port),
    "remote_display_port_max": Spec("uint", _display_port),
    "memory_backing_dir": Spec("string", absolute, "instance default"),
    "hugetlbfs_mount": Spec("strlist_compat", absolute, "autodetect"),
    "bridge_helper": Spec("string"),
    "pr_helper": Spec("string"),
    "slirp_helper": Spec("string"),
    "dbus_daemon": Spec("string"),
    "emulator_search_path": Spec("strlist", absolute),
    "remember_owner_xattr_prefix": Spec(
        "string", pattern(r"(trusted|security|user)\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                          "trusted.vmconfine.security")),
    "shutdown_timeout": Spec("uint", positive),
    "unsupported_xml": Spec("string", enum("warn", "error")),
}

#: Every instance-wide setting, in the order :meth:`QemuConfig.format` writes them.
KNOWN_KEYS: tuple[str, ...] = tuple(_SPECS)

_BOOL = ("vnc_tls", "vnc_tls_x509_verify", "vnc_sasl", "chardev_tls",
         "chardev_tls_x509_verify", "vxhs_tls",
         "nbd_tls", "migrate_tls_force", "migrate_tls_x509_verify", "backup_tls_x509_verify",
         "default_tls_x509_verify", "auto_dump_bypass_cache", "auto_start_bypass_cache",
         "log_timestamp", "virtiofsd_debug", "storage_use_nbdkit")
_STRING = ("vnc_tls_x509_cert_dir", "vnc_tls_x509_secret_uuid", "vnc_password",
           "vnc_sasl_dir", "spice_sasl_dir", "chardev_tls_x509_cert_dir",
           "chardev_tls_x509_secret_uuid",
           "vxhs_tls_x509_cert_dir", "vxhs_tls_x509_secret_uuid", "nbd_tls_x509_cert_dir",
           "nbd_tls_x509_secret_uuid", "migrate_tls_x509_cert_dir",
           "migrate_tls_x509_secret_uuid", "backup_tls_x509_cert_dir",
           "backup_tls_x509_secret_uuid", "default_tls_x509_cert_dir",
           "default_tls_x509_secret_uuid", "save_image_format", "dump_image_format",
           "snapshot_image_format", "auto_dump_path", "migration_host", "migration_address",
           "deprecation_behavior")
_UINT = ("remote_websocket_port_min",
         "remote_websocket_port_max", "migration_port_min", "migration_port_max",
         "max_queued", "keepalive_count", "gluster_debug_level")

#: libvirt qemu.conf settings vmconfine accepts (type-checked) but does not use.
LIBVIRT_UNUSED_KEYS: dict[str, str] = {
    **dict.fromkeys(_BOOL, "bool"), **dict.fromkeys(_STRING, "string"),
    **dict.fromkeys(_UINT, "uint"), "keepalive_interval": "int",
    "nvram": "strlist", "capability_filters": "strlist",
}

#: Settings that only matter when QEMU runs under another account (privileged instances).
_PRIVILEGED_ONLY = ("user", "group", "remember_owner")

#: sort position of a note about a key left at its default: after every line's notes
_END = 2**62


def _one_line(text: str) -> str:
    return text.replace("\r", "?").replace("\n", "?")


# -- loading --------------------------------------------------------------------------------

def config_from_conf(conf: ConfFile, *, privileged: bool, caller_uid: int,
                     caller_gid: int, drivers: Declarations = ()) -> QemuConfig:
    """Type-check a parsed qemu.conf and apply it over the instance's defaults, with the keys
    ``drivers`` declare (more can be declared later with :meth:`QemuConfig.declare`)."""
    cfg = QemuConfig.defaults(privileged=privileged, caller_uid=caller_uid,
                              caller_gid=caller_gid)
    cfg.path = conf.filename
    first: dict[str, ConfEntry] = {}
    lines: dict[str, int] = {}
    for entry in conf.entries:
        where, name = conf.where(entry), entry.name
        if name in first:
            cfg._notes.append((entry.line, f"{where}: '{name}' is set again and this line is "
                                           f"ignored; the first setting at "
                                           f"{conf.where(first[name])} wins"))
            continue
        first[name] = entry
        if name in _SPECS:
            setattr(cfg, name, apply(_SPECS[name], name, entry.value, where, privileged))
            cfg._sources[name] = where
            lines[name] = entry.line
            if name in _PRIVILEGED_ONLY and not privileged:
                cfg._notes.append((entry.line, f"{where}: '{name}' has no effect in an "
                                               "unprivileged instance (QEMU runs as the "
                                               "caller, without DAC relabelling)"))
            if name == "lock_manager":
                cfg._notes.append((entry.line, f"{where}: lock_manager is not implemented by "
                                               "vmconfine; disks are not locked"))
            continue
        cfg._raw[name] = (entry.value, where, entry.line)
        if name in LIBVIRT_UNUSED_KEYS:
            typed(LIBVIRT_UNUSED_KEYS[name], name, entry.value, where)
            cfg.ignored[name] = where
            cfg._notes.append((entry.line, f"{where}: '{name}' is a libvirt setting vmconfine "
                                           "does not use; it has no effect"))
        else:
            cfg.unknown[name] = where
    _note_high_privileges(cfg, lines)
    for driver, settings in drivers:
        cfg.declare(driver, settings)
    return cfg


def _note_high_privileges(cfg: QemuConfig, lines: dict[str, int]) -> None:
    """Note the settings libvirt taints as "high-privileges" (QEMU keeps root powers)."""
    if not cfg.privileged:
        return
    for key in ("user", "group"):
        if getattr(cfg, key) in ("root", "+0"):
            cfg._notes.append((lines.get(key, _END),
                               f"{cfg.source(key)}: '{key}' is root, so QEMU runs with root "
                               "privileges and DAC confinement is lost; use an unprivileged "
                               "account"))
    if not cfg.clear_emulator_capabilities:
        cfg._notes.append((lines.get("clear_emulator_capabilities", _END),
                           f"{cfg.source('clear_emulator_capabilities')}: "
                           "clear_emulator_capabilities = 0 lets QEMU keep its capabilities; "
                           "set it to 1 unless a device really needs them"))


def config_from_text(text: str, filename: str = "memory conf", *, privileged: bool,
                     caller_uid: int, caller_gid: int,
                     drivers: Declarations = ()) -> QemuConfig:
    """Parse qemu.conf text and apply it (see :func:`config_from_conf`)."""
    return config_from_conf(parse_conf(text, filename), privileged=privileged,
                            caller_uid=caller_uid, caller_gid=caller_gid, drivers=drivers)


def load_config(path: Path | None, *, privileged: bool, caller_uid: int,
                caller_gid: int, drivers: Declarations = (),
                missing_ok: bool = True) -> QemuConfig:
    """Load qemu.conf from ``path``; None or a missing file gives all defaults (unless
    ``missing_ok`` is off: then a missing file is an error).

    Raises ConfigError (``FILE:LINE: message``) for syntax errors, bad values and files that
    exist but cannot be read.
    """
    if path is None:
        return QemuConfig.defaults(privileged=privileged, caller_uid=caller_uid,
                                   caller_gid=caller_gid, drivers=drivers)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return QemuConfig.defaults(privileged=privileged, caller_uid=caller_uid,
                                       caller_gid=caller_gid, drivers=drivers)
    except OSError:
        pass  # read_conf_file reports it
    return config_from_conf(read_conf_file(path), privileged=privileged,
                            caller_uid=caller_uid, caller_gid=caller_gid, drivers=drivers)


assert set(KNOWN_KEYS) == {f.name for f in fields(QemuConfig) if f.init and f.compare}
