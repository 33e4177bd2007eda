"""Landlock on the real kernel: a read-only disk and a backing layer are readable but never
writable by QEMU, even though DAC hands QEMU's account every layer (owner write bit set).

A compromised QEMU is played over QMP: ``blockdev-add`` of each file, read-only and
read-write (``locking: off``, so QEMU's own image locks do not decide). The control runs the
same domain without Landlock (DAC alone): there the read-write opens succeed, so the denials
come from the ruleset and the test can fail.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir
from tests.host.test_dac_cli import Guest
from tests.host.test_landlock_enforce import require_landlock
from vmconfine.config.instance import open_instance


def make_domain(vm_dir: VmDir, name: str) -> tuple[Path, dict[str, Path]]:
    """A qcow2 overlay on a raw backing file, a read-only disk (and a shareable disk and a
    serial file): the DAC tests' guest."""
    g = Guest(vm_dir, name, kernel=False)
    return g.xml, {"top": g.overlay, "backing": g.base, "readonly": g.ro}


class Qmp:
    """The domain's second QMP monitor (the one ``qemu-monitor-command`` uses), spoken raw."""

    def __init__(self, embed: Embed, name: str) -> None:
        path = open_instance(embed.uri).user_monitor_path(name)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        assert "return" in self.cmd("qmp_capabilities")

    def cmd(self, execute: str, **arguments: object) -> dict:
        self.f.write(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:
                return reply

    def blockdev_add(self, node: str, path: Path, read_only: bool) -> str:
        """'ok', or QEMU's error text, for QEMU opening ``path`` as asked."""
        reply = self.cmd("blockdev-add", driver="file", filename=str(path), locking="off",
                         **{"node-name": node, "read-only": read_only})
        if "error" in reply:
            return str(reply["error"]["desc"])
        assert "return" in self.cmd("blockdev-del", **{"node-name": node})
        return "ok"

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.mark.parametrize("driver", ["landlock", "none"])
def test_readonly_disk_and_backing_layer_are_never_writable(embed: Embed, vm_dir: VmDir,
                                                            driver: str) -> None:
    if driver == "landlock":
        require_landlock()
    embed.configure(f'security_driver = "{driver}"\n')
    name = f"llro-{driver}"
    xml, files = make_domain(vm_dir, name)
    run = embed.start(xml, "--paused")
    try:
        qmp = Qmp(embed, name)
        got = {(what, mode): qmp.blockdev_add(f"n-{what}-{mode}", path, read_only=mode == "ro")
               for what, path in files.items() for mode in ("ro", "rw")}
        qmp.close()
    finally:
        embed.cli("destroy", name)
        run.wait(timeout=60)
    # DAC gave QEMU's account every layer, with the owner's write bit: only Landlock denies
    for path in files.values():
        assert os.stat(path).st_mode & 0o200
    assert got[("top", "ro")] == got[("top", "rw")] == "ok", got
    assert got[("backing", "ro")] == got[("readonly", "ro")] == "ok", got
    if driver == "landlock":
        for what in ("backing", "readonly"):
            assert "Permission denied" in got[(what, "rw")], got
    else:  # the control: without the ruleset the same opens succeed
        assert got[("backing", "rw")] == got[("readonly", "rw")] == "ok", got
