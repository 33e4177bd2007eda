"""Smoke test of the lsm tier itself: it can pass, and it can fail.

Each test boots one guest (tests/lsm/harness.py) running tests/lsm/guest_smoke.py inside. Four
boots in all: AppArmor, SELinux, AppArmor with an inverted expectation, and one cut short by the
timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lsm.harness import EXIT_TIMEOUT, GuestKernel, run_in_guest, run_script_in_guest

pytestmark = pytest.mark.lsm

SMOKE = "tests/lsm/guest_smoke.py"


def test_apparmor_guest_enforces_a_profile(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    result = run_in_guest("apparmor", SMOKE, kernel=guest_kernel, results_dir=tmp_path)
    assert result.exit_code == 0, result.tail()
    assert result.outcomes() == {
        "test_apparmor_confines": "passed",
        "test_selinux_mcs_separates": "skipped",
    }, result.tail()
    seen = json.loads((tmp_path / "smoke-apparmor.json").read_text())
    assert seen["label"] == "vmconfine_smoke (enforce)"
    assert seen["allowed_rc"] == 0 and seen["unconfined_rc"] == 0
    assert seen["secret_rc"] != 0 and seen["shadow_rc"] != 0


def test_selinux_guest_separates_mcs_categories(
    selinux_guest_kernel: GuestKernel, tmp_path: Path
) -> None:
    result = run_in_guest("selinux", SMOKE, kernel=selinux_guest_kernel, results_dir=tmp_path)
    assert result.exit_code == 0, result.tail()
    assert result.outcomes() == {
        "test_apparmor_confines": "skipped",
        "test_selinux_mcs_separates": "passed",
    }, result.tail()
    seen = json.loads((tmp_path / "smoke-selinux.json").read_text())
    assert seen["context"] == "system_u:system_r:svirt_t:s0:c1,c2"
    assert seen["own_rc"] == 0 and seen["vm2_own_rc"] == 0
    assert seen["foreign_rc"] != 0


def test_failing_guest_test_fails_the_run(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    result = run_in_guest(
        "apparmor", SMOKE, kernel=guest_kernel, results_dir=tmp_path,
        extra_env={"VMCONFINE_SMOKE_INVERT": "1"},
    )
    assert not result.timed_out, result.tail()
    assert result.exit_code == 1, result.tail()  # pytest: "tests were collected and some failed"
    assert result.outcomes()["test_apparmor_confines"] == "failed"
    assert "denied as it should be, but VMCONFINE_SMOKE_INVERT=1" in result.output
    # the guest still saw the real denial: only the expectation was inverted
    seen = json.loads((tmp_path / "smoke-apparmor.json").read_text())
    assert seen["shadow_rc"] != 0


def test_timeout_kills_the_guest(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    # The guest command never ends by itself, so only the harness's deadline can stop QEMU.
    result = run_script_in_guest(
        "apparmor", "sleep 600", kernel=guest_kernel, results_dir=tmp_path, timeout=5
    )
    assert result.timed_out
    assert result.exit_code == EXIT_TIMEOUT
    assert not result.ok
    assert "LSMPROBE_EXIT=" not in result.output
    assert "killed after the 5 s timeout" in result.tail()
