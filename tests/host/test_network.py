"""Network interfaces end to end, in a network namespace of the test's own (the host's
interfaces are never touched): a bridge and a veth pair made by the test, vmconfine run inside
the namespace (``ip netns exec``), real QEMU confined by landlock + dac + namespaces.

* two guests on one bridge (``type='bridge'`` and ``type='network'`` through a network
  definition): QMP ``announce-self`` makes each QEMU send RARP frames from its NIC's MAC
  through the tap descriptor vmconfine passed; a packet socket on the bridge sees both;
* QEMU holds the taps as descriptors (``/dev/net/tun`` in /proc/PID/fd), has no
  capabilities, and a compromised QEMU cannot open a tap of its own (``netdev_add``);
* teardown leaves no tap; kill -9 of vmconfine with a tap and a macvtap link made (before QEMU
  runs, through a macvtap network definition, and while it runs, through ``type='direct'``)
  leaves none after the next command, and the admin's own tap (``managed='no'``) is used as it
  is and never removed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from tests.host.conftest import Embed, VmDir, proc_status, qemu_pid
from tests.support import require, require_binary
from vmconfine_landlock import syscalls

pytestmark = pytest.mark.host

ETH_P_ALL = 0x0003
ETH_P_RARP = 0x8035
MAC_A, MAC_B, MAC_C = "52:54:00:0a:00:01", "52:54:00:0b:00:01", "52:54:00:0c:00:01"


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    """A network namespace with ``br0`` (a bridge) and ``v0``/``v1`` (a veth pair), all up."""
    require(os.geteuid() == 0, "needs root")
    require_binary("ip")
    name = f"vmc-test-{os.getpid()}-{uuidlib.uuid4().hex[:6]}"
    netns.create(name)
    try:
        with NetNS(name) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("add", ifname="v0", kind="veth", peer="v1")
            ipr.link("add", ifname="tapx", kind="tuntap", mode="tap")  # persistent, the admin's
            for dev in ("lo", "br0", "v0", "v1", "tapx"):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
        yield name
    finally:
        netns.remove(name)


def links(ns: str) -> dict[str, dict]:
    """name → {kind, mac, mtu, master} of every link in ``ns``."""
    out = {}
    with NetNS(ns) as ipr:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            out[link.get_attr("IFLA_IFNAME")] = {
                "kind": info.get_attr("IFLA_INFO_KIND") if info is not None else None,
                "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                "master": link.get_attr("IFLA_MASTER"), "index": link["index"]}
    return out


def packet_socket(ns: str, dev: str) -> socket.socket:
    """A raw packet socket bound to ``dev`` inside ``ns``."""
    netns.pushns(ns)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((dev, 0))
    finally:
        netns.popns()
    s.settimeout(1)
    return s


def frames_from(s: socket.socket, macs: set[str], timeout: float = 60) -> set[str]:
    """Source MACs of RARP frames seen on ``s`` until every one of ``macs`` is (bounded)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not macs <= seen and time.monotonic() < deadline:
        try:
            frame = s.recv(2048)
        except TimeoutError:
            continue
        if len(frame) >= 14 and struct.unpack("!H", frame[12:14])[0] == ETH_P_RARP:
            seen.add(":".join(f"{b:02x}" for b in frame[6:12]))
    return seen


def qmp(e: Embed, name: str, command: str, **arguments: object) -> dict:
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    proc = e.cli("qemu-monitor-command", name, json.dumps(msg))
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stdout + proc.stderr}


def interface(xml: Path, text: str) -> Path:
    xml.write_text(xml.read_text().replace("<memballoon model='none'/>",
                                           f"{text}<memballoon model='none'/>"))
    return xml


@pytest.fixture
def net_embed(embed: Embed, ns: str) -> Embed:
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"needs Landlock: {why}")
    embed.configure('security_driver = "landlock"\nlandlock_mode = "enforce"\n')
    embed.prefix = ["ip", "netns", "exec", ns]
    networks = embed.root / "etc" / "qemu" / "networks"
    networks.mkdir(parents=True)
    (networks / "lan.xml").write_text("<network><name>lan</name><forward mode='bridge'/>"
                                      "<bridge name='br0'/></network>")
    (networks / "mv.xml").write_text("<network><name>mv</name><forward mode='bridge'>"
                                     "<interface dev='v0'/></forward></network>")  # macvtap
    return embed


def tun_fds(pid: int) -> list[str]:
    fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    return sorted(f for f in fds if f == "/dev/net/tun" or f.startswith("/dev/tap"))


def test_two_guests_on_a_bridge(net_embed: Embed, vm_dir: VmDir, ns: str) -> None:
    e = net_embed
    xml_a = interface(vm_dir.domain_xml("na"), (
        f"<interface type='bridge'><source bridge='br0'/><mac address='{MAC_A}'/>"
        "<model type='virtio'/><driver queues='2'/><mtu size='1400'/></interface>"))
    xml_b = interface(vm_dir.domain_xml("nb"), (
        f"<interface type='network'><source network='lan'/><mac address='{MAC_B}'/>"
        "</interface>"))
    sniff = packet_socket(ns, "br0")
    try:
        run_a, run_b = e.start(xml_a), e.start(xml_b)
        pids = {n: qemu_pid(e, n) for n in ("na", "nb")}
        for name in ("na", "nb"):
            assert qmp(e, name, "announce-self", initial=50, max=100, rounds=3,
                       step=50) == {"return": {}}
        assert frames_from(sniff, {MAC_A, MAC_B}) == {MAC_A, MAC_B}
    finally:
        sniff.close()

    now = links(ns)
    taps = {v["mac"]: (k, v) for k, v in now.items() if v["kind"] == "tun" and k != "tapx"}
    assert set(taps) == {"fe:54:00:0a:00:01", "fe:54:00:0b:00:01"}  # host side: fe:...
    bridge = now["br0"]["index"]
    assert all(v["master"] == bridge for _, v in taps.values())
    assert taps["fe:54:00:0a:00:01"][1]["mtu"] == 1400
    assert taps["fe:54:00:0b:00:01"][1]["mtu"] == now["br0"]["mtu"]
    live = e.cli("dumpxml", "nb", check=True).stdout
    assert f'<target dev="{taps["fe:54:00:0b:00:01"][0]}"/>' in live
    assert 'bridge="br0"' in live
    inactive = e.cli("dumpxml", "--inactive", "nb", check=True).stdout
    assert "vnet" not in inactive and 'bridge="br0"' not in inactive

    # QEMU holds the queues as descriptors and nothing more: no capabilities, no tun node
    assert tun_fds(pids["na"]) == ["/dev/net/tun"] * 2
    assert tun_fds(pids["nb"]) == ["/dev/net/tun"]
    for pid in pids.values():
        status = proc_status(pid)
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    evil = qmp(e, "nb", "netdev_add", type="tap", id="evil", ifname="evil0")
    assert "could not open /dev/net/tun" in evil["error"], evil
    assert "evil0" not in links(ns)

    for name, run in (("na", run_a), ("nb", run_b)):
        e.cli("destroy", name, check=True)
        assert run.wait(timeout=60) == 0
    assert [k for k, v in links(ns).items() if v["kind"] in ("tun", "macvtap")] == ["tapx"]


@pytest.mark.parametrize("step", ["sockets", "running"])
def test_kill_9_leaves_no_network_device(net_embed: Embed, vm_dir: VmDir, ns: str,
                                          step: str) -> None:
    e = net_embed
    first = ("<interface type='direct'><source dev='v0' mode='bridge'/>" if step == "running"
             else "<interface type='network'><source network='mv'/>")  # a macvtap network
    xml = interface(vm_dir.domain_xml(f"nk{step[0]}"), (
        f"{first}<mac address='{MAC_C}'/>"
        "</interface><interface type='bridge'><source bridge='br0'/></interface>"
        "<interface type='ethernet'><target dev='tapx' managed='no'/></interface>"))
    tapx = links(ns)["tapx"]
    if step == "running":
        run = e.start(xml)
        fds = tun_fds(qemu_pid(e, xml.stem))  # the new tap, tapx and /dev/tapN
        assert fds[:2] == ["/dev/net/tun"] * 2 and fds[2].startswith("/dev/tap"), fds
        live = e.cli("dumpxml", xml.stem, check=True).stdout  # generated MACs shown too
        assert live.count("<mac address=") == 3 and '<target dev="tapx"' in live
    else:
        run = e.start(xml, env={**os.environ, "VMCONFINE_PAUSE_AT": step},
                      wait_for=f"paused at {step}")
    made = {k: v for k, v in links(ns).items() if v["kind"] in ("tun", "macvtap")
            and k != "tapx"}
    assert sorted(v["kind"] for v in made.values()) == ["macvtap", "tun"]
    macvtap = next(k for k, v in made.items() if v["kind"] == "macvtap")
    assert made[macvtap]["mac"] == MAC_C
    lower = links(ns)["v0"]["index"]
    with NetNS(ns) as ipr:
        assert ipr.get_links(ifname=macvtap)[0].get_attr("IFLA_LINK") == lower
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert macvtap in links(ns)  # a macvtap link outlives its descriptors
    e.cli("list", check=True)  # the next command finishes the teardown
    left = links(ns)
    assert [k for k, v in left.items() if v["kind"] in ("tun", "macvtap")] == ["tapx"]
    assert left["tapx"] == tapx  # the admin's tap: opened as it is, never changed or removed
    assert not (e.root / "run" / "qemu" / f"{xml.stem}.journal").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("<interface type='bridge'><source bridge='nobr0'/></interface>",
     "bridge 'nobr0' of interface 0 does not exist"),
    ("<interface type='bridge'><source bridge='v1'/></interface>",
     "'v1' of interface 0 is not a Linux bridge (it is a veth device)"),
    ("<interface type='direct'><source dev='nodev0'/></interface>",
     "source dev 'nodev0' of <interface type='direct'> does not exist"),
    ("<interface type='network'><source network='nonet'/></interface>",
     "network 'nonet' is not defined"),
    ("<interface type='ethernet'><target dev='nontap0' managed='no'/></interface>",
     "tap 'nontap0' does not exist"),
])
def test_missing_host_device_is_one_line(net_embed: Embed, vm_dir: VmDir, ns: str,
                                         text: str, message: str) -> None:
    xml = interface(vm_dir.domain_xml("ne"), text)
    if "nobr0" in text:  # the report finds what run would stop at (one case: time)
        report = net_embed.cli("confinement", str(xml))
        assert message in report.stdout, report.stdout + report.stderr
    proc = net_embed.cli("run", str(xml))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [k for k, v in links(ns).items() if v["kind"] in ("tun", "macvtap")] == ["tapx"]
    assert not (net_embed.root / "run" / "qemu" / "ne.journal").exists()
