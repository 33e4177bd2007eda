"""SELinux confinement of the TPM emulator on the fake backend: swtpm runs with the domain's
process label (setexeccon in the child), its state tree gets the image label and gets its
labels back at teardown; swtpm_setup is left alone; before anything changes, a swtpm binary
the policy does not accept as an entry point of the domain refuses the start and names
vmconfine's policy module. Proven on a booted SELinux kernel in tests/lsm."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_selinux_support import (
    domain_xml,
    fake_backend,
    gen,
    label_of,
    make_ctx,
    set_label,
    setup,
    touch,
)
from vmconfine.errors import LabelError
from vmconfine.plugin.helper import Helper
from vmconfine_selinux.transition import SWTPM_MODULE

TPM = "    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
BIN = "system_u:object_r:bin_t:s0"
SWTPM_EXEC = "system_u:object_r:swtpm_exec_t:s0"


def _helpers(state: Path) -> tuple[Helper, Helper]:
    owned = (str(state),)
    return (Helper("swtpm_setup", "/usr/bin/swtpm_setup", "tss", "tss", owned=owned),
            Helper("swtpm", "/usr/bin/swtpm", "tss", "tss", owned=owned))


def test_state_tree_gets_the_image_label_and_it_back(tmp_path: Path) -> None:
    host, drv, _be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    state = tmp_path / "swtpm" / "tpm2"
    before = "system_u:object_r:virt_var_lib_t:s0"
    files = [touch(state / "tpm2-00.permall", before), touch(state / ".lock", before)]
    (state / "escape").symlink_to("/etc/shadow")
    setup_helper, swtpm = _helpers(state)
    drv.set_helper_label(ctx, setup_helper)
    assert label_of(files[0]) == before  # swtpm_setup runs in vmconfine's own domain
    drv.set_helper_label(ctx, swtpm)
    assert {label_of(p) for p in (state, *files)} == {sec.imagelabel}
    drv.restore_helper_label(ctx, swtpm)
    assert [label_of(p) for p in files] == [before, before]


def test_swtpm_execs_into_the_domain_label_and_is_verified(tmp_path: Path) -> None:
    host, drv, be = setup(tmp_path)
    ctx = make_ctx(host, domain_xml())
    sec = gen(drv, ctx)
    setup_helper, swtpm = _helpers(tmp_path / "state")
    for step in ("child_cgroup", "child_identity"):
        drv.child_helper(ctx, swtpm, step)
    drv.child_helper(ctx, setup_helper, "child_exec_label")
    assert be.exec_context is None
    drv.child_helper(ctx, swtpm, "child_exec_label")
    assert be.exec_context == sec.label
    be.pid_contexts[200] = sec.label or ""
    assert drv.verify_helper(ctx, swtpm, 200) == []
    be.pid_contexts[201] = "system_u:system_r:kernel_t:s0"
    problems = drv.verify_helper(ctx, swtpm, 201)
    assert len(problems) == 1 and f"requested '{sec.label}'" in problems[0]
    assert drv.verify_helper(ctx, setup_helper, 201) == []


def _installed_swtpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str) -> Path:
    """swtpm and swtpm_setup in a PATH of their own; swtpm labelled ``label``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("swtpm", "swtpm_setup"):
        (bindir / name).write_bytes(b"#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    set_label(bindir / "swtpm", label)
    monkeypatch.setenv("PATH", str(bindir))
    return bindir / "swtpm"


def test_preflight_refuses_a_swtpm_the_domain_cannot_enter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's refpolicy: /usr/bin/swtpm is bin_t, no entry point of svirt_t. The start is
    refused before anything is labelled, naming vmconfine's module; labelled as that module
    says (swtpm_exec_t), the same domain passes."""
    be = fake_backend(tmp_path, denied={("svirt_t", "bin_t", "file", "entrypoint")})
    host, drv, _ = setup(tmp_path, backend=be)
    ctx = make_ctx(host, domain_xml(devices=TPM))
    sec = gen(drv, ctx)
    binary = _installed_swtpm(tmp_path, monkeypatch, BIN)
    with pytest.raises(LabelError) as err:
        drv.preflight(ctx)
    msg = err.value.message
    assert msg.startswith(f"swtpm cannot start as '{sec.label}': the swtpm binary {binary} "
                          f"is labelled '{BIN}', which the SELinux policy does not accept as "
                          "an entry point into svirt_t"), msg
    assert f"semodule -i {SWTPM_MODULE} && restorecon {binary}" in msg
    assert "(filecon \"/usr/bin/swtpm\" file (system_u object_r swtpm_exec_t" in \
        SWTPM_MODULE.read_text()
    set_label(binary, SWTPM_EXEC)
    drv.preflight(ctx)
    # a domain without a TPM never looks at swtpm
    set_label(binary, BIN)
    plain = make_ctx(host, domain_xml(name="vm2", uuid="c7a5fdbd-cdaf-9455-926a-d65c16db1802"))
    gen(drv, plain)
    drv.preflight(plain)
