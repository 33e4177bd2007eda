"""The SELinux driver asks the policy whether QEMU can enter its label, before the fork.

The fake backend refuses the (source type, target type, class, permission) tuples a test lists;
the same questions against Debian's real refpolicy are asked in the lsm tier
(tests/lsm/guest_e2e.py), where the answers decide whether QEMU really starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.unit.test_selinux_support import (
    domain_xml,
    fake_backend,
    gen,
    make_ctx,
    set_label,
    setup,
)
from vmconfine.errors import LabelError
from vmconfine_selinux.transition import check_exec

OWN = "system_u:system_r:kernel_t:s0"
SVIRT = "system_u:system_r:svirt_t:s0:c1,c2"
QEMU_EXEC = "system_u:object_r:qemu_exec_t:s0"
BIN = "system_u:object_r:bin_t:s0"


@pytest.fixture
def emulator(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    path.write_bytes(b"\x7fELF")
    path.chmod(0o755)
    return path


def test_everything_allowed_means_no_problem(tmp_path: Path, emulator: Path) -> None:
    be = fake_backend(tmp_path)
    set_label(emulator, QEMU_EXEC)
    assert check_exec(be, OWN, SVIRT, str(emulator), "qemu") == []


def test_wrong_emulator_label_names_current_and_needed_context(tmp_path: Path,
                                                               emulator: Path) -> None:
    be = fake_backend(tmp_path, denied={("svirt_t", "bin_t", "file", "entrypoint")},
                      defaults={"/usr/bin/qemu-system-x86_64": QEMU_EXEC})
    set_label(emulator, BIN)
    link = tmp_path / "qemu-link"
    link.symlink_to(emulator)  # exec follows symlinks: the target's label counts
    [problem] = check_exec(be, OWN, SVIRT, str(link), "kvm")
    assert problem.what == "entrypoint"
    assert f"the emulator {link} is labelled '{BIN}'" in problem.message
    assert "entry point into svirt_t" in problem.message
    assert f"label it '{QEMU_EXEC}' (restorecon {link}" in problem.message


def test_no_usable_file_context_falls_back_to_the_type_name(tmp_path: Path,
                                                            emulator: Path) -> None:
    be = fake_backend(tmp_path, denied={("svirt_t", "bin_t", "file", "entrypoint")},
                      defaults={"/": BIN})
    set_label(emulator, BIN)
    [problem] = check_exec(be, OWN, SVIRT, str(emulator), "kvm")
    assert f"chcon -t qemu_exec_t {emulator}" in problem.message


def test_no_new_privs_transition_names_the_rule(tmp_path: Path, emulator: Path) -> None:
    be = fake_backend(tmp_path, denied={("kernel_t", "svirt_t", "process2", "nnp_transition"),
                                        ("kernel_t", "svirt_t", "process", "transition")})
    whats = {p.what: p.message for p in check_exec(be, OWN, SVIRT, str(emulator), "kvm")}
    assert set(whats) == {"transition", "nnp_transition"}
    assert "(allow kernel_t svirt_t (process2 (nnp_transition)))" in whats["nnp_transition"]
    assert "(allow kernel_t svirt_t (process (transition)))" in whats["transition"]


@pytest.mark.parametrize(("booleans", "fix"), [
    ({"virt_use_execmem": False}, "setsebool -P virt_use_execmem on"),
    ({}, "give TCG domains a type with execmem"),
])
def test_tcg_needs_execmem(tmp_path: Path, emulator: Path, booleans: dict[str, bool],
                           fix: str) -> None:
    be = fake_backend(tmp_path, denied={("svirt_t", "svirt_t", "process", "execmem")},
                      booleans=booleans)
    [problem] = check_exec(be, OWN, SVIRT, str(emulator), "qemu")
    assert problem.what == "execmem" and fix in problem.message
    assert check_exec(be, OWN, SVIRT, str(emulator), "kvm") == []  # KVM runs no JIT


def _preflight_ctx(tmp_path: Path, enforce: bool):  # type: ignore[no-untyped-def]
    be = fake_backend(tmp_path, tcg=False, enforce=enforce,
                      denied={("svirt_t", "svirt_t", "process", "execmem")},
                      booleans={"virt_use_execmem": False})
    host, drv, _ = setup(tmp_path, backend=be)
    ctx = make_ctx(host, domain_xml(virt_type="qemu"))
    gen(drv, ctx)
    return drv, ctx


def test_preflight_refuses_when_enforcing(tmp_path: Path) -> None:
    drv, ctx = _preflight_ctx(tmp_path, enforce=True)
    label = ctx.domain.seclabel("selinux").label
    with pytest.raises(LabelError, match=rf"QEMU cannot start as '{label}': QEMU TCG .*"
                                         r"setsebool -P virt_use_execmem on"):
        drv.preflight(ctx)


def test_preflight_only_warns_when_permissive(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    drv, ctx = _preflight_ctx(tmp_path, enforce=False)
    with caplog.at_level(logging.WARNING):
        drv.preflight(ctx)
    assert "would be refused" in caplog.text and "virt_use_execmem" in caplog.text
