"""cgroup file primitives, and the v1 ``devices`` controller.

v1 device filtering writes libvirt's rule strings: ``a`` to ``devices.deny`` (deny all), then one
``devices.allow`` line per effective rule; ``devices.list`` is read back to verify the kernel
holds exactly that allow-list.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from pathlib import Path

from vmconfine_cgroups.rules import DeviceRule, effective

PROCS = "cgroup.procs"
TASKS = "tasks"


def write(path: str | Path, value: str) -> None:
    """Write one value to a cgroup file (a single write(2), as the kernel expects)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str | Path) -> str:
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read()


#: errnos of a group that is gone or being removed: ENOENT once its directory is unlinked,
#: ENODEV for a file of it opened before (another process's rmdir got there first)
GONE = (errno.ENOENT, errno.ENODEV)


def procs(cgroup_dir: str) -> list[int]:
    """Pids in ``cgroup_dir`` (empty when it does not exist or is being removed)."""
    try:
        return [int(x) for x in read(Path(cgroup_dir, PROCS)).split()]
    except OSError as exc:
        if exc.errno in GONE:
            return []
        raise


def add_self(cgroup_dir: str) -> None:
    """Move the calling process into ``cgroup_dir`` ("0" = the writer)."""
    write(Path(cgroup_dir, PROCS), "0")


def add_thread(cgroup_dir: str) -> None:
    """Move the calling thread into the v1 group ``cgroup_dir`` (``tasks``, "0" = the writer).
    For a single-threaded process (a forked child) that is the whole process; unlike a write
    of ``cgroup.procs``, the kernel does not take its global migration lock for it (whose
    first writer waits for an RCU grace period)."""
    write(Path(cgroup_dir, TASKS), "0")


def add_pid(cgroup_dir: str, pid: int) -> None:
    write(Path(cgroup_dir, PROCS), str(pid))


def copy_cpuset(cgroup_dir: str) -> None:
    """A new v1 cpuset cgroup starts with no cpus/mems; inherit its parent's."""
    parent = os.path.dirname(cgroup_dir)
    for name in ("cpuset.cpus", "cpuset.mems"):
        dst = os.path.join(cgroup_dir, name)
        try:  # a file that is not there (no cpuset, a parent gone) is left alone
            if _read_bytes(dst).strip():
                continue
            value = _read_bytes(os.path.join(parent, name)).strip()
        except FileNotFoundError:
            continue
        if value:
            write(dst, value.decode("ascii", "replace"))


def _read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def rmdir(cgroup_dir: str, wait: float = 2.0) -> str | None:
    """Remove a cgroup directory once it is empty.

    Returns None when it is gone (or was never there), else why it stays (processes or child
    groups); never raises. Exited processes can linger for a moment, so a busy group is
    retried for up to ``wait`` seconds while it has no live process left. A shared parent
    (``vmconfine/<instance>``) can be removed by another domain's teardown between the
    refused rmdir and the look at what it holds: gone is gone, not an error.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(cgroup_dir)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                return f"{cgroup_dir}: {exc.strerror}"
            try:
                pids = procs(cgroup_dir)
                children = [e.name for e in os.scandir(cgroup_dir) if e.is_dir()]
            except OSError as err:
                if err.errno not in GONE:
                    return f"{cgroup_dir}: {err.strerror}"
                if not os.path.isdir(cgroup_dir):
                    return None
                pids, children = [], []  # being removed: the next rmdir tells
            if children:
                return f"{cgroup_dir} still has child groups ({', '.join(sorted(children))})"
            if time.monotonic() >= deadline:
                if pids:
                    listed = " ".join(str(p) for p in pids[:10])
                    return f"{cgroup_dir} still holds processes {listed}"
                return f"{cgroup_dir}: {exc.strerror}"
            time.sleep(0.02)


# -- v1 devices controller ----------------------------------------------------------------------
def deny_all(cgroup_dir: str) -> None:
    write(Path(cgroup_dir, "devices.deny"), "a")


def allow(cgroup_dir: str, line: str) -> None:
    write(Path(cgroup_dir, "devices.allow"), line)


def deny(cgroup_dir: str, line: str) -> None:
    write(Path(cgroup_dir, "devices.deny"), line)


def read_list(cgroup_dir: str) -> list[str]:
    """The kernel's current allow-list (``devices.list``)."""
    return [ln.strip() for ln in read(Path(cgroup_dir, "devices.list")).splitlines()
            if ln.strip()]


def apply(cgroup_dir: str, rules: Iterable[DeviceRule]) -> None:
    """Deny everything, then allow each effective rule."""
    deny_all(cgroup_dir)
    for rule in effective(rules):
        allow(cgroup_dir, rule.text())


def differences(cgroup_dir: str, rules: Iterable[DeviceRule]) -> list[str]:
    """What ``devices.list`` holds that differs from ``rules`` (empty = exactly as asked)."""
    want = {r.key: r.access for r in effective(rules)}
    try:
        lines = read_list(cgroup_dir)
    except OSError as exc:
        return [f"cannot read {cgroup_dir}/devices.list: {exc.strerror}"]
    have: dict[tuple[str, int | None, int | None], str] = {}
    for line in lines:
        try:
            rule = DeviceRule.parse(line)
        except ValueError:
            return [f"{cgroup_dir}/devices.list has an unreadable line {line!r}"]
        have[rule.key] = rule.access
    out = []
    for key, access in have.items():
        if want.get(key) != access:
            shown = DeviceRule(key[0], key[1], key[2], access).text()
            out.append(f"devices.list allows {shown!r}, expected "
                       f"{want.get(key) or 'nothing'} for it")
    for key, access in want.items():
        if key not in have:
            out.append(f"devices.list lacks {DeviceRule(key[0], key[1], key[2], access).text()!r}")
    return out
