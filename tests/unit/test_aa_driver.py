"""The apparmor driver's hooks, with the real vmconfine-aa-helper in --compile-only mode.

This host's kernel has no AppArmor, so the driver's helper runs get ``--compile-only``
(``helper_extra``): profiles are written and checked by the real helper but not loaded. The
kernel side (probe, process labels, aa_change_profile) is faked by pointing
:mod:`vmconfine_apparmor.kernel` at scratch files or by replacing its functions. Loading for
real is the lsm tier's job (tests/lsm/test_apparmor_lsm.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vmconfine_apparmor
from tests.support import make_ctx, make_host
from vmconfine.errors import DriverError, LabelError
from vmconfine.plugin.stack import Stack
from vmconfine_apparmor import kernel
from vmconfine_apparmor.driver import AppArmorDriver

UUID = "3d1f7c5e-9b7a-4c6e-8f0a-1b2c3d4e5f60"
NAME = f"vmconfine-{UUID}"
XML = """<domain type='qemu'>
  <name>aa</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{dir}/a.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>{devices}
  </devices>{seclabel}
</domain>
"""


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.profiles = tmp / "profiles"
        (tmp / "a.img").touch()
        (tmp / "b.img").touch()
        self.host = make_host(tmp / "root", [vmconfine_apparmor],
                              config=f'apparmor_profile_dir = "{self.profiles}"\n')
        self.driver = AppArmorDriver(self.host)
        self.driver.helper_extra = ["--compile-only"]

    def ctx(self, *, seclabel: str = "", devices: str = "", uuid: str = UUID):  # type: ignore[no-untyped-def]
        xml = XML.format(uuid=uuid, dir=self.tmp, seclabel=seclabel, devices=devices)
        ctx = make_ctx(self.host, xml)
        if ctx.domain.seclabel("apparmor") is None:
            ctx.domain.add_seclabel("apparmor", "dynamic", implicit=True)
        return ctx

    def files(self, name: str = NAME) -> str:
        return (self.profiles / f"{name}.files").read_text()


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_registered_through_the_plugin_hook(s: Setup) -> None:
    info = s.host.registry.get("apparmor")
    assert info is not None and info.kind == "security"
    assert "vmconfine-aa-helper" in info.description
    drv = info.factory(s.host)
    assert isinstance(drv, AppArmorDriver)
    assert drv.model() == "apparmor" and drv.doi() == "0"


def test_probe_on_a_kernel_without_apparmor(s: Setup, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "ENABLED_PARAM", tmp_path / "missing")
    ok, why = s.driver.probe(s.host)
    assert not ok and why.startswith("AppArmor is not enabled in this kernel")


def test_probe_paths(s: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enabled = tmp_path / "enabled"
    enabled.write_text("Y\n")
    monkeypatch.setattr(kernel, "ENABLED_PARAM", enabled)
    monkeypatch.setattr(kernel, "PROFILES", tmp_path / "nosecfs" / "profiles")
    ok, why = s.driver.probe(s.host)
    assert not ok and "mount -t securityfs" in why
    profiles = tmp_path / "profiles-list"
    profiles.write_text("other (enforce)\n")
    monkeypatch.setattr(kernel, "PROFILES", profiles)
    assert s.driver.probe(s.host) == (True, "")


def test_stack_refuses_apparmor_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "ENABLED_PARAM", tmp_path / "missing")
    host = make_host(tmp_path / "r", [vmconfine_apparmor],
                     config='security_driver = "apparmor"\n')
    with pytest.raises(DriverError, match="Security driver apparmor not enabled: AppArmor is "
                                          "not enabled in this kernel"):
        Stack.build(host)


def test_gen_label_creates_profile_and_teardown_deletes_it(s: Setup) -> None:
    ctx = s.ctx()
    sec = ctx.domain.seclabel("apparmor")
    s.driver.gen_label(ctx, sec)
    assert sec.label == NAME and sec.imagelabel == NAME
    assert ctx.journal.records("apparmor", "profile")[0]["name"] == NAME
    assert f'"{s.tmp}/a.img" rwk,' in s.files()
    assert (s.profiles / NAME).is_file()
    live = ctx.domain.to_xml(live=True)
    assert f"<label>{NAME}</label>" in live
    s.driver.restore_all_labels(ctx)
    assert list(s.profiles.iterdir()) == []
    assert ctx.journal.last("apparmor", "profile_deleted") == {
        "driver": "apparmor", "op": "profile_deleted", "name": NAME}
    s.driver.restore_all_labels(ctx)  # idempotent


def test_crash_recovery_from_the_journal_alone(s: Setup) -> None:
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    ctx.journal.close()
    # a fresh process: new driver, domain without labels, the journal file on disk
    fresh = s.ctx()
    fresh_driver = AppArmorDriver(s.host)
    fresh_driver.helper_extra = ["--compile-only"]
    fresh_driver.restore_all_labels(fresh)
    assert list(s.profiles.iterdir()) == []


def test_refused_domain_fails_gen_label(s: Setup) -> None:
    dev = ("\n    <serial type='file'><source path='/etc/cron.d/evil'/>"
           "<target port='0'/></serial>")
    ctx = s.ctx(devices=dev)
    with pytest.raises(LabelError) as err:
        s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    msg = str(err.value)
    assert msg.startswith(f"cannot load AppArmor profile '{NAME}': path /etc/cron.d/evil")
    assert "\n" not in msg
    assert not s.profiles.exists() or list(s.profiles.iterdir()) == []
    s.driver.restore_all_labels(ctx)


def test_static_and_none_labels_write_nothing(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    for seclabel in ("<seclabel type='static' model='apparmor' relabel='no'>"
                     "<label>site-qemu</label></seclabel>",
                     "<seclabel type='none' model='apparmor'/>"):
        ctx = s.ctx(seclabel=seclabel)
        sec = ctx.domain.seclabel("apparmor")
        s.driver.gen_label(ctx, sec)
        s.driver.set_all_labels(ctx)
        s.driver.restore_all_labels(ctx)
        assert not s.profiles.exists()
    changed: list[str] = []
    monkeypatch.setattr(kernel, "change_profile", changed.append)
    static = s.ctx(seclabel="<seclabel type='static' model='apparmor' relabel='no'>"
                            "<label>site-qemu</label></seclabel>")
    s.driver.child_exec_label(static)
    s.driver.child_exec_label(s.ctx(seclabel="<seclabel type='none' model='apparmor'/>"))
    assert changed == ["site-qemu"]


def test_static_label_must_be_loaded(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = s.ctx(seclabel="<seclabel type='static' model='apparmor' relabel='no'>"
                         "<label>site-qemu</label></seclabel>")
    monkeypatch.setattr(kernel, "loaded_profiles", lambda: {"other": "enforce"})
    with pytest.raises(LabelError, match="Invalid security label 'site-qemu'"):
        s.driver.verify(ctx.domain, ctx.domain.seclabel("apparmor"))
    monkeypatch.setattr(kernel, "loaded_profiles", lambda: {"site-qemu": "enforce"})
    s.driver.verify(ctx.domain, ctx.domain.seclabel("apparmor"))


def test_baselabel_and_predefined_label_are_refused(s: Setup) -> None:
    ctx = s.ctx(seclabel="<seclabel type='dynamic' model='apparmor'>"
                         "<baselabel>x</baselabel></seclabel>")
    sec = ctx.domain.seclabel("apparmor")
    with pytest.raises(LabelError, match="Cannot set a base label with AppArmor"):
        s.driver.verify(ctx.domain, sec)
    with pytest.raises(LabelError, match="Cannot set a base label"):
        s.driver.gen_label(ctx, sec)
    ctx2 = s.ctx()
    sec2 = ctx2.domain.seclabel("apparmor")
    sec2.label = "preset"
    with pytest.raises(LabelError, match="security label already defined"):
        s.driver.gen_label(ctx2, sec2)


def test_set_all_labels_reloads_only_when_rules_changed(s: Setup,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    calls: list[str] = []
    real = s.driver._helper

    def spy(ctx: Any, cmd: str, name: str, **kw: Any) -> None:
        calls.append(cmd)
        real(ctx, cmd, name, **kw)

    monkeypatch.setattr(s.driver, "_helper", spy)
    s.driver.set_all_labels(ctx)
    assert calls == []
    good = s.files()
    (s.profiles / f"{NAME}.files").write_text("# stale\n")
    s.driver.set_all_labels(ctx)
    assert calls == ["-r"] and s.files() == good


def test_hotplug_regenerates_the_rules(s: Setup) -> None:
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    other = s.ctx(uuid="00000000-0000-0000-0000-000000000001", devices=(
        "\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{s.tmp}/b.img'/><target dev='vdb' bus='virtio'/><readonly/></disk>"))
    new_disk = other.domain.disks[1]
    s.driver.set_image_label(ctx, new_disk)
    assert f'deny "{s.tmp}/b.img" w,' in s.files() and f'"{s.tmp}/b.img" rk,' in s.files()
    s.driver.restore_image_label(ctx, new_disk)
    assert "b.img" not in s.files()
    # unplugging a disk that is still in the XML leaves it out as well
    s.driver.restore_image_label(ctx, ctx.domain.disks[0])
    assert "a.img" not in s.files()
    chardev = s.ctx(devices=f"\n    <serial type='file'><source path='{s.tmp}/s.log'/>"
                            "<target port='0'/></serial>").domain.chardevs[0]
    s.driver.set_chardev_label(ctx, chardev)
    assert f'"{s.tmp}/s.log" rw,' in s.files()


def test_verify_process_fails_closed(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = s.ctx()
    ctx.domain.seclabel("apparmor").label = NAME
    labels = {1: f"{NAME} (enforce)\n", 2: "unconfined\n", 3: f"{NAME} (complain)\n"}

    def fake(pid: int) -> str:
        if pid not in labels:
            raise PermissionError(13, "Permission denied")
        return labels[pid].strip()

    monkeypatch.setattr(kernel, "process_label", fake)
    assert s.driver.verify_process(ctx, 1) == []
    assert s.driver.verify_process(ctx, 2) == [
        f"pid 2 runs under AppArmor profile 'unconfined', expected '{NAME}'"]
    assert "mode 'complain'" in s.driver.verify_process(ctx, 3)[0]
    assert "cannot read the AppArmor label of pid 4" in s.driver.verify_process(ctx, 4)[0]
    assert s.driver.process_label(ctx, 1) == f"{NAME} (enforce)"
    assert s.driver.process_label(ctx, 4) is None


def test_child_exec_label_reports_failure(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = s.ctx()
    ctx.domain.seclabel("apparmor").label = NAME

    def fail(name: str) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(kernel, "change_profile", fail)
    with pytest.raises(LabelError, match=f"cannot change to AppArmor profile '{NAME}'"):
        s.driver.child_exec_label(ctx)


def test_describe(s: Setup) -> None:
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    desc = s.driver.describe(ctx)
    assert desc["label"] == NAME and desc["profile"] == str(s.profiles / NAME)
    assert f'"{s.tmp}/a.img" rwk,' in desc["rules"]


def test_split_label() -> None:
    assert kernel.split_label("vmconfine-x (enforce)\n") == ("vmconfine-x", "enforce")
    assert kernel.split_label("unconfined") == ("unconfined", "")
    assert kernel.split_label("a (b) (complain)") == ("a (b)", "complain")


def stop(s: Setup, ctx: Any) -> None:
    """Teardown as the pipeline does it: restore, then the journal is gone."""
    s.driver.restore_all_labels(ctx)
    ctx.journal.close()
    s.host.instance.journal_path(ctx.domain.name).unlink()


def test_restart_loads_the_cached_policy(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop (teardown deletes profile and rules) and start again with unchanged content: the
    driver finds the policy in the cache in-process and runs the helper with --cached (no
    XML, no compile); the files come back identical."""
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    profile, files = (s.profiles / NAME).read_text(), s.files()
    stop(s, ctx)
    assert list(s.profiles.iterdir()) == []
    cache = s.driver.cache_dir(ctx)
    assert [p.name.split(".")[0] for p in cache.iterdir()] == [NAME]  # the cache stays
    calls: list[tuple[str, dict[str, Any]]] = []
    real = s.driver._helper

    def spy(ctx: Any, cmd: str, name: str, **kw: Any) -> None:
        calls.append((cmd, kw))
        real(ctx, cmd, name, **kw)

    monkeypatch.setattr(s.driver, "_helper", spy)
    again = s.ctx()
    s.driver.gen_label(again, again.domain.seclabel("apparmor"))
    s.driver.set_all_labels(again)
    assert len(calls) == 1 and calls[0][0] == "-c"
    assert calls[0][1]["extra"][0] == "--cached" and "xml" not in calls[0][1]
    assert (s.profiles / NAME).read_text() == profile and s.files() == files
    stop(s, again)
    assert list(s.profiles.iterdir()) == []
    # changed content (another disk): a miss, generated from the XML
    calls.clear()
    other = s.ctx(devices=f"\n    <disk type='file' device='disk'><driver name='qemu' "
                          f"type='raw'/><source file='{s.tmp}/b.img'/><target dev='vdb' "
                          "bus='virtio'/></disk>")
    s.driver.gen_label(other, other.domain.seclabel("apparmor"))
    assert [c[0] for c in calls] == ["-c"] and "xml" in calls[0][1]
    assert f'"{s.tmp}/b.img" rwk,' in s.files()
    stop(s, other)


def test_cached_start_falls_back_to_the_xml(s: Setup) -> None:
    """A cache entry the helper refuses (here: damaged) costs a retry from the XML, never
    a failed start."""
    ctx = s.ctx()
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    stop(s, ctx)
    (entry,) = s.driver.cache_dir(ctx).iterdir()
    (entry / "policy.bin").write_bytes(b"torn")
    again = s.ctx()
    s.driver.gen_label(again, again.domain.seclabel("apparmor"))
    assert f'"{s.tmp}/a.img" rwk,' in s.files()
    (entry,) = s.driver.cache_dir(ctx).iterdir()
    assert (entry / "policy.bin").read_bytes() != b"torn"
    stop(s, again)


def test_helper_runs_isolated() -> None:
    from vmconfine_apparmor.driver import helper_command

    cmd = helper_command()
    assert cmd[1:4] == ["-I", "-S", "-c"] and "vmconfine_aa_helper.main" in cmd[4]


def test_plan_label_names_the_profile_and_writes_nothing(tmp_path: Path) -> None:
    """The report's dry run: the profile name gen_label would load, no helper run, no file."""
    s = Setup(tmp_path)
    ctx = s.ctx()
    sec = ctx.domain.seclabel("apparmor")
    assert sec is not None
    s.driver.plan_label(ctx, sec)
    assert sec.label == sec.imagelabel == NAME
    assert not s.profiles.exists() or not any(s.profiles.iterdir())
    assert ctx.journal.records("apparmor") == []
    with pytest.raises(LabelError, match="security label already defined"):
        s.driver.plan_label(ctx, sec)  # the same validation as gen_label
