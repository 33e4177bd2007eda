"""File labels per resource (libvirt's securityselinuxlabeldata), remembered labels, restore.

Files live under pytest's tmp dir; the fake backend keeps contexts in ``user.vmconfine.selinux``
and the driver remembers originals in real ``trusted.vmconfine.security.*`` xattrs (root).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_root
from tests.unit.test_selinux_support import (
    CONTENT_CONTEXT,
    IMAGE_CONTEXT,
    UUID_A,
    UUID_B,
    disk,
    domain_xml,
    fresh_ctx,
    gen,
    label_of,
    make_ctx,
    remembered,
    setup,
    touch,
)
from vmconfine.errors import LabelError
from vmconfine_selinux import SETTINGS as SELINUX_SETTINGS

FIXED = ("<seclabel model='selinux' type='dynamic' relabel='yes'>"
         "<label>system_u:system_r:svirt_t:s0:c41,c264</label>"
         "<imagelabel>system_u:object_r:svirt_image_t:s0:c41,c264</imagelabel></seclabel>")
PLAIN = "system_u:object_r:svirt_image_t:s0:c41,c264"
CUSTOM = "system_u:object_r:svirt_image_custom_t:s0:c41,c264"
ORIGINAL = "system_u:object_r:user_home_t:s0"


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()  # trusted.* xattrs need CAP_SYS_ADMIN


def _labeldata_disks(d: Path) -> str:
    devices = "\n".join([
        disk(f"{d}/plain.raw", "vda"),
        disk(f"{d}/shared.raw", "vdb", "<shareable/>"),
        disk(f"{d}/readonly.raw", "vdc", "<readonly/>"),
        disk(f"{d}/nolabel.raw", "vdd", source_extra="<seclabel model='selinux' relabel='no'/>"),
        disk(f"{d}/altlabel.raw", "vde", source_extra=(
            f"<seclabel model='selinux' relabel='yes'><label>{CUSTOM}</label></seclabel>")),
    ])
    return domain_xml(devices=devices, seclabel=FIXED)


def test_labeldata_disks(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    for name in ("plain", "shared", "readonly", "nolabel", "altlabel"):
        touch(d / f"{name}.raw")
    ctx = make_ctx(host, _labeldata_disks(d), live=True)
    drv.set_all_labels(ctx)
    assert label_of(d / "plain.raw") == PLAIN
    assert label_of(d / "shared.raw") == IMAGE_CONTEXT
    assert label_of(d / "readonly.raw") == CONTENT_CONTEXT
    assert label_of(d / "nolabel.raw") is None
    assert label_of(d / "altlabel.raw") == CUSTOM


def test_labeldata_kernel(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "vmlinuz.raw")
    touch(d / "initrd.raw")
    touch(d / "board.dtb")
    xml = domain_xml(seclabel=FIXED, os_extra=(
        f"<kernel>{d}/vmlinuz.raw</kernel><initrd>{d}/initrd.raw</initrd>"
        f"<dtb>{d}/board.dtb</dtb>"))
    drv.set_all_labels(make_ctx(host, xml, live=True))
    for name in ("vmlinuz.raw", "initrd.raw", "board.dtb"):
        assert label_of(d / name) == CONTENT_CONTEXT


def test_labeldata_chardev(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "chr"
    for name in ("plain.txt", "plain.fifo", "plain.dev", "nolabel.sock", "yeslabel.sock",
                 "altlabel.sock"):
        touch(d / name)
    # plain.sock (mode='bind') is not created: QEMU creates bind sockets itself (libvirt labels
    # one only when it already exists)
    serials = f"""
    <serial type='file'><source path='{d}/plain.txt'/></serial>
    <serial type='pipe'><source path='{d}/plain.fifo'/></serial>
    <serial type='dev'><source path='{d}/plain.dev'/></serial>
    <serial type='unix'><source mode='bind' path='{d}/plain.sock'/></serial>
    <serial type='unix'><source mode='connect' path='{d}/nolabel.sock'>
      <seclabel relabel='no' model='selinux'/></source></serial>
    <serial type='unix'><source mode='connect' path='{d}/yeslabel.sock'/></serial>
    <serial type='unix'><source mode='connect' path='{d}/altlabel.sock'>
      <seclabel relabel='yes' model='selinux'><label>{CUSTOM}</label></seclabel>
    </source></serial>"""
    drv.set_all_labels(make_ctx(host, domain_xml(devices=serials, seclabel=FIXED), live=True))
    expected = {"plain.txt": PLAIN, "plain.dev": PLAIN, "plain.fifo": PLAIN,
                "nolabel.sock": None, "plain.sock": None, "yeslabel.sock": PLAIN,
                "altlabel.sock": CUSTOM}
    got = {name: label_of(d / name) if (d / name).exists() else None for name in expected}
    assert got == expected


def test_pipe_with_in_and_out_labels_both(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "chr"
    for suffix in (".in", ".out"):  # regular files: user.* xattrs are refused on FIFOs
        touch(d / f"p{suffix}")
    serial = f"<serial type='pipe'><source path='{d}/p'/></serial>"
    drv.set_all_labels(make_ctx(host, domain_xml(devices=serial, seclabel=FIXED), live=True))
    assert label_of(d / "p.in") == label_of(d / "p.out") == PLAIN


def _busy_domain(d: Path, name: str = "vm1", uuid: str = UUID_A, extra_devices: str = "",
                 seclabel: str = "") -> str:
    devices = "\n".join([
        disk(f"{d}/{name}.raw", "vda"),
        disk(f"{d}/shared.raw", "vdb", "<shareable/>"),
        disk(f"{d}/cdrom.iso", "vdc", "<readonly/>"),
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{d}/{name}-top.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='{d}/base.raw'/>
        <backingStore/></backingStore>
      <target dev='vdd' bus='virtio'/>
    </disk>""",
        f"    <serial type='file'><source path='{d}/{name}.log'/></serial>",
        extra_devices,
    ])
    return domain_xml(name=name, uuid=uuid, devices=devices, seclabel=seclabel, os_extra=(
        f"<kernel>{d}/vmlinuz</kernel><initrd>{d}/initrd</initrd>"
        f"<nvram>{d}/{name}_VARS.fd</nvram>"))


def _files(d: Path, name: str = "vm1") -> list[Path]:
    return [d / n for n in (f"{name}.raw", "shared.raw", "cdrom.iso", f"{name}-top.qcow2",
                            "base.raw", f"{name}.log", "vmlinuz", "initrd", f"{name}_VARS.fd")]


def _prepare(d: Path, name: str = "vm1") -> dict[Path, str | None]:
    originals: dict[Path, str | None] = {}
    for i, f in enumerate(_files(d, name)):
        label = None if i % 3 == 0 else f"system_u:object_r:orig{i}_t:s0"
        if not f.exists():
            touch(f, label)
        originals[f] = label_of(f)
    return originals


def test_every_rule_then_restore_leaves_the_originals(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    originals = _prepare(d)
    ctx = make_ctx(host, _busy_domain(d))
    sec = gen(drv, ctx)
    ctx.instance.domain_run_dir("vm1").mkdir(parents=True)
    drv.preflight(ctx)
    drv.set_all_labels(ctx)
    image = sec.imagelabel
    assert label_of(d / "vm1.raw") == image
    assert label_of(d / "vm1-top.qcow2") == image
    assert label_of(d / "base.raw") == CONTENT_CONTEXT
    assert label_of(d / "shared.raw") == IMAGE_CONTEXT
    assert label_of(d / "cdrom.iso") == CONTENT_CONTEXT
    assert label_of(d / "vm1.log") == image
    assert label_of(d / "vmlinuz") == label_of(d / "initrd") == CONTENT_CONTEXT
    assert label_of(d / "vm1_VARS.fd") == image
    # the runtime dir holds only sockets QEMU gets as fds: vmconfine's own, not labelled
    assert label_of(ctx.instance.domain_run_dir("vm1")) != image
    assert remembered(d / "vm1.raw")["ref_selinux"] == "1"
    files = {f["path"] for f in drv.describe(ctx)["files"]}
    assert str(d / "base.raw") in files and len(files) == 9
    drv.restore_all_labels(ctx)
    assert {f: label_of(f) for f in originals} == originals
    for f in originals:
        assert remembered(f) == {}, f"xattrs left on {f}"
    assert drv.describe(ctx)["files"] == []


def test_restore_from_a_fresh_process_after_a_crash(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    d = tmp_path / "img"
    originals = _prepare(d)
    ctx = make_ctx(host, _busy_domain(d))
    gen(drv, ctx)
    ctx.journal.record("pipeline", "labels", xml=ctx.domain.to_xml(live=True))
    drv.set_all_labels(ctx)
    ctx.journal.close()
    # vmconfine dies here; the next command rebuilds everything from the journal
    from vmconfine_selinux.driver import SELinuxDriver

    host2, _drv, _ = setup(tmp_path, backend=be)
    fresh = SELinuxDriver(host2, be)
    rebuilt = fresh_ctx(host2, ctx)
    sec = rebuilt.domain.seclabel("selinux")
    assert sec is not None and sec.label is None  # config parse: generated labels are gone
    fresh.restore_all_labels(rebuilt)
    fresh.release_label(rebuilt, sec)
    assert {f: label_of(f) for f in originals} == originals
    assert fresh.registry(rebuilt).in_use() == 0
    fresh.restore_all_labels(rebuilt)  # idempotent
    assert {f: label_of(f) for f in originals} == originals


def _two_domains(tmp_path: Path) -> tuple[Any, Any, Path, dict[Path, str | None], Any, Any]:
    """(driver, backend, image dir, original labels, ctx vm1, ctx vm2): two domains sharing
    shared.raw and base.raw, labels generated, nothing set yet."""
    host, drv, be = setup(tmp_path)
    d = tmp_path / "img"
    originals = _prepare(d, "vm1")
    originals.update(_prepare(d, "vm2"))
    a = make_ctx(host, _busy_domain(d, "vm1", UUID_A))
    b = make_ctx(host, _busy_domain(d, "vm2", UUID_B))
    gen(drv, a)
    gen(drv, b)
    a.journal.record("pipeline", "labels", xml=a.domain.to_xml(live=True))
    return drv, be, d, originals, a, b


def test_shared_and_backing_files_are_restored_by_the_last_user(tmp_path: Path) -> None:
    drv, _be, d, originals, a, b = _two_domains(tmp_path)
    drv.set_all_labels(a)
    drv.set_all_labels(b)
    assert remembered(d / "shared.raw")["ref_selinux"] == "2"
    assert remembered(d / "base.raw")["ref_selinux"] == "2"
    drv.restore_all_labels(a)
    drv.restore_all_labels(a)  # a repeat must not count vm1 out twice
    assert label_of(d / "shared.raw") == IMAGE_CONTEXT, "vm2 still uses it"
    assert label_of(d / "base.raw") == CONTENT_CONTEXT
    assert remembered(d / "shared.raw")["ref_selinux"] == "1"
    assert label_of(d / "vm1.raw") == originals[d / "vm1.raw"]
    drv.restore_all_labels(b)
    assert {f: label_of(f) for f in originals} == originals


def test_writable_image_of_another_domain_is_refused(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "disk.raw", ORIGINAL)
    a = make_ctx(host, domain_xml(devices=disk(f"{d}/disk.raw", "vda")))
    b = make_ctx(host, domain_xml(name="vm2", uuid=UUID_B,
                                  devices=disk(f"{d}/disk.raw", "vda")))
    sa, _sb = gen(drv, a), gen(drv, b)
    drv.set_all_labels(a)
    with pytest.raises(LabelError, match=rf"Setting different SELinux label on {d}/disk.raw "
                                         r"which is already in use"):
        drv.set_all_labels(b)
    drv.restore_all_labels(b)  # the stack's rollback
    assert label_of(d / "disk.raw") == sa.imagelabel
    assert remembered(d / "disk.raw")["ref_selinux"] == "1"
    drv.restore_all_labels(a)
    assert label_of(d / "disk.raw") == ORIGINAL and remembered(d / "disk.raw") == {}


def test_without_remembered_labels_restore_uses_the_policy_default(tmp_path: Path) -> None:
    d = tmp_path / "img"
    host, drv, be = setup(tmp_path, config="remember_owner = 0\n",
                          defaults={str(d / "top.raw"): "system_u:object_r:virt_image_t:s0"})
    touch(d / "top.raw", ORIGINAL)
    touch(d / "nodefault.raw", ORIGINAL)
    touch(d / "ro.iso", ORIGINAL)
    devices = "\n".join([disk(f"{d}/top.raw", "vda"), disk(f"{d}/nodefault.raw", "vdb"),
                         disk(f"{d}/ro.iso", "vdc", "<readonly/>")])
    ctx = make_ctx(host, domain_xml(devices=devices))
    gen(drv, ctx)
    drv.set_all_labels(ctx)
    assert remembered(d / "top.raw") == {}
    drv.restore_all_labels(ctx)
    assert label_of(d / "top.raw") == "system_u:object_r:virt_image_t:s0"  # selabel_lookup
    assert label_of(d / "nodefault.raw") == ORIGINAL  # no default: the journal's previous label
    assert label_of(d / "ro.iso") == CONTENT_CONTEXT  # libvirt: others may still read it
    assert be.calls  # the backend did the work


def test_relabel_no_and_static_without_relabel_touch_nothing(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "a.raw", ORIGINAL)
    static = ("<seclabel type='static' model='selinux' relabel='no'>"
              "<label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>")
    ctx = make_ctx(host, domain_xml(devices=disk(f"{d}/a.raw", "vda"), seclabel=static))
    gen(drv, ctx)
    drv.set_all_labels(ctx)
    assert label_of(d / "a.raw") == ORIGINAL and be.calls == []
    static_yes = static.replace("relabel='no'", "relabel='yes'")
    ctx2 = make_ctx(host, domain_xml(name="vm2", uuid=UUID_B,
                                     devices=disk(f"{d}/a.raw", "vda"), seclabel=static_yes))
    gen(drv, ctx2)
    drv.set_all_labels(ctx2)
    assert label_of(d / "a.raw") == "system_u:object_r:svirt_image_t:s0:c1,c2"


def test_unsupported_file_system_only_warns(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "nfs"
    host, drv, _be = setup(tmp_path, unsupported=(str(d),))
    touch(d / "plain.raw")
    ctx = make_ctx(host, domain_xml(devices=disk(f"{d}/plain.raw", "vda")))
    gen(drv, ctx)
    with caplog.at_level(logging.INFO):
        drv.set_all_labels(ctx)
    assert "not supported" in caplog.text
    assert label_of(d / "plain.raw") is None
    drv.restore_all_labels(ctx)


def test_labelling_errors_name_path_labels_and_fix(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "a.raw", ORIGINAL)
    ctx = make_ctx(host, domain_xml(devices=disk(f"{d}/a.raw", "vda")))
    sec = gen(drv, ctx)
    be.fail["setfilecon"] = errno.EACCES
    with pytest.raises(LabelError) as info:
        drv.set_all_labels(ctx)
    msg = info.value.message
    assert f"unable to set security context '{sec.imagelabel}' on '{d}/a.raw'" in msg
    assert f"(current '{ORIGINAL}')" in msg and "vmconfine may not relabel it" in msg
    assert remembered(d / "a.raw") == {}, "a failed set gives its remembered count back"
    missing = make_ctx(host, domain_xml(name="vm2", uuid=UUID_B,
                                        devices=disk(f"{d}/missing.raw", "vda")))
    gen(drv, missing)
    with pytest.raises(LabelError, match=r"missing.raw \(disk\) does not exist"):
        drv.preflight(missing)


def test_hotplug_disk_chardev_and_unplug(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "hot.raw", ORIGINAL)
    touch(d / "hot.log", ORIGINAL)
    xml = domain_xml(devices=disk(f"{d}/hot.raw", "vdz") +
                     f"\n    <serial type='file'><source path='{d}/hot.log'/></serial>")
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    probe_dom = make_ctx(host, xml).domain
    hot_disk, hot_chr = probe_dom.disks[0], probe_dom.chardevs[0]
    drv.set_image_label(ctx, hot_disk)
    drv.set_chardev_label(ctx, hot_chr)
    assert label_of(d / "hot.raw") == label_of(d / "hot.log") == sec.imagelabel
    drv.restore_image_label(ctx, hot_disk)
    assert label_of(d / "hot.raw") == ORIGINAL
    assert label_of(d / "hot.log") == sec.imagelabel, "unplugging the disk leaves the chardev"
    drv.restore_chardev_label(ctx, hot_chr)
    assert label_of(d / "hot.log") == ORIGINAL


def test_symlinked_image_is_labelled_at_its_target(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    touch(d / "real.raw", ORIGINAL)
    os.symlink(d / "real.raw", d / "link.raw")
    ctx = make_ctx(host, domain_xml(devices=disk(f"{d}/link.raw", "vda")))
    sec = gen(drv, ctx)
    drv.set_all_labels(ctx)
    assert label_of(d / "real.raw") == sec.imagelabel
    os.unlink(d / "link.raw")  # the journal keeps the resolved path
    drv.restore_all_labels(ctx)
    assert label_of(d / "real.raw") == ORIGINAL


def test_stale_remembered_record_is_discarded(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    f = touch(d / "a.raw", ORIGINAL)
    prefix = "trusted.vmconfine.security"
    os.setxattr(f, f"{prefix}.selinux", b"system_u:object_r:bogus_t:s0")
    os.setxattr(f, f"{prefix}.ref_selinux", b"3")
    os.setxattr(f, f"{prefix}.timestamp_selinux", b"1")  # an earlier boot
    ctx = make_ctx(host, domain_xml(devices=disk(f"{d}/a.raw", "vda")))
    gen(drv, ctx)
    with caplog.at_level(logging.WARNING):
        drv.set_all_labels(ctx)
    assert "Invalid XATTR timestamp detected" in caplog.text
    assert remembered(f)["ref_selinux"] == "1"
    drv.restore_all_labels(ctx)
    assert label_of(f) == ORIGINAL


def test_through_the_stack_with_rollback_when_a_later_driver_fails(tmp_path: Path) -> None:
    """The hooks as the pipeline calls them (pluggy, stack order), and the stack's rollback."""
    import types

    from tests.support import make_host
    from tests.unit.test_selinux_support import fake_backend
    from vmconfine.plugin import nop
    from vmconfine.plugin.hookspecs import hookimpl
    from vmconfine.plugin.stack import Stack
    from vmconfine_selinux.driver import SELinuxDriver

    be = fake_backend(tmp_path)

    class FailingDac:
        fail = True

        @hookimpl
        def model(self) -> str:
            return "dac"

        @hookimpl
        def set_all_labels(self, ctx: object) -> None:
            if self.fail:
                raise LabelError("dac failed on purpose")

    dac = FailingDac()
    mod = types.ModuleType("stacked")

    @hookimpl
    def vmconfine_register_drivers(registry: object) -> None:
        registry.add("selinux", lambda host: SELinuxDriver(host, be), "fake",  # type: ignore[attr-defined]
                     settings=SELINUX_SETTINGS)
        registry.add("dac", lambda host: dac, "dac", implicit=True)  # type: ignore[attr-defined]

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    host = make_host(tmp_path / "inst", [nop, mod], config='security_driver = "selinux"\n')
    stack = Stack.build(host)
    d = tmp_path / "img"
    originals = _prepare(d)
    ctx = make_ctx(host, _busy_domain(d))
    stack.gen_labels(ctx)
    sec = ctx.domain.seclabel("selinux")
    assert sec is not None and sec.imagelabel
    with pytest.raises(LabelError, match="dac failed on purpose"):
        stack.set("set_all_labels", ctx)
    assert {f: label_of(f) for f in originals} == originals, "rolled back"
    dac.fail = False
    stack.set("set_all_labels", ctx)
    assert label_of(d / "vm1.raw") == sec.imagelabel
    stack.set("set_socket_label", ctx)
    assert be.sockcreate_context == sec.label
    assert stack.restore("clear_socket_label", ctx) == []
    assert stack.restore("restore_all_labels", ctx) == []
    assert stack.release_labels(ctx) == []
    assert {f: label_of(f) for f in originals} == originals
    assert SELinuxDriver(host, be).registry(ctx).in_use() == 0


def test_many_files_number_their_records_without_rereading_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each relabel record gets the next number from the journal's count, not from a filtered
    copy of every record per file (that made a start quadratic in files)."""
    from vmconfine.launch.journal import Journal

    host, drv, _be = setup(tmp_path)
    d = tmp_path / "img"
    files = [touch(d / f"d{i}.raw") for i in range(60)]
    devices = "\n".join(disk(str(f), f"vd{chr(97 + i // 26)}{chr(97 + i % 26)}")
                        for i, f in enumerate(files))
    ctx = make_ctx(host, domain_xml(devices=devices, seclabel=FIXED), live=True)
    ctx.journal.record("pipeline", "labels", n=1)
    copies: list[tuple[str | None, str | None]] = []
    real = Journal.records

    def counting(self: Journal, driver: str | None = None,
                 op: str | None = None) -> list[dict[str, object]]:
        copies.append((driver, op))
        return real(self, driver, op)

    monkeypatch.setattr(Journal, "records", counting)
    drv.set_all_labels(ctx)
    assert len(copies) <= 1, f"the journal was copied {len(copies)} times for 60 files"
    monkeypatch.undo()
    numbers = [r["n"] for r in ctx.journal.records("selinux", "relabel")]
    assert numbers == list(range(60))
    assert all(label_of(f) == PLAIN for f in files)
    drv.restore_all_labels(ctx)
    assert all(label_of(f) is None for f in files)
    assert {r["n"] for r in ctx.journal.records("selinux", "restored")} == set(range(60))


# ---- group commit: a crash anywhere in a batch ---------------------------------------------


def _crash_in_child(work: object) -> None:
    """Run ``work()`` in a forked child that dies (``os._exit``, no cleanup, no fsync of
    notes) where ``work`` says; the parent waits for it."""
    pid = os.fork()
    if pid == 0:
        try:
            work()  # type: ignore[operator]
        finally:
            os._exit(3)  # reached only when work() did not crash where it meant to
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the child did not crash where meant to"


def _die_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, *,
               calls: int, when: str) -> None:
    """Make ``module.name`` kill the process at its ``calls``-th call, before or after it."""
    real = getattr(module, name)
    seen = [0]

    def wrapper(*args: object, **kwargs: object) -> object:
        seen[0] += 1
        if seen[0] == calls and when == "before":
            os._exit(9)
        out = real(*args, **kwargs)
        if seen[0] == calls and when == "after":
            os._exit(9)
        return out

    monkeypatch.setattr(module, name, wrapper)


def _recover_vm1(tmp_path: Path, be: Any, a: Any, d: Path,
                 originals: dict[Path, str | None]) -> None:
    """What the next command does after vm1's process died: restore from the journal alone
    (twice: idempotent); vm1's files are back, vm2's count on the shared image is 1."""
    from vmconfine_selinux.driver import SELinuxDriver

    host2, _drv, _ = setup(tmp_path, backend=be)
    fresh = SELinuxDriver(host2, be)
    rebuilt = fresh_ctx(host2, a)
    fresh.restore_all_labels(rebuilt)
    fresh.restore_all_labels(rebuilt)
    assert remembered(d / "shared.raw")["ref_selinux"] == "1", "vm2's count was taken or kept"
    mine = {f: v for f, v in originals.items() if "vm1" in f.name}
    assert {f: label_of(f) for f in mine} == mine


@pytest.mark.parametrize(("where", "calls", "when"), [
    ("remember", 1, "before"),   # records durable, nothing changed yet
    ("remember", 2, "after"),    # vm1.raw done; shared.raw counted, its note not durable
    ("remember", 3, "before"),   # shared.raw counted and noted, the rest untouched
])
def test_crash_while_setting_a_batch_is_undone_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, calls: int,
        when: str) -> None:
    """One fsync for a batch's records: after a crash anywhere in the batch, recovery undoes
    what was done and only that; vm2's count on the shared image survives."""
    from vmconfine_selinux import relabel
    from vmconfine_selinux import remember as rem

    drv, be, d, originals, a, b = _two_domains(tmp_path)
    drv.set_all_labels(b)
    shared_b = label_of(d / "shared.raw")
    assert remembered(d / "shared.raw")["ref_selinux"] == "1"
    a.journal.close()
    assert relabel.BATCH >= 9  # the whole domain is one batch

    def work() -> None:
        _die_after(monkeypatch, rem, where, calls=calls, when=when)
        drv.set_all_labels(a)

    _crash_in_child(work)
    monkeypatch.undo()
    _recover_vm1(tmp_path, be, a, d, originals)
    assert label_of(d / "shared.raw") == shared_b
    drv.restore_all_labels(b)
    assert {f: label_of(f) for f in originals} == originals


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_while_restoring_a_batch_counts_down_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The batch's restore records are durable before any count-down: a crash just before or
    just after vm1 counts itself out of the shared image is finished exactly once."""
    from vmconfine_selinux import remember as rem

    drv, be, d, originals, a, b = _two_domains(tmp_path)
    drv.set_all_labels(a)
    drv.set_all_labels(b)
    a.journal.close()
    assert remembered(d / "shared.raw")["ref_selinux"] == "2"
    recalls = [i for i, r in enumerate(reversed(a.journal.records("selinux", "relabel")))
               if r["remember"]]
    shared_at = [r["path"] for r in reversed(a.journal.records("selinux", "relabel"))
                 if r["remember"]].index(str(d / "shared.raw"))

    def work() -> None:
        _die_after(monkeypatch, rem, "recall", calls=shared_at + 1, when=when)
        drv.restore_all_labels(a)

    assert recalls
    _crash_in_child(work)
    monkeypatch.undo()
    _recover_vm1(tmp_path, be, a, d, originals)
    drv.restore_all_labels(b)
    assert {f: label_of(f) for f in originals} == originals
