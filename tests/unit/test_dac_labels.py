"""DAC labels and identity: gen_label (libvirt's rules), ids, groups, /proc checks, taints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmconfine.plugin.nop
import vmconfine_dac
from tests.support import make_ctx
from tests.unit.test_dac_support import domain_xml, host_for, qemu_ids, scratch
from vmconfine.errors import ConfigError, LabelError
from vmconfine.plugin.registry import collect_drivers, make_plugin_manager
from vmconfine.plugin.stack import Stack
from vmconfine_dac.driver import DacDriver, identity
from vmconfine_dac.identity import (
    Identity,
    parse_label,
    supplementary_groups,
    user_id,
    verify_status,
)


@pytest.fixture
def root() -> Iterator[Path]:
    with scratch() as d:
        yield d


def _gen(root: Path, seclabel: str, config: str | None = None) -> tuple[object, object]:
    host = host_for(root, config)
    ctx = make_ctx(host, domain_xml("lbl", extra=seclabel))
    sec = ctx.domain.seclabel("dac")
    if sec is None:
        sec = ctx.domain.add_seclabel("dac", "dynamic", implicit=True)
    DacDriver(host).gen_label(ctx, sec)
    return ctx, sec


# ---- gen_label table --------------------------------------------------------------------------

GEN_TABLE = [
    # (seclabel XML, qemu.conf, expected label, expected imagelabel)
    ("", None, "+{uid}:+{gid}", "+{uid}:+{gid}"),
    ("", 'user = "+1234"\ngroup = "+5678"\n', "+1234:+5678", "+1234:+5678"),
    ("", 'user = "vmconfine-qemu"\ngroup = "+0"\n', "+{uid}:+0", "+{uid}:+0"),
    ("<seclabel type='dynamic' model='dac'/>", None, "+{uid}:+{gid}", "+{uid}:+{gid}"),
    ("<seclabel type='static' model='dac' relabel='yes'><label>+77:+88</label></seclabel>",
     None, "+77:+88", "+77:+88"),
    ("<seclabel type='static' model='dac' relabel='no'><label>+77:+88</label></seclabel>",
     None, "+77:+88", None),
    ("<seclabel type='static' model='dac'><label>vmconfine-qemu:kvm</label></seclabel>",
     None, "vmconfine-qemu:kvm", None),
]


@pytest.mark.parametrize(("xml", "config", "label", "imagelabel"), GEN_TABLE)
def test_gen_label_table(root: Path, xml: str, config: str | None, label: str,
                         imagelabel: str | None) -> None:
    uid, gid = qemu_ids()
    _ctx, sec = _gen(root, xml, config)
    assert sec.label == label.format(uid=uid, gid=gid)  # type: ignore[attr-defined]
    expected = imagelabel.format(uid=uid, gid=gid) if imagelabel else None
    assert sec.imagelabel == expected  # type: ignore[attr-defined]


def test_gen_label_refuses_preset_imagelabel(root: Path) -> None:
    host = host_for(root)
    ctx = make_ctx(host, domain_xml("img"))
    sec = ctx.domain.add_seclabel("dac", "static", implicit=False)
    sec.label = "+1:+1"
    sec.imagelabel = "+2:+2"
    with pytest.raises(LabelError, match="security image label already defined for VM"):
        DacDriver(host).gen_label(ctx, sec)


def test_gen_label_static_needs_label(root: Path) -> None:
    host = host_for(root)
    ctx = make_ctx(host, domain_xml("nolabel"))
    sec = ctx.domain.add_seclabel("dac", "static", implicit=False)
    with pytest.raises(LabelError, match="missing label for static security driver in domain "
                                         "nolabel"):
        DacDriver(host).gen_label(ctx, sec)


def test_gen_label_static_label_must_parse(root: Path) -> None:
    with pytest.raises(LabelError, match="Failed to parse uid and gid from 'nocolon'"):
        _gen(root, "<seclabel type='static' model='dac'><label>nocolon</label></seclabel>")


def test_gen_label_none_changes_nothing(root: Path) -> None:
    _ctx, sec = _gen(root, "<seclabel type='none' model='dac'/>")
    assert sec.label is None and sec.imagelabel is None  # type: ignore[attr-defined]


def test_live_xml_shows_label_and_imagelabel(root: Path) -> None:
    uid, gid = qemu_ids()
    ctx, _sec = _gen(root, "")
    live = ctx.domain.to_xml(live=True)  # type: ignore[attr-defined]
    assert f"<label>+{uid}:+{gid}</label>" in live
    assert f"<imagelabel>+{uid}:+{gid}</imagelabel>" in live


# ---- model, doi, base label, registration


def test_model_doi_base_label(root: Path) -> None:
    uid, gid = qemu_ids()
    drv = DacDriver(host_for(root))
    assert drv.model() == "dac" and drv.doi() == "0"
    assert drv.base_label("kvm") == f"+{uid}:+{gid}"
    assert drv.probe(drv.host) == (True, "")


def test_registered_and_appended_last_for_privileged_instance(root: Path) -> None:
    pm = make_plugin_manager(autoload=False, plugins=[vmconfine_dac, vmconfine.plugin.nop])
    registry = collect_drivers(pm)
    info = registry.get("dac")
    assert info is not None and info.kind == "security"
    host = host_for(root, 'security_driver = "none"\n')
    host.pm, host.registry = pm, registry
    stack = Stack.build(host)
    assert stack.names()[-1] == "dac"
    assert [m["model"] for m in stack.secmodels()] == ["none", "dac"]


# ---- ids and groups


def test_parse_label_forms() -> None:
    uid, gid = qemu_ids()
    assert parse_label("+5:+6") == (5, 6)
    assert parse_label("vmconfine-qemu:vmconfine-qemu") == (uid, gid)
    assert parse_label("4242:4343") == (4242, 4343)  # no such names: numbers (libvirt)
    for bad in ("", "+5", ":+6", "+5:"):
        with pytest.raises(LabelError, match="Failed to parse uid and gid"):
            parse_label(bad)
    with pytest.raises(LabelError, match="no-such-user-here"):
        parse_label("no-such-user-here:+1")


def test_unknown_configured_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="create the account"):
        user_id("no-such-user-here", "qemu.conf user")


def test_supplementary_groups_from_user_database() -> None:
    import grp

    uid, gid = qemu_ids()
    groups = supplementary_groups(uid, gid)
    assert gid in groups
    assert grp.getgrnam("kvm").gr_gid in groups  # scripts/setup.sh adds it
    assert supplementary_groups(uid, 4321) == tuple(sorted({*groups, 4321}))


def test_numeric_id_without_passwd_entry_gets_no_groups() -> None:
    import pwd

    free = next(u for u in range(54321, 60000) if not _has_pw(pwd, u))
    assert supplementary_groups(free, 54321) == ()


def _has_pw(pwd: object, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)  # type: ignore[attr-defined]
        return True
    except KeyError:
        return False


def test_identity_follows_static_label_and_config(root: Path) -> None:
    ctx, _ = _gen(root, "<seclabel type='static' model='dac'><label>+3000:+3001</label>"
                        "</seclabel>")
    ident = identity(ctx)  # type: ignore[arg-type]
    assert (ident.uid, ident.gid) == (3000, 3001)
    assert ident.clear_caps and not ident.high_privileges
    assert ctx.taints == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("config", [
    'user = "+0"\n', 'group = "root"\n', "clear_emulator_capabilities = 0\n",
])
def test_high_privileges_taint(root: Path, config: str) -> None:
    ctx, _ = _gen(root, "", config)
    identity(ctx)  # type: ignore[arg-type]
    assert "high-privileges" in ctx.taints  # type: ignore[attr-defined]


# ---- the kernel's view ------------------------------------------------------------------------


def test_process_label_reads_proc(root: Path) -> None:
    host = host_for(root)
    ctx = make_ctx(host, domain_xml("self"))
    label = DacDriver(host).process_label(ctx, os.getpid())
    assert label == f"+{os.geteuid()}:+{os.getegid()}"
    assert DacDriver(host).process_label(ctx, 2**22 + 12345) is None


def _status(uid: int, gid: int, groups: str, caps: str = "0000000000000000") -> dict[str, str]:
    out = {"Uid": f"{uid}\t{uid}\t{uid}\t{uid}", "Gid": f"{gid}\t{gid}\t{gid}\t{gid}",
           "Groups": groups}
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        out[k] = caps
    return out


def test_verify_status_accepts_exact_match() -> None:
    ident = Identity(999, 994, (994, 995))
    assert verify_status(_status(999, 994, "994 995"), ident) == []


def test_verify_status_reports_each_difference() -> None:
    ident = Identity(999, 994, (994, 995))
    status = _status(999, 994, "994", caps="000001ffffffffff")
    status["Uid"] = "999\t0\t999\t999"
    problems = verify_status(status, ident)
    assert any(p.startswith("Uid is 999 0 999 999") for p in problems)
    assert any(p.startswith("Groups are [994]") for p in problems)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert any(p.startswith(f"{key} is 000001ffffffffff") for p in problems)


def test_verify_status_ignores_caps_when_kept() -> None:
    ident = Identity(0, 0, (0,), clear_caps=False)
    assert verify_status(_status(0, 0, "0", caps="000001ffffffffff"), ident) == []


def test_verify_process_fails_closed_for_wrong_process(root: Path) -> None:
    ctx, _ = _gen(root, "")
    problems = DacDriver(ctx.host).verify_process(ctx, os.getpid())  # type: ignore[attr-defined]
    assert any(p.startswith("Uid is 0") for p in problems)  # the test runs as root
    assert any(p.startswith("CapEff") for p in problems)


def test_verify_rejects_unparsable_device_label(root: Path) -> None:
    from vmconfine.domain import parse_domain

    xml = domain_xml("bad", "<disk type='file' device='disk'><source file='/x.img'>"
                            "<seclabel model='dac'><label>oops</label></seclabel></source>"
                            "<target dev='vda' bus='virtio'/></disk>")
    domain = parse_domain(xml)
    with pytest.raises(LabelError, match="Failed to parse uid and gid from 'oops'"):
        DacDriver(host_for(root)).verify(domain, None)
