"""Journal.deferred_syncs: a closing sync inside the block is paid by the next durable record,
or at the block's end — never skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmconfine.launch.journal import Journal


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_an_owed_sync_is_paid_by_the_next_record(tmp_path: Path, fsyncs: list[int]) -> None:
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


def test_an_owed_sync_is_paid_at_the_end_of_the_outermost_block(
        tmp_path: Path, fsyncs: list[int]) -> None:
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


def test_an_owed_sync_is_paid_when_the_block_raises(tmp_path: Path, fsyncs: list[int]) -> None:
    j = Journal(tmp_path / "d.journal")
    with pytest.raises(RuntimeError), j.deferred_syncs():
        j.note("dac", "remembered", id=1)
        j.sync()
        raise RuntimeError("a driver failed")
    assert len(fsyncs) == 1
    j.close()
    assert len(fsyncs) == 1
