"""set_all_labels / restore_all_labels on real files: libvirt's rules per resource role,
relabel='no', device label overrides, refcounted sharing, and the journal."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import make_ctx
from tests.unit.test_dac_support import (
    disk,
    domain_xml,
    host_for,
    make_file,
    ops,
    owner,
    prepared,
    qemu_ids,
    scratch,
    snapshot,
    xattrs,
)
from vmconfine.errors import LabelError

REF = "trusted.vmconfine.security.ref_dac"
LABEL = "trusted.vmconfine.security.dac"


@pytest.fixture
def d() -> Iterator[Path]:
    with scratch() as path:
        yield path


class Files:
    """Every kind of resource, each owned by a different uid."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.top = make_file(d / "top.qcow2", 1001, 1001, 0o600)
        self.base = make_file(d / "base.img", 1002, 1002, 0o644)
        self.ro = make_file(d / "ro.img", 1003, 1003, 0o644)
        self.shared = make_file(d / "shared.img", 1004, 1004, 0o660)
        self.kernel = make_file(d / "vmlinuz", 1005, 1005, 0o644)
        self.initrd = make_file(d / "initrd", 1006, 1006, 0o644)
        self.dtb = make_file(d / "board.dtb", 1007, 1007, 0o644)
        self.nvram = make_file(d / "VARS.fd", 1008, 1008, 0o600)
        self.loader = make_file(d / "CODE.fd", 1009, 1009, 0o644)
        self.serial = make_file(d / "serial.log", 1010, 1010, 0o600)
        self.pipe_in, self.pipe_out = d / "pipe.in", d / "pipe.out"
        for p in (self.pipe_in, self.pipe_out):
            os.mkfifo(p, 0o600)
            os.chown(p, 1011, 1011)
        self.sock_path = d / "agent.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.sock_path))
        os.chown(self.sock_path, 1012, 1012)
        self.chr = d / "ttyfake"
        os.mknod(self.chr, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(self.chr, 1013, 1013)

    @property
    def restored(self) -> list[Path]:
        return [self.top, self.kernel, self.initrd, self.dtb, self.nvram,
                self.pipe_in, self.pipe_out, self.sock_path, self.chr]

    @property
    def kept(self) -> list[Path]:
        return [self.base, self.ro, self.shared]

    @property
    def all(self) -> list[Path]:
        return [*self.restored, *self.kept, self.loader, self.serial]

    def xml(self, name: str = "roles", top_extra: str = "") -> str:
        backing = (f"<backingStore type='file'><format type='raw'/><source file='{self.base}'/>"
                   "<backingStore/></backingStore>")
        devices = "".join([
            disk(self.top, "vda", fmt="qcow2", backing=backing, source_extra=top_extra),
            disk(self.ro, "vdb", extra="<readonly/>"),
            disk(self.shared, "vdc", extra="<shareable/>"),
            f"<serial type='file'><source path='{self.serial}'/><target port='0'/></serial>",
            f"<serial type='pipe'><source path='{self.d / 'pipe'}'/><target port='1'/></serial>",
            f"<channel type='unix'><source mode='connect' path='{self.sock_path}'/>"
            "<target type='virtio' name='org.example.agent'/></channel>",
            f"<serial type='dev'><source path='{self.chr}'/><target port='2'/></serial>",
        ])
        os_extra = (f"<loader readonly='yes' type='pflash'>{self.loader}</loader>"
                    f"<nvram>{self.nvram}</nvram><kernel>{self.kernel}</kernel>"
                    f"<initrd>{self.initrd}</initrd><dtb>{self.dtb}</dtb>")
        return domain_xml(name, devices, os_extra=os_extra)


@pytest.fixture
def files(d: Path) -> Iterator[Files]:
    f = Files(d)
    yield f
    f.server.close()


def test_rules_per_role(d: Path, files: Files) -> None:
    uid, gid = qemu_ids()
    before = snapshot(files.all)
    drv, ctx = prepared(host_for(d), files.xml())
    drv.set_all_labels(ctx)
    for p in [*files.restored, *files.kept]:
        assert owner(p) == (uid, gid), p
    # remembered: rw top images, kernel/initrd/dtb, nvram
    for p in (files.top, files.kernel, files.initrd, files.dtb, files.nvram):
        assert xattrs(p)[REF] == b"1", p
        assert xattrs(p)[LABEL] == f"+{before[str(p)][0]}:+{before[str(p)][1]}".encode()
    # backing, readonly and shareable images: chowned, never remembered
    for p in files.kept:
        assert xattrs(p) == {}, p
    assert snapshot([files.loader]) == {str(files.loader): before[str(files.loader)]}
    # a file chardev is opened by vmconfine and passed as an fd: never chowned
    assert snapshot([files.serial]) == {str(files.serial): before[str(files.serial)]}
    assert owner("/dev/null") == (0, 0)
    drv.restore_all_labels(ctx)
    after = snapshot(files.all)
    for p in [*files.restored, files.loader, files.serial]:
        assert after[str(p)] == before[str(p)], p
    for p in files.kept:  # libvirt: other domains may still use them
        assert after[str(p)][:2] == (uid, gid)
        assert after[str(p)][2:] == before[str(p)][2:]


def test_every_change_is_journaled_before_it_is_made(d: Path, files: Files,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac.fsops import FileHandle

    drv, ctx = prepared(host_for(d), files.xml())
    real_chown = FileHandle.chown
    seen: list[str] = []

    def chown(self: FileHandle, uid: int, gid: int) -> None:
        recorded = {r["path"] for r in ops(ctx, "chown")}
        assert self.name in recorded, f"{self.name} chowned before it was journaled"
        seen.append(self.name)
        real_chown(self, uid, gid)

    monkeypatch.setattr(FileHandle, "chown", chown)
    drv.set_all_labels(ctx)
    assert len(seen) == len(files.restored) + len(files.kept)
    rec = next(r for r in ops(ctx, "chown") if r["path"] == str(files.top))
    assert (rec["uid"], rec["gid"], rec["remember"], rec["restore"]) == (1001, 1001, True, True)
    st = os.stat(files.top)
    assert (rec["dev"], rec["ino"]) == (st.st_dev, st.st_ino)
    assert (rec["new_uid"], rec["new_gid"]) == qemu_ids()


def test_domain_relabel_no_changes_nothing(d: Path, files: Files) -> None:
    uid, gid = qemu_ids()
    xml = files.xml().replace(
        "</domain>", f"<seclabel type='static' model='dac' relabel='no'><label>+{uid}:+{gid}"
                     "</label></seclabel></domain>")
    before = snapshot(files.all)
    drv, ctx = prepared(host_for(d), xml)
    drv.set_all_labels(ctx)
    assert snapshot(files.all) == before and ops(ctx, "chown") == []


def test_dynamic_ownership_off_changes_nothing(d: Path, files: Files) -> None:
    before = snapshot(files.all)
    drv, ctx = prepared(host_for(d, "dynamic_ownership = 0\n"), files.xml())
    drv.set_all_labels(ctx)
    assert snapshot(files.all) == before and ops(ctx, "chown") == []


def test_device_relabel_no_skips_the_disk_and_its_chain(d: Path, files: Files) -> None:
    uid, gid = qemu_ids()
    drv, ctx = prepared(host_for(d),
                        files.xml(top_extra="<seclabel model='dac' relabel='no'/>"))
    drv.set_all_labels(ctx)
    assert owner(files.top) == (1001, 1001) and owner(files.base) == (1002, 1002)
    assert owner(files.ro) == (uid, gid)


def test_device_label_overrides_owner_and_backing_inherits(d: Path, files: Files) -> None:
    drv, ctx = prepared(host_for(d), files.xml(
        top_extra="<seclabel model='dac'><label>+4321:+4322</label></seclabel>"))
    drv.set_all_labels(ctx)
    assert owner(files.top) == (4321, 4322)
    assert owner(files.base) == (4321, 4322)
    assert owner(files.ro) == qemu_ids()
    drv.restore_all_labels(ctx)
    assert owner(files.top) == (1001, 1001)


def test_remember_owner_off_restores_from_the_journal(d: Path, files: Files) -> None:
    before = snapshot(files.all)
    drv, ctx = prepared(host_for(d, "remember_owner = 0\n"), files.xml())
    drv.set_all_labels(ctx)
    assert all(xattrs(p) == {} for p in files.restored)
    drv.restore_all_labels(ctx)
    for p in files.restored:
        assert snapshot([p]) == {str(p): before[str(p)]}


def test_symlinked_path_changes_the_target_only(d: Path) -> None:
    real = make_file(d / "real.img", 1001, 1001)
    link = d / "link.img"
    link.symlink_to(real)
    link_owner = os.lstat(link)[4:6]
    drv, ctx = prepared(host_for(d), domain_xml("sym", disk(link)))
    drv.set_all_labels(ctx)
    assert owner(real) == qemu_ids()
    assert os.lstat(link)[4:6] == link_owner
    assert ops(ctx, "chown")[0]["path"] == str(real)
    drv.restore_all_labels(ctx)
    assert owner(real) == (1001, 1001)


# ---- symlink swaps ---------------------------------------------------------------------------


def _swap_hook(monkeypatch: pytest.MonkeyPatch, swap: Any) -> None:
    from vmconfine_dac import fsops

    def hook(path: str, resolved: str) -> None:
        if resolved.endswith("real.img"):
            swap(Path(resolved))

    monkeypatch.setattr(fsops, "after_resolve_hook", hook)


@pytest.mark.parametrize("kind", ["symlink", "other-file", "directory-symlink"])
def test_swap_between_resolve_and_chown_is_refused(d: Path, monkeypatch: pytest.MonkeyPatch,
                                                   kind: str) -> None:
    """A file swapped after it was resolved is refused; a directory swapped after it was
    resolved (and so opened) cannot redirect the change: the victim is untouched either way."""
    victim = make_file(d / "victim", 1500, 1500, 0o600)
    sub = d / "sub"
    sub.mkdir(mode=0o755)
    real = make_file(sub / "real.img", 1001, 1001)
    kernel = make_file(d / "vmlinuz", 1005, 1005, 0o644)
    watched = [victim, real, kernel, sub]
    before = snapshot(watched)

    def swap(path: Path) -> None:
        if kind == "symlink":
            os.rename(path, d / "moved.img")
            path.symlink_to(victim)
        elif kind == "other-file":
            os.rename(path, d / "moved.img")
            os.link(victim, path)
        elif not (d / "sub.moved").exists():  # once (restore resolves the path again)
            os.rename(sub, d / "sub.moved")
            sub.symlink_to(d)
            os.link(victim, d / "real.img")

    xml = domain_xml("swap", disk(real), os_extra=f"<kernel>{kernel}</kernel>")
    drv, ctx = prepared(host_for(d), xml)
    _swap_hook(monkeypatch, swap)
    if kind == "directory-symlink":
        # the directory was opened when the path was resolved: its fd names the directory
        # that was checked, so the swap redirects nothing (the file moved with it is changed)
        drv.set_all_labels(ctx)
        assert owner(d / "sub.moved" / "real.img") == qemu_ids()
    else:
        with pytest.raises(LabelError, match="refusing to change its owner"):
            drv.set_all_labels(ctx)
    assert owner(victim) == (1500, 1500) and xattrs(victim) == {}
    drv.restore_all_labels(ctx)  # what the stack does after a failed set (or at stop)
    assert snapshot([victim, kernel]) == {k: v for k, v in before.items()
                                          if k in (str(victim), str(kernel))}


# ---- NFS-style refusals ----------------------------------------------------------------------


def _refuse_chown(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    from vmconfine_dac.fsops import FileHandle

    def chown(self: FileHandle, uid: int, gid: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(FileHandle, "chown", chown)


@pytest.mark.parametrize("err", [1, 30, 95])  # EPERM, EROFS, ENOTSUP
def test_refused_chown_is_skipped_when_qemu_can_already_use_the_file(
        d: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        err: int) -> None:
    kernel = make_file(d / "vmlinuz", 1005, 1005, 0o644)
    img = make_file(d / "disk.img", 1001, 1001, 0o666)
    drv, ctx = prepared(host_for(d), domain_xml("nfs", disk(img),
                                                os_extra=f"<kernel>{kernel}</kernel>"))
    _refuse_chown(monkeypatch, err)
    drv.set_all_labels(ctx)
    assert owner(kernel) == (1005, 1005) and owner(img) == (1001, 1001)
    assert "can already" in caplog.text
    assert {r["id"] for r in ops(ctx, "chown_skipped")} >= {
        r["id"] for r in ops(ctx, "chown") if r["role"] in ("kernel", "disk")}
    monkeypatch.undo()
    drv.restore_all_labels(ctx)
    assert owner(kernel) == (1005, 1005) and xattrs(kernel) == {}


def test_refused_chown_fails_when_qemu_cannot_use_the_file(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_file(d / "disk.img", 1001, 1001, 0o644)  # others may read, not write
    drv, ctx = prepared(host_for(d), domain_xml("nfs2", disk(img)))
    _refuse_chown(monkeypatch, 1)
    with pytest.raises(LabelError, match=r"cannot set owner of .*disk\.img to .*cannot read "
                                         r"and write it as it is \(owner \+1001:\+1001, mode "
                                         r"0644\)"):
        drv.set_all_labels(ctx)
    monkeypatch.undo()
    drv.restore_all_labels(ctx)
    assert owner(img) == (1001, 1001) and xattrs(img) == {}


def test_hard_chown_error_is_reported_and_rolled_back(d: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_file(d / "disk.img", 1001, 1001, 0o600)
    drv, ctx = prepared(host_for(d), domain_xml("eio", disk(img)))
    _refuse_chown(monkeypatch, 5)  # EIO
    with pytest.raises(LabelError, match="unable to set user and group to"):
        drv.set_all_labels(ctx)
    assert xattrs(img)[REF] == b"1"  # remembered before the chown, as journaled
    monkeypatch.undo()
    drv.restore_all_labels(ctx)
    assert owner(img) == (1001, 1001) and xattrs(img) == {}


# ---- misc rules ------------------------------------------------------------------------------


def test_missing_disk_is_an_error(d: Path) -> None:
    drv, ctx = prepared(host_for(d), domain_xml("missing", disk(d / "nope.img")))
    with pytest.raises(LabelError, match=r"nope\.img to QEMU: no such file or directory"):
        drv.set_all_labels(ctx)


def test_passed_file_chardev_and_log_are_left_to_the_pipeline(d: Path) -> None:
    """The pipeline opens them and passes the fds: DAC neither creates nor chowns them."""
    log, out = d / "console.log", d / "console.out"
    drv, ctx = prepared(host_for(d), domain_xml(
        "mk", f"<serial type='file'><source path='{out}'/><log file='{log}'/>"
              "<target port='0'/></serial>"))
    drv.set_all_labels(ctx)
    assert not log.exists() and not out.exists()
    assert ops(ctx, "chown") == []
    drv.restore_all_labels(ctx)


def test_setid_bits_cleared_by_chown_come_back(d: Path) -> None:
    kernel = make_file(d / "vmlinuz", 1005, 1005, 0o6755)
    before = snapshot([kernel])
    drv, ctx = prepared(host_for(d), domain_xml("suid", os_extra=f"<kernel>{kernel}</kernel>"))
    drv.set_all_labels(ctx)
    assert stat.S_IMODE(os.stat(kernel).st_mode) & 0o6000 == 0
    drv.restore_all_labels(ctx)
    assert snapshot([kernel]) == before


def test_owner_changed_while_running_is_left_alone(d: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    img = make_file(d / "disk.img", 1001, 1001)
    drv, ctx = prepared(host_for(d, "remember_owner = 0\n"), domain_xml("chg", disk(img)))
    drv.set_all_labels(ctx)
    os.chown(img, 2002, 2002)
    drv.restore_all_labels(ctx)
    assert owner(img) == (2002, 2002)
    assert "changed to +2002:+2002 while the domain ran" in caplog.text


def test_restore_image_label_restores_one_disk(d: Path) -> None:
    a = make_file(d / "a.img", 1001, 1001)
    b = make_file(d / "b.img", 1002, 1002)
    drv, ctx = prepared(host_for(d), domain_xml("one", disk(a, "vda") + disk(b, "vdb")))
    drv.set_all_labels(ctx)
    drv.restore_image_label(ctx, ctx.domain.disks[1])
    assert owner(a) == qemu_ids() and owner(b) == (1002, 1002)
    drv.restore_all_labels(ctx)
    assert owner(a) == (1001, 1001)


def test_set_image_label_hotplug(d: Path) -> None:
    a = make_file(d / "a.img", 1001, 1001)
    drv, ctx = prepared(host_for(d), domain_xml("hot", disk(a, "vdz")))
    drv.set_image_label(ctx, ctx.domain.disks[0])
    assert owner(a) == qemu_ids() and ops(ctx, "chown")[0]["device"] == "disk:vdz"
    drv.restore_image_label(ctx, ctx.domain.disks[0])
    assert owner(a) == (1001, 1001)


# ---- two domains sharing a disk --------------------------------------------------------------


def test_shared_disk_refcount(d: Path) -> None:
    img = make_file(d / "common.img", 1001, 1001)
    host = host_for(d)
    drv, a = prepared(host, domain_xml("a", disk(img)))
    _, b = prepared(host, domain_xml("b", disk(img)))
    drv.set_all_labels(a)
    drv.set_all_labels(b)
    assert xattrs(img)[REF] == b"2" and xattrs(img)[LABEL] == b"+1001:+1001"
    drv.restore_all_labels(a)
    assert owner(img) == qemu_ids() and xattrs(img)[REF] == b"1"
    drv.restore_all_labels(b)
    assert owner(img) == (1001, 1001) and xattrs(img) == {}


def test_different_owner_for_a_file_in_use_is_refused(d: Path) -> None:
    img = make_file(d / "common.img", 1001, 1001)
    host = host_for(d)
    drv, a = prepared(host, domain_xml("a", disk(img)))
    _, b = prepared(host, domain_xml(
        "b", disk(img, source_extra="<seclabel model='dac'><label>+4321:+4321</label>"
                                    "</seclabel>")))
    drv.set_all_labels(a)
    with pytest.raises(LabelError, match=f"Setting different DAC user or group on {img} which "
                                         "is already in use"):
        drv.set_all_labels(b)
    assert owner(img) == qemu_ids() and xattrs(img)[REF] == b"1"
    drv.restore_all_labels(b)  # the stack's rollback: must not disturb a
    assert owner(img) == qemu_ids() and xattrs(img)[REF] == b"1"
    drv.restore_all_labels(a)
    assert owner(img) == (1001, 1001) and xattrs(img) == {}


# ---- crash recovery (journal-driven, from a fresh context) ---------------------------------------


class _Crash(BaseException):
    """Stands for vmconfine dying at this point."""


def _fresh(host: Any, xml: str) -> Any:
    return make_ctx(host, xml)


def test_restore_from_fresh_context_after_crash(d: Path, files: Files) -> None:
    before = snapshot(files.all)
    host = host_for(d)
    drv, ctx = prepared(host, files.xml())
    drv.set_all_labels(ctx)
    ctx.journal.close()
    ctx2 = _fresh(host, files.xml())
    drv.restore_all_labels(ctx2)
    for p in files.restored:
        assert snapshot([p]) == {str(p): before[str(p)]}
    lines = ctx2.journal.path.read_text().splitlines()
    drv.restore_all_labels(_fresh(host, files.xml()))  # idempotent: nothing left to do
    assert ctx2.journal.path.read_text().splitlines() == lines
    assert all(snapshot([p]) == {str(p): before[str(p)]} for p in files.restored)
    assert {r["id"] for r in ops(ctx2, "restored")} == {r["id"] for r in ops(ctx2, "chown")}


def test_crash_after_remembering_before_the_marker(d: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac import owners

    img = make_file(d / "disk.img", 1001, 1001)
    before = snapshot([img])
    host = host_for(d)
    drv, ctx = prepared(host, domain_xml("crash1", disk(img)))
    real = owners.remember

    def remember_then_die(*args: Any) -> Any:
        real(*args)
        raise _Crash

    monkeypatch.setattr(owners, "remember", remember_then_die)
    with pytest.raises(_Crash):
        drv.set_all_labels(ctx)
    monkeypatch.undo()
    assert xattrs(img)[REF] == b"1"
    drv.restore_all_labels(_fresh(host, domain_xml("crash1", disk(img))))
    assert snapshot([img]) == before


def test_crash_in_the_middle_of_restore(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac.fsops import FileHandle

    img = make_file(d / "disk.img", 1001, 1001)
    before = snapshot([img])
    host = host_for(d)
    xml = domain_xml("crash2", disk(img))
    drv, ctx = prepared(host, xml)
    drv.set_all_labels(ctx)

    def die(self: FileHandle, uid: int, gid: int) -> None:
        raise _Crash

    monkeypatch.setattr(FileHandle, "chown", die)
    with pytest.raises(_Crash):
        drv.restore_all_labels(_fresh(host, xml))
    monkeypatch.undo()
    assert xattrs(img) == {}  # the count went down before the crash; the owner did not
    assert owner(img) == qemu_ids()
    drv.restore_all_labels(_fresh(host, xml))
    assert snapshot([img]) == before


def test_shared_disk_survives_crash_of_one_supervisor(d: Path) -> None:
    img = make_file(d / "common.img", 1001, 1001)
    host = host_for(d)
    xml_a, xml_b = domain_xml("a", disk(img)), domain_xml("b", disk(img))
    drv, a = prepared(host, xml_a)
    _, b = prepared(host, xml_b)
    drv.set_all_labels(a)
    drv.set_all_labels(b)
    drv.restore_all_labels(_fresh(host, xml_a))  # a's supervisor died; the next command
    assert owner(img) == qemu_ids()
    drv.restore_all_labels(_fresh(host, xml_b))
    assert owner(img) == (1001, 1001) and xattrs(img) == {}
