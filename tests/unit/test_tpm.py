"""The TPM emulator's command line, its validation, the helper model and the stack's
fail-closed rule for helper processes (no swtpm runs here: tests/host/test_swtpm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_stack import Recorder, build
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import parse_domain
from vmconfine.errors import DriverError
from vmconfine.plugin.helper import Helper, HelperPath
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.qemu.argv import CommandPaths, QemuCommand, build_command
from vmconfine.qemu.argv_devices import UnsupportedConfigError
from vmconfine.qemu.fdpass import CONNECTED

XML = """<domain type='qemu'><name>t</name><uuid>6f1c3b0e-8d2a-4c55-9a0e-1a2b3c4d5e6f</uuid>
<memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>
<devices><emulator>{emu}</emulator>{tpm}</devices></domain>"""
PATHS = CommandPaths(monitor_socket="/run/x/domain-t/monitor.sock", home_dir="/var/lib/x",
                     runtime_dir="/run/x/domain-t", user="qemu")


def command(tmp_path: Path, tpm: str) -> QemuCommand:
    emu = tmp_path / "qemu-system-x86_64"
    emu.write_text("#!/bin/sh\n")
    emu.chmod(0o755)
    return build_command(parse_domain(XML.format(emu=emu, tpm=tpm)), QemuConfig(), PATHS)


def test_emulator_tpm_gets_a_connected_channel(tmp_path: Path) -> None:
    cmd = command(tmp_path, "<tpm model='tpm-crb'><backend type='emulator' "
                            "version='2.0'/></tpm>")
    tpm = [p for p in cmd.passed if p.name == "chrtpm"]
    assert [(p.kind, p.path) for p in tpm] == [(CONNECTED, "/run/x/domain-t/swtpm.sock")]
    args = cmd.argv(fds={p.name: 40 + i for i, p in enumerate(cmd.passed)})
    i = args.index("-tpmdev")
    assert args[i - 2:i + 4] == [
        "-chardev", f"socket,id=chrtpm,fd={40 + cmd.passed.index(tpm[0])}",
        "-tpmdev", "emulator,id=tpm-tpm0,chardev=chrtpm",
        "-device", '{"driver":"tpm-crb","tpmdev":"tpm-tpm0","id":"tpm0"}']
    assert "-chardev" in cmd.args and "socket,id=chrtpm,path=/run/x/domain-t/swtpm.sock" \
        in cmd.args  # domxml-to-native's symbolic form


@pytest.mark.parametrize(("tpm", "message"), [
    ("<tpm model='tpm-spapr'><backend type='emulator'/></tpm>", "tpm-spapr"),
    ("<tpm model='tpm-tis'><backend type='emulator' version='3.0'/></tpm>", "'2.0' or '1.2'"),
    ("<tpm model='tpm-tis'><backend type='emulator'/></tpm>"
     "<tpm model='tpm-crb'><backend type='emulator'/></tpm>", "only one <tpm>"),
])
def test_bad_tpm_is_refused_in_one_line(tmp_path: Path, tpm: str, message: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=message):
        command(tmp_path, tpm)


def test_helper_round_trips_through_the_journal() -> None:
    h = Helper("swtpm", "/usr/bin/swtpm", "tss", "tss",
               paths=(HelperPath("/usr/bin/swtpm", "rx"), HelperPath("/s", "rw", tree=True)),
               owned=("/s",))
    assert Helper.from_json(h.to_json()) == h


class HelperAware(Recorder):
    @hookimpl
    def child_helper(self, ctx: Any, helper: Any, step: str) -> None:
        self._do(f"child_helper:{step}")


def test_a_label_driver_that_cannot_confine_helpers_refuses_them(tmp_path: Path) -> None:
    swtpm = Helper("swtpm", "/usr/bin/swtpm", "tss", "tss")
    stack = build(tmp_path / "a", 'security_driver = "a"\n', {"a": Recorder("a", [])},
                  HelperAware("dac", []))
    with pytest.raises(DriverError, match="a: this driver cannot confine the swtpm helper"):
        stack.check_helper(swtpm)
    ok = build(tmp_path / "b", 'security_driver = "a"\n', {"a": HelperAware("a", [])},
               HelperAware("dac", []))
    ok.check_helper(swtpm)
