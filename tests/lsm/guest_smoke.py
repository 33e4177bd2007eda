"""Guest side of the lsm-tier smoke test: runs INSIDE the guest (see tests/lsm/harness.py).

Proves the booted LSM really enforces: AppArmor confines a process with a profile loaded by
``apparmor_parser -r``; SELinux keeps two sVirt MCS categories apart. Each test records what it
observed in ``$VMCONFINE_GUEST_RESULTS/smoke-<lsm>.json`` for the host side to check.

``VMCONFINE_SMOKE_INVERT=1`` flips the expectation of the denial checks, so the host side can
prove that a failing guest test makes the tier fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.lsm_guest

LSM = os.environ.get("VMCONFINE_LSM", "")
RESULTS = Path(os.environ.get("VMCONFINE_GUEST_RESULTS", "/run/out"))
INVERT = os.environ.get("VMCONFINE_SMOKE_INVERT") == "1"
WORK = Path("/run/vmconfine-smoke")  # tmpfs: SELinux labels stick here (the 9p root has none)
PROFILE = "vmconfine_smoke"
SVIRT = "system_u:system_r:svirt_t"
IMAGE = "system_u:object_r:svirt_image_t"


def active_lsms() -> list[str]:
    return Path("/sys/kernel/security/lsm").read_text().strip(",\n").split(",")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def record(name: str, data: dict[str, object]) -> None:
    (RESULTS / f"smoke-{name}.json").write_text(json.dumps(data, indent=1))


def expect_denied(proc: subprocess.CompletedProcess[str], what: str) -> None:
    """Assert ``proc`` failed with EACCES (or, inverted, that it succeeded)."""
    denied = proc.returncode != 0 and "Permission denied" in proc.stderr
    if INVERT:
        assert not denied, f"{what}: denied as it should be, but VMCONFINE_SMOKE_INVERT=1"
    else:
        assert denied, f"{what}: expected EACCES, got rc={proc.returncode} {proc.stderr!r}"


@pytest.fixture
def work() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    return WORK


def confined_by_apparmor(profile: str) -> None:
    """preexec_fn: ask AppArmor to switch to ``profile`` at the next exec (aa_change_onexec)."""
    attr = Path("/proc/self/attr/apparmor/exec")
    if not attr.exists():
        attr = Path("/proc/self/attr/exec")
    attr.write_text(f"exec {profile}")


def test_apparmor_confines(work: Path) -> None:
    if LSM != "apparmor":
        pytest.skip(f"guest booted with {LSM or 'no'} LSM, not apparmor")
    assert "apparmor" in active_lsms()
    assert Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    allowed = work / "allowed"
    secret = work / "secret"
    allowed.write_text("allowed-content\n")
    secret.write_text("secret-content\n")
    profile = work / "smoke.profile"
    profile.write_text(
        "abi <abi/3.0>,\n"
        "include <tunables/global>\n"
        f"profile {PROFILE} {{\n"
        "  include <abstractions/base>\n"
        f"  {allowed} r,\n"
        "  /usr/bin/cat mr,\n"
        "  owner @{PROC}/@{pid}/attr/{,apparmor/}current r,\n"
        "}\n"
    )
    load = run(["apparmor_parser", "-r", str(profile)])
    assert load.returncode == 0, load.stderr
    loaded = Path("/sys/kernel/security/apparmor/profiles").read_text()
    assert f"{PROFILE} (enforce)" in loaded

    def confined(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, check=False,
            preexec_fn=lambda: confined_by_apparmor(PROFILE),
        )

    label = confined("/usr/bin/cat", "/proc/self/attr/current")
    ok = confined("/usr/bin/cat", str(allowed))
    other = confined("/usr/bin/cat", str(secret))
    shadow = confined("/usr/bin/cat", "/etc/shadow")
    unconfined = run(["/usr/bin/cat", str(secret)])
    record("apparmor", {
        "label": label.stdout.strip("\x00\n"), "allowed_rc": ok.returncode,
        "secret_rc": other.returncode, "shadow_rc": shadow.returncode,
        "unconfined_rc": unconfined.returncode,
    })
    assert label.stdout.strip("\x00\n") == f"{PROFILE} (enforce)"
    assert ok.returncode == 0 and ok.stdout == "allowed-content\n", ok.stderr
    assert unconfined.returncode == 0 and unconfined.stdout == "secret-content\n"
    expect_denied(other, "confined read of a file the profile does not list")
    expect_denied(shadow, "confined read of /etc/shadow")
    if not INVERT:
        audit = run(["dmesg"]).stdout
        assert f'apparmor="DENIED" operation="open" profile="{PROFILE}" name="{secret}"' in audit


def test_selinux_mcs_separates(work: Path) -> None:
    if LSM != "selinux":
        pytest.skip(f"guest booted with {LSM or 'no'} LSM, not selinux")
    assert "selinux" in active_lsms()
    assert Path("/sys/fs/selinux/enforce").read_text().strip() == "1"
    own = work / "img-c1c2"
    foreign = work / "img-c3c4"
    own.write_text("vm1-disk\n")
    foreign.write_text("vm2-disk\n")
    for path, level in ((own, "s0:c1,c2"), (foreign, "s0:c3,c4")):
        label = run(["chcon", f"{IMAGE}:{level}", str(path)])
        assert label.returncode == 0, label.stderr
    vm1 = ["runcon", f"{SVIRT}:s0:c1,c2"]
    context = run([*vm1, "cat", "/proc/self/attr/current"])
    ok = run([*vm1, "cat", str(own)])
    other = run([*vm1, "cat", str(foreign)])
    vm2_own = run(["runcon", f"{SVIRT}:s0:c3,c4", "cat", str(foreign)])
    record("selinux", {
        "context": context.stdout.strip("\x00\n"), "own_rc": ok.returncode,
        "foreign_rc": other.returncode, "vm2_own_rc": vm2_own.returncode,
    })
    assert context.stdout.strip("\x00\n") == f"{SVIRT}:s0:c1,c2", context.stderr
    assert ok.returncode == 0 and ok.stdout == "vm1-disk\n", ok.stderr
    assert vm2_own.returncode == 0 and vm2_own.stdout == "vm2-disk\n", vm2_own.stderr
    expect_denied(other, "svirt_t:s0:c1,c2 reading svirt_image_t:s0:c3,c4")
