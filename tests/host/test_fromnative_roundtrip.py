"""domxml-to-native → domxml-from-native → to-native again, and QEMU builds the same VM.

For every corpus domain that can start here (tests/data/argv/, the same set and preparation
as tests/host/test_argv_qmp.py), the command line vmconfine builds is converted back to
domain XML; the command built from that XML must equal the first one, and a real QEMU started
with it (paused) must show over QMP the VM the *original* XML describes (block devices and
backing chains, CPUs, memory, chardevs, PCI devices, machine, VNC), checked with the QMP
helpers of test_argv_qmp.
"""

from __future__ import annotations

import pytest

from tests.host.test_argv_qmp import (
    STARTABLE,
    Workspace,
    check_view,
    config_for,
    launch,
    preopened,
    prepare,
    qemu_binary,
    qemu_log,
    qmp_view,
    wait_exit,
)
from tests.host.test_argv_qmp import ws as ws  # the workspace fixture
from tests.unit.test_fromnative import NO_ROUND_TRIP  # cases with their reasons
from vmconfine.domain import parse_domain
from vmconfine.qemu.argv import build_command
from vmconfine.qemu.fromnative.convert import from_native

pytestmark = pytest.mark.host


@pytest.mark.parametrize("case", [c for c in STARTABLE if c not in NO_ROUND_TRIP])
def test_converted_back_domain_starts_the_same_vm(case: str, ws: Workspace) -> None:
    qemu_binary()
    domain, cmd, paths = prepare(case, ws)
    result = from_native(cmd.format_native(), f"{case}.args")
    converted = parse_domain(result.xml, f"{case} (converted)")
    again = build_command(converted, config_for(case), paths)
    assert again.args == cmd.args
    assert again.env == cmd.env
    assert again.emulator == cmd.emulator

    argv, fds, vnc = preopened(again, ws)
    proc = launch(argv, again.env, ws, pass_fds=tuple(fds.values()))
    view = qmp_view(paths.monitor_socket, proc, ws, vnc=vnc)
    check_view(case, domain, again, view)  # the VM the original XML describes
    check_view(case, converted, again, view)  # and the one the converted XML describes
    assert wait_exit(proc) == 0, qemu_log(ws)
    for server in ws.servers:  # connect-mode sockets: QEMU connected as before
        server.settimeout(5)
        conn, _addr = server.accept()
        conn.close()
