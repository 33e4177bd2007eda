"""SELinux confinement of the TPM emulator on the fake backend: swtpm runs with the domain's
process label (setexeccon in the child), its state tree gets the image label and gets its
labels back at teardown; swtpm_setup is left alone. Proven on a booted SELinux kernel in
tests/lsm."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_selinux_support import domain_xml, gen, label_of, make_ctx, setup, touch
from vmconfine.plugin.helper import Helper


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
