"""Out-of-range and empty values are refused at parse time, with libvirt's limits and messages.

Each case is one edit of a valid domain; the refusal is one ``XMLError`` line naming the file,
the line of the element and libvirt's message (checked against ``virsh domxml-to-native`` of
libvirt 9.0 where libvirt has one). The control cases at the limit must parse, so a check
that refused everything would fail here.
"""

from __future__ import annotations

import pytest

from tests.unit.test_domain_hostile import reject
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import parse_domain
from vmconfine.errors import XMLError
from vmconfine.qemu.argv import CommandPaths, build_command

BASE = """<domain type='qemu'>
  <name>ranges</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    @DEVICE@
  </devices>
</domain>
"""
def xml(vcpu: str = "<vcpu>1</vcpu>", device: str = "") -> str:
    return BASE.replace("<vcpu>1</vcpu>", vcpu).replace("@DEVICE@", device)


REFUSED = {
    "vcpu-overflow": (xml(vcpu="<vcpu>99999999999999999999999</vcpu>"), 4,
                      "maximum vcpus count must be an integer"),
    "vcpu-uint-max": (xml(vcpu="<vcpu>4294967296</vcpu>"), 4,
                      "maximum vcpus count must be an integer"),
    "vcpu-above-every-machine": (xml(vcpu="<vcpu>4097</vcpu>"), 4,
                                 "Maximum CPUs greater than the limit"),
    "vcpu-current-overflow": (xml(vcpu="<vcpu current='99999999999999999'>2</vcpu>"), 4,
                              "Invalid value for attribute 'current' in element 'vcpu'"),
    "serial-port-overflow": (xml(device="<serial type='pty'><target "
                                        "port='100000000000000000000'/></serial>"), 10,
                             "Invalid value for attribute 'port' in element 'target'"),
    "disk-empty-source": (xml(device="<disk type='file' device='disk'><source file=''/>"
                                     "<target dev='vda' bus='virtio'/></disk>"), 10,
                          "missing source information for device vda"),
    "disk-no-source": (xml(device="<disk type='block' device='disk'>"
                                  "<target dev='vda' bus='virtio'/></disk>"), 10,
                       "missing source information for device vda"),
    "lun-empty-dev": (xml(device="<disk type='block' device='lun'><source dev=''/>"
                                 "<target dev='sda' bus='scsi'/></disk>"), 10,
                      "missing source information for device sda"),
    "boot-order-overflow": (xml(device="<disk type='file' device='cdrom'><target dev='hdc'/>"
                                       "<boot order='99999999999999'/></disk>"), 10,
                            "Invalid value for attribute 'order' in element 'boot'"),
    "controller-index-overflow": (xml(device="<controller type='usb' index='99999999999'/>"),
                                  10, "Invalid value for attribute 'index' in element "
                                      "'controller'"),
    "controller-index-negative": (xml(device="<controller type='usb' index='-1'/>"), 10,
                                  "controller index -1 is negative"),
    "pci-controller-index": (xml(device="<controller type='pci' index='300' "
                                        "model='pci-bridge'/>"), 10,
                             "PCI controller index 300 too high, maximum is 255"),
    "vnc-port-overflow": (xml(device="<graphics type='vnc' port='100000000000000000000'/>"),
                          10, "Invalid value for attribute 'port' in element 'graphics'"),
    "vnc-port-range": (xml(device="<graphics type='vnc' port='70000'/>"), 10,
                       "vnc port must be in range [5900,65535]"),
    "websocket-range": (xml(device="<graphics type='vnc' port='5900' websocket='65536'/>"),
                        10, "websocket port must be in range"),
    "pci-hostdev-bus": (xml(device="<hostdev mode='subsystem' type='pci'><source><address "
                                   "domain='0' bus='256' slot='0' function='0'/></source>"
                                   "</hostdev>"), 10,
                        "Invalid PCI address bus='0x100', must be <= 0xFF"),
    "pci-hostdev-slot": (xml(device="<hostdev mode='subsystem' type='pci'><source><address "
                                    "domain='0' bus='0' slot='0x20' function='0'/></source>"
                                    "</hostdev>"), 10,
                         "Invalid PCI address slot='0x20', must be <= 0x1F"),
    "pci-hostdev-function": (xml(device="<hostdev mode='subsystem' type='pci'><source>"
                                        "<address domain='0' bus='0' slot='0' function='8'/>"
                                        "</source></hostdev>"), 10,
                             "Invalid PCI address function='0x8', must be <= 0x7"),
    "pci-hostdev-domain": (xml(device="<hostdev mode='subsystem' type='pci'><source>"
                                      "<address domain='0x10000' bus='0' slot='0' "
                                      "function='0'/></source></hostdev>"), 10,
                           "Invalid PCI address domain='0x10000', must be <= 0xFFFF"),
    "usb-vendor-range": (xml(device="<hostdev mode='subsystem' type='usb'><source><vendor "
                                    "id='0x10000'/><product id='0x1'/></source></hostdev>"),
                         10, "usb vendor id 0x10000 is not a USB id"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_at_parse_time(case: str) -> None:
    text, line, message = REFUSED[case]
    got_line, got = reject(text)
    assert got_line == line and got.split(": ", 2)[2].startswith(message), got


ACCEPTED = {
    "vcpu-at-limit": xml(vcpu="<vcpu>4096</vcpu>"),
    "cdrom-empty-source": xml(device="<disk type='file' device='cdrom'><source file=''/>"
                                     "<target dev='hdc'/></disk>"),
    "pci-hostdev-max": xml(device="<hostdev mode='subsystem' type='pci'><source><address "
                                  "domain='0xffff' bus='0xff' slot='0x1f' function='7'/>"
                                  "</source></hostdev>"),
    "pci-controller-max": xml(device="<controller type='pci' index='255' "
                                     "model='pci-bridge'/>"),
    "vnc-port-max": xml(device="<graphics type='vnc' port='65535' websocket='65535'/>"),
    "usb-vendor-max": xml(device="<hostdev mode='subsystem' type='usb'><source><vendor "
                                 "id='0xffff'/><product id='0xffff'/></source></hostdev>"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_limits_themselves_parse(case: str) -> None:
    parse_domain(ACCEPTED[case], "hostile.xml")


def test_serial_port_beyond_qemus_isa_ports_is_refused() -> None:
    paths = CommandPaths(monitor_socket="/run/m.sock", home_dir="/var/lib/x",
                         runtime_dir="/run/x", user="qemu")
    dom = parse_domain(xml(device="<serial type='pty'><target port='3'/></serial>"), "r.xml")
    assert '"index":3' in " ".join(build_command(dom, QemuConfig(), paths).args)
    dom = parse_domain(xml(device="<serial type='pty'><target port='4'/></serial>"), "r.xml")
    with pytest.raises(XMLError, match="serial port 4 is out of range"):
        build_command(dom, QemuConfig(), paths)
