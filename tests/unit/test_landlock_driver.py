"""The landlock driver's hooks (vmconfine_landlock.driver) with a faked kernel ABI."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import vmconfine_landlock
from tests.support import make_ctx, make_host
from vmconfine.errors import DriverError, LabelError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.plugin.nop import NopDriver
from vmconfine.plugin.stack import Stack
from vmconfine.qemu.emulator import EmulatorFiles
from vmconfine_landlock import driver as drv_mod
from vmconfine_landlock import syscalls
from vmconfine_landlock.driver import LABEL_RE, LandlockDriver

EMU = EmulatorFiles(executable="/opt/emu/qemu", interpreter="/opt/emu/ld.so",
                    libraries=("/opt/emu/libc.so.6",), data_dirs=("/opt/emu/share",))


def xml(tmp: Path, seclabel: str = "") -> str:
    return f"""<domain type='qemu'><name>ll</name>
<uuid>5a2c1cf0-1111-4e0e-9d7a-3a5d2b6c7e01</uuid><memory>65536</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/opt/emu/qemu</emulator>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='{tmp}/disk.img'/><target dev='hda' bus='ide'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
<source file='{tmp}/cd.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
<serial type='file'><source path='{tmp}/serial.log'/></serial>
<graphics type='vnc' port='5911' autoport='no' listen='127.0.0.1'/>
</devices>{seclabel}</domain>"""


@pytest.fixture
def abi(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The kernel ABI the driver sees (0 = no Landlock, ENOSYS)."""
    value = {"abi": 7}

    def fake() -> int:
        if value["abi"] == 0:
            raise OSError(errno.ENOSYS, "Function not implemented")
        return value["abi"]

    monkeypatch.setattr(syscalls, "abi_version", fake)
    monkeypatch.setattr(drv_mod, "emulator_files", lambda path, probe: EMU)
    return value


class StubDac:
    """Stands in for the DAC driver the stack appends when the tests run as root."""

    @hookimpl
    def vmconfine_register_drivers(self, registry) -> None:  # type: ignore[no-untyped-def]
        registry.add("dac", lambda host: NopDriver(), "stub DAC for unit tests", implicit=True)


def setup(tmp: Path, conf: str = "", seclabel: str = ""):  # type: ignore[no-untyped-def]
    host = make_host(tmp / "root", [vmconfine_landlock, StubDac()],
                     config=f'security_driver = "landlock"\n{conf}')
    ctx = make_ctx(host, xml(tmp, seclabel))
    return host, ctx, LandlockDriver(host)


def confined(ctx):  # type: ignore[no-untyped-def]
    return ctx.domain.seclabel("landlock") or ctx.domain.add_seclabel("landlock", "dynamic",
                                                                        implicit=True)


# ---- registration and probe -----------------------------------------------------------------


def test_registered_through_the_hook(tmp_path: Path, abi: dict[str, int]) -> None:
    host, _, _ = setup(tmp_path)
    info = host.registry.get("landlock")
    assert info is not None and info.kind == "security"
    assert "Landlock" in info.description
    stack = Stack.build(host)
    assert stack.names()[0] == "landlock"
    assert stack.primary.model == "landlock" and stack.primary.doi == "0"


def test_probe_reasons(tmp_path: Path, abi: dict[str, int]) -> None:
    host, _, d = setup(tmp_path)
    assert d.probe(host) == (True, "")
    abi["abi"] = 3
    ok, why = d.probe(host)
    assert ok and why.startswith("ABI 3, best effort")
    assert "TCP bind/connect" in why and "ioctl_dev" in why and "truncate" not in why
    abi["abi"] = 0
    ok, why = d.probe(host)
    assert not ok and "CONFIG_SECURITY_LANDLOCK" in why and "best-effort" in why
    with pytest.raises(DriverError, match="Security driver landlock not enabled"):
        Stack.build(host)


def test_probe_enforce_needs_every_feature(tmp_path: Path, abi: dict[str, int]) -> None:
    abi["abi"] = 3
    host, _, d = setup(tmp_path, 'landlock_mode = "enforce"\n')
    ok, why = d.probe(host)
    assert not ok and "ABI 3" in why and "TCP bind/connect" in why


def test_probe_enforce_without_landlock(tmp_path: Path, abi: dict[str, int]) -> None:
    abi["abi"] = 0
    host, _, d = setup(tmp_path, 'landlock_mode = "enforce"\n')
    ok, why = d.probe(host)
    assert not ok and "CONFIG_SECURITY_LANDLOCK" in why and "enforce" in why
    with pytest.raises(DriverError, match="Security driver landlock not enabled"):
        Stack.build(host)


# ---- labels ---------------------------------------------------------------------------------


def test_gen_label_is_ruleset_digest(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    sec = confined(ctx)
    d.gen_label(ctx, sec)
    assert LABEL_RE.match(sec.label)
    rs, _ = d.ruleset(ctx)
    assert rs is not None and sec.label == rs.label
    abi["abi"] = 5
    d.gen_label(ctx, sec)
    assert sec.label.startswith("landlock:abi5:") and sec.label != rs.label


def test_stack_gen_labels_implicit(tmp_path: Path, abi: dict[str, int]) -> None:
    host, ctx, _ = setup(tmp_path)
    Stack.build(host).gen_labels(ctx)
    sec = ctx.domain.seclabel("landlock")
    assert sec is not None and sec.implicit and LABEL_RE.match(sec.label)


def test_verify_static_label(tmp_path: Path, abi: dict[str, int]) -> None:
    bad = "<seclabel type='static' model='landlock'><label>anything</label></seclabel>"
    _, ctx, d = setup(tmp_path, seclabel=bad)
    with pytest.raises(LabelError, match="not a ruleset digest"):
        d.verify(ctx.domain, ctx.domain.seclabel("landlock"))


def test_static_label_pins_the_ruleset(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    rs, _ = d.ruleset(ctx)
    assert rs is not None
    pinned = f"<seclabel type='static' model='landlock'><label>{rs.label}</label></seclabel>"
    _, ctx2, d2 = setup(tmp_path, seclabel=pinned)
    d2.verify(ctx2.domain, ctx2.domain.seclabel("landlock"))
    d2.set_all_labels(ctx2)  # matches: fine
    d2.restore_all_labels(ctx2)
    other = pinned.replace(rs.label, "landlock:abi7:000000000000")
    _, ctx3, d3 = setup(tmp_path, seclabel=other)
    with pytest.raises(LabelError, match="pins ruleset landlock:abi7:000000000000"):
        d3.set_all_labels(ctx3)


# ---- set / restore / child / verify ---------------------------------------------------------


def test_set_all_labels_state_and_journal(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    sec = confined(ctx)
    d.gen_label(ctx, sec)
    d.set_all_labels(ctx)
    state = ctx.state["landlock"]
    rs = state["ruleset"]
    assert rs.label == sec.label
    rec = ctx.journal.last("landlock", "ruleset")
    assert rec is not None and rec["label"] == rs.label and rec["changes_host"] is False
    r, w = state["status_fds"]
    assert not os.get_inheritable(r) and not os.get_inheritable(w)
    d.restore_all_labels(ctx)
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    d.restore_all_labels(ctx)  # idempotent


def test_unconfined_domain_is_left_alone(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path, seclabel="<seclabel type='none' model='landlock'/>")
    d.set_all_labels(ctx)
    assert "disabled" in ctx.state["landlock"]
    d.child_confine(ctx)  # nothing to apply
    assert d.verify_process(ctx, os.getpid()) == []
    assert d.describe(ctx)["confined"] is False


def test_best_effort_without_landlock(tmp_path: Path, abi: dict[str, int]) -> None:
    abi["abi"] = 0
    _, ctx, d = setup(tmp_path)
    sec = confined(ctx)
    d.gen_label(ctx, sec)
    assert sec.label == "landlock:unavailable"
    d.set_all_labels(ctx)
    d.child_confine(ctx)  # writes "not applied" to the status pipe, applies nothing
    assert d.verify_process(ctx, os.getpid()) == []
    assert ctx.state["landlock"]["report"]["applied"] is False
    info = d.describe(ctx)
    assert info["confined"] is False and "CONFIG_SECURITY_LANDLOCK" in info["reason"]


def test_child_confine_needs_parent_state(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    with pytest.raises(DriverError, match="no ruleset was computed"):
        d.child_confine(ctx)


def test_verify_process_fails_closed(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    confined(ctx)
    d.set_all_labels(ctx)
    # no child ever reported, and this pid is not the emulator
    problems = d.verify_process(ctx, os.getpid())
    assert any("did not report" in p for p in problems)
    assert any("does not allow" in p for p in problems)
    # a report with the wrong ruleset is a difference too
    _, ctx2, d2 = setup(tmp_path)
    confined(ctx2)
    d2.set_all_labels(ctx2)
    os.write(ctx2.state["landlock"]["status_fds"][1],
             b'{"applied": true, "label": "landlock:abi7:000000000000", "selftest": "denied"}')
    problems = d2.verify_process(ctx2, os.getpid())
    assert any("expected landlock:abi7:" in p for p in problems)


def test_describe_lists_every_rule(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    confined(ctx)
    d.set_all_labels(ctx)
    info = d.describe(ctx)
    rs = ctx.state["landlock"]["ruleset"]
    assert info["confined"] and info["label"] == rs.label and info["abi"] == 7
    assert info["mode"] == "best-effort"
    assert len(info["rules"]) == len(rs.path_rules)
    by_path = {r["path"]: r for r in info["rules"]}
    assert "write_file" in by_path[str(tmp_path / "disk.img")]["access"]
    assert by_path[str(tmp_path / "cd.iso")]["access"] == ["read_file"]
    assert by_path["/opt/emu/qemu"]["access"] == ["execute", "read_file"]
    assert info["network"] == {"handled": ["bind_tcp", "connect_tcp"],
                               "ports": [{"port": 5911, "access": ["bind_tcp"],
                                          "roles": ["vnc"]}]}
    assert info["scoped"] == ["abstract_unix_socket", "signal"]
    assert info["summary"] == (f"{rs.label} (best-effort), {len(rs.path_rules)} path rules; "
                               "TCP bind only on 5911, connect denied; "
                               "scoped: abstract_unix_socket, signal")
    d.restore_all_labels(ctx)


def test_process_label(tmp_path: Path, abi: dict[str, int]) -> None:
    _, ctx, d = setup(tmp_path)
    sec = confined(ctx)
    d.gen_label(ctx, sec)
    assert d.process_label(ctx, os.getpid()) == sec.label


class StubMac:
    """A second MAC driver (model "selinux") to stack landlock behind, as in
    security_driver = [ "selinux", "landlock" ]."""

    class Driver(NopDriver):
        @hookimpl
        def model(self) -> str:
            return "selinux"

        @hookimpl
        def gen_label(self, ctx, seclabel) -> None:  # type: ignore[no-untyped-def]
            seclabel.label = "system_u:system_r:svirt_t:s0:c1,c2"

    @hookimpl
    def vmconfine_register_drivers(self, registry) -> None:  # type: ignore[no-untyped-def]
        registry.add("selinux", lambda host: StubMac.Driver(), "stub MAC for unit tests")


def test_stacked_behind_another_mac_driver(tmp_path: Path, abi: dict[str, int]) -> None:
    host = make_host(tmp_path / "root", [vmconfine_landlock, StubDac(), StubMac()],
                     config='security_driver = [ "selinux", "landlock" ]\n')
    ctx = make_ctx(host, xml(tmp_path))
    stack = Stack.build(host)
    assert stack.names()[:2] == ["selinux", "landlock"]
    stack.gen_labels(ctx)
    assert ctx.domain.seclabel("selinux").label.startswith("system_u:")
    assert LABEL_RE.match(ctx.domain.seclabel("landlock").label)
    stack.set("set_all_labels", ctx)
    assert ctx.state["landlock"]["ruleset"].label == ctx.domain.seclabel("landlock").label
    assert stack.restore("restore_all_labels", ctx) == []


@pytest.mark.parametrize(("mode", "wanted", "status"), [
    ("enforce", True, "FAIL"), ("best-effort", True, "WARN"), ("enforce", False, "WARN")])
def test_host_check_without_landlock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                     wanted: bool, status: str) -> None:
    """host-validate's Landlock line: FAIL only when qemu.conf asks for Landlock, enforced."""
    host = make_host(tmp_path / "root", [vmconfine_landlock],
                     config=f'landlock_mode = "{mode}"\n')
    monkeypatch.setattr(syscalls, "probe_abi", lambda: (0, "Landlock is disabled at boot"))
    lines = LandlockDriver(host).host_checks(host, wanted, [])
    assert lines == [{"status": status, "name": "Landlock",
                      "detail": "not available (Landlock is disabled at boot)",
                      "fix": "boot a kernel with Landlock in CONFIG_LSM (lsm=...,landlock)"}]
