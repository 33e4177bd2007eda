"""Processes created inside their cgroup v2 group (``clone3`` with ``CLONE_INTO_CGROUP``).

Joining a group by writing ``cgroup.procs`` takes the kernel's cgroup migration lock
(``cgroup_threadgroup_rwsem``) for writing; its first writer after a quiet period waits for an
RCU grace period (5-15 ms on the 2-CPU test machine, longer when the CPUs are busy) and holds
``cgroup_mutex`` while it waits. A process *created* in the group takes no such lock: that is
why a bare ``posix_spawn`` of QEMU pays nothing of it.

:func:`spawn_into` is ``os.fork`` with ``CLONE_INTO_CGROUP``: ``clone3`` called through ctypes
without releasing the GIL, between ``PyOS_BeforeFork`` and ``PyOS_AfterFork_Child`` /
``_Parent`` as ``os.fork`` does, with every signal blocked and the pending Python handlers run
first (no handler of the parent's can run in the child before the child resets them). Only
in a process with a single thread: glibc's ``fork`` also resets locks another thread may hold
(malloc's), which a raw ``clone3`` cannot. A parent with other threads forks as usual, and the
single-threaded child calls :func:`enter`: ``CLONE_PARENT | CLONE_INTO_CGROUP`` makes a second
process, vmconfine's child too, that goes on in the group while the first one exits (one more
copy of the address space, 2-3 ms here, against the grace period). Where the kernel refuses
(``ENOSYS`` before 5.7, ``EBUSY`` for a group with controllers enabled below it...), the child
joins by writing ``cgroup.procs``; the membership is the same every way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Iterable

CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 0x200000000
#: the same number on every architecture (added after the syscall tables were unified)
SYS_CLONE3 = 435


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


# loaded in the parent, at import: a child must not load libraries (see child_namespace)
_syscall = ctypes.PyDLL(None, use_errno=True).syscall  # PyDLL: the GIL stays held
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_check_signals = ctypes.pythonapi.PyErr_CheckSignals  # raises what a handler raised
_pthread_sigmask = ctypes.CDLL(None).pthread_sigmask
_SIGSET_SIZE = 128  # glibc's sigset_t: 1024 bits
#: raw ``sigset_t`` masks for :func:`set_signal_mask` (glibc keeps its own internal signals)
ALL_SIGNALS = b"\xff" * _SIGSET_SIZE
NO_SIGNALS = bytes(_SIGSET_SIZE)


def _clone3(flags: int, exit_signal: int, cgroup_fd: int) -> int:
    if len(os.listdir("/proc/self/task")) != 1:
        raise OSError(errno.EBUSY, "clone into a cgroup needs a single-threaded process")
    args = _CloneArgs(flags=flags, exit_signal=exit_signal, cgroup=cgroup_fd)
    _before_fork()
    pid = _syscall(SYS_CLONE3, ctypes.addressof(args), ctypes.sizeof(args))
    if pid == 0:
        _after_child()
        return 0
    err = ctypes.get_errno()
    _after_parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def set_signal_mask(how: int, mask: bytes) -> bytes:
    """``pthread_sigmask`` on a raw ``sigset_t`` (:data:`ALL_SIGNALS`, :data:`NO_SIGNALS` or
    a mask it returned); returns the previous one. ``signal.pthread_sigmask`` turns both masks
    into sets of ``Signals`` members, 80 µs a call here."""
    new = ctypes.create_string_buffer(mask, _SIGSET_SIZE)
    old = ctypes.create_string_buffer(_SIGSET_SIZE)
    err = _pthread_sigmask(how, new, old)
    if err:
        raise OSError(err, os.strerror(err))
    return old.raw


def spawn_into(cgroup_fd: int) -> int:
    """``os.fork`` into the cgroup v2 group ``cgroup_fd`` names: 0 in the child, its pid in
    the parent. The child starts with every signal blocked (it resets dispositions, then the
    mask). Raises OSError when the kernel refuses or the process has other threads (fork as
    usual then)."""
    old = set_signal_mask(signal.SIG_BLOCK, ALL_SIGNALS)
    try:
        _check_signals()  # handlers of signals that came before the block run here, once
        pid = _clone3(CLONE_INTO_CGROUP, signal.SIGCHLD, cgroup_fd)
    except BaseException:
        set_signal_mask(signal.SIG_SETMASK, old)
        raise
    if pid:
        set_signal_mask(signal.SIG_SETMASK, old)
    return pid


def clone_into(cgroup_fd: int) -> int:
    """In a single-threaded forked child: ``clone3(CLONE_PARENT | CLONE_INTO_CGROUP)``, 0 in
    the new process (born in the group, a child of the caller's parent), its pid in the
    caller. Raises OSError when the kernel refuses."""
    return _clone3(CLONE_PARENT | CLONE_INTO_CGROUP, 0, cgroup_fd)


def join(cgroup_fd: int) -> None:
    """Move the calling process into the cgroup v2 group ``cgroup_fd`` names (a write of
    ``cgroup.procs``: waits for the migration lock)."""
    fd = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=cgroup_fd)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def enter(groups: Iterable[int]) -> int:
    """In a forked, single-threaded child: be in every cgroup v2 group of ``groups`` (their
    directory descriptors, closed here). The first is entered by creating a new process in it
    (:func:`clone_into`) when the kernel allows; the others, and the first when it does not,
    by writing ``cgroup.procs``. Returns the pid of the process that goes on: the caller's own
    (it was not re-created, or it is the new process), else the new one's (the caller reports
    it and exits)."""
    fds = list(groups)
    try:
        if fds:
            for fd in fds[1:]:
                join(fd)
            try:
                pid = clone_into(fds[0])
            except OSError:
                join(fds[0])
            else:
                if pid:
                    return pid
        return os.getpid()
    finally:
        for fd in fds:
            os.close(fd)
