"""vmconfine-aa-helper with the real apparmor_parser on this host.

The kernel here has no AppArmor, so profiles cannot be loaded; ``--compile-only`` makes the
helper run ``apparmor_parser -Q -K`` (compile and check, load nothing). Every profile of the
golden corpus must compile, files must appear with -c and disappear with -D, and a broken
profile must be rejected by the parser.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import VENV_BIN, require, require_binary
from tests.unit.test_aa_profiles import CASES, prepare, uuid_of
from vmconfine_aa_helper.files import DEFAULT_PARSER, shipped_dir
from vmconfine_apparmor import kernel

HELPER = str(VENV_BIN / "vmconfine-aa-helper")


def helper(*args: str, xml: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELPER, *args], input=xml, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(autouse=True)
def _parser() -> None:
    require_binary("apparmor_parser")
    require(Path(DEFAULT_PARSER).exists(), f"{DEFAULT_PARSER} is missing (apparmor package)")


@pytest.mark.parametrize("case", CASES)
def test_corpus_profile_compiles(case: str, tmp_path: Path) -> None:
    xml = prepare(case, tmp_path)
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    proc = helper("-c", "-u", name, "-P", str(profiles), "--compile-only",
                  "--uri", f"qemu:///embed?root={tmp_path}/inst", xml=xml)
    assert proc.returncode == 0, proc.stderr
    assert (profiles / name).is_file() and (profiles / f"{name}.files").is_file()
    # and by hand, as the docs tell an administrator to check a profile
    direct = subprocess.run(
        [DEFAULT_PARSER, "-Q", "-K", "-I", str(profiles), "-I", str(shipped_dir()),
         str(profiles / name)], capture_output=True, text=True, timeout=120, check=False)
    assert direct.returncode == 0, direct.stderr
    names = subprocess.run([DEFAULT_PARSER, "-N", "-I", str(shipped_dir()), str(profiles / name)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert names.stdout.split() == [name], names.stderr


def test_files_appear_and_disappear(tmp_path: Path) -> None:
    xml = prepare("disk-virtio", tmp_path)
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    uri = f"qemu:///embed?root={tmp_path}/inst"
    assert helper("-c", "-u", name, "-P", str(profiles), "--compile-only", "--uri", uri,
                  xml=xml).returncode == 0
    assert sorted(p.name for p in profiles.iterdir()) == [name, f"{name}.files", f"{name}.hash"]
    proc = helper("-r", "-u", name, "-P", str(profiles), "--compile-only", "--uri", uri,
                  "-f", str(tmp_path / "extra.img"), xml=xml)
    assert proc.returncode == 0, proc.stderr
    assert f'"{tmp_path}/extra.img" rwk,' in (profiles / f"{name}.files").read_text()
    proc = helper("-D", "-u", name, "-P", str(profiles), "--compile-only")
    assert proc.returncode == 0, proc.stderr
    assert list(profiles.iterdir()) == []


def test_parser_rejects_a_broken_profile(tmp_path: Path) -> None:
    """The compile check is real: a template with a bad rule fails and leaves nothing."""
    xml = prepare("minimal", tmp_path)
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "TEMPLATE.qemu").write_text(
        "profile VMCONFINE_TEMPLATE {\n  /etc/passwd zz,\n}\n")
    proc = helper("-c", "-u", name, "-P", str(profiles), "--compile-only",
                  "--uri", f"qemu:///embed?root={tmp_path}/inst", xml=xml)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "apparmor_parser" in proc.stderr
    assert sorted(p.name for p in profiles.iterdir()) == ["TEMPLATE.qemu"]


def test_local_abstraction_override_is_used(tmp_path: Path) -> None:
    """``<profile dir>/abstractions/vmconfine-qemu`` wins over the shipped one (-I order)."""
    xml = prepare("minimal", tmp_path)
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    (profiles / "abstractions").mkdir(parents=True)
    (profiles / "abstractions" / "vmconfine-qemu").write_text("  /broken-rule zz,\n")
    proc = helper("-c", "-u", name, "-P", str(profiles), "--compile-only",
                  "--uri", f"qemu:///embed?root={tmp_path}/inst", xml=xml)
    assert proc.returncode == 1 and "apparmor_parser" in proc.stderr


def test_loading_on_this_host(tmp_path: Path) -> None:
    """Without --compile-only the helper really loads; here that fails cleanly (one line,
    no files left) unless the kernel has AppArmor."""
    xml = prepare("disk-virtio", tmp_path)
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    uri = f"qemu:///embed?root={tmp_path}/inst"
    proc = helper("-c", "-u", name, "-P", str(profiles), "--uri", uri, xml=xml)
    if kernel.enabled()[0]:
        assert proc.returncode == 0, proc.stderr
        assert helper("-D", "-u", name, "-P", str(profiles)).returncode == 0
    else:
        assert proc.returncode == 1
        assert len(proc.stderr.splitlines()) == 1
        assert f"cannot load {profiles / name}: " in proc.stderr
        assert "AppArmor is not enabled in this kernel" in proc.stderr
    assert not profiles.exists() or list(profiles.iterdir()) == []


def test_console_script(tmp_path: Path) -> None:
    ok = helper("-h")
    assert ok.returncode == 0 and "usage: vmconfine-aa-helper" in ok.stdout
    bad = helper("-c", "-u", "vmconfine-nope")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stdout == ""


def test_tpm_domain_profile_compiles_with_its_swtpm_child(tmp_path: Path) -> None:
    """A TPM emulator domain's profile holds the ``//swtpm`` child profile, and the parser
    compiles both (the names ``-N`` lists are the kernel's)."""
    xml = prepare("minimal", tmp_path).replace(
        "</devices>", "<tpm model='tpm-crb'><backend type='emulator'/></tpm></devices>")
    name = f"vmconfine-{uuid_of(xml)}"
    profiles = tmp_path / "profiles"
    proc = helper("-c", "-u", name, "-P", str(profiles), "--compile-only",
                  "--uri", f"qemu:///embed?root={tmp_path}/inst", xml=xml)
    assert proc.returncode == 0, proc.stderr
    assert "  profile swtpm {" in (profiles / f"{name}.files").read_text()
    names = subprocess.run(
        [DEFAULT_PARSER, "-N", "-I", str(profiles), "-I", str(shipped_dir()),
         str(profiles / name)], capture_output=True, text=True, timeout=120, check=False)
    assert names.stdout.split() == [name, f"{name}//swtpm"], names.stderr
