"""Smoke test of the lsm tier itself: it can pass, and it can fail.

Two boots (tests/lsm/harness.py): AppArmor running tests/lsm/guest_smoke.py with an inverted
expectation (a failing guest test fails the run), and one cut short by the timeout. The smoke
module's passing runs happen inside the drivers' boots (test_apparmor_lsm.py,
test_selinux_lsm.py), which check its observations with ``e2e_checks.assert_smoke``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lsm.harness import EXIT_TIMEOUT, GuestKernel, run_in_guest, run_script_in_guest

pytestmark = pytest.mark.lsm

SMOKE = "tests/lsm/guest_smoke.py"


def test_failing_guest_test_fails_the_run(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    result = run_in_guest(
        "apparmor", SMOKE, kernel=guest_kernel, results_dir=tmp_path,
        extra_env={"VMCONFINE_SMOKE_INVERT": "1"},
        timeout=600,  # bounds a hang only; the lsm tier shares the CPUs with the other tiers
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
