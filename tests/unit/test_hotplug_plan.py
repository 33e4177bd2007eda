"""The QMP side of chardev, USB hostdev and media hotplug, planned without QEMU: what each
device becomes, and the refusals (one clear line, before anything changes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmconfine.domain import parse_domain
from vmconfine.launch.media import find_drive, with_source
from vmconfine.qemu.argv_devices import UnsupportedConfigError
from vmconfine.qemu.hotplug import parse_device, with_element, without_element
from vmconfine.qemu.hotplug_devices import free_alias, plan_chardev, plan_usb_hostdev

DOMAIN = ("<domain type='qemu'><name>p</name><memory>32768</memory>"
          "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
          "<disk type='file' device='cdrom'><source file='/srv/a.iso'/>"
          "<target dev='hdc' bus='ide'/><readonly/></disk>"
          "<disk type='file' device='disk'><source file='/srv/d.img'/>"
          "<target dev='vda' bus='virtio'/></disk>{extra}</devices></domain>")


def chardev(xml: str, extra: str = ""):  # type: ignore[no-untyped-def]
    domain = parse_domain(DOMAIN.format(extra=extra))
    new, el = with_element(domain, parse_device(xml))
    return domain, new, next(c for c in new.chardevs if c.element is el)


def test_channel_socket_is_passed_by_name() -> None:
    _, _, dev = chardev("<channel type='unix'><source mode='bind' path='/run/x.sock'/>"
                        "<target type='virtio' name='org.x'/></channel>")
    plan = plan_chardev(dev, "channel1")
    assert plan.backend == {"id": "charchannel1", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "charchannel1"}}, "server": True,
        "wait": False}}}
    assert plan.device == {"driver": "virtserialport", "bus": "virtio-serial0.0",
                           "chardev": "charchannel1", "id": "channel1", "name": "org.x"}
    assert plan.listens


@pytest.mark.parametrize(("xml", "words"), [
    ("<serial type='unix'><source mode='bind' path='/run/s'/></serial>", "pci-serial"),
    ("<channel type='unix'><source mode='connect' path='/run/s'/>"
     "<target type='virtio'/></channel>", "mode='bind'"),
    ("<console type='pty'/>", "<target type='virtio'/>"),
    ("<channel type='file'><source path='/tmp/f'/><target type='virtio'/></channel>",
     "type='unix'"),
])
def test_chardev_refusals(xml: str, words: str) -> None:
    _, _, dev = chardev(xml)
    with pytest.raises(UnsupportedConfigError, match=words.replace("(", r"\(")):
        plan_chardev(dev, "x0")


def test_aliases_skip_what_qemu_has() -> None:
    assert free_alias("channel", {"channel0", "charchannel1"}) == "channel2"
    assert free_alias("hostdev", set()) == "hostdev0"


def test_without_element_removes_only_that_device() -> None:
    domain, new, dev = chardev("<channel type='pty'><target type='virtio'/></channel>")
    assert dev.element is not None
    back = without_element(new, dev.element)
    assert len(back.chardevs) == len(domain.chardevs) and len(back.disks) == 2


def test_usb_hostdev_goes_through_an_fd_set() -> None:
    domain = parse_domain(DOMAIN.format(extra=""))
    new, el = with_element(domain, parse_device(
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1d6b'/>"
        "<product id='0x0002'/></source></hostdev>"))
    h = next(x for x in new.hostdevs if x.element is el)
    assert plan_usb_hostdev(new, None, h, "hostdev0", 7) == {
        "driver": "usb-host", "id": "hostdev0", "bus": "usb.0",
        "hostdevice": "/dev/fdset/7"}
    none = parse_domain(DOMAIN.format(extra="<controller type='usb' model='none'/>"))
    with pytest.raises(UnsupportedConfigError, match="USB controller"):
        plan_usb_hostdev(none, None, h, "hostdev0", 7)


def test_media_source_replaced_or_removed(tmp_path: Path) -> None:
    domain = parse_domain(DOMAIN.format(extra=""))
    drive = find_drive(domain, "hdc")
    assert find_drive(domain, "/srv/a.iso") is drive
    iso = tmp_path / "b.iso"
    iso.write_bytes(b"x")
    _new, disk = with_source(domain, drive, str(iso))
    assert disk.source is not None and disk.source.path == str(iso) and disk.readonly
    empty, gone = with_source(domain, drive, None)
    assert gone.source is None and "a.iso" not in empty.to_xml()
    with pytest.raises(UnsupportedConfigError, match="not removable"):
        find_drive(domain, "vda")
    with pytest.raises(UnsupportedConfigError, match="No disk found"):
        find_drive(domain, "hdz")
    with pytest.raises(UnsupportedConfigError, match="absolute"):
        with_source(domain, drive, "b.iso")


def test_start_aliases_are_stamped_before_the_order_changes() -> None:
    from vmconfine.launch.hotplug_devices import alias_of, stamp_aliases

    domain = parse_domain(DOMAIN.format(extra=(
        "<console type='pty'/>"
        "<channel type='pty'><target type='virtio' name='a'/></channel>"
        "<channel type='pty'><target type='virtio' name='b'/></channel>")))
    stamp_aliases(domain)
    assert [alias_of(c.element) for c in domain.chardevs] == ["serial0", "channel0", "channel1"]
    first = domain.chardevs[1]
    assert first.element is not None
    later = without_element(domain, first.element)
    assert [alias_of(c.element) for c in later.chardevs] == ["serial0", "channel1"]
