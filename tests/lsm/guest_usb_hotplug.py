"""Guest side of the USB hostdev hotplug test: a real USB device, passed to a real QEMU.

Runs INSIDE the AppArmor guest, which the harness boots with ``usb=True`` (an xHCI controller
and QEMU's emulated USB keyboard, ``harness.USB_DEVICE``): the guest kernel enumerates it and
devtmpfs makes ``/dev/bus/usb/001/002``. A daemon with ``security_driver = "apparmor"`` starts a
paused nested QEMU; ``attach-device`` of ``<hostdev mode='subsystem' type='usb'>`` by vendor and
product gives QEMU the device (``usb-host`` over an fd set), ``detach-device`` takes it back
(tests/host/usb_hostdev.py has the steps and the assertions, shared with the host tier).
Checked: QOM and ``info usb`` show the device, the node belongs to QEMU's account while
attached, the node appears in QEMU's private /dev, the domain's AppArmor profile allows the
node only while it is attached; after the detach owner, /dev, profile and QEMU are as before.

Observations go to ``$VMCONFINE_GUEST_RESULTS/usb-hotplug.json`` for the host side.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.host.conftest import Embed
from tests.host.test_daemon import Daemon
from tests.host.usb_hostdev import Env, attach_detach, in_process, usb_devices
from tests.lsm.e2e_checks import assert_usb_hotplug
from tests.lsm.harness import USB_DEVICE

pytestmark = pytest.mark.lsm_guest

LSM = os.environ.get("VMCONFINE_LSM", "")
RESULTS = Path(os.environ.get("VMCONFINE_GUEST_RESULTS", "/run/out"))
WORK = Path("/run/vmconfine-usb")
NAME = "usbhp"


def test_usb_hostdev_attach_detach() -> None:
    if LSM != "apparmor":
        pytest.skip("run in the AppArmor boot")
    devices = [d for d in usb_devices() if (d.vendor, d.product) == USB_DEVICE]
    assert len(devices) == 1, f"the guest has no emulated USB device (usb=True): {usb_devices()}"
    dev = devices[0]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.chmod(WORK, 0o755)
    profiles = WORK / "profiles"
    e = Embed(WORK / "instance")
    e.configure(f'security_driver = "apparmor"\napparmor_profile_dir = "{profiles}"\n')
    d = Daemon(e)
    d.start(timeout=300)  # an interpreter start-up under TCG on a loaded host can take a minute
    xml = WORK / "dom.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{NAME}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/>"
        "</devices></domain>")
    env = Env(d, WORK, NAME, in_process(e.uri))
    try:
        env.cli("define", str(xml), check=True)
        env.cli("start", "--paused", NAME, check=True)
        current = Path(f"/proc/{env.pid()}/attr/current").read_text().strip("\x00\n")
        label = current.removesuffix(" (enforce)")
        rules = profiles / f"{label}.files"

        def node_rule() -> bool:
            return f'"{dev.node}" rw' in rules.read_text()

        seen: dict[str, Any] = attach_detach(env, dev, probe=node_rule)
        seen["label"], seen["current"] = label, current
        (RESULTS / "usb-hotplug.json").write_text(json.dumps(seen, indent=1, sort_keys=True))
        assert_usb_hotplug(seen)
    finally:
        env.cli("destroy", NAME)
        d.stop()
        shutil.copy(d.log, RESULTS / "usb-daemon.log")  # for a failure's diagnosis

