"""Display autoports held instance-wide (vmconfine.launch.ports) with real ``vmconfine run``
processes: two starts at the same time get different SPICE and VNC ports (each paused right
after its ports were reserved, before QEMU binds anything: probing alone would give both the
same ports), a port another process has bound is skipped, SIGKILL + the next command's recovery
frees the ports, and a real QEMU listens on exactly the ports reserved for it until ``destroy``
gives them back."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import xml.etree.ElementTree as ET

from tests.host.conftest import VMCONFINE, Embed, VmDir, wait_for_line
from tests.support import REPO
from vmconfine.config.instance import open_instance
from vmconfine.launch.journal import Journal
from vmconfine.launch.ports import PortRegistry
from vmconfine.qemu.argv_display import port_is_free

DISPLAYS = ("<graphics type='spice' autoport='yes'><listen type='address'/></graphics>"
            "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>")
WIDTH = 6


def free_block() -> int:
    """The first port of WIDTH consecutive ports nothing is bound to (a range of this test's
    own, so parallel tests' displays at 5900+ never meet it)."""
    for _ in range(200):
        low = random.randrange(20000, 30000)
        if all(port_is_free(p) for p in range(low, low + WIDTH)):
            return low
    raise AssertionError("no free block of ports")


def held(e: Embed) -> dict[str, str]:
    registry = PortRegistry(open_instance(e.uri))
    try:
        return {lease.owner: lease.value for lease in registry.leases()}
    finally:
        registry.close()


def live_ports(xml: str) -> list[int]:
    """The ports of the displays (SPICE first, then VNC) in a live XML."""
    return [int(g.get("port", "-1")) for g in ET.fromstring(xml).iter("graphics")]


def qmp(e: Embed, name: str, command: str) -> dict:
    proc = e.cli("qemu-monitor-command", name, json.dumps({"execute": command}), check=True)
    return json.loads(proc.stdout)["return"]


def test_concurrent_starts_hold_different_ports_until_teardown(embed: Embed,
                                                               vm_dir: VmDir) -> None:
    e = embed
    low = free_block()
    e.configure(f'security_driver = "none"\nremote_display_port_min = {low}\n'
                f'remote_display_port_max = {low + WIDTH - 1}\n')
    other = socket.socket()  # another process's listener on the range's first port
    other.bind(("127.0.0.1", low))
    other.listen()
    try:
        xmls = {n: vm_dir.domain_xml(n, extra_devices=DISPLAYS) for n in ("dpa", "dpb", "dpc")}
        env = dict(os.environ, VMCONFINE_PAUSE_AT="labels")  # ports reserved, QEMU not started
        runs = {n: subprocess.Popen([VMCONFINE, "-c", e.uri, "run", str(xmls[n])], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
                for n in ("dpa", "dpb")}
        e.procs += runs.values()
        for proc in runs.values():
            wait_for_line(proc, "paused at labels", stderr=True)
        inst = open_instance(e.uri)
        got = {n: live_ports(Journal(inst.journal_path(n)).last("pipeline", "labels")["xml"])
               for n in runs}
        taken = sorted(got["dpa"] + got["dpb"])
        assert taken == list(range(low + 1, low + 5)), got  # four different ports, not `low`
        assert sorted(map(int, held(e).values())) == taken

        # SIGKILL at that step: the next command's recovery gives the ports back
        for proc in runs.values():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert e.cli("list").returncode == 0
        assert held(e) == {}

        # a real QEMU listens on the ports reserved for it, held until destroy
        run = e.start(xmls["dpc"], "--paused")
        ports = live_ports(e.cli("dumpxml", "dpc", check=True).stdout)
        assert ports == [low + 1, low + 2], ports
        assert int(qmp(e, "dpc", "query-spice")["port"]) == ports[0]
        assert int(qmp(e, "dpc", "query-vnc")["service"]) == ports[1]
        assert sorted(map(int, held(e).values())) == ports
        e.cli("destroy", "dpc", check=True)
        assert run.wait(timeout=60) == 0
        assert held(e) == {}
        assert all(port_is_free(p) for p in ports)
    finally:
        other.close()

