"""The journal as the DAC driver uses it: group commit, notes, grouped lines, counting."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmconfine.errors import LaunchError
from vmconfine.launch.journal import Journal


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_record_many_is_one_write_and_one_fsync(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path / "d.journal")
    fsyncs = _fsyncs(monkeypatch)
    entries = [("dac", "chown", {"id": f"{i:04x}", "path": f"/img/{i}", "uid": i})
               for i in range(100)]
    j.record_many(entries)
    assert len(fsyncs) == 1
    assert len(j.path.read_text().splitlines()) == 1  # same fields: one grouped line
    fresh = Journal(j.path)  # another process reads them back one record at a time
    assert fresh.records("dac", "chown") == [{"driver": "dac", "op": "chown", **d}
                                             for _drv, _op, d in entries]
    assert fresh.records() == j.records()


def test_groups_only_join_records_with_the_same_fields(tmp_path: Path) -> None:
    j = Journal(tmp_path / "d.journal")
    j.record_many([("dac", "restored", {"id": "a", "how": "kept"}),
                   ("dac", "restored", {"id": "b", "how": "kept"}),
                   ("dac", "restored", {"id": "c", "how": "gone", "extra": None}),
                   ("cgroups", "mkdir", {"path": "/sys/fs/cgroup/x"})])
    lines = [json.loads(x) for x in j.path.read_text().splitlines()]
    assert len(lines) == 3 and "group" in lines[0] and "driver" in lines[1]
    got = Journal(j.path).records()
    assert [r.get("id") for r in got] == ["a", "b", "c", None]
    assert got[2] == {"driver": "dac", "op": "restored", "id": "c", "how": "gone",
                      "extra": None}


def test_notes_are_written_at_once_and_synced_later(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path / "d.journal")
    fsyncs = _fsyncs(monkeypatch)
    j.note("dac", "remembered", id="a", ref=1)
    j.note_many([("dac", "restored", {"id": "a", "how": "xattr"})])
    assert fsyncs == []
    assert [r["op"] for r in Journal(j.path).records()] == ["remembered", "restored"]
    j.sync()
    j.sync()  # nothing new: no second fsync
    assert len(fsyncs) == 1
    j.note("dac", "restored", id="b", how="kept")
    j.close()  # closing makes the last note durable
    assert len(fsyncs) == 2


def test_torn_last_group_line_is_dropped_and_a_torn_middle_line_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path / "d.journal")
    j.record("pipeline", "start")
    j.record_many([("dac", "chown", {"id": str(i)}) for i in range(3)])
    j.close()
    text = j.path.read_text()
    j.path.write_text(text[:-20])  # the process died while writing the group
    assert [r["op"] for r in Journal(j.path).records()] == ["start"]
    j.path.write_text(text[:-20] + "\n" + text)
    with pytest.raises(LaunchError, match="corrupt journal line"):
        Journal(j.path).records()
    j.path.write_text('{"group": ["driver", "op"], "rows": [["dac"]]}\n'
                      '{"driver": "x", "op": "y"}\n')  # a row shorter than its fields
    with pytest.raises(LaunchError, match="corrupt journal line"):
        Journal(j.path).records()


def test_count_follows_appends_reloads_and_removal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "d.journal")
    assert j.count("selinux", "relabel") == 0
    j.record_many([("selinux", "relabel", {"n": i}) for i in range(5)])
    j.record("selinux", "restored", n=0)
    assert j.count("selinux", "relabel") == 5 and j.count("selinux", "restored") == 1
    j.note("selinux", "relabel", n=5)
    assert j.count("selinux", "relabel") == 6
    assert Journal(j.path).count("selinux", "relabel") == 6
    j.remove()
    assert j.count("selinux", "relabel") == 0
    j.record("selinux", "relabel", n=0)
    assert j.count("selinux", "relabel") == 1


def test_a_journal_that_keeps_records_its_own_way_gets_every_batch() -> None:
    """A subclass overriding record() (the confinement report's in-memory journal) sees the
    batch calls as records too; nothing is written anywhere."""
    from vmconfine.report.build import MemoryJournal

    j = MemoryJournal()
    j.record_many([("dac", "chown", {"id": "a"}), ("dac", "chown", {"id": "b"})])
    j.note("dac", "remembered", id="a", ref=1)
    j.note_many([("dac", "restored", {"id": "a", "how": "kept"})])
    j.sync()
    seen: list[Any] = [(r["op"], r["id"]) for r in j.records("dac")]
    assert seen == [("chown", "a"), ("chown", "b"), ("remembered", "a"), ("restored", "a")]
    assert j.count("dac", "chown") == 2
    assert not j.path.exists()


def test_groups_of_rows_one_fsync_read_back_in_order(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """record_groups: one write and one fsync for every group, one line per group with the
    shared fields once; read back (here and by a fresh process) as one record per row, in the
    order written among plain records; groups() hands them over without a record per row."""
    j = Journal(tmp_path / "d.journal")
    j.record("pipeline", "begin")
    fsyncs = _fsyncs(monkeypatch)
    chain = [[f"id{i}", f"/img/l{i}", 0] for i in range(50)]
    j.record_groups("dac", "chown", ("id", "path", "uid"),
                    [({"role": "disk", "restore": True}, [["top", "/img/top", 7]]),
                     ({"role": "backing", "restore": False}, chain)])
    assert len(fsyncs) == 1
    j.note_rows("dac", "restored", ("id",), [["id0"], ["id1"]], same={"how": "kept"})
    j.note("dac", "remembered", id="top", ref=1)
    lines = j.path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[2])["same"] == {
        "driver": "dac", "op": "chown", "role": "backing", "restore": False}
    assert j.count("dac", "chown") == 51 and j.count("dac", "restored") == 2
    for reader in (j, Journal(j.path)):
        groups = reader.groups("dac", "chown")
        assert [len(rows) for _same, _keys, rows in groups] == [1, 50]
        assert groups[1][0]["restore"] is False and groups[1][1] == ("id", "path", "uid")
        assert reader.groups("dac", "remembered") == [
            ({"driver": "dac", "op": "remembered", "id": "top", "ref": 1}, (), [[]])]
        recs = reader.records()
        assert [r["op"] for r in recs] == ["begin"] + ["chown"] * 51 + ["restored"] * 2 + [
            "remembered"]
        assert recs[2] == {"driver": "dac", "op": "chown", "role": "backing", "restore": False,
                           "id": "id0", "path": "/img/l0", "uid": 0}
        assert reader.records("dac", "restored") == [
            {"driver": "dac", "op": "restored", "how": "kept", "id": f"id{i}"} for i in (0, 1)]


def test_a_torn_group_line_with_shared_fields_is_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "d.journal")
    j.record("pipeline", "begin")
    j.record_rows("dac", "chown", ("id",), [[str(i)] for i in range(20)], same={"role": "x"})
    j.close()
    text = j.path.read_text()
    j.path.write_text(text[:-15])  # the process died while writing the group
    fresh = Journal(j.path)
    assert [r["op"] for r in fresh.records()] == ["begin"] and fresh.groups("dac", "chown") == []
    fresh.record("pipeline", "end")  # appended after the cut, not glued onto the torn line
    assert [r["op"] for r in Journal(j.path).records()] == ["begin", "end"]


# ---- deferred_syncs: DAC's closing sync inside the pipeline's set_all_labels ----------------


def test_deferred_syncs_an_owed_sync_is_paid_by_the_next_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = _fsyncs(monkeypatch)
    j = Journal(tmp_path / "d.journal")
    with j.deferred_syncs():
        j.record("dac", "chown", path="/img")  # a record is durable at once, as always
        assert len(fsyncs) == 1
        j.note("dac", "remembered", id=1)
        j.sync()  # owed
        assert len(fsyncs) == 1
        j.record("cgroups", "mkdir", path="/sys/fs/cgroup/x")  # pays it: one fsync for both
        assert len(fsyncs) == 2
        j.note("namespaces", "view", entries=3)  # a note without a sync asked for
    assert len(fsyncs) == 2  # nothing owed at the end: no fsync of its own
    assert [r["op"] for r in Journal(j.path).records()] == ["chown", "remembered", "mkdir",
                                                            "view"]
    j.close()


def test_deferred_syncs_an_owed_sync_is_paid_at_the_end_of_the_outermost_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = _fsyncs(monkeypatch)
    j = Journal(tmp_path / "d.journal")
    j.record("dac", "chown", path="/img")
    with j.deferred_syncs():
        with j.deferred_syncs():
            j.note("dac", "remembered", id=1)
            j.sync()
        assert len(fsyncs) == 1  # the inner end is not the end
    assert len(fsyncs) == 2
    j.sync()  # paid: nothing left to sync
    assert len(fsyncs) == 2


def test_deferred_syncs_an_owed_sync_is_paid_when_the_block_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = _fsyncs(monkeypatch)
    j = Journal(tmp_path / "d.journal")
    with pytest.raises(RuntimeError), j.deferred_syncs():
        j.note("dac", "remembered", id=1)
        j.sync()
        raise RuntimeError("a driver failed")
    assert len(fsyncs) == 1
    j.close()
    assert len(fsyncs) == 1


def test_groups_by_op_and_note_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """groups_by_op hands over several ops' groups from one pass (plain records and group
    lines, in order); note_groups writes several groups in one write and no fsync."""
    j = Journal(tmp_path / "d.journal")
    j.record("dac", "chown", id="top", path="/img/top")
    j.record_rows("dac", "chown", ("id", "path"), [["l1", "/img/l1"], ["l2", "/img/l2"]],
                  same={"role": "backing"})
    j.note("dac", "remembered", id="top", ref=1)
    j.record("selinux", "chown", n=1)  # another driver's: not handed over
    fsyncs = _fsyncs(monkeypatch)
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: (writes.append(fd), real_write(fd, b))[1])
    j.note_groups("dac", "restored", ("id",), [({"how": "kept"}, [["l1"], ["l2"]]),
                                               ({"how": "xattr"}, [["top"]]),
                                               ({"how": "none"}, [])])
    assert fsyncs == [] and len(writes) == 1
    for reader in (j, Journal(j.path)):
        by_op = reader.groups_by_op("dac", ("chown", "remembered", "restored", "labelled"))
        assert by_op["labelled"] == []
        assert [len(rows) for _same, _keys, rows in by_op["chown"]] == [1, 2]
        assert by_op["chown"] == reader.groups("dac", "chown")
        assert by_op["remembered"] == reader.groups("dac", "remembered")
        assert {r["id"]: r["how"] for r in reader.records("dac", "restored")} == {
            "l1": "kept", "l2": "kept", "top": "xattr"}
