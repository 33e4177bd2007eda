"""The registry: entry-point discovery, a third-party driver selected by name, contract checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest

from tests.support import install_plugin_package
from vmconfine.errors import DriverError
from vmconfine.plugin.registry import DriverRegistry, collect_drivers, make_plugin_manager

PLUGIN = '''
from vmconfine.plugin.hookspecs import hookimpl


class Tagger:
    @hookimpl
    def probe(self, host):
        return True, ""

    @hookimpl
    def model(self):
        return "tagger"

    @hookimpl
    def base_label(self, virt_type):
        return "tag-" + virt_type


@hookimpl
def vmconfine_register_drivers(registry):
    registry.add("tagger", lambda host: Tagger(), "a third-party test driver")
'''


def install_fake_package(site: Path) -> None:
    """The tagger plugin as an installed distribution (entry point ``tagger``)."""
    install_plugin_package(site, "vmconfine_tagger", PLUGIN)
    (site / "vmconfine_tagger-1.0.dist-info" / "entry_points.txt").write_text(
        "[vmconfine]\ntagger = vmconfine_tagger\n")


def test_builtin_drivers_come_from_entry_points() -> None:
    pm = make_plugin_manager()
    names = collect_drivers(pm).names()
    assert "none" in names
    assert {"none", "dac", "selinux", "apparmor", "landlock"} <= set(
        pm.get_name(p) for p in pm.get_plugins())


def test_autoload_off_registers_only_given_plugins() -> None:
    from vmconfine.plugin import nop
    pm = make_plugin_manager(autoload=False, plugins=[nop])
    assert collect_drivers(pm).names() == ["none"]


def test_third_party_driver_installed_and_selected_by_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_fake_package(site)
    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "tagger"\n')
    env = dict(os.environ, PYTHONPATH=str(site))
    uri = f"qemu:///embed?root={root}"
    drivers = subprocess.run([sys.executable, "-m", "vmconfine.cli", "-c", uri, "drivers"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert drivers.returncode == 0, drivers.stderr
    assert "tagger" in drivers.stdout and "a third-party test driver" in drivers.stdout
    caps = subprocess.run([sys.executable, "-m", "vmconfine.cli", "-c", uri, "capabilities"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert caps.returncode == 0, caps.stderr
    assert "<model>tagger</model>" in caps.stdout
    assert "<baselabel type=\"kvm\">tag-kvm</baselabel>" in caps.stdout.replace("'", '"')


def test_duplicate_driver_name_is_an_error() -> None:
    reg = DriverRegistry()
    reg.add("x", lambda h: None, "first")
    with pytest.raises(DriverError, match="registered twice"):
        reg.add("x", lambda h: None, "second")


def test_bad_kind_is_an_error() -> None:
    with pytest.raises(DriverError, match="kind must be one of"):
        DriverRegistry().add("x", lambda h: None, "d", kind="weird")


def test_hookimpl_with_unknown_argument_violates_the_contract() -> None:
    from vmconfine.plugin.hookspecs import hookimpl

    class Bad:
        @hookimpl
        def set_all_labels(self, ctx, surprise):  # type: ignore[no-untyped-def]
            pass

    pm = make_plugin_manager(autoload=False)
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(Bad())


def test_every_hookspec_is_documented() -> None:
    import inspect

    from vmconfine.plugin import hookspecs
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, "vmconfine_spec"):
            doc = textwrap.dedent(fn.__doc__ or "")
            assert len(doc.strip()) > 20, f"hook {name} lacks a docstring"


def test_entry_points_match_importlib_metadata(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up fast path finds the same entry points, in the same order, as
    importlib.metadata (which it replaces because importing it costs every command 15-25 ms)."""
    import importlib.metadata

    from vmconfine.plugin.registry import entry_points

    site = tmp_path / "site"
    install_fake_package(site)
    extra = site / "other-2.0.dist-info"
    extra.mkdir()
    (extra / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 2.0\n")
    (extra / "entry_points.txt").write_text(
        "# comment\n[console_scripts]\nx = other:main\n\n[vmconfine]\n"
        "  spaced  =  other.plug:Factory.make [extra]\n[vmconfine.more]\n"
        "no = other\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    ours = entry_points("vmconfine")
    theirs = [(ep.name, ep.value.split("[", 1)[0].strip())
              for d in importlib.metadata.distributions() for ep in d.entry_points
              if ep.group == "vmconfine"]
    assert ("tagger", "vmconfine_tagger") in ours
    assert ("spaced", "other.plug:Factory.make") in ours
    assert ("no", "other") not in ours
    assert sorted(set(ours)) == sorted(set(theirs))
    assert [n for n, _v in ours if n in ("tagger", "spaced")] == \
        [n for n, _v in theirs if n in ("tagger", "spaced")]
