"""Running-domain state of an instance: locks, status files, ids, process identity.

A supervising vmconfine process holds an exclusive ``flock`` on ``<run>/<name>.lock`` for the
domain's whole life (the fd is close-on-exec, so QEMU never inherits it). Any other process can
tell a live supervisor from a crashed one by trying that lock: if it can take it, the supervisor
is gone and the journal left behind must be finished (see :mod:`vmconfine.launch.pipeline`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmconfine.config.instance import Instance
from vmconfine.errors import VmconfineError


def proc_starttime(pid: int) -> int | None:
    """The process start time (clock ticks since boot) of ``pid``, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[19])


def proc_status(pid: int | str) -> dict[str, str]:
    """``/proc/PID/status`` as ``{field: value}`` (raises OSError when the process is gone)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def same_process(pid: int | None, starttime: int | None) -> bool:
    """True when ``pid`` still names the process that started at ``starttime``."""
    if not pid:
        return False
    try:  # one read: the process may be gone (and reaped) between two
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return False
    return starttime is None or int(fields[19]) == starttime


def write_atomic(path: Path, data: str, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` at once (readers see the old or the new file).

    ``durable=False`` leaves out the ``fsync``: for the run directory's per-boot state (the
    status XML, the domain id counter), which no reboot outlives in meaning — a crash of
    vmconfine leaves the page cache to the next reader, and a crash of the machine ends every
    domain the files describe (readers treat them as stale). The fsync cost 0.2-60 ms per
    start where the run directory is on a disk, not tmpfs (docs/performance.md, P1).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data.encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def instance_lock(instance: Instance) -> Iterator[None]:
    """Serialise state changes of the instance (start checks, ids, status rewrites)."""
    instance.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(instance.instance_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class DomainLock:
    """The supervisor's lifetime lock on one domain name."""

    def __init__(self, instance: Instance, name: str) -> None:
        self.path = instance.lock_path(name)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # the holder may have unlinked the file between our open and our flock: a lock on
            # a file that is no longer at the path protects nothing, try the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)
        return False

    def release(self, *, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def supervisor_alive(instance: Instance, name: str) -> bool:
    """True when some process holds the domain's lifetime lock."""
    path = instance.lock_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass
class DomainRecord:
    """What ``list`` knows about a domain: from its status file and journal."""

    name: str
    status_path: Path
    journal_path: Path
    alive: bool


def known_domains(instance: Instance) -> list[DomainRecord]:
    """Every domain with a status file or a journal in the instance's run dir."""
    if not instance.run_dir.is_dir():
        return []
    names: set[str] = set()
    for p in instance.run_dir.iterdir():
        if p.name.startswith("."):
            continue
        if p.suffix in (".xml", ".journal"):
            names.add(p.stem)
    return [
        DomainRecord(
            n,
            instance.status_path(n),
            instance.journal_path(n),
            supervisor_alive(instance, n),
        )
        for n in sorted(names)
    ]


def next_domain_id(instance: Instance) -> int:
    """libvirt-style increasing domain ids (call under :func:`instance_lock`, which every
    reader and writer of the counter holds).

    The counter is rewritten in place, one short ``pwrite`` (a killed process leaves the old
    or the new value; anything unreadable starts again at 1, as after a reboot): replacing it
    by a rename made ext4 write the new file out at once (``auto_da_alloc``), 0.2-0.8 ms per
    start where the run directory is on a disk (an embed root)."""
    fd = os.open(instance.run_dir / ".next_id", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            value = int(os.pread(fd, 64, 0).strip() or b"1")
        except ValueError:
            value = 1
        data = f"{value + 1}\n".encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return value


def kill_process(pid: int, starttime: int | None, timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL ``pid`` if it still is the process that started at ``starttime``."""
    for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
        if not same_process(pid, starttime):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not same_process(pid, starttime):
                return
            try:  # reap it when it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
    if same_process(pid, starttime):
        raise VmconfineError(f"QEMU process {pid} does not die after SIGKILL")
