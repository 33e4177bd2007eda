"""DAC preflight: QEMU's ids must reach every resource; failures name the path and the fix,
and nothing is changed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_dac_support import (
    disk,
    domain_xml,
    host_for,
    make_file,
    ops,
    prepared,
    scratch,
    snapshot,
)
from vmconfine.errors import DriverError, LabelError


@pytest.fixture
def d() -> Iterator[Path]:
    with scratch() as path:
        yield path


def test_reachable_domain_passes(d: Path) -> None:
    img = make_file(d / "disk.img", 1001, 1001, 0o600)
    kernel = make_file(d / "vmlinuz", 0, 0, 0o644)
    drv, ctx = prepared(host_for(d), domain_xml("ok", disk(img),
                                                os_extra=f"<kernel>{kernel}</kernel>"))
    drv.preflight(ctx)
    assert ops(ctx, "chown") == []


def test_unsearchable_parent_directory_is_named_with_the_fix(d: Path) -> None:
    private = d / "home" / "alice"
    private.mkdir(parents=True)
    os.chmod(d / "home", 0o755)
    os.chmod(private, 0o700)
    img = make_file(private / "disk.img", 1001, 1001, 0o600)
    before = snapshot([img, private])
    drv, ctx = prepared(host_for(d), domain_xml("home", disk(img)))
    with pytest.raises(LabelError) as err:
        drv.preflight(ctx)
    msg = str(err.value)
    assert f"cannot search directory {private} (+0:+0 0700)" in msg
    assert f"fix: chmod o+x {private}" in msg
    assert "\n" not in msg
    assert snapshot([img, private]) == before and ops(ctx, "chown") == []


def test_group_search_bit_is_enough(d: Path) -> None:
    import grp

    shared = d / "images"
    shared.mkdir()
    os.chown(shared, 0, grp.getgrnam("kvm").gr_gid)  # QEMU's account is in kvm
    os.chmod(shared, 0o710)
    img = make_file(shared / "disk.img", 1001, 1001)
    drv, ctx = prepared(host_for(d), domain_xml("grp", disk(img)))
    drv.preflight(ctx)


def test_symlink_target_directories_are_checked_too(d: Path) -> None:
    hidden = d / "hidden"
    hidden.mkdir(mode=0o700)
    real = make_file(hidden / "real.img", 1001, 1001)
    link = d / "link.img"
    link.symlink_to(real)
    drv, ctx = prepared(host_for(d), domain_xml("lnk", disk(link)))
    with pytest.raises(LabelError, match=f"cannot search directory {hidden} .*resolves to "
                                         f"{real}.*fix: chmod o\\+x {hidden}"):
        drv.preflight(ctx)


def test_unusable_instance_directory_suggests_chown(d: Path) -> None:
    host = host_for(d)
    lib = host.instance.lib_dir
    os.chmod(lib, 0o700)
    drv, ctx = prepared(host, domain_xml("inst"))
    with pytest.raises(LabelError, match=f"cannot search directory {lib} .*the instance "
                                         f"directory {lib}; fix: chown vmconfine-qemu:"
                                         f"vmconfine-qemu {lib} \\(or chmod o\\+x {lib}\\)"):
        drv.preflight(ctx)


def test_file_left_alone_must_be_usable_as_is(d: Path) -> None:
    img = make_file(d / "disk.img", 1001, 1001, 0o600)
    drv, ctx = prepared(host_for(d, "dynamic_ownership = 0\n"), domain_xml("as-is", disk(img)))
    with pytest.raises(LabelError, match=f"cannot read and write {img} \\(\\+1001:\\+1001 "
                                         f"0600\\), the domain's disk; fix: chown "
                                         f"vmconfine-qemu:vmconfine-qemu {img}"):
        drv.preflight(ctx)


def test_file_unusable_even_once_chowned(d: Path) -> None:
    img = make_file(d / "disk.img", 1001, 1001, 0o400)
    drv, ctx = prepared(host_for(d), domain_xml("ro-mode", disk(img)))
    with pytest.raises(LabelError, match=f"once chowned .*fix: chmod u\\+rw {img}"):
        drv.preflight(ctx)


def test_missing_disk_is_reported(d: Path) -> None:
    drv, ctx = prepared(host_for(d), domain_xml("gone", disk(d / "gone.img")))
    with pytest.raises(LabelError, match=r"disk .*gone\.img does not exist"):
        drv.preflight(ctx)


def test_passed_sockets_and_files_need_no_writable_directory(d: Path) -> None:
    """vmconfine creates bind sockets and opens file chardevs itself and passes the fds
    (libvirt 9): a root-owned 0755 directory is fine, and nothing there is chowned."""
    os.chmod(d, 0o755)
    sock, out, log = d / "agent.sock", d / "serial.out", d / "serial.log"
    drv, ctx = prepared(host_for(d), domain_xml(
        "bind", f"<channel type='unix'><source mode='bind' path='{sock}'/>"
                "<target type='virtio' name='org.example.agent'/></channel>"
                f"<serial type='file'><source path='{out}'/><log file='{log}'/></serial>"))
    drv.preflight(ctx)
    from vmconfine_dac import relabel
    from vmconfine_dac.driver import identity

    passed = [r for r in ctx.resources if r.passed]
    assert {r.path for r in passed} == {str(sock), str(out), str(log)}
    assert relabel.plan(ctx, passed, identity(ctx)) == []


def test_kvm_device_needs_the_kvm_group(d: Path) -> None:
    from tests.support import require

    require(os.path.exists("/dev/kvm"), "/dev/kvm is missing")
    free = next(u for u in range(54321, 60000) if not _has_pw(u))
    drv, ctx = prepared(host_for(d, f'user = "+{free}"\ngroup = "+{free}"\n'),
                        domain_xml("kvm", virt_type="kvm"))
    with pytest.raises(LabelError, match=rf"user \+{free}:\+{free} \(groups none\) cannot "
                                         r"read and write /dev/kvm \(\+0:\+\d+ 0660\).*"
                                         rf"fix: add {free} to group \w+ \(usermod -aG \w+ "
                                         rf"{free}\)$"):
        drv.preflight(ctx)


def test_capng_missing_is_reported(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac import preflight

    monkeypatch.setattr(preflight, "have_capng", lambda: False)
    drv, ctx = prepared(host_for(d), domain_xml("nocap"))
    with pytest.raises(DriverError, match="install python3-cap-ng"):
        drv.preflight(ctx)


def _has_pw(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def test_image_under_root_is_never_a_chmod_of_root(d: Path) -> None:
    """/root is a system path: the fix is an ACL for QEMU's user alone or moving the image,
    never `chmod o+x /root` (which would open the admin's home to every account)."""
    from tests.support import require

    require(not os.stat("/root").st_mode & 0o001, "/root is searchable by others here")
    drv, ctx = prepared(host_for(d), domain_xml("rooted", disk(Path("/root/vm/disk.img"))))
    with pytest.raises(LabelError) as err:
        drv.preflight(ctx)
    msg = str(err.value)
    assert "cannot search directory /root (" in msg, msg
    assert "setfacl -m u:" in msg and ":x /root" in msg and "/var/lib/vmconfine/images" in msg
    assert "chmod" not in msg and "chown" not in msg
