"""set/restore in batches: group commit (one fsync per batch, every record before its change),
directories opened once, the same file twice, a failure in the middle of a batch, and symlink
swaps of files whose directory is already open."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
from vmconfine.launch.journal import Journal
from vmconfine_dac import relabel

REF = "trusted.vmconfine.security.ref_dac"


@pytest.fixture
def d() -> Iterator[Path]:
    with scratch() as path:
        yield path


def _chain(d: Path, name: str, layers: int) -> tuple[str, list[Path]]:
    files = [make_file(d / f"{name}-l{i}.img", 1000 + i, 1000 + i) for i in range(layers)]
    inner = "<backingStore/>"
    for f in reversed(files[1:]):
        inner = (f"<backingStore type='file'><format type='raw'/><source file='{f}'/>{inner}"
                 "</backingStore>")
    return disk(files[0], "vda", backing=inner), files


def _targets(n: int) -> list[str]:
    return [f"vd{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(n)]


def test_a_long_chain_and_many_disks_take_one_fsync_per_batch(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain, layers = _chain(d, "c", 150)
    disks = [make_file(d / f"disk{i}.img", 3000 + i, 3000 + i) for i in range(70)]
    devices = chain + "".join(disk(f, t) for f, t in zip(disks, _targets(71)[1:], strict=True))
    before = snapshot([*layers, *disks])
    drv, ctx = prepared(host_for(d), domain_xml("many", devices))
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    drv.set_all_labels(ctx)
    files = 150 + 70
    batches = -(-files // relabel.BATCH)
    # one per batch of records, and one at the end for the 'remembered' markers
    assert len(fsyncs) <= batches + 1, fsyncs
    uid, gid = qemu_ids()
    assert all(owner(f) == (uid, gid) for f in [*layers, *disks])
    assert len(ops(ctx, "chown")) == files
    fsyncs.clear()
    drv.restore_all_labels(ctx)
    assert len(fsyncs) <= 2 * batches + 1, fsyncs
    after = snapshot([*layers, *disks])
    assert after[str(layers[0])] == before[str(layers[0])]
    assert all(after[str(f)] == before[str(f)] for f in disks)
    assert all(owner(f) == (uid, gid) for f in layers[1:])  # backing layers: kept (libvirt)
    assert {r["id"] for r in ops(ctx, "restored")} == {r["id"] for r in ops(ctx, "chown")}


def test_every_change_of_every_batch_is_journaled_and_synced_first(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac.fsops import FileHandle

    chain, layers = _chain(d, "c", 100)
    drv, ctx = prepared(host_for(d), domain_xml("wal", chain))
    synced: set[str] = set()
    real_fsync, real_chown = os.fsync, FileHandle.chown

    def fsync(fd: int) -> None:
        real_fsync(fd)  # what is in the file now is durable
        synced.update(r["path"] for r in Journal(ctx.journal.path).records("dac", "chown"))

    def chown(self: FileHandle, uid: int, gid: int) -> None:
        assert self.name in synced, f"{self.name} chowned before its record was synced"
        real_chown(self, uid, gid)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(FileHandle, "chown", chown)
    drv.set_all_labels(ctx)
    assert all(owner(f) == qemu_ids() for f in layers)


def test_the_same_image_twice_is_counted_twice(d: Path) -> None:
    img = make_file(d / "twice.img", 1001, 1001)
    before = snapshot([img])
    drv, ctx = prepared(host_for(d), domain_xml("twice", disk(img, "vda") + disk(img, "vdb")))
    drv.set_all_labels(ctx)
    assert owner(img) == qemu_ids() and xattrs(img)[REF] == b"2"
    drv.restore_image_label(ctx, ctx.domain.disks[1])
    assert owner(img) == qemu_ids() and xattrs(img)[REF] == b"1"
    drv.restore_all_labels(ctx)
    assert snapshot([img]) == before


def test_a_failure_in_a_batch_leaves_the_files_after_it_alone(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmconfine_dac.fsops import FileHandle

    a, b, c = (make_file(d / f"{n}.img", 1001, 1001) for n in "abc")
    host = host_for(d)
    drv, other = prepared(host, domain_xml("other", disk(c)))
    drv.set_all_labels(other)  # c is in use by another domain: its count is 1
    before = snapshot([a, b, c])
    _, ctx = prepared(host, domain_xml("fail", disk(a, "vda") + disk(b, "vdb") + disk(c, "vdc")))
    real = FileHandle.chown

    def chown(self: FileHandle, uid: int, gid: int) -> None:
        if self.name == str(b):
            raise OSError(5, "Input/output error")
        real(self, uid, gid)

    monkeypatch.setattr(FileHandle, "chown", chown)
    with pytest.raises(LabelError, match="unable to set user and group"):
        drv.set_all_labels(ctx)
    monkeypatch.undo()
    rec_c = next(r for r in ops(ctx, "chown") if r["path"] == str(c))
    assert {r["id"]: r["how"] for r in ops(ctx, "restored")} == {rec_c["id"]: "not-made"}
    assert snapshot([c]) == {str(c): before[str(c)]}  # never touched: count still 1
    drv.restore_all_labels(ctx)  # the stack's rollback
    assert owner(a) == owner(b) == (1001, 1001) and xattrs(a) == xattrs(b) == {}
    assert snapshot([c]) == {str(c): before[str(c)]}
    drv.restore_all_labels(other)
    assert owner(c) == (1001, 1001) and xattrs(c) == {}


def test_files_in_many_directories(d: Path) -> None:
    from vmconfine_dac import fsops

    dirs = [d / f"dir{i}" for i in range(fsops.DIR_CACHE_SIZE + 6)]
    files = []
    for sub in dirs:
        sub.mkdir(mode=0o755)
        files.append(make_file(sub / "img.raw", 1001, 1001))
    link = d / "linked"
    link.symlink_to(dirs[0])
    devices = "".join(disk(f, t) for f, t in zip(files, _targets(len(files)), strict=True))
    devices += disk(link / "img.raw", "zz")  # the same file through a symlinked directory
    before = snapshot(files)
    drv, ctx = prepared(host_for(d), domain_xml("dirs", devices))
    drv.set_all_labels(ctx)
    assert all(owner(f) == qemu_ids() for f in files)
    assert xattrs(files[0])[REF] == b"2"
    assert {r["path"] for r in ops(ctx, "chown")} == {str(f) for f in files}
    drv.restore_all_labels(ctx)
    assert snapshot(files) == before


@pytest.mark.parametrize("kind", ["symlink", "other-file"])
def test_swap_of_a_file_whose_directory_is_already_open_is_refused(
        d: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    from vmconfine_dac import fsops

    victim = make_file(d / "victim", 1500, 1500, 0o600)
    sub = d / "sub"
    sub.mkdir(mode=0o755)
    first = make_file(sub / "first.img", 1001, 1001)
    real = make_file(sub / "real.img", 1002, 1002)

    def hook(path: str, resolved: str) -> None:
        if resolved.endswith("real.img") and not os.path.islink(resolved):
            os.rename(resolved, d / "moved.img")
            if kind == "symlink":
                Path(resolved).symlink_to(victim)
            else:
                os.link(victim, resolved)

    drv, ctx = prepared(host_for(d), domain_xml("swap2", disk(first, "vda") + disk(real, "vdb")))
    monkeypatch.setattr(fsops, "after_resolve_hook", hook)
    with pytest.raises(LabelError, match="refusing to change its owner"):
        drv.set_all_labels(ctx)
    monkeypatch.undo()
    assert owner(victim) == (1500, 1500) and xattrs(victim) == {}
    drv.restore_all_labels(ctx)
    assert owner(first) == (1001, 1001) and xattrs(first) == {}


def test_a_directory_swapped_after_it_was_opened_redirects_nothing(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory's fd names the directory that was checked: a symlink put in its place
    later cannot send a chown anywhere else."""
    from vmconfine_dac import fsops

    sub = d / "sub"
    sub.mkdir(mode=0o755)
    first = make_file(sub / "first.img", 1001, 1001)
    second = make_file(sub / "second.img", 1002, 1002)
    elsewhere = d / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    decoy = make_file(elsewhere / "second.img", 1500, 1500)
    swapped: list[Any] = []

    def hook(path: str, resolved: str) -> None:
        if resolved.endswith("second.img") and not swapped:
            os.rename(sub, d / "sub.moved")
            sub.symlink_to(elsewhere)
            swapped.append(True)

    drv, ctx = prepared(host_for(d), domain_xml("dirswap",
                                                disk(first, "vda") + disk(second, "vdb")))
    monkeypatch.setattr(fsops, "after_resolve_hook", hook)
    drv.set_all_labels(ctx)
    monkeypatch.undo()
    assert swapped and owner(decoy) == (1500, 1500) and xattrs(decoy) == {}
    assert owner(d / "sub.moved" / "second.img") == qemu_ids()


def test_a_chain_restored_by_a_fresh_process_marks_each_layer_kept_once(d: Path) -> None:
    """The chain's layers share one group line of chown rows; a restore from the journal file
    alone gives the top image back, marks every never-undone layer kept once, and a second
    restore writes nothing."""
    chain, layers = _chain(d, "k", 40)
    before = snapshot(layers)
    host = host_for(d)
    drv, ctx = prepared(host, domain_xml("kept", chain))
    drv.set_all_labels(ctx)
    ctx.journal.close()
    groups = Journal(ctx.journal.path).groups("dac", "chown")
    assert [len(rows) for _same, _keys, rows in groups] == [1, 39]
    assert groups[1][0]["role"] == "backing" and groups[1][0]["restore"] is False
    _drv2, ctx2 = prepared(host, domain_xml("kept", chain))
    drv.restore_all_labels(ctx2)
    assert snapshot(layers[:1]) == {str(layers[0]): before[str(layers[0])]}
    assert all(owner(f) == qemu_ids() for f in layers[1:])  # backing layers: kept (libvirt)
    restored = ops(ctx2, "restored")
    assert sorted(r["id"] for r in restored) == sorted(r["id"] for r in ops(ctx2, "chown"))
    assert sum(r["how"] == "kept" for r in restored) == 39
    text = ctx2.journal.path.read_text()
    _drv3, ctx3 = prepared(host, domain_xml("kept", chain))
    drv.restore_all_labels(ctx3)
    assert ctx3.journal.path.read_text() == text


def test_set_reuses_the_plan_preflight_checked_for_the_same_resources(
        d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preflight and set_all_labels of one start plan once; another list (hotplug) or the
    domain's list grown since is planned again."""
    img = make_file(d / "a.img", 1000, 1000)
    drv, ctx = prepared(host_for(d), domain_xml("plan", disk(img)))
    calls: list[int] = []
    real = relabel.plan
    monkeypatch.setattr(relabel, "plan", lambda c, res, ident: (calls.append(len(res)),
                                                                 real(c, res, ident))[1])
    drv.preflight(ctx)
    drv.set_all_labels(ctx)
    assert len(calls) == 1 and owner(img) == qemu_ids()
    drv.restore_all_labels(ctx)
    assert owner(img) == (1000, 1000)
    extra = make_file(d / "b.img", 1001, 1001)
    more = list(ctx.resources)
    drv._set(ctx, more[:1])  # another list object: planned again
    assert len(calls) == 2
    ctx.resources.extend(relabel_resources(ctx, extra))  # the domain's list, grown
    drv.set_all_labels(ctx)
    assert len(calls) == 3 and owner(extra) == qemu_ids()
    drv.restore_all_labels(ctx)
    assert owner(extra) == (1001, 1001) and owner(img) == (1000, 1000)


def relabel_resources(ctx: Any, path: Path) -> list[Any]:
    """The resources of one more disk at ``path`` (as hotplug computes them)."""
    from vmconfine.domain import parse_domain
    from vmconfine.plugin import resources as core_resources

    other = parse_domain(domain_xml("other", disk(path, "vdb")))
    return core_resources.disk_resources(other.disks[0])


def test_a_chain_is_journaled_without_repeating_resolved_paths(d: Path) -> None:
    """A layer named by its real path records it once (``orig`` null); a disk named through a
    symlink keeps the name the XML used, and a per-path restore finds it by either name."""
    chain, layers = _chain(d, "o", 5)
    link_target = make_file(d / "real.img", 1002, 1002)
    (d / "link.img").symlink_to(link_target)
    drv, ctx = prepared(host_for(d), domain_xml("orig", chain + disk(d / "link.img", "vdb")))
    drv.set_all_labels(ctx)
    rows = {r["path"]: r for r in ops(ctx, "chown")}
    assert all(rows[str(f)]["orig"] is None for f in layers)
    assert rows[str(link_target)]["orig"] == str(d / "link.img")
    assert relabel.orig_path(rows[str(layers[0])]) == str(layers[0])
    assert relabel.orig_path(rows[str(link_target)]) == str(d / "link.img")
    drv._restore(ctx, lambda rec: relabel.orig_path(rec) == str(d / "link.img"))
    assert owner(link_target) == (1002, 1002) and owner(layers[0]) == qemu_ids()
    drv.restore_all_labels(ctx)
    assert owner(layers[0]) == (1000, 1000)
