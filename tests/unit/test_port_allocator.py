"""Display ports reserved instance-wide (vmconfine.launch.ports): libvirt's port allocator over
the locked lease registry. Concurrent ``vmconfine run`` processes and kill -9 recovery with real
QEMU: tests/host/test_display_ports.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import make_host
from vmconfine.domain import Domain, parse_domain
from vmconfine.errors import LaunchError
from vmconfine.launch import ports
from vmconfine.launch.journal import Journal
from vmconfine.plugin.context import HostContext
from vmconfine.qemu.argv import CommandPaths, UnsupportedConfigError, build_command

XML = """<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>{devices}</devices></domain>"""
SPICE_VNC = ("<graphics type='spice' autoport='yes'><listen type='address'/></graphics>"
             "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>")
PATHS = CommandPaths(monitor_socket="/run/x/monitor.sock", home_dir="/var/lib/x/d",
                     runtime_dir="/run/x", user="qemu")


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Ports some other process has bound (the bind probe says so)."""
    bound: set[int] = set()
    monkeypatch.setattr(ports, "port_is_free", lambda port: port not in bound)
    return bound


@pytest.fixture
def host(tmp_path: Path) -> HostContext:
    return make_host(tmp_path, [], config="remote_display_port_min = 5900\n"
                                          "remote_display_port_max = 5905\n")


def start(host: HostContext, n: int, devices: str = SPICE_VNC) -> tuple[Domain, Journal]:
    """What a start does: journal, then reserve (the journal stays: the domain runs)."""
    dom = parse_domain(XML.format(name=f"d{n}", uuid=f"00000000-0000-4000-8000-{n:012x}",
                                  devices=devices))
    journal = Journal(host.instance.journal_path(dom.name))
    journal.record("pipeline", "begin", xml=dom.to_xml())
    ports.reserve(host.instance, journal, dom)
    return dom, journal


def stop(host: HostContext, journal: Journal) -> None:
    assert ports.release(host.instance, journal) == []
    journal.remove()


def held(host: HostContext) -> dict[str, str]:
    registry = ports.PortRegistry(host.instance)
    try:
        return {lease.owner: lease.value for lease in registry.leases()}
    finally:
        registry.close()


def test_two_domains_get_different_ports_and_teardown_frees_them(host: HostContext,
        busy: set[int]) -> None:
    a, ja = start(host, 1)
    b, jb = start(host, 2)
    assert (a.graphics[0].port, a.graphics[1].port) == (5900, 5901)
    assert (b.graphics[0].port, b.graphics[1].port) == (5902, 5903)  # not A's: they are held
    assert held(host) == {f"{a.uuid}-0002": "5900", f"{a.uuid}-0001": "5901",
                          f"{b.uuid}-0002": "5902", f"{b.uuid}-0001": "5903"}
    # the live XML shows them, the inactive one does not (allocated again at the next start)
    live, inactive = a.to_xml(live=True), a.to_xml()
    assert 'port="5900"' in live and 'port="5901"' in live
    assert "5900" not in inactive and "5901" not in inactive
    again = parse_domain(inactive)
    assert [(g.port, g.autoport) for g in again.graphics] == [(-1, True), (-1, True)]
    # VNC at its reserved port, where QEMU would otherwise pick its own
    argv = build_command(a, host.instance.config, PATHS).args
    assert argv[argv.index("-vnc") + 1] == "127.0.0.1:1"
    assert "port=5900" in argv[argv.index("-spice") + 1]
    stop(host, ja)
    assert set(held(host)) == {f"{b.uuid}-0002", f"{b.uuid}-0001"}
    c, jc = start(host, 3)
    assert (c.graphics[0].port, c.graphics[1].port) == (5900, 5901)  # A's, given back
    stop(host, jb)
    stop(host, jc)
    assert held(host) == {}


def test_a_port_bound_by_another_process_is_skipped(host: HostContext,
        busy: set[int]) -> None:
    busy.update({5900, 5902})
    a, _ = start(host, 1)
    assert (a.graphics[0].port, a.graphics[1].port) == (5901, 5903)


def test_fixed_ports_are_held_and_a_second_owner_is_refused(host: HostContext,
        busy: set[int]) -> None:
    fixed = "<graphics type='vnc' port='5900' autoport='no' listen='127.0.0.1'/>"
    start(host, 1, fixed)
    b, _ = start(host, 2, "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>")
    assert b.graphics[0].port == 5901  # 5900 is the running domain's own
    with pytest.raises(LaunchError, match=r"domain 'd3': vnc port 5900 is already in use by "
                                          r"another domain; give the display another port"):
        start(host, 3, fixed)


def test_an_exhausted_range_is_one_line_and_stale_leases_are_reclaimed(host: HostContext,
        busy: set[int]) -> None:
    busy.update({5900, 5901, 5902, 5903})
    start(host, 1)  # 5904, 5905
    with pytest.raises(UnsupportedConfigError, match=r"Unable to find an unused port in range "
                                                     r"'display' \(5900-5905\)"):
        start(host, 2)
    # the failed start journaled the port it asked for; its teardown gives back nothing held
    assert ports.release(host.instance, Journal(host.instance.journal_path("d2"))) == []
    # d1's journal vanishes without a teardown (not a vmconfine path, but the registry copes):
    # its leases are reclaimed when the range runs out
    host.instance.journal_path("d1").unlink()
    c, _ = start(host, 3)
    assert (c.graphics[0].port, c.graphics[1].port) == (5904, 5905)


def test_sockets_and_unallocated_starts_take_no_port(host: HostContext,
        busy: set[int]) -> None:
    devices = ("<graphics type='spice'><listen type='socket'/></graphics>"
               "<graphics type='vnc' socket='/run/x/vnc.sock'/>")
    start(host, 1, devices)
    assert held(host) == {}
    # a command line only printed (domxml-to-native) leaves the VNC port to QEMU
    dom = parse_domain(XML.format(name="p", uuid="00000000-0000-4000-8000-00000000000f",
                                  devices=SPICE_VNC))
    argv = build_command(dom, host.instance.config, PATHS, symbolic=True).args
    assert argv[argv.index("-vnc") + 1] == f"127.0.0.1:0,to={65535 - 5900}"
