"""The CLI: one-line errors, exit status 1, no tracebacks, --help on every verb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmconfine.cli import _VERBS, main

VMCONFINE = [sys.executable, "-m", "vmconfine.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMCONFINE, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("verb", sorted(_VERBS))
def test_help_on_every_verb(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert verb in capsys.readouterr().out


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_malformed_xml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='qemu'><name>x</name>")
    uri = f"qemu:///embed?root={tmp_path / 'inst'}"
    _assert_one_line_error(run("-c", uri, "domxml-to-native", "qemu-argv", str(bad)),
                           str(bad))


def test_missing_file(tmp_path: Path) -> None:
    uri = f"qemu:///embed?root={tmp_path / 'inst'}"
    _assert_one_line_error(run("-c", uri, "run", str(tmp_path / "nope.xml")), "no such file")


def test_bad_config(tmp_path: Path) -> None:
    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text("security_driver = yes\n")
    _assert_one_line_error(run("-c", f"qemu:///embed?root={root}", "config"), "qemu.conf:1:")


def test_unknown_driver(tmp_path: Path) -> None:
    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "foo"\n')
    _assert_one_line_error(run("-c", f"qemu:///embed?root={root}", "capabilities"),
                           "security driver 'foo' is not installed (installed: ")


def test_dac_listed_in_security_driver(tmp_path: Path) -> None:
    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = [ "apparmor", "dac" ]\n')
    _assert_one_line_error(run("-c", f"qemu:///embed?root={root}", "capabilities"),
                           'security_driver cannot contain "dac": the dac driver is always '
                           "enabled for privileged instances; remove it from the list")
    check = run("-c", f"qemu:///embed?root={root}", "config", "--check")
    assert check.returncode == 1
    assert 'security_driver cannot contain "dac"' in check.stdout


def test_config_words_autodetection_from_the_installed_drivers(tmp_path: Path) -> None:
    proc = run("-c", f"qemu:///embed?root={tmp_path / 'inst'}", "config")
    assert proc.returncode == 0, proc.stderr
    assert "#security_driver = (autodetect: selinux, apparmor, none) # default" in \
        proc.stdout.splitlines()


def test_remote_uri_for_a_local_verb() -> None:
    _assert_one_line_error(run("-c", "qemu+ssh://h/system", "capabilities"),
                           "is a remote URI: this verb runs on the host itself")


def test_not_running(tmp_path: Path) -> None:
    _assert_one_line_error(run("-c", f"qemu:///embed?root={tmp_path}", "dominfo", "ghost"),
                           "domain 'ghost' is not running")


def test_unsupported_native_format(tmp_path: Path) -> None:
    f = tmp_path / "d.xml"
    f.write_text("<domain/>")
    _assert_one_line_error(
        run("-c", f"qemu:///embed?root={tmp_path}", "domxml-to-native", "xen-xm", str(f)),
        "unsupported native format 'xen-xm'")


def test_config_prints_a_valid_qemu_conf(tmp_path: Path) -> None:
    from vmconfine.config.conf import parse_conf

    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\nuser = "+0"\n')
    proc = run("-c", f"qemu:///embed?root={root}", "config")
    assert proc.returncode == 0, proc.stderr
    conf = parse_conf(proc.stdout)
    entry = conf.get("user")
    assert entry is not None and entry.value == "+0"
    assert "qemu.conf:2" in proc.stdout


def test_capabilities_lists_secmodels_in_stack_order(tmp_path: Path) -> None:
    from lxml import etree

    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n')
    proc = run("-c", f"qemu:///embed?root={root}", "capabilities")
    assert proc.returncode == 0, proc.stderr
    doc = etree.fromstring(proc.stdout.encode())
    models = doc.xpath("/capabilities/host/secmodel/model/text()")
    assert models[0] == "none"
    assert doc.xpath("/capabilities/host/cpu/arch/text()")


@pytest.mark.parametrize("columns", [None, "57", "0", "junk"])
def test_help_is_as_wide_as_argparse_makes_it(columns: str | None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's formatter finds the width without shutil, as shutil would; the help text is
    wrapped exactly as argparse's own formatter wraps it."""
    import argparse
    import shutil

    from vmconfine.cli import _columns, build_parser

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _columns() == shutil.get_terminal_size().columns
    for only in (None, "list"):
        ours = build_parser(only)
        plain = build_parser(only)
        plain.formatter_class = argparse.HelpFormatter
        assert ours.format_help() == plain.format_help()
