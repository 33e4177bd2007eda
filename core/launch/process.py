"""A started QEMU process as its parent sees it: exit watched through a pidfd, its log.

The parent (``run``'s supervising process) is QEMU's parent, so it reaps it: the pidfd becomes
readable when QEMU exits, :meth:`QemuProcess.watch` then ``waitpid``\\ s it and sets
:attr:`QemuProcess.exited`. Both the start sequence (QMP handshake raced against exit) and the
supervisor (waiting for the guest) use the same watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from vmconfine.launch import runtime
from vmconfine.sanitize import decode

LOG_TAIL_LINES = 8


class QemuProcess:
    """QEMU's pid and start time (its identity), and its exit once watched."""

    def __init__(self, pid: int, starttime: int | None) -> None:
        self.pid = pid
        self.starttime = starttime
        self.exited = asyncio.Event()
        self.wait_status: int | None = None
        self._pidfd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap QEMU when it exits and set :attr:`exited` (on ``loop``)."""
        pidfd = os.pidfd_open(self.pid)
        self._pidfd, self._loop = pidfd, loop

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # already reaped by kill()
                status = self.wait_status if self.wait_status is not None else 0
            self.wait_status = status
            self.exited.set()

        loop.add_reader(pidfd, on_exit)

    @property
    def exit_code(self) -> int | None:
        """``waitstatus_to_exitcode`` of the reaped QEMU (negative: killed by that signal)."""
        return None if self.wait_status is None else os.waitstatus_to_exitcode(self.wait_status)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL, if QEMU is still the process that started (never another
        process that reused the pid)."""
        runtime.kill_process(self.pid, self.starttime)

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if self._pidfd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """QEMU's last lines of the current run (after its command line), joined by " | "."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read()
    except OSError:
        return ""
    # split on line feeds only: a guest's \r or ESC sequence is shown escaped, never obeyed
    all_lines = data.split(b"\n")
    starts = [i for i, ln in enumerate(all_lines) if ln.rstrip(b"\r").endswith(b": starting up")]
    if starts:
        all_lines = all_lines[starts[-1] + 2:]  # skip the marker and the command line
    tail = [decode(ln.rstrip(b"\r")) for ln in all_lines if ln.strip()][-lines:]
    return " | ".join(tail)
