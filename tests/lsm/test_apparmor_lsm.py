"""The AppArmor driver and vmconfine-aa-helper against a kernel that enforces AppArmor.

One boot of the lsm guest (tests/lsm/harness.py) runs tests/lsm/guest_apparmor.py inside: the
real driver and helper load per-domain profiles, a process in domain A's profile reads and
writes A's disk and is denied B's disk, an unlisted file and /etc/shadow, an over-broad profile
is caught leaking, teardown unloads the profile, a disk hotplugged through the driver's hooks
is readable after the attach and denied after the detach, a restart loads the cached compiled
policy (no compile) that confines the same way, and with ``namespaces = ["mount", "root"]``
QEMU runs under its profile inside its per-domain root view. The same boot runs
tests/lsm/guest_e2e.py: ``vmconfine run`` starts real QEMUs under their profiles, a QEMU asked
over QMP to open another domain's image or a file outside its domain is refused (a ``none``
control run opens both), SIGKILL of ``vmconfine run`` at every pipeline step is cleaned up
by the next command, and a TPM domain's swtpm runs in its ``//swtpm`` child profile
(enforce), denied another domain's TPM state. It also runs tests/lsm/guest_smoke.py first: the
kernel enforces a profile loaded by apparmor_parser alone, and tests/lsm/guest_usb_hotplug.py
after guest_e2e.py: the guest's emulated USB device (``usb=True``) is hotplugged into a
confined QEMU through the daemon and detached again; and tests/lsm/guest_display.py: a q35
UEFI domain with SPICE on a unix socket runs paused under its profile, which holds exactly the
NVRAM and socket rules (the firmware read-only through the abstraction), and its QEMU is
refused another domain's NVRAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lsm.e2e_checks import (
    SMOKE,
    SMOKE_OUTCOMES,
    assert_display,
    assert_e2e,
    assert_smoke,
    assert_usb_hotplug,
)
from tests.lsm.harness import GuestKernel, run_in_guest

pytestmark = pytest.mark.lsm

GUEST = "tests/lsm/guest_apparmor.py"
E2E = "tests/lsm/guest_e2e.py"
USB = "tests/lsm/guest_usb_hotplug.py"
DISPLAY = "tests/lsm/guest_display.py"


def test_apparmor_driver_in_an_enforcing_kernel(guest_kernel: GuestKernel,
                                                tmp_path: Path) -> None:
    # The timeout bounds a hang only: the guest's 12 tests take ~8 min under TCG on an idle
    # machine, and more than 20 min once the other tiers and a benchmark share the 2 CPUs.
    result = run_in_guest("apparmor", GUEST, kernel=guest_kernel, results_dir=tmp_path,
                          timeout=1800, memory_mib=1024, pytest_args=[SMOKE, E2E, USB, DISPLAY],
                          usb=True)
    assert not result.timed_out, result.tail()
    assert result.outcomes() == {
        **SMOKE_OUTCOMES["apparmor"],
        "test_driver_profile_confines_and_is_unloaded": "passed",
        "test_over_broad_profile_is_caught": "passed",
        "test_hotplugged_disk_is_readable_then_denied": "passed",
        "test_profile_applies_inside_the_root_view": "passed",
        "test_selinux_names_what_the_policy_lacks": "skipped",
        "test_confined_qemu_opens_only_its_own_image": "passed",
        "test_sigkill_at_every_step_is_finished_by_the_next_command": "passed",
        "test_swtpm_runs_confined": "passed",
        "test_usb_hostdev_attach_detach": "passed",
        "test_spice_and_efi_under_the_lsm": "passed",
    }, result.tail(120)
    assert result.exit_code == 0, result.tail()
    assert_smoke("apparmor", tmp_path)
    seen = json.loads((tmp_path / "apparmor-driver.json").read_text())
    confined = seen["confined"]
    assert confined["own_disk"] == "ok"
    assert confined["other_disk"] == confined["shadow"] == confined["unlisted"] == "EACCES"
    assert seen["broken_profile"]["other_disk"] == "ok"
    assert seen["after_teardown"] == []
    restart = seen["restart"]  # unchanged content: the cached compiled policy is loaded
    assert [c[:2] for c in restart["helper"]] == [["-c", "--cached"]]
    assert restart["loaded"] == "enforce"
    assert restart["confined"]["own_disk"] == "ok"
    assert restart["confined"]["other_disk"] == restart["confined"]["shadow"] == "EACCES"
    assert seen["after_restart_teardown"] is False
    hotplug = seen["hotplug"]  # the profile follows attach and detach
    assert hotplug["before"]["new"] == hotplug["detached"]["new"] == "EACCES"
    assert hotplug["attached"]["new"] == "ok"
    view = seen["root_view"]  # namespaces = ["mount", "root"]: the profile still applies
    assert view["label"].startswith("vmconfine-") and view["label"].endswith(" (enforce)")
    assert view["opens"]["own"] == "ok" and "Permission denied" in view["opens"]["environ"]
    assert view["opens"]["control_own"] == view["opens"]["control_environ"] == "ok"
    assert any("/environ" in ln for ln in view["denials"]), view["denials"]
    e2e = assert_e2e(tmp_path / "e2e-apparmor.json")
    tpm = e2e["tpm"]  # swtpm in its child profile, denied another domain's TPM state
    profile = tpm["current"].split("//", 1)[0]
    assert tpm["current"] == f"{profile}//swtpm (enforce)"
    assert tpm["confined"][0] != 0 and tpm["control"][0] == 0
    assert tpm["denials"] and all("/swtpm/" in d for d in tpm["denials"])
    assert tpm["after"] == {"swtpm_gone": True, "profiles": [], "leases": 0}
    assert_usb_hotplug(json.loads((tmp_path / "usb-hotplug.json").read_text()))
    assert_display(json.loads((tmp_path / "display-apparmor.json").read_text()))
