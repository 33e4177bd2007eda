"""Debian's real /etc/libvirt/qemu.conf parses unchanged, and with its examples switched on.

The file is taken from the Debian package (``apt-get download`` + ``dpkg-deb -x``, nothing is
installed). Debian 12 ships it in libvirt-daemon-system; later releases moved it to
libvirt-daemon-driver-qemu, so both are tried.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmconfine.config.conf import parse_conf, read_conf_file
from vmconfine.config.settings import LIBVIRT_UNUSED_KEYS, QemuConfig, load_config
from vmconfine.errors import ConfigError
from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

try:
    from tests.support import require, require_binary
except ModuleNotFoundError:  # tests/host is not a package: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support import require, require_binary

pytestmark = pytest.mark.host

PACKAGES = ("libvirt-daemon-driver-qemu", "libvirt-daemon-system")
#: with the keys the installed (built-in) drivers declare, as every command loads qemu.conf
SYSTEM = {"privileged": True, "caller_uid": 0, "caller_gid": 0,
          "drivers": collect_drivers(make_plugin_manager()).settings()}


def _fetch(workdir: Path) -> tuple[Path | None, list[str]]:
    """Download the packages one by one until one holds etc/libvirt/qemu.conf."""
    failures: list[str] = []
    for package in PACKAGES:
        pkgdir = workdir / package
        pkgdir.mkdir()
        try:
            done = subprocess.run(["apt-get", "download", package], cwd=pkgdir,
                                  capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            failures.append(f"{package}: apt-get download timed out")
            continue
        debs = list(pkgdir.glob("*.deb"))
        if done.returncode != 0 or not debs:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            failures.append(f"{package}: {last}")
            continue
        tree = pkgdir / "tree"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True, timeout=60)
        conf = tree / "etc" / "libvirt" / "qemu.conf"
        if conf.is_file():
            return conf, failures
        failures.append(f"{package}: holds no etc/libvirt/qemu.conf")
    return None, failures


@pytest.fixture(scope="module")
def debian_qemu_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_binary("apt-get")
    require_binary("dpkg-deb")
    path, failures = _fetch(tmp_path_factory.mktemp("debian-qemu-conf"))
    require(path is not None, f"apt-get download failed (no network?): {'; '.join(failures)}")
    assert path is not None
    return path


def _uncomment_examples(text: str) -> tuple[str, dict[str, int]]:
    """Switch on every commented-out ``#key = value`` example that forms a whole statement.

    Multi-line examples (``#cgroup_device_acl = [`` ... ``#]``) are switched on as a block.
    Returns the new text and, per key, the line of its first example.
    """
    lines = text.split("\n")
    first_line: dict[str, int] = {}
    i = 0
    while i < len(lines):
        match = re.match(r"#([a-z_]+) = ", lines[i])
        if match is None:
            i += 1
            continue
        for size in range(1, 20):
            block = lines[i : i + size]
            if not all(line.startswith("#") for line in block):
                break
            candidate = [line[1:] for line in block]
            try:
                parse_conf("\n".join(candidate))
            except ConfigError:
                continue
            lines[i : i + size] = candidate
            first_line.setdefault(match.group(1), i + 1)
            i += size - 1
            break
        i += 1
    return "\n".join(lines), first_line


def test_parses_unchanged(debian_qemu_conf: Path) -> None:
    conf = read_conf_file(debian_qemu_conf)
    assert conf.entries == []  # every setting is commented out
    assert len(conf.items) > 500  # ... and all those comments were read
    again = parse_conf(conf.write())
    assert [(type(i), i.text) for i in again.items] == [  # type: ignore[union-attr]
        (type(i), i.text) for i in conf.items  # type: ignore[union-attr]
    ]


def test_loads_as_all_defaults(debian_qemu_conf: Path) -> None:
    cfg = load_config(debian_qemu_conf, **SYSTEM)
    assert cfg.values() == QemuConfig.defaults(**SYSTEM).values()
    assert all(cfg.source(key) == "default" for key in cfg.known_keys())
    assert cfg.check() == []


def test_loads_with_security_settings_switched_on(debian_qemu_conf: Path,
                                                  tmp_path: Path) -> None:
    text = debian_qemu_conf.read_text()
    lines = text.split("\n")
    driver_line = lines.index('#security_driver = "selinux"') + 1
    user_line = lines.index('#user = "libvirt-qemu"') + 1
    text = text.replace('#security_driver = "selinux"',
                        'security_driver = [ "selinux", "apparmor" ]')
    text = text.replace('#user = "libvirt-qemu"', 'user = "+0"')
    edited = tmp_path / "qemu.conf"
    edited.write_text(text)
    cfg = load_config(edited, **SYSTEM)
    assert cfg.security_driver == ["selinux", "apparmor"]
    assert cfg.user == "+0"
    assert cfg.source("security_driver") == f"{edited}:{driver_line}"
    assert cfg.source("user") == f"{edited}:{user_line}"
    assert cfg.group == "vmconfine-qemu" and cfg.source("group") == "default"
    assert any("'user' is root" in problem for problem in cfg.check())


def test_loads_with_every_example_switched_on(debian_qemu_conf: Path, tmp_path: Path) -> None:
    text, first_line = _uncomment_examples(debian_qemu_conf.read_text())
    assert {"security_driver", "user", "cgroup_device_acl", "nvram"} <= set(first_line)
    edited = tmp_path / "qemu.conf"
    edited.write_text(text)
    cfg = load_config(edited, **SYSTEM)
    assert cfg.unknown == {}  # vmconfine knows every setting Debian documents
    for key, line in first_line.items():
        assert key in cfg.known_keys() or key in LIBVIRT_UNUSED_KEYS
        if key in cfg.known_keys():
            assert cfg.source(key) == f"{edited}:{line}"
        else:
            assert cfg.ignored[key] == f"{edited}:{line}"
    assert cfg.security_driver == ["selinux"]
    assert cfg.user == "libvirt-qemu"
    cgroups = cfg.driver_settings("cgroups")
    assert cgroups.cgroup_device_acl is not None and "/dev/kvm" in cgroups.cgroup_device_acl
    assert cgroups.cgroup_controllers == ["cpu", "devices", "memory", "blkio", "cpuset", "cpuacct"]
    assert cfg.max_core == "unlimited"
    assert cfg.driver_settings("namespaces").namespaces == ["mount"]
    again = parse_conf(cfg.format())
    assert again.get("security_driver").value == ["selinux"]  # type: ignore[union-attr]
