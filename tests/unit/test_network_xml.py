"""``<interface>`` parsing, network definitions and the ``-netdev`` command line (no host
changes: the host side is tested in tests/host/test_network.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmconfine.config.networks import load_network
from vmconfine.domain import parse_domain
from vmconfine.domain.support import unsupported
from vmconfine.errors import ConfigError, LaunchError, XMLError
from vmconfine.launch import netdev as host
from vmconfine.qemu import netdev
from vmconfine.qemu.argv import CommandPaths, UnsupportedConfigError, build_command
from vmconfine.report.validate import check_network

PATHS = CommandPaths(monitor_socket="/run/m.sock", home_dir="/var/lib/h", runtime_dir="/run/r",
                     user="qemu")


def domain_xml(iface: str, virt: str = "qemu") -> str:
    return (f"<domain type='{virt}'><name>n</name>"
            "<uuid>0c7f4bb4-1c7e-4a55-9e0f-3b5f1f7a9d11</uuid><memory>65536</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{iface}"
            "<memballoon model='none'/></devices></domain>")


def netdev_args(iface: str, fds: dict[str, int] | None = None, virt: str = "qemu"
                ) -> tuple[list[str], list[str]]:
    """(-netdev values, -device values) of the command line, symbolic or with ``fds``."""
    cmd = build_command(parse_domain(domain_xml(iface, virt)), None, PATHS)
    if fds is not None:
        fds = {**{p.name: 90 + n for n, p in enumerate(cmd.inherited)}, **fds}  # 90: QMP
    argv = cmd.argv(fds)
    nets = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    devs = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "netdev" in argv[i + 1]]
    return nets, devs


@pytest.mark.parametrize(("iface", "message"), [
    ("<interface type='bridge'><source bridge='br0'/><mac address='52:54:00:zz:00:01'/>"
     "</interface>", "unable to parse mac address '52:54:00:zz:00:01'"),
    ("<interface type='bridge'><source bridge='br0'/><mac address='52:54:00:01'/>"
     "</interface>", "unable to parse mac address"),
    ("<interface type='bridge'><source bridge='br0'/><mac address='01:00:5e:00:00:01'/>"
     "</interface>", "expected unicast mac address, found multicast '01:00:5e:00:00:01'"),
    ("<interface type='bridge'/>", "<interface type='bridge'> needs <source bridge='...'>"),
    ("<interface type='network'><source/></interface>", "needs <source network='...'>"),
    ("<interface type='direct'><source dev='eth0' mode='tunnel'/></interface>",
     "unknown macvtap mode 'tunnel'"),
    ("<interface type='bridge'><source bridge='br0'/><driver name='vfio'/></interface>",
     "unknown interface driver name 'vfio'"),
    ("<interface type='bridge'><source bridge='br0'/><driver queues='257'/></interface>",
     "queues must be from 1 to 256, not 257"),
    ("<interface type='bridge'><source bridge='br0'/><mtu size='20'/></interface>",
     "<mtu size> must be from 68 to 65535"),
    ("<interface type='ethernet'><target dev='a/b'/></interface>",
     "target dev 'a/b' is not a valid interface name"),
    ("<interface type='ethernet'><target dev='waytoolonginterface'/></interface>",
     "is not a valid interface name"),
])
def test_bad_interface_xml_is_one_line(iface: str, message: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_domain(domain_xml(iface))
    assert message in err.value.message and "\n" not in err.value.message


def test_interface_fields_and_generated_names() -> None:
    xml = domain_xml("<interface type='direct'><source dev='eth0'/><mac address='52:54:0:A:b:C'/>"
                     "<target dev='macvtap3'/><driver name='qemu' queues='4'/><mtu size='9000'/>"
                     "<model type='virtio'/></interface>"
                     "<interface type='ethernet'><target dev='tapx' managed='no'/></interface>")
    d = parse_domain(xml)
    direct, eth = d.interfaces
    assert (direct.mac, direct.source, direct.source_mode, direct.driver_name, direct.queues,
            direct.mtu) == ("52:54:00:0a:0b:0c", "eth0", "vepa", "qemu", 4, 9000)
    assert direct.target_dev is None  # generated name: dropped from a config (libvirt)
    assert (eth.target_dev, eth.managed) == ("tapx", False)
    assert unsupported(d) == []  # every attribute above is implemented
    live = parse_domain(d.to_xml(live=True).replace(
        "<mtu", "<target dev='macvtap3'/><mtu", 1))
    assert live.interfaces[0].target_dev == "macvtap3"  # kept in live XML
    assert "macvtap3" not in live.to_xml()


def test_tap_command_line_passes_descriptors() -> None:
    iface = ("<interface type='bridge'><source bridge='br0'/><mac address='52:54:00:00:00:05'/>"
             "<model type='virtio'/><driver queues='2'/><mtu size='1400'/></interface>")
    nets, devs = netdev_args(iface)
    assert nets == ["tap,id=hostnet0,ifname=vnet%d,script=no,downscript=no,queues=2"]
    assert devs == ['{"driver":"virtio-net-pci","mq":true,"vectors":6,"host_mtu":1400,'
                    '"netdev":"hostnet0","id":"net0","mac":"52:54:00:00:00:05"}']
    nets, _ = netdev_args(iface, {"tapfd-net0-0": 30, "tapfd-net0-1": 31})
    assert nets == ["tap,fds=30:31,id=hostnet0"]
    nets, _ = netdev_args("<interface type='network'><source network='x'/></interface>",
                          {"tapfd-net0-0": 40})
    assert nets == ["tap,fd=40,id=hostnet0"]
    nets, _ = netdev_args("<interface type='direct'><source dev='eth0'/></interface>")
    assert nets == ["tap,id=hostnet0,ifname=macvtap%d,script=no,downscript=no"]
    nets, _ = netdev_args("<interface type='user'/>")
    assert nets == ["user,id=hostnet0"]


def test_vhost_follows_libvirt(monkeypatch: pytest.MonkeyPatch) -> None:
    virtio = ("<interface type='bridge'><source bridge='br0'/><model type='virtio'/>"
              "<driver {}queues='2'/></interface>")
    monkeypatch.setattr(netdev, "vhost_usable", lambda: True)
    nets, _ = netdev_args(virtio.format(""), {}, virt="kvm")
    assert nets == ["tap,fds=91:92,vhost=on,vhostfds=93:94,id=hostnet0"]
    # TCG guests and <driver name='qemu'> use QEMU's own back end (libvirt)
    assert "vhost" not in netdev_args(virtio.format(""), {})[0][0]
    assert "vhost" not in netdev_args(virtio.format("name='qemu' "), {}, virt="kvm")[0][0]
    monkeypatch.setattr(netdev, "vhost_usable", lambda: False)
    assert "vhost" not in netdev_args(virtio.format(""), {}, virt="kvm")[0][0]
    with pytest.raises(UnsupportedConfigError, match="vhost-net was requested for interface 0"):
        netdev_args(virtio.format("name='vhost' "), virt="kvm")
    with pytest.raises(UnsupportedConfigError, match="multiqueue is only supported for virtio"):
        netdev_args("<interface type='bridge'><source bridge='br0'/><driver queues='2'/>"
                    "</interface>")
    with pytest.raises(UnsupportedConfigError, match="needs a tap back end"):
        netdev_args("<interface type='user'><model type='virtio'/><driver queues='2'/>"
                    "</interface>")


def test_network_definitions(tmp_path: Path) -> None:
    (tmp_path / "lan.xml").write_text("<network><name>lan</name><bridge name='br7'/></network>")
    (tmp_path / "nat.xml").write_text("<network><name>nat</name><forward mode='nat'/></network>")
    (tmp_path / "other.xml").write_text("<network><name>lan</name><bridge name='b'/></network>")
    os.mkfifo(tmp_path / "fifo.xml")
    (tmp_path / "mv.xml").write_text("<network><name>mv</name><forward mode='private'>"
                                     "<interface dev='eth3'/><interface dev='eth4'/>"
                                     "</forward></network>")
    assert load_network(tmp_path, "lan").bridge == "br7"
    mv = load_network(tmp_path, "mv")
    assert (mv.bridge, mv.direct_dev, mv.forward) == (None, "eth3", "private")
    for name, message in [
        ("default", f"network 'default' is not defined: there is no {tmp_path}/default.xml"),
        ("nat", "network 'nat' (" + str(tmp_path / "nat.xml") + ") has no <bridge name="),
        ("other", "defines network 'lan', not 'other'"),
        ("../x", "network name '../x' is not valid"),
        ("fifo", f"network definition {tmp_path}/fifo.xml is not a regular file"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_network(tmp_path, name)
        assert message in err.value.message and "\n" not in err.value.message


def test_tun_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host, "TUN_PATH", str(tmp_path / "tun"))
    domain = parse_domain(domain_xml("<interface type='bridge'><source bridge='br0'/>"
                                     "</interface>"))
    plan = netdev.plan_interface(domain, 0, domain.interfaces[0], "rtl8139")
    with pytest.raises(LaunchError) as err:
        host.open_tap_queues("vnet%d", plan)
    assert err.value.message == (f"tun is not available: {tmp_path}/tun does not exist; load "
                                 "the tun module (modprobe tun)")
    assert host.host_mac("52:54:00:0a:0b:0c") == "fe:54:00:0a:0b:0c"


def test_host_validate_network_lines(tmp_path: Path) -> None:
    (tmp_path / "tun").touch()
    tun, vhost = str(tmp_path / "tun"), str(tmp_path / "vhost-net")
    ok, slow = check_network(True, tun=tun, vhost=vhost)
    assert (ok.status, slow.status) == ("PASS", "WARN") and "vhost_net" in slow.fix
    assert check_network(False, tun=tun, vhost=vhost)[0].status == "WARN"
    missing = check_network(True, tun=str(tmp_path / "none"), vhost=vhost)[0]
    assert missing.status == "WARN" and "modprobe tun" in missing.fix
    assert check_network(True, tun=tun, vhost=vhost, netlink=False)[0].status == "FAIL"


def test_apparmor_rule_for_a_running_macvtap(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The macvtap descriptor QEMU inherits is revalidated by AppArmor at exec: the helper
    adds its node, found from the live XML's <target dev> through sysfs (as libvirt's
    AppArmorSetFDLabel adds the descriptor's path)."""
    from vmconfine_aa_helper import rules

    (tmp_path / "macvtap3" / "macvtap" / "tap17").mkdir(parents=True)
    (tmp_path / "vnet0").mkdir()  # a tap: no macvtap node
    monkeypatch.setattr(rules, "SYSFS_NET", str(tmp_path))
    domain = parse_domain(domain_xml(
        "<interface type='direct'><source dev='eth0'/><target dev='macvtap3'/></interface>"
        "<interface type='bridge'><source bridge='br0'/><target dev='vnet0'/></interface>"
        ).replace("<domain ", "<domain id='3' ").replace(
        "</devices>", "</devices><metadata><vmconfine:state xmlns:vmconfine="
        "'https://vmconfine.dev/xmlns/1.0'/></metadata>"))
    assert domain.interfaces[0].target_dev == "macvtap3"  # live XML keeps the name
    text = rules.domain_rules(domain, None).render()
    assert '"/dev/tap17" rw,' in text and "vnet0" not in text
    assert rules.macvtap_node("../etc") is None and rules.macvtap_node(None) is None
