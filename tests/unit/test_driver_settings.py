"""Driver-owned qemu.conf keys: declared at registration, typed, listed by ``config``, checked
by ``config --check``; unknown keys are warned about with the nearest known key."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.support import install_plugin_package, make_host
from vmconfine.config.keys import Setting, positive
from vmconfine.config.settings import config_from_text
from vmconfine.errors import ConfigError, DriverError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.plugin.registry import DriverRegistry

RLIMIT = (Setting(name="rl_nofile", kind="uint", default=512, check=positive,
                  doc="open files QEMU may have"),
          Setting(name="rl_names", kind="strlist", default=["a"], doc="some names"))


class Driver:
    def __init__(self, host: Any) -> None:
        self.settings = host.config.driver_settings("rl")

    @hookimpl
    def probe(self, host: Any) -> tuple[bool, str]:
        return True, ""


def rl_plugin(settings: tuple[Setting, ...] = RLIMIT) -> types.ModuleType:
    mod = types.ModuleType("thirdparty_rl")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add("rl", Driver, "rlimit test driver", kind="pipeline", settings=settings)

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


def test_third_party_key_is_typed_and_has_a_source(tmp_path: Path) -> None:
    host = make_host(tmp_path, [rl_plugin()], config="# x\nrl_nofile = 64\n")
    settings = host.config.driver_settings("rl")
    assert settings.rl_nofile == 64 and settings["rl_names"] == ["a"]
    conf = str(tmp_path / "etc" / "qemu.conf")
    assert settings.source("rl_nofile") == f"{conf}:2"
    assert host.config.source("rl_names") == "default"
    assert host.config.unknown == {} and host.config.check() == []
    text = host.config.format()
    assert f"rl_nofile = 64 # {conf}:2\n" in text
    assert 'rl_names = [ "a" ] # default\n' in text
    assert "## open files QEMU may have\n" in text
    with pytest.raises(AttributeError, match=r"driver 'rl' declares no qemu\.conf key 'user'"):
        settings.user  # noqa: B018  (core keys are not a driver's)


@pytest.mark.parametrize(("line", "message"), [
    ('rl_nofile = "many"', "expected an unsigned integer for 'rl_nofile' parameter"),
    ("rl_nofile = 0", "value for 'rl_nofile' parameter must be at least 1"),
    ("rl_names = [ 1 ]", "expected a string list for 'rl_names' parameter"),
])
def test_wrong_type_is_a_file_line_error(tmp_path: Path, line: str, message: str) -> None:
    host = make_host(tmp_path, [rl_plugin()], config=f"\n\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        host.config  # noqa: B018
    assert str(exc.value).startswith(f"{tmp_path / 'etc' / 'qemu.conf'}:3: {message}")


def test_keys_declared_after_loading_are_typed_too() -> None:
    cfg = config_from_text("rl_nofile = -1\n", "q.conf", privileged=True, caller_uid=0,
                           caller_gid=0)
    assert cfg.unknown == {"rl_nofile": "q.conf:1"}  # no driver declared it yet
    with pytest.raises(ConfigError, match=r"^q\.conf:1: expected an unsigned integer"):
        cfg.declare("rl", RLIMIT)


def test_builtin_driver_keys_live_in_their_plugins(tmp_path: Path) -> None:
    import vmconfine_cgroups
    import vmconfine_dac

    host = make_host(tmp_path, [vmconfine_dac, vmconfine_cgroups],
                     config='cgroup_partition = "/machine/t1"\ndynamic_ownership = 0\n')
    assert host.config.driver_settings("cgroups").cgroup_partition == "/machine/t1"
    assert host.config.driver_settings("dac").dynamic_ownership is False
    assert not hasattr(host.config, "cgroup_partition")  # not a core field any more
    with pytest.raises(ConfigError, match=r"qemu\.conf:1: Resource partition 'x' must start"):
        _ = make_host(tmp_path / "b", [vmconfine_cgroups],
                      config='cgroup_partition = "x"\n').config


def test_session_defaults_and_privileged_only_notes() -> None:
    import vmconfine_dac

    cfg = config_from_text("dynamic_ownership = 1\n", "q.conf", privileged=False,
                           caller_uid=1, caller_gid=1,
                           drivers=[("dac", vmconfine_dac.SETTINGS)])
    assert cfg.driver_settings("dac").dynamic_ownership is True
    assert cfg.check() == ["q.conf:1: 'dynamic_ownership' has no effect in an unprivileged "
                           "instance (QEMU runs as the caller, without DAC relabelling)"]
    unset = config_from_text("", privileged=False, caller_uid=1, caller_gid=1,
                             drivers=[("dac", vmconfine_dac.SETTINGS)])
    assert unset.driver_settings("dac").dynamic_ownership is False


def test_key_collisions_are_refused() -> None:
    reg = DriverRegistry()
    with pytest.raises(DriverError, match=r"declares qemu\.conf key 'user', which core already"):
        reg.add("x", Driver, "d", settings=[Setting(name="user", kind="string", default="",
                                                    doc="mine")])
    reg.add("rl", Driver, "d", settings=RLIMIT)
    with pytest.raises(DriverError, match="key 'rl_nofile', which driver 'rl' already owns"):
        reg.add("y", Driver, "d", settings=RLIMIT[:1])
    with pytest.raises(ValueError, match="has no doc"):
        Setting(name="z", kind="bool", default=False, doc="")
    with pytest.raises(ValueError, match="kind 'float'"):
        Setting(name="z", kind="float", default=0, doc="a float")


def test_unknown_key_warns_once_with_the_nearest_key(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    host = make_host(tmp_path, [rl_plugin()],
                     config='securty_driver = "landlock"\nrl_nofiles = 3\nzzz = 1\n')
    with caplog.at_level(logging.WARNING):
        host.config  # noqa: B018
        host.config  # noqa: B018
    conf = tmp_path / "etc" / "qemu.conf"
    assert [r.getMessage() for r in caplog.records] == [
        f"{conf}:1: unknown setting 'securty_driver' is ignored (did you mean "
        "security_driver?)",
        f"{conf}:2: unknown setting 'rl_nofiles' is ignored (did you mean rl_nofile?)",
        f"{conf}:3: unknown setting 'zzz' is ignored (check the spelling; 'vmconfine "
        "config' lists the known settings)",
    ]
    assert host.config.check()[0].endswith("(did you mean security_driver?)")


# ---- the CLI ------------------------------------------------------------------------------------

UNAVAILABLE = """
from vmconfine.plugin.hookspecs import hookimpl


class Never:
    @hookimpl
    def probe(self, host):
        return False, "needs the frobnicator; install it"


@hookimpl
def vmconfine_register_drivers(registry):
    registry.add("never", lambda host: Never(), "a driver that is never available")
"""


def cli(root: Path, *args: str, site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("VMCONFINE_DEBUG", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-m", "vmconfine.cli", "-c",
                           f"qemu:///embed?root={root}", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def write_conf(root: Path, text: str) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    path = root / "etc" / "qemu.conf"
    path.write_text(text)
    return path


def test_config_check_unknown_key_exits_1(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, 'securty_driver = "landlock"\n')
    proc = cli(tmp_path, "config", "--check")
    assert proc.returncode == 1, proc
    assert proc.stdout.splitlines() == [
        f"{conf}:1: unknown setting 'securty_driver' is ignored (did you mean "
        "security_driver?)"]
    assert "did you mean security_driver?" in proc.stderr  # the warning every command gives
    run = cli(tmp_path, "config")
    assert run.returncode == 0 and "did you mean security_driver?" in run.stderr
    caps = cli(tmp_path, "capabilities")  # any command that loads qemu.conf warns, once
    assert caps.returncode == 0, caps.stderr
    assert caps.stderr.count("unknown setting 'securty_driver'") == 1
    assert f"#securty_driver # {conf}:1" in run.stdout


def test_config_check_uninstalled_driver_exits_1(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, 'security_driver = "landlok"\n')
    proc = cli(tmp_path, "config", "--check")
    assert proc.returncode == 1, proc
    assert "no problems" not in proc.stdout
    assert proc.stdout.startswith(f"{conf}:1: security driver 'landlok' is not installed")
    assert proc.stdout.rstrip().endswith("(did you mean landlock?)")


def test_config_check_missing_file_exits_1(tmp_path: Path) -> None:
    proc = cli(tmp_path, "config", "--check", str(tmp_path / "nope.conf"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {tmp_path / 'nope.conf'}: cannot read "
                                   "configuration file: it does not exist; create it or give "
                                   "the right path")
    assert proc.stdout == ""


def test_config_check_clean_file_and_driver_keys(tmp_path: Path) -> None:
    other = tmp_path / "other.conf"
    other.write_text('security_driver = "none"\nlandlock_mode = "enforce"\n')
    proc = cli(tmp_path, "config", "--check", str(other))
    assert proc.returncode == 0, proc
    assert proc.stdout == f"{other}: no problems found\n"
    shown = cli(tmp_path, "config", str(other))
    assert shown.returncode == 0
    assert f'landlock_mode = "enforce" # {other}:2\n' in shown.stdout
    assert 'apparmor_profile_prefix = "vmconfine-" # default\n' in shown.stdout
    absent = cli(tmp_path / "empty", "config", "--check")
    assert absent.returncode == 0 and "no problems found" in absent.stdout


def test_config_check_unavailable_driver_exits_1(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_plugin_package(site, "vmconfine_never", UNAVAILABLE)
    conf = write_conf(tmp_path / "inst", 'security_driver = "never"\n')
    proc = cli(tmp_path / "inst", "config", "--check", site=site)
    assert proc.returncode == 1, proc
    assert proc.stdout == (f"{conf}:1: security driver 'never' is not available on this host: "
                           "needs the frobnicator; install it\n")


def test_asking_before_declaring_does_not_hide_the_keys() -> None:
    cfg = config_from_text("rl_nofile = 7\n", privileged=True, caller_uid=0, caller_gid=0)
    assert "rl_nofile" not in cfg.driver_settings("rl")
    cfg.declare("rl", RLIMIT)
    assert cfg.driver_settings("rl").rl_nofile == 7
