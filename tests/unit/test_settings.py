"""Typed qemu.conf settings: defaults, type errors, sources, format() and check()."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import vmconfine.config.conf as conf_module
from vmconfine.config.conf import parse_conf
from vmconfine.config.settings import (
    KNOWN_KEYS,
    LIBVIRT_UNUSED_KEYS,
    QemuConfig,
    config_from_text,
    load_config,
)
from vmconfine.errors import ConfigError
from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

#: the keys the installed (built-in) drivers declare
BUILTIN = collect_drivers(make_plugin_manager()).settings()
SYSTEM: dict[str, Any] = {"privileged": True, "caller_uid": 0, "caller_gid": 0,
                          "drivers": BUILTIN}
SESSION: dict[str, Any] = {"privileged": False, "caller_uid": 1000, "caller_gid": 1001,
                           "drivers": BUILTIN}


def system(text: str, filename: str = "q.conf") -> QemuConfig:
    return config_from_text(text, filename, **SYSTEM)


def session(text: str, filename: str = "q.conf") -> QemuConfig:
    return config_from_text(text, filename, **SESSION)


# -- defaults -------------------------------------------------------------------------------

def test_system_defaults() -> None:
    cfg = load_config(None, **SYSTEM)
    assert cfg.privileged is True and cfg.path is None
    assert cfg.security_driver is None
    assert cfg.security_default_confined is True
    assert cfg.security_require_confined is False
    values = cfg.values()
    assert (cfg.user, cfg.group) == ("vmconfine-qemu", "vmconfine-qemu")
    assert values["dynamic_ownership"] is True and cfg.remember_owner is True
    assert values["cgroup_controllers"] is None and values["cgroup_device_acl"] is None
    assert cfg.clear_emulator_capabilities is True
    assert cfg.seccomp_sandbox == -1
    assert values["namespaces"] == ["mount"]
    assert (cfg.max_processes, cfg.max_files, cfg.max_threads_per_process) == (0, 0, 0)
    assert cfg.max_core == "unlimited"
    assert cfg.stdio_handler == "logd" and cfg.sched_core == "none"
    assert cfg.lock_manager is None
    assert (cfg.swtpm_user, cfg.swtpm_group) == ("tss", "tss")
    assert cfg.vnc_listen == "127.0.0.1"
    assert values["cgroup_device_acl_extra"] == []
    assert values["cgroup_partition"] == "/machine"
    assert cfg.emulator_search_path == ["/usr/bin", "/usr/local/bin"]
    assert values["apparmor_profile_dir"] == "/etc/apparmor.d/vmconfine"
    assert values["apparmor_profile_prefix"] == "vmconfine-"
    assert values["selinux_mode"] == "svirt"
    assert cfg.remember_owner_xattr_prefix == "trusted.vmconfine.security"
    assert cfg.shutdown_timeout == 30
    assert values["landlock_mode"] == "best-effort"
    assert all(cfg.source(key) == "default" for key in cfg.known_keys())
    assert cfg.check() == []


def test_session_defaults() -> None:
    cfg = load_config(None, **SESSION)
    assert cfg.privileged is False
    assert (cfg.user, cfg.group) == ("+1000", "+1001")
    assert (cfg.swtpm_user, cfg.swtpm_group) == ("+1000", "+1001")
    assert cfg.driver_settings("dac").dynamic_ownership is False
    assert cfg.remember_owner is False
    assert cfg.driver_settings("namespaces").namespaces == []
    assert cfg.security_default_confined is True
    assert cfg.check() == []


def test_defaults_do_not_share_lists() -> None:
    one = QemuConfig.defaults(**SYSTEM)
    two = QemuConfig.defaults(**SYSTEM)
    one.emulator_search_path.append("/opt/bin")
    one.driver_settings("namespaces").namespaces.clear()
    assert two.emulator_search_path == ["/usr/bin", "/usr/local/bin"]
    assert two.driver_settings("namespaces").namespaces == ["mount"]


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "absent" / "qemu.conf", **SYSTEM)
    assert cfg.values() == QemuConfig.defaults(**SYSTEM).values()
    assert cfg.path is None


def test_unreadable_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "qemu.conf"
    path.write_text("security_require_confined = 1\n")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(conf_module, "open", denied, raising=False)
    with pytest.raises(ConfigError, match="Permission denied"):
        load_config(path, **SYSTEM)


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, **SYSTEM)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "qemu.conf"
    path.write_text('user = "a"\nsecurity_driver = selinux\n')
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}:2: expecting a value")):
        load_config(path, **SYSTEM)


def test_load_from_file_records_sources(tmp_path: Path) -> None:
    path = tmp_path / "qemu.conf"
    path.write_text('# header\nuser = "+107"\n\ngroup = "kvm"; mac_filter = 1\n')
    cfg = load_config(path, **SYSTEM)
    assert cfg.path == str(path)
    assert (cfg.user, cfg.group, cfg.mac_filter) == ("+107", "kvm", True)
    assert cfg.source("user") == f"{path}:2"
    assert cfg.source("group") == f"{path}:4"
    assert cfg.source("mac_filter") == f"{path}:4"
    assert cfg.source("dynamic_ownership") == "default"
    with pytest.raises(KeyError, match=r"unknown qemu\.conf setting"):
        cfg.source("no_such_key")


# -- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('security_driver = "selinux"', "security_driver", ["selinux"]),
        ('security_driver = [ "selinux", "apparmor" ]', "security_driver",
         ["selinux", "apparmor"]),
        ('security_driver = "none"', "security_driver", ["none"]),
        ("security_driver = [ ]", "security_driver", None),
        ("security_default_confined = 0", "security_default_confined", False),
        ("security_require_confined = 1", "security_require_confined", True),
        ('user = "+0"', "user", "+0"),
        ('group = "100"', "group", "100"),
        ('cgroup_controllers = [ "cpu", "devices", "name=systemd" ]', "cgroup_controllers",
         ["cpu", "devices", "name=systemd"]),
        ("cgroup_controllers = []", "cgroup_controllers", []),
        ('cgroup_device_acl = [ "/dev/null" ]', "cgroup_device_acl", ["/dev/null"]),
        ("seccomp_sandbox = 0", "seccomp_sandbox", 0),
        ("seccomp_sandbox = -1", "seccomp_sandbox", -1),
        ('namespaces = [ "mount", "mount" ]', "namespaces", ["mount"]),
        ("namespaces = [ ]", "namespaces", []),
        ("max_files = 4294967295", "max_files", 4294967295),
        ("max_core = 0", "max_core", 0),
        ("max_core = 18446744073709551615", "max_core", 2**64 - 1),
        ('max_core = "unlimited"', "max_core", "unlimited"),
        ('stdio_handler = "file"', "stdio_handler", "file"),
        ('sched_core = "full"', "sched_core", "full"),
        ("allow_disk_format_probing = 0", "allow_disk_format_probing", False),
        ('lock_manager = "lockd"', "lock_manager", "lockd"),
        ('hugetlbfs_mount = "/dev/hugepages"', "hugetlbfs_mount", ["/dev/hugepages"]),
        ('vnc_listen = "0.0.0.0"', "vnc_listen", "0.0.0.0"),
        ('cgroup_device_acl_extra = [ "/dev/net/tun" ]', "cgroup_device_acl_extra",
         ["/dev/net/tun"]),
        ('cgroup_partition = "/machine/tenant"', "cgroup_partition", "/machine/tenant"),
        ('emulator_search_path = [ "/opt/qemu/bin" ]', "emulator_search_path",
         ["/opt/qemu/bin"]),
        ('apparmor_profile_prefix = "vmc_"', "apparmor_profile_prefix", "vmc_"),
        ('selinux_mode = "basic"', "selinux_mode", "basic"),
        ('remember_owner_xattr_prefix = "user.vmc"', "remember_owner_xattr_prefix",
         "user.vmc"),
        ("shutdown_timeout = 5", "shutdown_timeout", 5),
        ('landlock_mode = "enforce"', "landlock_mode", "enforce"),
    ],
)
def test_values(text: str, key: str, value: Any) -> None:
    cfg = system(text + "\n")
    assert cfg.values()[key] == value
    assert cfg.source(key) == "q.conf:1"


def test_first_occurrence_wins_and_later_ones_are_not_checked() -> None:
    cfg = system('mac_filter = 1\nmac_filter = "not a bool"\n')
    assert cfg.mac_filter is True
    assert cfg.source("mac_filter") == "q.conf:1"
    assert cfg.check() == [
        "q.conf:2: 'mac_filter' is set again and this line is ignored; the first setting "
        "at q.conf:1 wins"
    ]


# -- every error ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mac_filter = "1"', "expected a bool for 'mac_filter' parameter"),
        ("dynamic_ownership = -1", "expected a bool for 'dynamic_ownership' parameter"),
        ("remember_owner = [ 1 ]", "expected a bool for 'remember_owner' parameter"),
        ("security_require_confined = 2", "value for 'security_require_confined' parameter "
                                          "must be 0 or 1"),
        ('seccomp_sandbox = "on"', "expected a signed integer for 'seccomp_sandbox' parameter"),
        ("seccomp_sandbox = 2147483648", "value for 'seccomp_sandbox' parameter must be in "
                                         "range -2147483648:2147483647"),
        ("seccomp_sandbox = -2147483649", "value for 'seccomp_sandbox' parameter must be in "
                                          "range -2147483648:2147483647"),
        ("max_files = -1", "expected an unsigned integer for 'max_files' parameter"),
        ('max_processes = "10"', "expected an unsigned integer for 'max_processes' parameter"),
        ("max_threads_per_process = 4294967296", "value for 'max_threads_per_process' "
                                                 "parameter must be in range 0:4294967295"),
        ('max_core = "huge"', "Unknown core size 'huge'"),
        ("max_core = -1", "expected an unsigned integer for 'max_core' parameter"),
        ("max_core = 18446744073709551616", "value for 'max_core' parameter must be in "
                                            "range 0:18446744073709551615"),
        ("max_core = [ ]", "expected an unsigned integer for 'max_core' parameter"),
        ("user = 0", "expected a string for 'user' parameter"),
        ('group = [ "kvm" ]', "expected a string for 'group' parameter"),
        ('user = ""', "'user' is empty"),
        ('user = "+abc"', "'user' value '+abc' is not +ID"),
        ('swtpm_group = "+"', "'swtpm_group' value '+' is not +ID"),
        ('user = "+4294967295"', "'user' id +4294967295 is out of range"),
        ('cgroup_device_acl = "/dev/null"', "expected a string list for 'cgroup_device_acl' "
                                            "parameter"),
        ("cgroup_device_acl = [ 1 ]", "expected a string list for 'cgroup_device_acl' "
                                      "parameter"),
        ('cgroup_device_acl = [ "dev/null" ]', "'dev/null' in 'cgroup_device_acl' is not an "
                                               "absolute path"),
        ("security_driver = 1", "expected a string or string list for 'security_driver' "
                                "parameter"),
        ('security_driver = [ "selinux", 1 ]', "expected a string list for 'security_driver' "
                                               "parameter"),
        ('security_driver = [ "selinux", "selinux" ]', "Duplicate security driver selinux"),
        ('security_driver = [ "none", "selinux" ]', '"none" cannot appear in a list of '
                                                    "drivers"),
        ('cgroup_controllers = [ "cpu", "bogus" ]', "Unknown cgroup controller 'bogus'"),
        ('cgroup_controllers = "cpu"', "expected a string list for 'cgroup_controllers' "
                                       "parameter"),
        ('namespaces = [ "pid" ]', "Unknown namespace: pid"),
        ('stdio_handler = "journald"', "Unknown stdio handler journald"),
        ('sched_core = "some"', "Unknown sched_core value some"),
        ("allow_disk_format_probing = 1", "allow_disk_format_probing is no longer supported"),
        ('hugetlbfs_mount = [ "hugepages" ]', "'hugepages' in 'hugetlbfs_mount' is not an "
                                              "absolute path"),
        ("hugetlbfs_mount = 1", "expected a string or string list for 'hugetlbfs_mount' "
                                "parameter"),
        ('memory_backing_dir = "ram"', "'ram' in 'memory_backing_dir' is not an absolute path"),
        ('shared_filesystems = [ "nfs" ]', "'nfs' in 'shared_filesystems' is not an absolute "
                                           "path"),
        ('cgroup_device_acl_extra = [ "tun" ]', "'tun' in 'cgroup_device_acl_extra' is not an "
                                                "absolute path"),
        ('cgroup_partition = "machine"', "Resource partition 'machine' must start with '/'"),
        ('cgroup_partition = "/machine/../x"', "Resource partition '/machine/../x' must not "
                                               "contain '..'"),
        ('emulator_search_path = "/usr/bin"', "expected a string list for "
                                              "'emulator_search_path' parameter"),
        ('emulator_search_path = [ "bin" ]', "'bin' in 'emulator_search_path' is not an "
                                             "absolute path"),
        ('apparmor_profile_dir = "apparmor.d"', "'apparmor.d' in 'apparmor_profile_dir' is "
                                                "not an absolute path"),
        ('apparmor_profile_prefix = "../x"', "'apparmor_profile_prefix' value '../x' is not "
                                             "valid"),
        ('apparmor_profile_prefix = ""', "'apparmor_profile_prefix' value '' is not valid"),
        ('remember_owner_xattr_prefix = "vmconfine"', "'remember_owner_xattr_prefix' value "
                                                      "'vmconfine' is not valid"),
        ('selinux_mode = "mls"', "unknown selinux_mode value 'mls'"),
        ('landlock_mode = "off"', "unknown landlock_mode value 'off'"),
        ("shutdown_timeout = 0", "value for 'shutdown_timeout' parameter must be at least 1"),
        ("shutdown_timeout = -5", "expected an unsigned integer for 'shutdown_timeout' "
                                  "parameter"),
        ("vnc_auto_unix_socket = 3", "value for 'vnc_auto_unix_socket' parameter must be 0 "
                                     "or 1"),
        ('vnc_tls = "yes"', "expected a bool for 'vnc_tls' parameter"),
        ("remote_display_port_min = -1", "expected an unsigned integer for "
                                         "'remote_display_port_min' parameter"),
        ("nvram = 1", "expected a string list for 'nvram' parameter"),
        ("keepalive_interval = 2147483648", "value for 'keepalive_interval' parameter must be "
                                            "in range"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        system(f"# first line\n{text}\n", "/etc/vmconfine/qemu.conf")
    assert str(info.value).startswith(f"/etc/vmconfine/qemu.conf:2: {message}")
    assert "\n" not in str(info.value)


def test_namespaces_in_session_mode_and_the_root_view() -> None:
    # libvirt refuses namespaces in session mode; vmconfine makes them in a user namespace
    def ns(cfg: QemuConfig) -> list[str]:
        return list(cfg.driver_settings("namespaces").namespaces)

    assert ns(session('namespaces = [ "mount", "root" ]\n')) == ["mount", "root"]
    assert ns(session("namespaces = []\n")) == []
    assert ns(system('namespaces = [ "root", "mount" ]\n')) == ["root", "mount"]
    with pytest.raises(ConfigError, match=r'^q\.conf:1: the "root" namespace view needs "mount"'):
        session('namespaces = [ "root" ]\n')


# -- format() -------------------------------------------------------------------------------

FULL = """\
security_driver = [ "selinux", "apparmor" ]
security_default_confined = 0
security_require_confined = 1
user = "+107"
group = "kvm"
dynamic_ownership = 0
cgroup_controllers = [ "cpu", "devices" ]
cgroup_device_acl = [ "/dev/null", "/dev/kvm" ]
seccomp_sandbox = 1
max_core = 1048576
stdio_handler = "file"
lock_manager = "lockd"
vnc_listen = 'odd "listen" value'
bridge_helper = \"\"\"it's "odd" too\"\"\"
cgroup_device_acl_extra = [ "/dev/net/tun" ]
emulator_search_path = [ "/opt/qemu/bin", "/usr/bin" ]
shutdown_timeout = 120
landlock_mode = "enforce"
vnc_tls = 1
no_such_setting = [ 1, 2 ]
"""


@pytest.mark.parametrize(
    ("text", "kwargs"),
    [("", SYSTEM), ("", SESSION), (FULL, SYSTEM), ("security_driver = []\n", SYSTEM)],
)
def test_format_reparses_to_the_same_values(text: str, kwargs: dict[str, Any]) -> None:
    cfg = config_from_text(text, "/etc/q.conf", **kwargs)
    rendered = cfg.format()
    again = config_from_text(rendered, "rendered", **kwargs)
    assert again.values() == cfg.values()
    assert again.unknown == {} and again.ignored == {}


def test_format_lines_name_each_key_and_its_source() -> None:
    cfg = config_from_text(FULL, "/etc/q.conf", **SYSTEM)
    rendered = cfg.format()
    parsed = parse_conf(rendered)
    values = cfg.values()
    assert [e.name for e in parsed.entries] == [
        key for key in cfg.known_keys() if values[key] is not None
    ]
    for entry in parsed.entries:
        assert entry.comment == f" {cfg.source(entry.name)}"
    assert parsed.get("security_driver").comment == " /etc/q.conf:1"  # type: ignore[union-attr]
    assert parsed.get("mac_filter").comment == " default"  # type: ignore[union-attr]
    lines = rendered.splitlines()
    for key in cfg.known_keys():
        mine = [ln for ln in lines if ln.startswith((f"{key} = ", f"#{key} = "))]
        assert len(mine) == 1, key
        assert mine[0].endswith((" # default", f" # {cfg.source(key)}"))
    assert "#vnc_tls # /etc/q.conf:19" in lines
    assert "#no_such_setting # /etc/q.conf:20" in lines


def test_format_comments_out_unset_keys() -> None:
    lines = QemuConfig.defaults(**SYSTEM).format().splitlines()
    assert "#security_driver = (autodetect) # default" in lines
    # the caller (the CLI, which knows the installed drivers) words the autodetection
    worded = QemuConfig.defaults(**SYSTEM).format({"security_driver": "autodetect: x, none"})
    assert "#security_driver = (autodetect: x, none) # default" in worded.splitlines()
    assert "#cgroup_controllers = (autodetect) # default" in lines
    assert "#cgroup_device_acl = (built-in device list) # default" in lines
    assert 'user = "vmconfine-qemu" # default' in lines
    assert "dynamic_ownership = 1 # default" in lines
    assert 'max_core = "unlimited" # default' in lines


# -- check() --------------------------------------------------------------------------------

def test_check_lists_unknown_unused_and_repeated_settings() -> None:
    cfg = system('vnc_tls = 1\nsecuriti_driver = "selinux"\nuser = "a"\nuser = "b"\n')
    assert cfg.unknown == {"securiti_driver": "q.conf:2"}
    assert cfg.ignored == {"vnc_tls": "q.conf:1"}
    problems = cfg.check()
    assert len(problems) == 3
    assert problems[0].startswith("q.conf:1: 'vnc_tls' is a libvirt setting vmconfine does "
                                  "not use")
    assert problems[1].startswith("q.conf:2: unknown setting 'securiti_driver' is ignored")
    assert problems[2].startswith("q.conf:4: 'user' is set again")


def test_check_notes_settings_without_effect_or_with_high_privileges() -> None:
    assert session('user = "qemu"\n').check() == [
        "q.conf:1: 'user' has no effect in an unprivileged instance (QEMU runs as the "
        "caller, without DAC relabelling)"
    ]
    root = system('user = "+0"\ngroup = "root"\nclear_emulator_capabilities = 0\n').check()
    assert [p.split(":")[1] for p in root] == ["1", "2", "3"]
    assert "'user' is root" in root[0] and "'group' is root" in root[1]
    assert "clear_emulator_capabilities = 0" in root[2]
    assert system('lock_manager = "lockd"\n').check() == [
        "q.conf:1: lock_manager is not implemented by vmconfine; disks are not locked"
    ]
    assert system('user = "+107"\nmac_filter = 1\n').check() == []


def test_key_tables() -> None:
    for key in ("security_driver", "user", "group", "remember_owner",
                "max_core", "allow_disk_format_probing", "swtpm_user", "vnc_listen",
                "emulator_search_path", "remember_owner_xattr_prefix", "shutdown_timeout"):
        assert key in KNOWN_KEYS
    owners = {key: driver for driver, settings in BUILTIN for key in (s.name for s in settings)}
    assert owners == {
        "dynamic_ownership": "dac", "user_range": "dac", "shared_group": "dac",
        "namespaces": "namespaces",
        "cgroup_controllers": "cgroups",
        "cgroup_device_acl": "cgroups", "cgroup_device_acl_extra": "cgroups",
        "cgroup_partition": "cgroups", "cgroup_devices_backend": "cgroups",
        "apparmor_profile_dir": "apparmor", "apparmor_profile_prefix": "apparmor",
        "selinux_mode": "selinux", "landlock_mode": "landlock"}
    assert not set(KNOWN_KEYS) & set(owners)  # a driver's key is never a core key
    assert not set(KNOWN_KEYS) & set(LIBVIRT_UNUSED_KEYS)
    assert len(set(KNOWN_KEYS)) == len(KNOWN_KEYS)
