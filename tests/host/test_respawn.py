"""Processes created inside a cgroup v2 group (vmconfine.launch.respawn, child.fork_exec).

Real clone3(CLONE_INTO_CGROUP) on the host's cgroup2 mount: the exec'd program reports its own
cgroups and parent; from a single-threaded parent (created in the group), from a parent with
another thread (the child makes a second process in the group and exits), and a directory that
is no cgroup (refused: the start fails with the child's error, nothing left running).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require, require_root
from vmconfine.errors import LaunchError
from vmconfine.launch import child
from vmconfine_cgroups import placement

pytestmark = pytest.mark.host

REPORT = "cat /proc/self/cgroup; echo ppid $PPID; exec sleep 60"


@pytest.fixture(scope="module")
def group() -> Iterator[Path]:
    require_root()
    h = placement.detect()
    require(h.v2 is not None, "no cgroup2 mount")
    assert h.v2 is not None
    path = Path(placement.join(h.v2, h.self_v2, f"vmconfine-respawn-{os.getpid()}"))
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids ``os.fork`` returned in this test (the parent's side)."""
    made: list[int] = []
    real = os.fork

    def fork() -> int:
        pid = real()
        if pid:
            made.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return made


def run(tmp_path: Path, group_dir: Path) -> tuple[int, list[int], str]:
    """fork_exec ``sh -c REPORT`` created in ``group_dir``; (pid, forked() calls, its output)."""
    log = tmp_path / "out.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    groups = [os.open(group_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    forked: list[int] = []
    pid = child.fork_exec(["/bin/sh", "-c", REPORT], {}, [], log_fd, lambda hook: None,
                          forked.append, groups, what="probe", outlive=False)
    try:
        deadline = time.monotonic() + 30
        while "ppid" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return pid, forked, log.read_text()


def expect_in(group_dir: Path, out: str) -> None:
    v2 = [line.split(":", 2)[2] for line in out.splitlines() if line.startswith("0::")]
    assert v2 and v2[0].endswith("/" + group_dir.name), out
    assert f"ppid {os.getpid()}" in out  # vmconfine's own child, whichever way it was made


def test_created_in_the_group(tmp_path: Path, group: Path, forks: list[int]) -> None:
    pid, forked, out = run(tmp_path, group)
    assert forked == [pid]  # journaled before exec, the pid that exec'd
    assert forks == []  # clone3 into the group, no fork
    expect_in(group, out)


def test_created_in_the_group_from_a_parent_with_threads(tmp_path: Path, group: Path,
                                                         forks: list[int]) -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        pid, forked, out = run(tmp_path, group)
    finally:
        stop.set()
        other.join()
    assert forked == [pid]
    assert len(forks) == 1 and forks[0] != pid  # forked; the child made the process in it
    expect_in(group, out)


def test_a_directory_that_is_no_cgroup_fails_cleanly(tmp_path: Path) -> None:
    require_root()
    with pytest.raises(LaunchError, match=r"probe failed: .*cgroup\.procs"):
        run(tmp_path, tmp_path)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # every process it made was reaped
