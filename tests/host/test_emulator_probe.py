"""The XML's <emulator> is untrusted: vmconfine probes it only as QEMU's account, without
capabilities, with no_new_privs and a clean environment (vmconfine.qemu.probe), for every
command that looks at a domain XML."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir
from tests.support import require

QEMU_USER = "vmconfine-qemu"

FAKE = """#!/bin/sh
# records who runs it; a root run leaves a marker
{{
  echo "argv=$*"
  echo "uid=$(id -u) gid=$(id -g)"
  grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status
  env | sed 's/^/env:/'
  echo "--"
}} >> {rec}/log 2>/dev/null
[ "$(id -u)" = 0 ] && touch {rec}/RAN-AS-ROOT
case "$1" in -L) echo /usr/share/qemu ;; esac
{tail}
"""


def fake_emulator(vm_dir: VmDir, tail: str = "exit 0") -> tuple[Path, Path]:
    rec = vm_dir.path / "rec"
    rec.mkdir()
    os.chmod(rec, 0o777)  # QEMU's account records there
    emu = vm_dir.path / "fake-qemu"
    emu.write_text(FAKE.format(rec=rec, tail=tail))
    os.chmod(emu, 0o755)
    return emu, rec


def xml_with(vm_dir: VmDir, emulator: Path, name: str) -> Path:
    xml = vm_dir.domain_xml(name)
    xml.write_text(xml.read_text().replace("/usr/bin/qemu-system-x86_64", str(emulator)))
    return xml


def probe_runs(rec: Path) -> list[dict[str, str]]:
    """Each recorded run of the fake emulator with '-L' (a probe), as key → value."""
    runs = []
    text = (rec / "log").read_text() if (rec / "log").exists() else ""
    for block in text.split("--\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            m = re.match(r"^(argv|uid|Cap\w+|NoNewPrivs)[=:]\s*(.*)$", line)
            if m:
                fields[m.group(1)] = m.group(2)
            elif line.startswith("env:"):
                fields.setdefault("env", "")
                fields["env"] += line[4:].split("=", 1)[0] + " "
        if fields.get("argv", "").startswith("-L"):
            runs.append(fields)
    return runs


def assert_unprivileged(rec: Path) -> None:
    assert not (rec / "RAN-AS-ROOT").exists(), "the XML's emulator ran as root"
    runs = probe_runs(rec)
    assert runs, "the emulator was never probed (the test proves nothing)"
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    for run in runs:
        assert run["uid"].startswith(f"{uid} "), run
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(run[cap], 16) == 0, run
        assert run["NoNewPrivs"] == "1", run
        # PATH only (the shell itself adds PWD)
        assert set(run["env"].split()) <= {"PATH", "PWD"} and "PATH" in run["env"], run


@pytest.fixture
def landlock_embed(embed: Embed) -> Embed:
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        require(False, f"user {QEMU_USER} is missing (run scripts/setup.sh)")
    embed.configure('security_driver = "landlock"\n')
    return embed


def test_confinement_report_probes_as_qemu_user(vm_dir: VmDir, landlock_embed: Embed) -> None:
    emu, rec = fake_emulator(vm_dir)
    xml = xml_with(vm_dir, emu, "probe-rep")
    proc = landlock_embed.cli("confinement", str(xml))
    assert "Traceback" not in proc.stderr
    assert_unprivileged(rec)
    # nothing written for a fresh instance; once it has a cache dir (its first start makes
    # it), a second look answers from the cache: the emulator is not run again
    assert not (landlock_embed.root / "cache").exists()
    (landlock_embed.root / "cache" / "qemu").mkdir(parents=True)
    landlock_embed.cli("confinement", str(xml))
    before = len(probe_runs(rec))
    landlock_embed.cli("confinement", str(xml))
    assert len(probe_runs(rec)) == before


def test_run_and_to_native_probe_as_qemu_user(vm_dir: VmDir, landlock_embed: Embed) -> None:
    emu, rec = fake_emulator(vm_dir)
    xml = xml_with(vm_dir, emu, "probe-run")
    native = landlock_embed.cli("domxml-to-native", "qemu-argv", str(xml))
    assert native.returncode == 0, native.stderr
    assert not (rec / "RAN-AS-ROOT").exists()
    proc = landlock_embed.cli("run", str(xml), timeout=120)
    assert proc.returncode == 1  # the fake speaks no QMP
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_unprivileged(rec)


@pytest.mark.parametrize("case", ["crash", "not-executable", "fifo"])
def test_probe_failure_is_one_line(vm_dir: VmDir, landlock_embed: Embed, case: str) -> None:
    emu, rec = fake_emulator(vm_dir, tail="kill -SEGV $$")
    if case == "not-executable":
        os.chmod(emu, 0o644)
    elif case == "fifo":
        emu.unlink()
        os.mkfifo(emu)
    xml = xml_with(vm_dir, emu, f"probe-{case}")
    proc = landlock_embed.cli("run", str(xml), timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(emu) in lines[0], proc.stderr
    assert {"crash": "SIGSEGV", "not-executable": "Permission denied",
            "fifo": "not a regular file"}[case] in lines[0]
    assert not (rec / "RAN-AS-ROOT").exists()
