"""Fix advice never weakens the host: no chown/chmod of a system path or of a device node.

The cases are the ones a careless admin would have followed: QEMU denied ``/etc/shadow`` (a
``<qemu:arg>`` names it), an image under ``/root``, ``/dev/kvm`` for an unprivileged user. The
same advice reaches the DAC preflight, the confinement report, the diagnosis of a failed start
and host-validate (one model: :mod:`vmconfine.perms`)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.support import require
from vmconfine.perms import QemuIds, R, W, denial, protected

OTHER = QemuIds(54321, 54321)  # an account that is neither owner nor in any group
WEAKENING = re.compile(r"\b(chown|chmod)\b[^;,]*\s(/etc|/root|/dev|/usr|/boot|/home)\b")


def _unsearchable(path: str) -> bool:
    st = os.stat(path)
    return not st.st_mode & stat.S_IXOTH


def test_system_paths_are_protected(tmp_path: Path) -> None:
    for p in ("/etc/shadow", "/etc", "/root", "/root/x/y.img", "/home/alice/vm.img", "/usr/bin",
              "/boot/vmlinuz", "/dev/kvm", "/proc/1", "/sys/kernel", "/var/lib/mysql/db",
              "/", "/var", "/var/lib"):
        assert protected(p), p
    for p in (str(tmp_path / "a.img"), "/srv/images/a.img", "/var/lib/vmconfine/images/a.img",
              "/var/tmp/vmconfine-tests/x/a.img"):  # test-rules: path never touched
        assert not protected(p), p


def test_denied_system_file_is_never_chowned() -> None:
    require(os.path.exists("/etc/shadow") and not os.stat("/etc/shadow").st_mode & 0o004,
            "/etc/shadow is missing or world-readable here")
    found = denial("/etc/shadow", OTHER, R, role="other")
    assert found is not None and found.culprit == "/etc/shadow"
    assert not WEAKENING.search(found.fix), found.fix
    assert "<qemu:arg>" in found.fix
    listed = denial("/etc/shadow", OTHER, R, role="disk")
    assert listed is not None and "move or copy" in listed.fix and "chown" not in listed.fix
    chowned = denial("/etc/shadow", OTHER, R, owner=(1, 1), role="disk")
    assert chowned is not None and "chmod" not in chowned.fix


def test_image_under_root_gets_an_acl_not_chmod() -> None:
    require(os.path.isdir("/root") and _unsearchable("/root"),
            "/root is missing or searchable by others here")
    found = denial("/root/vmconfine-no-such-dir/disk.img", OTHER, R | W)
    assert found is not None and found.culprit == "/root"
    assert f"setfacl -m u:{OTHER.uid}:x /root" in found.fix
    assert not WEAKENING.search(found.fix), found.fix


def test_kvm_device_gets_group_membership() -> None:
    require(os.path.exists("/dev/kvm"), "/dev/kvm is missing")
    st = os.stat("/dev/kvm")
    require(st.st_mode & 0o060 == 0o060 and st.st_gid != 0 and not st.st_mode & 0o006,
            "/dev/kvm is not 0660 with a group of its own here")
    found = denial("/dev/kvm", OTHER, R | W)
    assert found is not None
    group = __import__("grp").getgrgid(st.st_gid).gr_name
    assert found.fix == f"add {OTHER.uid} to group {group} (usermod -aG {group} {OTHER.uid})"


def test_user_files_keep_the_simple_fix() -> None:
    top = Path(tempfile.mkdtemp(prefix="vmconfine-advice-"))
    try:
        os.chmod(top, 0o755)
        d = top / "locked"
        d.mkdir(mode=0o700)
        found = denial(str(d / "img"), OTHER, R)
        assert found is not None and found.fix.startswith(f"chmod o+x {d}")
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("path", ["/etc/shadow", "/root/disk.img", "/dev/kvm"])
def test_report_and_hint_never_weaken_the_host(path: str, tmp_path: Path) -> None:
    """The diagnosis of a start QEMU failed on ``path`` (named by a <qemu:arg>)."""
    require(os.geteuid() == 0, "needs root (QEMU's account differs from the caller)")
    require(os.path.exists(path) or os.path.isdir(os.path.dirname(path)), f"{path} missing")
    import vmconfine_dac
    from tests.support import make_ctx, make_host
    from vmconfine.launch.connection import Connection
    from vmconfine.plugin import nop
    from vmconfine.report.build import open_failure_hint

    host = make_host(tmp_path / "inst", [nop, vmconfine_dac],
                     config='security_driver = "none"\nuser = "+54321"\ngroup = "+54321"\n')
    conn = Connection(host.instance, pm=host.pm, recover=False)
    ctx = make_ctx(host, """<domain type='kvm'><name>adv</name><memory unit='MiB'>32</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>""")
    conn.stack.gen_labels(ctx)
    hint = open_failure_hint(conn, ctx, f"x: Could not open '{path}': Permission denied")
    assert "denied by DAC" in hint, hint
    assert not WEAKENING.search(hint), hint
