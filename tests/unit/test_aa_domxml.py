"""The helper's pyexpat reader (vmconfine_aa_helper.domxml) against the shared domain model.

Over every domain of the test corpus (tests/data/domains, tests/data/apparmor), and the live
XML the AppArmor driver sends: where the fast reader answers, its view holds what the model
holds, and the rules it leads to are byte-identical to the model's; where it does not, it
says so (Fallback) and the helper uses the model. Hostile or unusual documents fall back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit import test_aa_helper_hardening as hardening
from tests.unit.test_aa_profiles import CASES as AA_CASES
from tests.unit.test_aa_profiles import prepare
from vmconfine.config.instance import open_instance, parse_uri
from vmconfine.config.layout import embed_dirs, plain_uri
from vmconfine.domain import parse_domain
from vmconfine.plugin import resources
from vmconfine_aa_helper import domxml, rules
from vmconfine_aa_helper.paths import Refusal

DATA = Path(__file__).resolve().parent.parent / "data"
DOMAINS = sorted(p.name for p in (DATA / "domains").glob("*.xml"))


def compare(xml: bytes, uri: str) -> bool:
    """True when the fast reader answered (and agreed with the model), False on Fallback."""
    try:
        view = domxml.read(xml)
    except domxml.Fallback:
        return False
    model = parse_domain(xml, "<stdin>", live=True)
    assert (view.name, view.uuid, view.virt_type, view.emulator) == (
        model.name, model.uuid, model.virt_type, model.emulator)
    assert [(d.type, d.device, d.target, d.readonly, d.shareable,
             d.source.path if d.source else None) for d in view.disks] == [
        (d.type, d.device, d.target, d.readonly, d.shareable,
         d.source.path if d.source else None) for d in model.disks]
    assert [(c.kind, c.type, c.path, c.mode, c.target_type, c.log_file)
            for c in view.chardevs] == [(c.kind, c.type, c.path, c.mode, c.target_type,
                                         c.log_file) for c in model.chardevs]
    assert view.graphics == [g.socket for g in model.graphics if g.type == "vnc" and g.socket]
    assert (view.kernel, view.initrd, view.dtb, view.nvram) == (
        model.os.kernel, model.os.initrd, model.os.dtb, model.os.nvram)
    inst = open_instance(uri)
    dirs = (str(inst.log_path(view.name)), str(inst.domain_lib_dir(view.name)),
            str(inst.domain_run_dir(view.name)))
    try:
        want = rules.domain_rules(model, inst).render()
    except Refusal as exc:
        with pytest.raises(Refusal) as got:
            rules.view_rules(view, dirs)
        assert str(got.value) == str(exc)
        return True
    assert rules.view_rules(view, dirs).render() == want
    return True


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_corpus(name: str, tmp_path: Path) -> None:
    compare((DATA / "domains" / name).read_bytes(), f"qemu:///embed?root={tmp_path}/inst")


def test_apparmor_corpus(tmp_path: Path) -> None:
    fast = []
    for case in AA_CASES:
        base = tmp_path / case
        base.mkdir()
        xml = prepare(case, base).encode()
        if compare(xml, f"qemu:///embed?root={base}/inst"):
            fast.append(case)
    # the reader must stay useful: most of the corpus (everything without hostdevs, backing
    # chains or namespaces: 33 of 37) takes the fast path
    assert len(fast) >= 30, fast


def test_driver_live_xml_takes_the_fast_path(tmp_path: Path) -> None:
    """What the AppArmor driver sends: live XML with the stack's seclabels (DAC's too)."""
    base = tmp_path / "c"
    base.mkdir()
    model = parse_domain(prepare("disk-virtio", base))
    for sec in ("dac", "apparmor"):
        model.add_seclabel(sec, "dynamic", implicit=True)
    dac = model.seclabel("dac")
    assert dac is not None
    dac.label = dac.imagelabel = "+107:+107"
    assert compare(model.to_xml(live=True).encode(), f"qemu:///embed?root={base}/inst")


@pytest.mark.parametrize("label", [
    "<seclabel type='dynamic' model='dac' relabel='no'/>",
    "<seclabel type='static' model='dac'/>",
    "<seclabel type='none' model='dac' relabel='yes'/>",
    "<seclabel type='static' model='dac'><label>+1:+1</label><baselabel>x</baselabel></seclabel>",
    "<seclabel type='dynamic'/>",
    "<seclabel type='dynamic' model='dac'/><seclabel type='dynamic' model='dac'/>",
])
def test_seclabels_the_model_refuses_fall_back(label: str) -> None:
    xml = (DATA / "apparmor" / "minimal.xml").read_text().replace("</domain>",
                                                                  label + "</domain>")
    with pytest.raises(domxml.Fallback):
        domxml.read(xml.encode())


@pytest.mark.parametrize("mutate", [
    lambda x: '<!DOCTYPE d [<!ENTITY e "x">]>' + x.replace("<vcpu>1", "<vcpu>&e;1"),
    lambda x: x.replace("<vcpu>1", "<vcpu>&e;1"),
    lambda x: x.replace("<vcpu>", "<vcpu>\x00"),
    lambda x: x.replace("</devices>", "<devices>"),
    lambda x: x.replace("<domain type='qemu'>", "<domain type='qemu' xmlns='urn:x'>"),
    lambda x: x.replace("<domain type='qemu'>", "<domain type='lxc'>"),
    lambda x: x.replace(">hvm<", ">xen<"),
    lambda x: x.replace("<uuid>a21d44e2-b91b-56a5-b84c-33811d27f9eb</uuid>", ""),
    lambda x: x.replace("<name>minimal</name>", "<name>.hidden</name>"),
    lambda x: x.replace("<memory unit='MiB'>64", "<memory unit='MiB'>sixty"),
    lambda x: x.replace("</devices>", "<hostdev mode='subsystem' type='usb'/></devices>"),
    lambda x: x.replace("</devices>", "<disk type='file'><source file='/x'/><target dev='vda'/>"
                                      "<boot order='1'/></disk></devices>"),
    lambda x: x.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><memoryBacking><hugepages/>"
                                          "</memoryBacking>"),
])
def test_unusual_documents_fall_back(mutate) -> None:  # type: ignore[no-untyped-def]
    xml = mutate((DATA / "apparmor" / "minimal.xml").read_text())
    with pytest.raises(domxml.Fallback):
        domxml.read(xml.encode())


def test_the_hardening_tests_take_the_fast_path() -> None:
    """The helper's refusals (test_aa_helper_hardening) are exercised through this reader."""
    xml = hardening.TEMPLATE.format(name="n", uuid=hardening.UUID, disk="/srv/1.img",
                                    devices="", os_extra="", disk_extra="", ostype="hvm",
                                    emulator="/usr/bin/qemu-system-x86_64")
    assert domxml.read(xml.encode()).disks[0].source.path == "/srv/1.img"


def test_minimal_is_read() -> None:
    view = domxml.read((DATA / "apparmor" / "minimal.xml").read_bytes())
    assert (view.name, view.uuid) == ("minimal", "a21d44e2-b91b-56a5-b84c-33811d27f9eb")


def test_devnodes_are_the_resource_lists() -> None:
    assert rules.BASE_DEVNODES == resources.BASE_DEVNODES
    assert set(rules.READ_ONLY_DEVNODES) == resources.READ_ONLY_DEVNODES


@pytest.mark.parametrize("uri", [
    "qemu:///system", "qemu+unix:///system", "qemu:///system/", "qemu:///embed?root=/srv/x",
    "qemu:///embed?root=/srv/x/../y/", "qemu:///embed/?root=/a", "qemu:///embed?root=/a%20b",
    "qemu:///embed?root=/a+b", "qemu:///embed?root=rel", "qemu:///embed?root=/a&root=/b",
    "qemu:///session", "qemu://host/system", "qemu+ssh://h/system", "lxc:///system",
    "qemu:///embed?root=", "qemu:///embed?x=1&root=/a",
])
def test_plain_uri_agrees_with_the_uri_parser(uri: str) -> None:
    plain = plain_uri(uri)
    if plain is None:
        return  # left to parse_uri
    parsed = parse_uri(uri)
    assert (parsed.kind, str(parsed.root) if parsed.root else None) == plain
    inst = open_instance(uri) if parsed.kind == "embed" or os.geteuid() == 0 else None
    if inst is not None and plain[1] is not None:
        assert embed_dirs(plain[1]) == (str(inst.config_path), str(inst.run_dir),
                                        str(inst.lib_dir), str(inst.cache_dir),
                                        str(inst.log_dir))
