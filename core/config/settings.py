"""Typed ``qemu.conf`` settings with libvirt's defaults, each remembering where it came from.

:func:`load_config` reads a qemu.conf (virConf syntax, :mod:`vmconfine.config.conf`) into a
:class:`QemuConfig`: one typed field per setting vmconfine knows (:data:`KNOWN_KEYS`). Types
are checked as libvirt's ``virConfGetValue*`` getters check them, with the same messages
prefixed by ``FILE:LINE``. Only the first occurrence of a key counts (libvirt's rule).

Defaults are libvirt's, except:

* ``user`` / ``group`` default to ``vmconfine-qemu`` (the account ``scripts/setup.sh`` creates)
  for a privileged instance, and to the caller's ``+UID`` / ``+GID`` for an unprivileged one;
* ``swtpm_user`` / ``swtpm_group`` default to ``tss`` (privileged) or the caller's ids;
* the keys vmconfine adds (documented on the fields below).

Unprivileged instances also get ``dynamic_ownership = 0``, ``remember_owner = 0`` and no
namespaces by default, as in libvirt's session daemon (where libvirt refuses namespaces,
vmconfine makes them in a user namespace when configured).

Settings libvirt knows but vmconfine does not use (VNC TLS, SPICE, migration ports, ...) are
type-checked like libvirt would and otherwise ignored; unknown settings are accepted. Both are
reported by :meth:`QemuConfig.check`. A missing file means all defaults (libvirt's rule); a
file that exists but cannot be read is an error (libvirt would silently use defaults, which
could drop settings such as ``security_require_confined``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmconfine.config.conf import ConfEntry, ConfFile, format_value, parse_conf, read_conf_file
from vmconfine.errors import ConfigError

#: Account QEMU runs as in a privileged instance unless qemu.conf says otherwise.
SYSTEM_ACCOUNT = "vmconfine-qemu"

#: libvirt's cgroup controller names (``virCgroupController``).
CGROUP_CONTROLLERS = (
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "net_cls",
    "perf_event", "name=systemd", "pids",
)

#: The namespaces ``namespaces`` may list: libvirt's "mount" and vmconfine's "root".
NAMESPACES = ("mount", "root")

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
UINT_MAX = 2**32 - 1
ULLONG_MAX = 2**64 - 1


@dataclass
class QemuConfig:
    """Effective qemu.conf settings. Field defaults are those of a privileged instance."""

    # -- security drivers (libvirt) ---------------------------------------------------------
    security_driver: list[str] | None = None  #: None = autodetect: selinux, apparmor, none
    security_default_confined: bool = True
    security_require_confined: bool = False
    # -- DAC (libvirt) ----------------------------------------------------------------------
    user: str = SYSTEM_ACCOUNT  #: a user name or "+UID"
    group: str = SYSTEM_ACCOUNT  #: a group name or "+GID"
    dynamic_ownership: bool = True
    remember_owner: bool = True
    # -- cgroups (libvirt) ------------------------------------------------------------------
    cgroup_controllers: list[str] | None = None  #: None = autodetect
    cgroup_device_acl: list[str] | None = None  #: None = the cgroups plugin's built-in list
    # -- process (libvirt) ------------------------------------------------------------------
    clear_emulator_capabilities: bool = True
    seccomp_sandbox: int = -1  #: -1 = QEMU's default, 0 = off, 1 = on
    #: "mount" = private /dev (libvirt); "root" (with "mount") = a per-domain root view
    namespaces: list[str] = field(default_factory=lambda: ["mount"])
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
    # -- helpers and paths (libvirt) --------------------------------------------------------
    memory_backing_dir: str | None = None  #: None = the instance's default
    hugetlbfs_mount: list[str] | None = None  #: None = autodetect
    bridge_helper: str = "qemu-bridge-helper"
    pr_helper: str = "qemu-pr-helper"
    slirp_helper: str = "slirp-helper"
    dbus_daemon: str = "dbus-daemon"
    # -- vmconfine's own settings -----------------------------------------------------------
    #: Device paths allowed in addition to cgroup_device_acl (or to the built-in list).
    cgroup_device_acl_extra: list[str] = field(default_factory=list)
    #: cgroup partition for domains whose XML has no <resource><partition> (libvirt's default).
    cgroup_partition: str = "/machine"
    #: Device filter backend: "auto" (cgroup v2 BPF when available, else v1), "v1" or "v2".
    cgroup_devices_backend: str = "auto"
    #: Directories searched for qemu-system-* when the domain XML has no <emulator>.
    emulator_search_path: list[str] = field(
        default_factory=lambda: ["/usr/bin", "/usr/local/bin"]
    )
    #: Where vmconfine-aa-helper writes per-domain AppArmor profiles.
    apparmor_profile_dir: str = "/etc/apparmor.d/vmconfine"
    #: Prefix of per-domain AppArmor profile names (libvirt uses "libvirt-").
    apparmor_profile_prefix: str = "vmconfine-"
    #: "svirt" = per-domain MCS categories; "basic" = one shared label, no categories.
    selinux_mode: str = "svirt"
    #: XATTR name prefix for remembered owners/labels (libvirt: trusted.libvirt.security).
    remember_owner_xattr_prefix: str = "trusted.vmconfine.security"
    #: Seconds a guest gets to power off before QEMU is killed.
    shutdown_timeout: int = 30
    #: Landlock on a kernel whose ABI lacks rights vmconfine uses: "best-effort" = apply what
    #: it offers; "enforce" = refuse. A kernel without Landlock is refused in both modes.
    landlock_mode: str = "best-effort"
    #: Domain XML elements and attributes vmconfine does not implement: "warn" = one warning
    #: line each and the guest runs without them; "error" = refuse the domain.
    unsupported_xml: str = "warn"

    # -- bookkeeping (not settings) ---------------------------------------------------------
    path: str | None = field(default=None, compare=False)
    privileged: bool = field(default=True, compare=False)
    unknown: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    ignored: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _notes: list[str] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def defaults(cls, *, privileged: bool, caller_uid: int, caller_gid: int) -> QemuConfig:
        """All-default settings for a privileged (system) or unprivileged (session) instance."""
        cfg = cls(privileged=privileged)
        if not privileged:
            cfg.user = cfg.swtpm_user = f"+{caller_uid}"
            cfg.group = cfg.swtpm_group = f"+{caller_gid}"
            cfg.dynamic_ownership = False
            cfg.remember_owner = False
            cfg.namespaces = []
        return cfg

    def source(self, key: str) -> str:
        """``"default"`` or ``"FILE:LINE"`` of the statement that set ``key``."""
        if key not in _SPECS:
            raise KeyError(f"unknown qemu.conf setting {key!r}")
        return self._sources.get(key, "default")

    def values(self) -> dict[str, Any]:
        """The settings as a ``{key: value}`` dict in :data:`KNOWN_KEYS` order."""
        return {key: getattr(self, key) for key in KNOWN_KEYS}

    def check(self) -> list[str]:
        """Problems that do not stop vmconfine: unknown, unused and repeated settings."""
        return list(self._notes)

    def format(self) -> str:
        """The effective settings as a valid qemu.conf, each line saying where it came from."""
        kind = "privileged" if self.privileged else "unprivileged"
        origin = f"read from {self.path}" if self.path else "no configuration file was read"
        out = [f"# vmconfine settings in effect ({kind} instance; {origin})\n"]
        for key in KNOWN_KEYS:
            value = getattr(self, key)
            where = _one_line(self.source(key))
            if value is None:
                out.append(f"#{key} = ({_SPECS[key].unset}) # {where}\n")
            else:
                out.append(f"{key} = {format_value(value)} # {where}\n")
        for title, table in (("libvirt settings vmconfine does not use", self.ignored),
                             ("unknown settings", self.unknown)):
            if table:
                out.append(f"# {title}:\n")
                out.extend(f"#{name} # {_one_line(where)}\n" for name, where in table.items())
        return "".join(out)


# -- key specifications -------------------------------------------------------------------

Check = Callable[[str, Any, str, bool], Any]


@dataclass(frozen=True)
class _Spec:
    """How one key is typed: ``kind`` picks the libvirt getter; ``check`` validates further."""

    kind: str
    check: Check | None = None
    unset: str = ""  #: meaning of None, for format()


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _enum(*choices: str, message: str = "unknown {key} value '{value}'") -> Check:
    def check(key: str, value: Any, where: str, privileged: bool) -> Any:
        if value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            text = message.format(key=key, value=value)
            raise _err(where, f"{text} (use one of {allowed})")
        return value

    return check


def _absolute(key: str, value: Any, where: str, privileged: bool) -> Any:
    for path in value if isinstance(value, list) else [value]:
        if not path.startswith("/"):
            raise _err(where, f"'{path}' in '{key}' is not an absolute path (start it with '/')")
    return value


def _account(key: str, value: Any, where: str, privileged: bool) -> Any:
    if value == "":
        raise _err(where, f"'{key}' is empty (give a name, or +ID for a numeric id)")
    if value.startswith("+") and not (value[1:].isascii() and value[1:].isdigit()):
        raise _err(where, f"'{key}' value '{value}' is not +ID with a decimal id (e.g. +107)")
    if value.startswith("+") and int(value[1:]) > UINT_MAX - 1:
        raise _err(where, f"'{key}' id {value} is out of range")
    return value


def _security_driver(key: str, value: Any, where: str, privileged: bool) -> Any:
    for i, name in enumerate(value):
        if name in value[i + 1 :]:
            raise _err(where, f"Duplicate security driver {name} (list each driver once)")
    if "dac" in value:
        raise _err(where, 'security_driver cannot contain "dac" (the DAC driver is added '
                          "automatically for privileged instances; remove it)")
    if "none" in value and len(value) > 1:
        raise _err(where, '"none" cannot appear in a list of drivers (write '
                          'security_driver = "none" on its own)')
    return value or None  # an empty list means autodetect, as in libvirt


def _controllers(key: str, value: Any, where: str, privileged: bool) -> Any:
    for name in value:
        if name not in CGROUP_CONTROLLERS:
            raise _err(where, f"Unknown cgroup controller '{name}' (known: "
                              f"{', '.join(CGROUP_CONTROLLERS)})")
    return value


def _namespaces(key: str, value: Any, where: str, privileged: bool) -> Any:
    """libvirt knows "mount"; vmconfine adds "root" (a per-domain filesystem view, see
    docs/namespaces.md), which needs "mount". Unprivileged instances may use both: the
    namespaces driver makes them in a user namespace."""
    for name in value:
        if name not in NAMESPACES:
            raise _err(where, f'Unknown namespace: {name} (known: "mount", "root")')
    if "root" in value and "mount" not in value:
        raise _err(where, 'the "root" namespace view needs "mount" (write namespaces = '
                          '[ "mount", "root" ])')
    return list(dict.fromkeys(value))


def _no_probing(key: str, value: Any, where: str, privileged: bool) -> Any:
    if value:
        raise _err(where, "allow_disk_format_probing is no longer supported (remove it and "
                          "give each disk's format in the domain XML)")
    return value


def _partition(key: str, value: Any, where: str, privileged: bool) -> Any:
    if not value.startswith("/"):
        raise _err(where, f"Resource partition '{value}' must start with '/'")
    if ".." in value.split("/"):
        raise _err(where, f"Resource partition '{value}' must not contain '..'")
    return value


def _pattern(regex: str, example: str) -> Check:
    compiled = re.compile(regex)

    def check(key: str, value: Any, where: str, privileged: bool) -> Any:
        if not compiled.fullmatch(value):
            raise _err(where, f"'{key}' value '{value}' is not valid (expected something like "
                              f"'{example}')")
        return value

    return check


def _positive(key: str, value: Any, where: str, privileged: bool) -> Any:
    if value < 1:
        raise _err(where, f"value for '{key}' parameter must be at least 1")
    return value


_SPECS: dict[str, _Spec] = {
    "security_driver": _Spec("strlist_compat", _security_driver,
                             "autodetect: selinux, apparmor, none"),
    "security_default_confined": _Spec("bool"),
    "security_require_confined": _Spec("bool"),
    "user": _Spec("string", _account),
    "group": _Spec("string", _account),
    "dynamic_ownership": _Spec("bool"),
    "remember_owner": _Spec("bool"),
    "cgroup_controllers": _Spec("strlist", _controllers, "autodetect"),
    "cgroup_device_acl": _Spec("strlist", _absolute, "built-in device list"),
    "clear_emulator_capabilities": _Spec("bool"),
    "seccomp_sandbox": _Spec("int"),
    "namespaces": _Spec("strlist", _namespaces),
    "set_process_name": _Spec("bool"),
    "max_processes": _Spec("uint"),
    "max_files": _Spec("uint"),
    "max_threads_per_process": _Spec("uint"),
    "max_core": _Spec("max_core"),
    "dump_guest_core": _Spec("bool"),
    "stdio_handler": _Spec("string", _enum("logd", "file",
                                           message="Unknown stdio handler {value}")),
    "sched_core": _Spec("string", _enum("none", "vcpus", "emulator", "full",
                                        message="Unknown sched_core value {value}")),
    "relaxed_acs_check": _Spec("bool"),
    "mac_filter": _Spec("bool"),
    "allow_disk_format_probing": _Spec("bool", _no_probing),
    "lock_manager": _Spec("string", None, "no disk locking"),
    "swtpm_user": _Spec("string", _account),
    "swtpm_group": _Spec("string", _account),
    "shared_filesystems": _Spec("strlist", _absolute),
    "vnc_listen": _Spec("string"),
    "vnc_auto_unix_socket": _Spec("bool"),
    "vnc_allow_host_audio": _Spec("bool"),
    "nographics_allow_host_audio": _Spec("bool"),
    "memory_backing_dir": _Spec("string", _absolute, "instance default"),
    "hugetlbfs_mount": _Spec("strlist_compat", _absolute, "autodetect"),
    "bridge_helper": _Spec("string"),
    "pr_helper": _Spec("string"),
    "slirp_helper": _Spec("string"),
    "dbus_daemon": _Spec("string"),
    "cgroup_device_acl_extra": _Spec("strlist", _absolute),
    "cgroup_partition": _Spec("string", _partition),
    "cgroup_devices_backend": _Spec("string", _enum("auto", "v1", "v2")),
    "emulator_search_path": _Spec("strlist", _absolute),
    "apparmor_profile_dir": _Spec("string", _absolute),
    "apparmor_profile_prefix": _Spec("string", _pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]*",
                                                        "vmconfine-")),
    "selinux_mode": _Spec("string", _enum("svirt", "basic")),
    "remember_owner_xattr_prefix": _Spec(
        "string", _pattern(r"(trusted|security|user)\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                           "trusted.vmconfine.security")),
    "shutdown_timeout": _Spec("uint", _positive),
    "landlock_mode": _Spec("string", _enum("enforce", "best-effort")),
    "unsupported_xml": _Spec("string", _enum("warn", "error")),
}

#: Every setting vmconfine uses, in the order :meth:`QemuConfig.format` writes them.
KNOWN_KEYS: tuple[str, ...] = tuple(_SPECS)

_BOOL = ("vnc_tls", "vnc_tls_x509_verify", "vnc_sasl", "spice_tls", "spice_sasl",
         "spice_auto_unix_socket", "chardev_tls", "chardev_tls_x509_verify", "vxhs_tls",
         "nbd_tls", "migrate_tls_force", "migrate_tls_x509_verify", "backup_tls_x509_verify",
         "default_tls_x509_verify", "auto_dump_bypass_cache", "auto_start_bypass_cache",
         "log_timestamp", "virtiofsd_debug", "storage_use_nbdkit")
_STRING = ("vnc_tls_x509_cert_dir", "vnc_tls_x509_secret_uuid", "vnc_password",
           "vnc_sasl_dir", "spice_tls_x509_cert_dir", "spice_sasl_dir", "spice_listen",
           "spice_password", "chardev_tls_x509_cert_dir", "chardev_tls_x509_secret_uuid",
           "vxhs_tls_x509_cert_dir", "vxhs_tls_x509_secret_uuid", "nbd_tls_x509_cert_dir",
           "nbd_tls_x509_secret_uuid", "migrate_tls_x509_cert_dir",
           "migrate_tls_x509_secret_uuid", "backup_tls_x509_cert_dir",
           "backup_tls_x509_secret_uuid", "default_tls_x509_cert_dir",
           "default_tls_x509_secret_uuid", "save_image_format", "dump_image_format",
           "snapshot_image_format", "auto_dump_path", "migration_host", "migration_address",
           "deprecation_behavior")
_UINT = ("remote_display_port_min", "remote_display_port_max", "remote_websocket_port_min",
         "remote_websocket_port_max", "migration_port_min", "migration_port_max",
         "max_queued", "keepalive_count", "gluster_debug_level")

#: libvirt qemu.conf settings vmconfine accepts (type-checked) but does not use.
LIBVIRT_UNUSED_KEYS: dict[str, str] = {
    **dict.fromkeys(_BOOL, "bool"), **dict.fromkeys(_STRING, "string"),
    **dict.fromkeys(_UINT, "uint"), "keepalive_interval": "int",
    "nvram": "strlist", "capability_filters": "strlist",
}

#: Settings that only matter when QEMU runs under another account (privileged instances).
_PRIVILEGED_ONLY = ("user", "group", "dynamic_ownership", "remember_owner")


# -- typed getters (libvirt's virConfGetValue* rules) -------------------------------------

def _typed(kind: str, key: str, value: Any, where: str) -> Any:
    """Check ``value`` against ``kind`` as libvirt's getter for that kind does."""
    if kind == "bool":
        if not isinstance(value, int) or value < 0:
            raise _err(where, f"expected a bool for '{key}' parameter (write 0 or 1)")
        if value > 1:
            raise _err(where, f"value for '{key}' parameter must be 0 or 1")
        return value == 1
    if kind == "int":
        if not isinstance(value, int):
            raise _err(where, f"expected a signed integer for '{key}' parameter")
        if not INT_MIN <= value <= INT_MAX:
            raise _err(where, f"value for '{key}' parameter must be in range "
                              f"{INT_MIN}:{INT_MAX}")
        return value
    if kind in ("uint", "ullong"):
        if not isinstance(value, int) or value < 0:
            raise _err(where, f"expected an unsigned integer for '{key}' parameter")
        top = UINT_MAX if kind == "uint" else ULLONG_MAX
        if value > top:
            raise _err(where, f"value for '{key}' parameter must be in range 0:{top}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise _err(where, f"expected a string for '{key}' parameter (put it in quotes)")
        return value
    if kind in ("strlist", "strlist_compat"):
        if kind == "strlist_compat" and isinstance(value, str):
            return [value]
        if kind == "strlist_compat" and not isinstance(value, list):
            raise _err(where, f"expected a string or string list for '{key}' parameter "
                              '(write "a" or [ "a", "b" ])')
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _err(where, f"expected a string list for '{key}' parameter "
                              '(write [ "a", "b" ])')
        return list(value)
    if kind == "max_core":
        if isinstance(value, str):
            if value != "unlimited":
                raise _err(where, f"Unknown core size '{value}' (use \"unlimited\" or a "
                                  "number of bytes)")
            return value
        return _typed("ullong", key, value, where)
    raise AssertionError(f"unknown kind {kind}")


def _one_line(text: str) -> str:
    return text.replace("\r", "?").replace("\n", "?")


# -- loading --------------------------------------------------------------------------------

def config_from_conf(conf: ConfFile, *, privileged: bool, caller_uid: int,
                     caller_gid: int) -> QemuConfig:
    """Type-check a parsed qemu.conf and apply it over the instance's defaults."""
    cfg = QemuConfig.defaults(privileged=privileged, caller_uid=caller_uid,
                              caller_gid=caller_gid)
    cfg.path = conf.filename
    first: dict[str, ConfEntry] = {}
    for entry in conf.entries:
        where = conf.where(entry)
        if entry.name in first:
            cfg._notes.append(f"{where}: '{entry.name}' is set again and this line is ignored; "
                              f"the first setting at {conf.where(first[entry.name])} wins")
            continue
        first[entry.name] = entry
        if entry.name in _SPECS:
            spec = _SPECS[entry.name]
            value = _typed(spec.kind, entry.name, entry.value, where)
            if spec.check is not None:
                value = spec.check(entry.name, value, where, privileged)
            setattr(cfg, entry.name, value)
            cfg._sources[entry.name] = where
            if entry.name in _PRIVILEGED_ONLY and not privileged:
                cfg._notes.append(f"{where}: '{entry.name}' has no effect in an unprivileged "
                                  "instance (QEMU runs as the caller, without DAC relabelling)")
            if entry.name == "lock_manager":
                cfg._notes.append(f"{where}: lock_manager is not implemented by vmconfine; "
                                  "disks are not locked")
        elif entry.name in LIBVIRT_UNUSED_KEYS:
            _typed(LIBVIRT_UNUSED_KEYS[entry.name], entry.name, entry.value, where)
            cfg.ignored[entry.name] = where
            cfg._notes.append(f"{where}: '{entry.name}' is a libvirt setting vmconfine does "
                              "not use; it has no effect")
        else:
            cfg.unknown[entry.name] = where
            cfg._notes.append(f"{where}: unknown setting '{entry.name}' is ignored (check the "
                              "spelling; 'vmconfine config' lists the known settings)")
    _note_high_privileges(cfg)
    return cfg


def _note_high_privileges(cfg: QemuConfig) -> None:
    """Note the settings libvirt taints as "high-privileges" (QEMU keeps root powers)."""
    if not cfg.privileged:
        return
    for key in ("user", "group"):
        if getattr(cfg, key) in ("root", "+0"):
            cfg._notes.append(f"{cfg.source(key)}: '{key}' is root, so QEMU runs with root "
                              "privileges and DAC confinement is lost; use an unprivileged "
                              "account")
    if not cfg.clear_emulator_capabilities:
        cfg._notes.append(f"{cfg.source('clear_emulator_capabilities')}: "
                          "clear_emulator_capabilities = 0 lets QEMU keep its capabilities; "
                          "set it to 1 unless a device really needs them")


def config_from_text(text: str, filename: str = "memory conf", *, privileged: bool,
                     caller_uid: int, caller_gid: int) -> QemuConfig:
    """Parse qemu.conf text and apply it (see :func:`config_from_conf`)."""
    return config_from_conf(parse_conf(text, filename), privileged=privileged,
                            caller_uid=caller_uid, caller_gid=caller_gid)


def load_config(path: Path | None, *, privileged: bool, caller_uid: int,
                caller_gid: int) -> QemuConfig:
    """Load qemu.conf from ``path``; None or a missing file gives all defaults.

    Raises ConfigError (``FILE:LINE: message``) for syntax errors, bad values and files that
    exist but cannot be read.
    """
    defaults = QemuConfig.defaults(privileged=privileged, caller_uid=caller_uid,
                                   caller_gid=caller_gid)
    if path is None:
        return defaults
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return defaults
    except OSError:
        pass  # read_conf_file reports it
    return config_from_conf(read_conf_file(path), privileged=privileged,
                            caller_uid=caller_uid, caller_gid=caller_gid)


assert set(KNOWN_KEYS) == {f.name for f in fields(QemuConfig) if f.init and f.compare}
