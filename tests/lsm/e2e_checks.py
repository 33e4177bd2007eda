"""Host-side checks of what tests/lsm/guest_e2e.py, guest_usb_hotplug.py and guest_smoke.py
observed in a guest.

The guest asserts the same things; reading them back here means a guest test that silently did
less (a skipped branch, a missing record) cannot pass the host test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.host.usb_hostdev import assert_attach_detach
from vmconfine.launch.pipeline import STEPS

#: what ``<os firmware='efi'>`` picks on Debian (40-edk2-x86_64-secure-enrolled.json)
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"


def assert_confined(lsm: str, got: dict[str, Any]) -> None:
    """QEMU runs with the domain's label and (SELinux) its image carries the image label."""
    if lsm == "selinux":
        assert got["current"] == got["label"]
        assert got["image"][3]["security.selinux"] == got["imagelabel"]
    else:
        assert got["current"] == f"{got['label']} (enforce)"


def assert_e2e(path: Path) -> dict[str, Any]:
    """Assert the e2e observations in ``path`` (``e2e-<lsm>.json``); return them."""
    seen = json.loads(path.read_text())
    lsm = path.stem.split("-", 1)[1]
    confined = seen["confined"]
    for name in ("dom-a", "dom-b"):
        assert_confined(lsm, confined[name])
    opens = seen["opens"]
    assert opens["own"] == "ok"
    assert "Permission denied" in opens["other"] and "Permission denied" in opens["secret"]
    assert opens["control_other"] == opens["control_secret"] == "ok"
    after = seen["after"]
    assert after["profiles"] == [] and after["leases"] == 0 and after["qemu_gone"]
    crash = seen["sigkill"]
    assert len(crash["after"]["qemus"]) == len(STEPS) - STEPS.index("forked")
    assert crash["after"]["qemu_alive"] == [] and crash["after"]["state"] == []
    assert crash["after"]["profiles"] == [] and crash["after"]["leases"] == 0
    if lsm == "selinux":
        levels = seen["levels"]
        assert len(set(levels)) == 2
        assert crash["during"]["leases"] == len(STEPS) - 1
        # the sVirt exec is AT_SECURE (refpolicy grants no noatsecure), which clears the
        # parent-death signal: these QEMUs survived the supervisor, the next command killed them
        assert crash["left_running"] == crash["after"]["qemus"]
        assert seen["refused"]["rc"] == 1
        assert "setsebool -P virt_use_execmem on" in seen["refused"]["stderr"]
    else:
        assert len(crash["during"]["profiles"]) == len(STEPS) - 1
    return seen


def assert_root_view(seen: dict[str, Any]) -> None:
    """``namespaces = ["mount", "root"]`` (guest_e2e.RootView): both QEMUs got their own mount
    namespace, and the confined one a per-domain root (``/usr`` bound, the host's ``/root``
    absent)."""
    assert seen["own_ns"] == {"rv-a": True, "rv-c": True}, seen
    assert "usr" in seen["view_root"] and "root" not in seen["view_root"], seen


def assert_svirt_root_view(seen: dict[str, Any]) -> None:
    """SELinux inside the root view (guest_selinux.py, ``selinux-rootview.json``): QEMU runs
    as the domain's sVirt label in its own root holding only the planned tree; its image and
    the files in its home directory keep their labels there; another domain's image and
    socket are not in it; the policy refuses the file and socket of another MCS pair and a
    home-directory file, which the control without an LSM opens and connects to."""
    assert_root_view(seen)
    label, imagelabel = seen["live"]["label"], seen["live"]["imagelabel"]
    assert seen["label"] == seen["label_after"] == label, seen
    assert label.split(":")[2] == "svirt_t", label
    assert label.split(":", 3)[3] == imagelabel.split(":", 3)[3]
    # /proc/PID/root holds exactly the planned entries (the namespaces driver's report rows)
    rows = {r["item"]: r for r in seen["view_rows"]}
    assert "/ in QEMU's view" in rows and not any(r["differs"] for r in rows.values()), rows
    assert seen["image_on_host"] == seen["image_in_view"] == imagelabel, seen
    assert seen["in_view"] == seen["labels"], seen
    assert not any(seen["cross_in_view"].values()), seen["cross_in_view"]
    opens = seen["opens"]
    for own in ("own", "mine"):  # the domain's own resources work
        assert opens[own] == "ok", opens
    # "mine_sock" is recorded, not asserted: its file label lets QEMU in (no sock_file AVC),
    # but Debian's refpolicy refuses svirt_t "connectto" a socket of its own process label
    # that the harness (kernel_t) created; real peers are labelled by their services
    for refused in ("other", "secret", "other_sock"):  # refused by the policy
        assert "Permission denied" in opens[refused], opens
    for absent in ("cross_image", "cross_sock"):  # another domain's: not in the view
        assert "No such file or directory" in opens[absent], opens
    for control in ("control_other", "control_secret", "control_other_sock"):
        assert opens[control] == "ok", opens
    for file in ("other.img", "secret.txt", "other.sock"):  # the AVCs name those labels
        target = f"tcontext={seen['labels'][file]} "
        assert any(target in ln for ln in seen["denials"]), (file, seen["denials"])


def assert_usb_hotplug(seen: dict[str, Any]) -> None:
    """tests/lsm/guest_usb_hotplug.py: the emulated USB device attached to and detached from a
    confined QEMU (tests/host/usb_hostdev.py), and its AppArmor profile allowed the node exactly
    while it was attached."""
    assert_attach_detach(seen)
    assert seen["label"].startswith("vmconfine-"), seen["label"]
    assert seen["current"] == f"{seen['label']} (enforce)", seen["current"]
    assert [seen[s]["probe"] for s in ("before", "attached", "detached")] == [False, True, False]


def assert_display(seen: dict[str, Any]) -> None:
    """tests/lsm/guest_display.py: SPICE on its socket and the UEFI flash under the LSM, the
    profile's or the labels' exact share of them, another domain's NVRAM refused (and opened
    once the LSM stops enforcing: the control)."""
    lsm, loader = seen["lsm"], OVMF_CODE
    nvram, home, sock = (seen["paths"][k] for k in ("nvram", "home", "sock"))
    if lsm == "selinux":
        assert seen["current"] == seen["label"] and ":svirt_t:" in seen["label"], seen
        assert seen["enforce"] == "1"
        ctx = seen["contexts"]
        assert ctx["nvram"] == ctx["socket"] == seen["imagelabel"], ctx
        assert ":svirt_image_t:" in ctx["other"] and ctx["other"] != seen["imagelabel"], ctx
        assert ctx["loader"] != seen["imagelabel"], ctx  # the firmware is never relabelled
    else:
        assert seen["current"] == f"{seen['label']} (enforce)", seen
        # the OVMF code: read and lock through the abstraction, written nowhere
        assert seen["abstraction_ovmf"] == ["/usr/share/OVMF/** rk,"], seen["abstraction_ovmf"]
        assert seen["rules"] == {
            "loader": [],  # no rule of the domain's own: the abstraction's covers it
            "nvram": [f'"{nvram}" rwk,'],
            "home": sorted([f'"{home}/" r,', f'"{home}/**" rwk,']),  # the socket's directory
            "spice": [],  # no rule of its own: the generated socket is in the home directory
        }, seen["rules"]
    # on a unix socket: no port; no ticket (the XML sets none)
    assert seen["spice"] == {"enabled": True, "host": sock, "port": None, "auth": "none"}
    assert seen["link_magic"] == "REDQ"
    assert seen["flash"] == {"flash0": [loader, True], "flash1": [nvram, False]}, seen["flash"]
    assert seen["status"] == "prelaunch"
    assert seen["opens"]["own_nvram"] == "ok", seen["opens"]
    assert "Permission denied" in seen["opens"]["other_nvram"], seen["opens"]
    assert seen["denials"], "the refusal left no LSM denial"
    if lsm == "apparmor":
        assert all(f'profile="{seen["label"]}"' in ln for ln in seen["denials"]), seen
    assert seen["relaxed"] == ("0" if lsm == "selinux" else "complain")
    assert seen["control"] == "ok", seen["control"]
    assert seen["after"] == {"destroy": 0, "qemu_gone": True, "profiles": [],
                             "nvram_kept": True}, seen["after"]


#: tests/lsm/guest_smoke.py: the booted kernel itself enforces (run in the drivers' boots)
SMOKE = "tests/lsm/guest_smoke.py"
SMOKE_OUTCOMES = {
    "apparmor": {"test_apparmor_confines": "passed", "test_selinux_mcs_separates": "skipped"},
    "selinux": {"test_apparmor_confines": "skipped", "test_selinux_mcs_separates": "passed"},
}


def assert_smoke(lsm: str, results_dir: Path) -> None:
    """The smoke observations of a guest booted with ``lsm``: a profile (AppArmor) or two MCS
    categories (SELinux) enforced by the kernel alone, before any vmconfine code runs."""
    seen = json.loads((results_dir / f"smoke-{lsm}.json").read_text())
    if lsm == "apparmor":
        assert seen["label"] == "vmconfine_smoke (enforce)"
        assert seen["allowed_rc"] == 0 and seen["unconfined_rc"] == 0
        assert seen["secret_rc"] != 0 and seen["shadow_rc"] != 0
    else:
        assert seen["context"] == "system_u:system_r:svirt_t:s0:c1,c2"
        assert seen["own_rc"] == 0 and seen["vm2_own_rc"] == 0
        assert seen["foreign_rc"] != 0
