"""Device rule generation for a corpus of domains (a fake device table stands in for /dev)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmconfine.domain import parse_domain
from vmconfine_cgroups import rules
from vmconfine_cgroups.rules import DeviceRule, domain_rules, effective, v1_transition

CHR, BLK = stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o660

#: path -> (mode, major, minor); anything else does not exist
DEVICES = {
    "/dev/null": (CHR, 1, 3), "/dev/zero": (CHR, 1, 5), "/dev/full": (CHR, 1, 7),
    "/dev/random": (CHR, 1, 8), "/dev/urandom": (CHR, 1, 9), "/dev/ptmx": (CHR, 5, 2),
    "/dev/kvm": (CHR, 10, 232), "/dev/ttyS0": (CHR, 4, 64), "/dev/sda": (BLK, 8, 0),
    "/dev/sdb": (BLK, 8, 16), "/dev/sr0": (BLK, 11, 0), "/dev/tpm0": (CHR, 10, 224),
    "/dev/bus/usb/001/004": (CHR, 189, 3), "/dev/vfio/vfio": (CHR, 10, 196),
    "/dev/vfio/7": (CHR, 242, 0), "/dev/input/event3": (CHR, 13, 67),
    "/dev/hwrng": (CHR, 10, 183), "/dev/net/tun": (CHR, 10, 200),
    "/dev/disk/by-id/sda-link": (BLK, 8, 0), "/var/lib/images/a.img": (stat.S_IFREG | 0o600, 0, 0),
}

DEFAULT_ACL = ["c 1:3 rw", "c 1:7 rw", "c 1:5 rw", "c 1:8 rw", "c 1:9 rw", "c 5:2 rw",
               "c 10:232 rw"]


def fake_stat(path: str | os.PathLike[str]) -> Any:
    entry = DEVICES.get(os.fspath(path))
    if entry is None:
        raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
    mode, major, minor = entry
    return SimpleNamespace(st_mode=mode, st_rdev=os.makedev(major, minor))


@pytest.fixture(autouse=True)
def fake_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "_stat", fake_stat)


def config(acl: list[str] | None = None, extra: list[str] | None = None) -> Any:
    return SimpleNamespace(cgroup_device_acl=acl, cgroup_device_acl_extra=extra or [])


def domain(devices: str, virt_type: str = "kvm") -> Any:
    return parse_domain(f"""<domain type='{virt_type}'><name>r</name><memory>65536</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>""")


def lines(devices: str, cfg: Any = None, **kw: Any) -> list[str]:
    return [r.text() for r in effective(domain_rules(domain(devices), cfg or config(), **kw))]


# ---- the corpus --------------------------------------------------------------------------------
CORPUS: list[tuple[str, str, list[str]]] = [
    ("no devices: the default ACL only", "", DEFAULT_ACL),
    ("pty serial adds every PTY, before the ACL",
     "<serial type='pty'><target port='0'/></serial>", ["c 136:* rw", *DEFAULT_ACL]),
    ("file disk on a regular image: no rule", """<disk type='file' device='disk'>
        <source file='/var/lib/images/a.img'/><target dev='vda' bus='virtio'/></disk>""",
     DEFAULT_ACL),
    ("missing file disk: no rule", """<disk type='file' device='disk'>
        <source file='/nope.img'/><target dev='vda' bus='virtio'/></disk>""", DEFAULT_ACL),
    ("block disk rw, first", """<disk type='block' device='disk'>
        <source dev='/dev/sda'/><target dev='vda' bus='virtio'/></disk>""",
     ["b 8:0 rw", *DEFAULT_ACL]),
    ("readonly block cdrom: r", """<disk type='block' device='cdrom'>
        <source dev='/dev/sr0'/><target dev='hdc' bus='ide'/><readonly/></disk>""",
     ["b 11:0 r", *DEFAULT_ACL]),
    ("backing layers are r, the top rw", """<disk type='block' device='disk'>
        <driver name='qemu' type='qcow2'/><source dev='/dev/sda'/>
        <backingStore type='block'><format type='raw'/><source dev='/dev/sdb'/></backingStore>
        <target dev='vda' bus='virtio'/></disk>""", ["b 8:0 rw", "b 8:16 r", *DEFAULT_ACL]),
    ("symlinked device node resolves", """<disk type='block' device='disk'>
        <source dev='/dev/disk/by-id/sda-link'/><target dev='vda' bus='virtio'/></disk>""",
     ["b 8:0 rw", *DEFAULT_ACL]),
    ("same device ro and rw merges to rw", """<disk type='block' device='disk'>
        <source dev='/dev/sda'/><target dev='vda' bus='virtio'/><readonly/></disk>
        <disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb' bus='virtio'/>
        <shareable/></disk>""", ["b 8:0 rw", *DEFAULT_ACL]),
    ("network disk: no rule", """<disk type='network' device='disk'>
        <source protocol='nbd' name='x'><host name='h' port='10809'/></source>
        <target dev='vda' bus='virtio'/></disk>""", DEFAULT_ACL),
    ("chardev of type dev", """<serial type='dev'><source path='/dev/ttyS0'/>
        <target port='0'/></serial>""", [*DEFAULT_ACL, "c 4:64 rw"]),
    ("tpm passthrough", """<tpm model='tpm-tis'><backend type='passthrough'>
        <device path='/dev/tpm0'/></backend></tpm>""", [*DEFAULT_ACL, "c 10:224 rw"]),
    ("usb hostdev by address", """<hostdev mode='subsystem' type='usb'><source>
        <address bus='1' device='4'/></source></hostdev>""", [*DEFAULT_ACL, "c 189:3 rw"]),
    ("evdev input and random rng", """<input type='evdev'><source dev='/dev/input/event3'/>
        </input><rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>""",
     [*DEFAULT_ACL, "c 13:67 rw", "c 10:183 rw"]),
]


@pytest.mark.parametrize(("what", "devices", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(what: str, devices: str, expected: list[str]) -> None:
    assert lines(devices) == expected, what


def test_vfio_hostdev_needs_group_and_container(tmp_path: Path) -> None:
    dev = tmp_path / "bus" / "pci" / "devices" / "0000:01:00.0"
    dev.mkdir(parents=True)
    (dev / "iommu_group").symlink_to("../../../kernel/iommu_groups/7")
    xml = """<hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/><source>
        <address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>"""
    got = lines(xml, sysfs_root=tmp_path)
    assert got == [*DEFAULT_ACL, "c 242:0 rw", "c 10:196 rw"]


def test_custom_acl_replaces_default_and_skips_missing() -> None:
    cfg = config(acl=["/dev/null", "/dev/does-not-exist", "/var/lib/images/a.img"],
                 extra=["/dev/net/tun"])
    assert lines("", cfg) == ["c 1:3 rw", "c 10:200 rw"]


def test_devnodes_from_the_resource_model_are_allowed() -> None:
    cfg = config(acl=["/dev/null"])
    assert lines("", cfg, devnodes=["/dev/kvm", "/dev/urandom"]) == [
        "c 1:3 rw", "c 10:232 rw", "c 1:9 rw"]


def test_every_rule_names_its_origin() -> None:
    dom = domain("""<disk type='block' device='disk'><source dev='/dev/sda'/>
        <target dev='vda' bus='virtio'/></disk><serial type='pty'/>""")
    origins = {r.origin for r in domain_rules(dom, config())}
    assert origins == {"disk:vda", "pty", "acl"}


# ---- the rule model ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["c 1:3 rw", "c 136:* rw", "b 7:0 r", "a *:* rwm", "b *:* m"])
def test_rule_text_round_trip(text: str) -> None:
    assert DeviceRule.parse(text).text() == text


def test_access_is_normalised_and_validated() -> None:
    assert DeviceRule("c", 1, 3, "wr").access == "rw"
    with pytest.raises(ValueError):
        DeviceRule("c", 1, 3, "rx")
    with pytest.raises(ValueError):
        DeviceRule("x", 1, 3, "r")


def test_json_round_trip() -> None:
    r = DeviceRule("c", 136, None, "rw", "/dev/pts/*", "pty")
    assert DeviceRule.from_json(r.to_json()) == r


def test_v1_transition_denies_first_then_allows() -> None:
    old = [DeviceRule("c", 1, 3, "rw"), DeviceRule("b", 8, 0, "rw"), DeviceRule("b", 8, 16, "rw")]
    new = [DeviceRule("c", 1, 3, "rw"), DeviceRule("b", 8, 0, "r"), DeviceRule("c", 10, 232, "rw")]
    assert v1_transition(old, new) == [("deny", "b 8:0 w"), ("deny", "b 8:16 rw"),
                                       ("allow", "c 10:232 rw")]
    assert v1_transition(new, new) == []


def test_without_origin_keeps_shared_nodes() -> None:
    a = DeviceRule("c", 10, 196, "rw", "/dev/vfio/vfio", "hostdev:pci:0000:01:00.0")
    b = DeviceRule("c", 10, 196, "rw", "/dev/vfio/vfio", "hostdev:pci:0000:02:00.0")
    left = rules.without_origin([a, b], "hostdev:pci:0000:01:00.0")
    assert [r.text() for r in effective(left)] == ["c 10:196 rw"]
