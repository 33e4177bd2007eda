"""The cgroups driver's warm-up of the kernel's migration lock (vmconfine_cgroups.warm)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmconfine_cgroups import warm

PROC_SELF_CGROUP = """\
12:pids:/user.slice
4:cpu,cpuacct:/vmconfine.slice/x
1:name=systemd:/user.slice/session-1.scope
0::/user.slice/session-1.scope
"""


@pytest.fixture
def own_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(PROC_SELF_CGROUP)
    monkeypatch.setattr(warm, "PROC_CGROUP", path)
    return path


def test_own_cgroup_procs_file_per_hierarchy(own_cgroup: Path) -> None:
    assert warm.own_procs_file("/sys/fs/cgroup/unified", None) == \
        "/sys/fs/cgroup/unified/user.slice/session-1.scope/cgroup.procs"
    assert warm.own_procs_file("/sys/fs/cgroup/cpu,cpuacct", "cpuacct") == \
        "/sys/fs/cgroup/cpu,cpuacct/vmconfine.slice/x/cgroup.procs"
    assert warm.own_procs_file("/sys/fs/cgroup/memory", "memory") is None  # not mounted


def test_warm_up_writes_this_process_into_its_own_cgroup(own_cgroup: Path,
                                                          tmp_path: Path) -> None:
    mount = tmp_path / "pids"
    procs = mount / "user.slice" / "cgroup.procs"
    procs.parent.mkdir(parents=True)
    procs.write_text("")
    assert warm.warm_up(str(mount), "pids")
    deadline = time.monotonic() + 30
    while procs.read_text() != "0" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procs.read_text() == "0"  # "0": the writer itself, into where it already is
    # a hierarchy this process is not in: nothing to write, no thread
    assert not warm.warm_up(str(tmp_path / "memory"), "memory")
    # a file that cannot be opened: the thread gives up quietly
    assert warm.warm_up(str(tmp_path / "gone"), "pids")
