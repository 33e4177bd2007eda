"""Journal.sync_ahead: an fsync started early in a thread, on a descriptor of its own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vmconfine.launch.journal import Journal


def test_sync_ahead_syncs_in_the_background_and_leaves_the_journal_usable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = threading.Event()
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)
        done.set()

    monkeypatch.setattr(os, "fsync", fsync)
    j = Journal(tmp_path / "d.journal")
    j.sync_ahead()  # nothing written yet: nothing to sync
    j.note("pipeline", "begin", xml="<domain/>")
    j.sync_ahead()
    assert done.wait(30), "the background fsync never ran"
    assert synced == [os.stat(j.path).st_ino]
    # an early start only: the next durable record still syncs itself
    j.record("pipeline", "mkdir", path="/run/x")
    assert len(synced) == 2
    assert [r["op"] for r in Journal(j.path).records()] == ["begin", "mkdir"]
    j.note("pipeline", "labels", xml="<domain/>")
    j.sync_ahead()
    j.remove()  # the thread syncs its own duplicate: removal does not wait for it
    assert not j.path.exists()
