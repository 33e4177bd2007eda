"""The SELinux driver on the fake backend: probe, label generation, process-side hooks."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from tests.support import make_host
from tests.unit.test_selinux_support import (
    CONTENT_CONTEXT,
    DOMAIN_CONTEXT,
    IMAGE_CONTEXT,
    UUID_A,
    UUID_B,
    domain_xml,
    fake_backend,
    gen,
    make_ctx,
    plugin,
    setup,
)
from vmconfine.errors import DriverError, LabelError
from vmconfine.plugin import nop
from vmconfine.plugin.stack import Stack
from vmconfine_selinux.contexts import Context, load_policy_contexts
from vmconfine_selinux.driver import SELinuxDriver
from vmconfine_selinux.mcs import LabelRegistry, parse_process_range

# libvirt tests/securityselinuxtest.c GenLabel table:
# (process context, user, role, sensitivity, lowest category, highest category)
GENLABEL = [
    ("unconfined_u:unconfined_r:unconfined_t:s0", "unconfined_u", "unconfined_r", "s0", 0, 1023),
    ("unconfined_u:unconfined_r:unconfined_t:s0-s0", "unconfined_u", "unconfined_r", "s0", 0,
     1023),
    ("unconfined_u:unconfined_r:unconfined_t:s0-s0:c0.c1023", "unconfined_u", "unconfined_r",
     "s0", 0, 1023),
    ("system_u:system_r:virtd_t:s0-s0:c0.c1023", "system_u", "system_r", "s0", 0, 1023),
    ("system_u:system_r:virtd_t:s0-s0:c0.c10", "system_u", "system_r", "s0", 0, 10),
    ("system_u:system_r:virtd_t:s2-s3:c0.c1023", "system_u", "system_r", "s2", 0, 1023),
    ("system_u:system_r:virtd_t", "system_u", "system_r", "s0", 0, 1023),
]


def _cats(level: str, sens: str) -> tuple[int, int]:
    s, _, cats = level.partition(":")
    assert s == sens, level
    a, b = (int(c[1:]) for c in cats.split(","))
    return a, b


@pytest.mark.parametrize(("pidcon", "user", "role", "sens", "low", "high"), GENLABEL)
def test_genlabel_table(tmp_path: Path, pidcon: str, user: str, role: str, sens: str,
                        low: int, high: int) -> None:
    host, drv, _be = setup(tmp_path, process_context=pidcon)
    for i in range(20):
        ctx = make_ctx(host, domain_xml(name=f"vm{i}", uuid=f"{UUID_A[:-2]}{i:02x}"))
        sec = gen(drv, ctx)
        assert sec.label is not None and sec.imagelabel is not None
        proc, img = Context.parse(sec.label), Context.parse(sec.imagelabel)
        assert (proc.user, proc.role, proc.type) == (user, role, "svirt_t")
        assert (img.user, img.role, img.type) == (user, "object_r", "svirt_image_t")
        assert proc.range == img.range
        a, b = _cats(str(proc.range), sens)
        assert low <= a < b <= high, "two different, ordered categories (CVE-2021-3631)"
        assert sec.model == "selinux"


def test_dynamic_labels_are_unique_and_released(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path, process_context="system_u:system_r:virtd_t:s0-s0:c0.c7")
    ctxs = [make_ctx(host, domain_xml(name=f"vm{i}", uuid=f"{UUID_A[:-2]}{i:02x}"))
            for i in range(28)]
    labels = {gen(drv, c).label for c in ctxs}
    assert len(labels) == 28
    extra = make_ctx(host, domain_xml(name="late", uuid="0badc0de-0000-4000-8000-000000000001"))
    with pytest.raises(LabelError, match=r"no free MCS category pair in s0:c0\.c7 \(28 in use\)"):
        gen(drv, extra)
    sec = ctxs[5].domain.seclabel("selinux")
    assert sec is not None
    freed = sec.label
    drv.release_label(ctxs[5], sec)
    assert sec.label is None and sec.imagelabel is None
    drv.release_label(ctxs[5], sec)  # restore-type: repeat is fine
    assert freed is not None and gen(drv, extra).label == freed  # the only free pair


def test_tcg_guests_get_the_tcg_type(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    sec = gen(drv, make_ctx(host, domain_xml(virt_type="qemu")))
    assert Context.parse(sec.label or "").type == "svirt_tcg_t"
    assert drv.base_label("qemu") == "system_u:system_r:svirt_tcg_t:s0"
    assert drv.base_label("kvm") == DOMAIN_CONTEXT
    assert drv.base_label("xen") is None
    assert (drv.model(), drv.doi()) == ("selinux", "0")


def test_policy_without_tcg_type_warns_and_uses_the_domain_type(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import vmconfine_selinux.contexts as contexts_mod

    contexts_mod._warned_tcg = False
    host, drv, _be = setup(tmp_path, tcg=False)
    with caplog.at_level(logging.WARNING):
        sec = gen(drv, make_ctx(host, domain_xml(virt_type="qemu")))
    assert Context.parse(sec.label or "").type == "svirt_t"
    assert "does not define a domain type for QEMU TCG" in caplog.text


def test_baselabel_gives_the_type(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    xml = domain_xml(seclabel="<seclabel type='dynamic' model='selinux'>"
                              "<baselabel>system_u:system_r:svirt_custom_t:s0</baselabel>"
                              "</seclabel>")
    sec = gen(drv, make_ctx(host, xml))
    proc = Context.parse(sec.label or "")
    assert proc.type == "svirt_custom_t" and proc.range and proc.range.startswith("s0:c")
    assert Context.parse(sec.imagelabel or "").type == "svirt_image_t"


def test_static_label_is_used_verbatim(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    xml = domain_xml(seclabel="<seclabel type='static' model='selinux' relabel='yes'>"
                              "<label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>")
    ctx = make_ctx(host, xml)
    drv.verify(ctx.domain, ctx.domain.seclabel("selinux"))
    sec = gen(drv, ctx)
    assert sec.label == "system_u:system_r:svirt_t:s0:c1,c2"
    assert sec.imagelabel == "system_u:object_r:svirt_image_t:s0:c1,c2"
    assert not (tmp_path / "inst").joinpath("run", "qemu", "selinux-mcs").exists(), \
        "static labels use no registry"


def test_invalid_static_label_is_refused(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    xml = domain_xml(seclabel="<seclabel type='static' model='selinux'>"
                              "<label>not-a-context</label></seclabel>")
    ctx = make_ctx(host, xml)
    with pytest.raises(LabelError, match="Invalid security label not-a-context"):
        drv.verify(ctx.domain, ctx.domain.seclabel("selinux"))


def test_labels_already_present_are_refused(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    live = domain_xml(seclabel="<seclabel type='dynamic' model='selinux' relabel='yes'>"
                               "<label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>")
    with pytest.raises(LabelError, match="security label already defined for VM"):
        gen(drv, make_ctx(host, live, live=True))
    ctx = make_ctx(host, domain_xml())
    sec = ctx.domain.add_seclabel("selinux", "dynamic")
    sec.imagelabel = IMAGE_CONTEXT
    with pytest.raises(LabelError, match="security image label already defined for VM"):
        drv.gen_label(ctx, sec)


def test_basic_mode_uses_the_policy_contexts(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path, config='selinux_mode = "basic"\n')
    a = gen(drv, make_ctx(host, domain_xml()))
    b = gen(drv, make_ctx(host, domain_xml(name="vm2", uuid=UUID_B)))
    assert a.label == b.label == DOMAIN_CONTEXT
    assert a.imagelabel == b.imagelabel == IMAGE_CONTEXT
    assert not list((tmp_path / "inst").rglob("selinux-mcs"))


def test_policy_without_mcs_falls_back_to_basic(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path, policy_mcs=False)
    sec = gen(drv, make_ctx(host, domain_xml()))
    assert sec.label == "system_u:system_r:svirt_t"
    assert sec.imagelabel == "system_u:object_r:svirt_image_t"


def test_live_xml_shows_label_and_imagelabel(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    live = ctx.domain.to_xml(live=True)
    assert f"<label>{sec.label}</label>" in live
    assert f"<imagelabel>{sec.imagelabel}</imagelabel>" in live
    assert "<label>" not in ctx.domain.to_xml()  # generated: not part of the config


def test_gen_failure_releases_the_level(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    xml = domain_xml(seclabel="<seclabel type='dynamic' model='selinux'>"
                              "<baselabel>broken</baselabel></seclabel>")
    with pytest.raises(LabelError, match="cannot build the domain label"):
        gen(drv, make_ctx(host, xml))
    assert drv.registry(make_ctx(host, domain_xml())).in_use() == 0


def test_reserve_label_of_a_running_domain(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    be.pid_contexts[4242] = "system_u:system_r:svirt_t:s0:c5,c9"
    ctx = make_ctx(host, domain_xml())
    sec = ctx.domain.add_seclabel("selinux", "dynamic")
    drv.reserve_label(ctx, sec, 4242)
    drv.reserve_label(ctx, sec, 4242)  # reconnecting twice is harmless
    other = make_ctx(host, domain_xml(name="vm2", uuid=UUID_B))
    with pytest.raises(LabelError, match=r"MCS level for existing domain label "
                                         r"system_u:system_r:svirt_t:s0:c5,c9 already reserved"):
        drv.reserve_label(other, other.domain.add_seclabel("selinux", "dynamic"), 4242)
    with pytest.raises(LabelError, match="unable to get PID 999999 security context"):
        drv.reserve_label(other, other.domain.seclabel("selinux"), 999999)  # type: ignore[arg-type]


def test_probe_without_selinux_and_explicit_config_refuses(tmp_path: Path) -> None:
    be = fake_backend(tmp_path, enabled=False)
    drv = SELinuxDriver(None, be)
    ok, why = drv.probe(None)  # type: ignore[arg-type]
    assert not ok and "SELinux is not enabled on this host" in why
    host = make_host(tmp_path / "inst", [nop, plugin(be)], config='security_driver = "selinux"\n')
    with pytest.raises(DriverError, match="Security driver selinux not enabled: SELinux is not "
                                          "enabled on this host"):
        Stack.build(host)
    auto = make_host(tmp_path / "auto", [nop, plugin(be)])
    assert Stack.build(auto).names()[0] == "none"


def test_probe_with_unreadable_context_files(tmp_path: Path) -> None:
    be = fake_backend(tmp_path)
    be.domain_path = str(tmp_path / "missing")
    ok, why = SELinuxDriver(None, be).probe(None)  # type: ignore[arg-type]
    assert not ok
    assert why.startswith(f"cannot read SELinux virtual domain context file "
                          f"'{tmp_path / 'missing'}'")


def test_stack_with_selinux_and_implicit_labels(tmp_path: Path) -> None:
    be = fake_backend(tmp_path)
    host = make_host(tmp_path / "inst", [nop, plugin(be)], config='security_driver = "selinux"\n')
    stack = Stack.build(host)
    assert stack.names()[:2] == ["selinux", "dac"]
    assert stack.secmodels()[0] == {"model": "selinux", "doi": "0", "baselabels": {
        "kvm": DOMAIN_CONTEXT, "qemu": "system_u:system_r:svirt_tcg_t:s0"}}
    ctx = make_ctx(host, domain_xml())
    stack.gen_labels(ctx)
    sec = ctx.domain.seclabel("selinux")
    assert sec is not None and sec.implicit and sec.label and sec.label.startswith(
        "system_u:system_r:svirt_t:s0:c")


def test_type_none_gets_no_label(tmp_path: Path) -> None:
    be = fake_backend(tmp_path)
    host = make_host(tmp_path / "inst", [nop, plugin(be)], config='security_driver = "selinux"\n')
    stack = Stack.build(host)
    ctx = make_ctx(host, domain_xml(seclabel="<seclabel type='none' model='selinux'/>"))
    stack.gen_labels(ctx)
    drv = stack.primary.obj
    drv.child_exec_label(ctx)
    assert be.exec_context is None
    assert drv.verify_process(ctx, 1) == []


def test_mount_options_give_filesystems_for_qemu_the_image_label(tmp_path: Path) -> None:
    """libvirt's GetSecurityMountOptions: the stack joins them for the namespaces driver's
    tmpfs; a domain without an SELinux label gets none."""
    be = fake_backend(tmp_path)
    host = make_host(tmp_path / "inst", [nop, plugin(be)], config='security_driver = "selinux"\n')
    stack = Stack.build(host)
    ctx = make_ctx(host, domain_xml())
    stack.gen_labels(ctx)
    sec = ctx.domain.seclabel("selinux")
    assert sec is not None and sec.imagelabel
    assert stack.mount_options(ctx) == f'context="{sec.imagelabel}"'
    off = make_ctx(host, domain_xml(seclabel="<seclabel type='none' model='selinux'/>"))
    stack.gen_labels(off)
    assert stack.mount_options(off) == ""


def test_policy_context_files_are_parsed(tmp_path: Path) -> None:
    dom = tmp_path / "d"
    img = tmp_path / "i"
    dom.write_text("system_u:system_r:svirt_t:s0\n")
    img.write_text("system_u:object_r:svirt_image_t:s0\nsystem_u:object_r:virt_content_t:s0\n")
    pc = load_policy_contexts(str(dom), str(img))
    assert (pc.domain, pc.alt_domain, pc.file, pc.content) == (
        DOMAIN_CONTEXT, None, IMAGE_CONTEXT, CONTENT_CONTEXT)
    img.write_text("system_u:object_r:svirt_image_t:s0\n")
    with pytest.raises(DriverError, match="content context on line 2"):
        load_policy_contexts(str(dom), str(img))
    dom.write_text("x" * 2000)
    with pytest.raises(DriverError, match="larger than 1024 bytes"):
        load_policy_contexts(str(dom), str(img))


# ---- process-side hooks -------------------------------------------------------------------


def test_child_exec_label_and_socket_labels(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    drv.child_exec_label(ctx)
    assert be.exec_context == sec.label
    drv.set_socket_label(ctx)
    assert be.sockcreate_context == sec.label
    drv.clear_socket_label(ctx)
    assert be.sockcreate_context is None


def test_exec_label_failure_is_fatal_only_when_enforcing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host, drv, be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    be.fail["setexeccon"] = errno.EINVAL
    with pytest.raises(LabelError, match=f"unable to set security context '{sec.label}'"):
        drv.child_exec_label(ctx)
    be.enforce = False
    with caplog.at_level(logging.WARNING):
        drv.child_exec_label(ctx)
    assert "not enforcing" in caplog.text


def test_verify_process_fails_closed(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    be.pid_contexts[100] = sec.label or ""
    assert drv.verify_process(ctx, 100) == []
    assert drv.process_label(ctx, 100) == sec.label
    be.pid_contexts[101] = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
    problems = drv.verify_process(ctx, 101)
    assert len(problems) == 1 and f"requested '{sec.label}'" in problems[0]
    assert "runs as 'system_u:system_r:virtd_t:s0-s0:c0.c1023'" in problems[0]
    gone = drv.verify_process(ctx, 999999)
    assert len(gone) == 1 and "cannot read /proc/999999/attr/current" in gone[0]
    assert drv.process_label(ctx, 999999) is None


def test_describe_reports_labels(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    info = drv.describe(ctx)
    assert info["label"] == sec.label and info["imagelabel"] == sec.imagelabel
    assert info["mode"] == "svirt" and info["files"] == []


def test_registry_lives_in_the_instance_and_is_shared(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    a = gen(drv, make_ctx(host, domain_xml()))
    other = SELinuxDriver(host, be)  # another vmconfine process of the same instance
    b = gen(other, make_ctx(host, domain_xml(name="vm2", uuid=UUID_B)))
    assert a.label != b.label
    assert drv.registry(make_ctx(host, domain_xml())).dir == host.instance.run_dir / "selinux-mcs"
    leases = LabelRegistry(host.instance.run_dir / "selinux-mcs", parse_process_range(
        be.getcon())).leases()  # what a third process sees
    assert sorted(x.owner for x in leases) == sorted([UUID_A, UUID_B])
    assert {x.level for x in leases} == {Context.parse(a.label or "").range,
                                         Context.parse(b.label or "").range}
