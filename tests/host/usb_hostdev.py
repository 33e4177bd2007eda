"""USB hostdev hotplug through the daemon, shared by the host tier (tests/host/
test_hotplug_devices.py: the refusals, which need no device) and the lsm tier
(tests/lsm/guest_usb_hotplug.py: a real attach and detach of the guest's emulated USB device).

``attach_detach`` drives ``attach-device`` / ``detach-device`` on a running domain and returns
what it observed; ``assert_attach_detach`` asserts those observations, in the guest and again on
the host from the JSON the guest wrote.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.host.test_daemon import Daemon, dominfo_pid
from vmconfine.cli import main

Runner = Callable[..., subprocess.CompletedProcess]


def in_process(uri: str) -> Runner:
    """What ``vmconfine -c URI ARGS`` does, run by the CLI's ``main`` in this process: the
    daemon does the work either way, and under TCG in the lsm guest every interpreter start-up
    costs 4-5 s."""

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main(["-c", uri, *args])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
        proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
        assert not check or rc == 0, f"vmconfine {' '.join(args)}: {proc.stderr}"
        return proc

    return run


class Env:
    """One running domain of a daemon, driven through the CLI (every hotplug test's handle);
    ``run`` replaces the ``vmconfine`` process per call (e.g. :func:`in_process`)."""

    def __init__(self, d: Daemon, path: Path, name: str, run: Runner | None = None) -> None:
        self.d, self.path, self.name = d, path, name
        self.run: Runner = run or d.cli

    def qmp(self, command: str, **args: object) -> dict:
        payload = {"execute": command, **({"arguments": args} if args else {})}
        out = self.run("qemu-monitor-command", self.name, json.dumps(payload), check=False)
        return json.loads(out.stdout) if out.stdout.strip() else {"error": out.stderr}

    def cli(self, *args: str, check: bool = False):  # type: ignore[no-untyped-def]
        return self.run(*args, check=check)

    def pid(self) -> int:
        return dominfo_pid(self.run("dominfo", self.name, check=True).stdout)

    def medium(self, device: str) -> str | None:
        for b in self.qmp("query-block")["return"]:
            if b["qdev"].removeprefix("/machine/peripheral/").split("/")[0] == device:
                return b.get("inserted", {}).get("file")
        raise AssertionError(f"no drive {device}")

    def peripherals(self) -> set[str]:
        return {d["name"] for d in self.qmp("qom-list", path="/machine/peripheral")["return"]}

    def hmp(self, line: str) -> str:
        reply = self.qmp("human-monitor-command", **{"command-line": line})
        return str(reply.get("return", reply))


@dataclass(frozen=True)
class UsbDevice:
    bus: int
    devnum: int
    vendor: int
    product: int

    @property
    def node(self) -> Path:
        return Path(f"/dev/bus/usb/{self.bus:03d}/{self.devnum:03d}")


def usb_devices() -> list[UsbDevice]:
    """The USB devices of this kernel other than hubs (root hubs included)."""
    base = Path("/sys/bus/usb/devices")
    found = []
    for d in sorted(base.glob("*")) if base.exists() else []:
        try:
            if (d / "bDeviceClass").read_text().strip() == "09":
                continue
            found.append(UsbDevice(int((d / "busnum").read_text()),
                                   int((d / "devnum").read_text()),
                                   int((d / "idVendor").read_text(), 16),
                                   int((d / "idProduct").read_text(), 16)))
        except (OSError, ValueError):
            continue
    return found


def _ids(path: Path | str) -> list[int]:
    st = os.stat(path)
    return [st.st_uid, st.st_gid]


def _process_ids(pid: int) -> list[int]:
    """The effective uid and gid of ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return [int(fields["Uid"][1]), int(fields["Gid"][1])]


def attach_detach(env: Env, dev: UsbDevice, *, by_ids: bool = True,
                  probe: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Attach ``dev`` (by vendor/product, or by bus/device), look, detach, look again.

    ``probe`` (e.g. the AppArmor profile's rules for the node) is called in each state."""
    pid = env.pid()
    view = Path(f"/proc/{pid}/root{dev.node}")

    def state() -> dict[str, Any]:
        return {"owner": _ids(dev.node), "peripherals": sorted(env.peripherals()),
                "info_usb": env.hmp("info usb"), "in_qemu_dev": view.exists(),
                "live_hostdev": "<hostdev" in env.cli("dumpxml", env.name).stdout,
                "probe": probe() if probe else None}

    source = (f"<vendor id='{dev.vendor:#06x}'/><product id='{dev.product:#06x}'/>" if by_ids
              else f"<address bus='{dev.bus}' device='{dev.devnum}'/>")
    xml = env.path / "usb-hostdev.xml"
    xml.write_text(f"<hostdev mode='subsystem' type='usb'><source>{source}</source></hostdev>")
    seen: dict[str, Any] = {
        "device": [dev.bus, dev.devnum, dev.vendor, dev.product], "node": str(dev.node),
        "qemu_ids": _process_ids(pid),
        "private_dev": os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
        "before": state()}
    out = env.cli("attach-device", env.name, str(xml))
    seen["attach"] = {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr}
    seen["attached"] = state()
    out = env.cli("detach-device", env.name, str(xml))
    seen["detach"] = {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr}
    seen["detached"] = state()
    # a compromised QEMU asks for the node by path once it is detached
    seen["evil"] = env.qmp("device_add", driver="usb-host", id="evil",
                           hostdevice=str(dev.node))
    seen["evil_peripherals"] = sorted(env.peripherals())
    return seen


def assert_attach_detach(seen: dict[str, Any]) -> None:
    """QEMU got the device (QOM, ``info usb``, the live XML), its account owns the node, the
    node is in QEMU's private /dev; detach gives all of it back, and QEMU cannot then open the
    node by path itself (``device_add usb-host hostdevice=/dev/bus/usb/...``)."""
    before, attached, detached = seen["before"], seen["attached"], seen["detached"]
    assert seen["attach"]["rc"] == 0, seen["attach"]
    assert "hostdev0" not in before["peripherals"] and not before["live_hostdev"]
    assert "hostdev0" in attached["peripherals"], attached
    assert "ID: hostdev0" in attached["info_usb"], attached["info_usb"]
    assert attached["live_hostdev"]
    assert before["owner"] != seen["qemu_ids"]  # so the change below means something
    assert attached["owner"] == seen["qemu_ids"], (attached["owner"], seen["qemu_ids"])
    if seen["private_dev"]:
        assert not before["in_qemu_dev"] and attached["in_qemu_dev"]
    assert seen["detach"]["rc"] == 0, seen["detach"]
    assert "hostdev0" not in detached["peripherals"]
    assert "hostdev0" not in detached["info_usb"] and not detached["live_hostdev"]
    assert detached["owner"] == before["owner"]
    assert detached["in_qemu_dev"] == before["in_qemu_dev"]
    assert "error" in seen["evil"] and "evil" not in seen["evil_peripherals"], seen["evil"]
