"""AppArmor confinement of the TPM emulator: the ``//swtpm`` child profile the aa-helper
writes into a TPM domain's profile, and the driver's helper hooks (aa_change_onexec in the
child, /proc/PID/attr/apparmor/current after exec). Compiled by apparmor_parser in
tests/host/test_aa_parser.py; proven on a booted AppArmor kernel in tests/lsm."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_aa_driver import NAME, Setup
from vmconfine.errors import LabelError
from vmconfine.plugin.helper import Helper
from vmconfine_aa_helper.domxml import Fallback, read
from vmconfine_apparmor import kernel

TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
SWTPM = Helper("swtpm", "/usr/bin/swtpm", "tss", "tss")
SETUP = Helper("swtpm_setup", "/usr/bin/swtpm_setup", "tss", "tss")


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def _child(files: str) -> list[str]:
    """The lines of the ``profile swtpm { ... }`` block."""
    lines = files.splitlines()
    start = lines.index("  profile swtpm {")
    return lines[start:lines.index("  }", start) + 1]


def test_tpm_domain_gets_a_child_profile_with_only_its_own_paths(s: Setup) -> None:
    ctx = s.ctx(devices=TPM)
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    files = s.files()
    block = _child(files)
    state = ctx.instance.lib_dir / "swtpm" / ctx.domain.uuid / "tpm2"
    log = ctx.instance.log_dir / "aa-swtpm.log"
    assert f'    "{state}/**" rwk,' in block and f'    "{state}/" r,' in block
    assert f'    "{log}" w,' in block
    assert "    unix (send, receive) type=stream addr=none peer=(addr=none)," in block
    # nothing of QEMU's: not its disk, not its home; QEMU's rules do not name the TPM state
    assert not any("a.img" in ln or "domain-aa" in ln for ln in block)
    outside = [ln for ln in files.splitlines() if ln not in block]
    assert not any(str(state) in ln or "swtpm.log" in ln for ln in outside)


def test_tpm_1_2_state_and_no_child_without_emulator(s: Setup) -> None:
    ctx = s.ctx(devices=TPM.replace("tpm-crb", "tpm-tis").replace("2.0", "1.2"))
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    assert any(ln.endswith('/tpm1.2/**" rwk,') for ln in _child(s.files()))
    (s.tmp / "other").mkdir()
    other = Setup(s.tmp / "other")
    plain = other.ctx()
    other.driver.gen_label(plain, plain.domain.seclabel("apparmor"))
    assert "profile swtpm" not in other.files()


def test_fast_reader_leaves_tpm_emulator_domains_to_the_model(s: Setup) -> None:
    ctx = s.ctx(devices=TPM)
    with pytest.raises(Fallback, match="TPM emulator"):
        read(ctx.domain.to_xml().encode())


def test_child_helper_changes_onexec_to_the_child_profile_for_swtpm_only(
        s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kernel, "change_onexec", calls.append)
    ctx = s.ctx(devices=TPM)
    s.driver.plan_label(ctx, ctx.domain.seclabel("apparmor"))
    for step in ("child_cgroup", "child_exec_label", "child_identity", "child_confine"):
        s.driver.child_helper(ctx, SWTPM, step)
        s.driver.child_helper(ctx, SETUP, step)
    assert calls == [f"{NAME}//swtpm"]


def test_child_helper_failure_is_one_line(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(kernel, "change_onexec", refuse)
    ctx = s.ctx(devices=TPM)
    s.driver.plan_label(ctx, ctx.domain.seclabel("apparmor"))
    with pytest.raises(LabelError, match=f"cannot make swtpm enter AppArmor profile "
                                         f"'{NAME}//swtpm' at exec"):
        s.driver.child_helper(ctx, SWTPM, "child_exec_label")


@pytest.mark.parametrize(("label", "problem"), [
    (f"{NAME}//swtpm (enforce)", None),
    (f"{NAME}//swtpm (complain)", "in mode 'complain', expected 'enforce'"),
    (f"{NAME} (enforce)", f"expected '{NAME}//swtpm'"),
    ("unconfined", f"runs under AppArmor profile 'unconfined', expected '{NAME}//swtpm'"),
])
def test_verify_helper_reads_the_kernel_label(s: Setup, monkeypatch: pytest.MonkeyPatch,
                                              label: str, problem: str | None) -> None:
    monkeypatch.setattr(kernel, "process_label", lambda pid: label)
    ctx = s.ctx(devices=TPM)
    s.driver.plan_label(ctx, ctx.domain.seclabel("apparmor"))
    found = s.driver.verify_helper(ctx, SWTPM, 4242)
    assert (found == []) if problem is None else (len(found) == 1 and problem in found[0])
    assert s.driver.verify_helper(ctx, SETUP, 4242) == []


def test_unconfined_domain_leaves_swtpm_alone(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "change_onexec", lambda name: pytest.fail(name))
    ctx = s.ctx(devices=TPM, seclabel="<seclabel type='none' model='apparmor'/>")
    s.driver.child_helper(ctx, SWTPM, "child_exec_label")
    assert s.driver.verify_helper(ctx, SWTPM, 1) == []


def test_describe_shows_qemu_rules_without_the_swtpm_child(s: Setup) -> None:
    """dominfo/confinement list QEMU's rules: the child profile's are swtpm's, not QEMU's."""
    ctx = s.ctx(devices=TPM)
    s.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    shown = s.driver.describe(ctx)["rules"]
    assert any("a.img" in ln for ln in shown)
    assert not any("swtpm" in ln or "unix" in ln or "abstractions" in ln for ln in shown)
    assert "  profile swtpm {" in s.files()  # while the profile file has them
