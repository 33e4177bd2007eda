"""Start the kernel's cgroup-migration wait before the child needs the lock.

Moving a task into a cgroup (the child's writes to ``cgroup.procs`` in ``child_cgroup``) takes
the kernel's ``cgroup_threadgroup_rwsem`` for writing. Its writer side is an ``rcu_sync``: the
first writer after a quiet period waits for an RCU grace period (5-15 ms on the 2-CPU test
machine, 10-14 ms median in bench/p1_start.py's "migration wait" row) before it gets the lock;
a writer that comes while that wait is under way shares it, and one that comes within about one
more grace period after the last writer left does not wait at all. A bare ``posix_spawn`` of
QEMU pays none of this; libvirt's child pays all of it between fork and exec.

:func:`warm_up` lets the parent pay it in the background: a short-lived thread writes this
process into the cgroup it already is in (``0`` into its own ``cgroup.procs``: a move to where
it is, which changes nothing and still takes the lock) while the parent goes on preparing the
domain. When the child writes itself into the domain's cgroups a few milliseconds later, the
wait is over or nearly so (measured on this machine: a write 10-20 ms after the warm-up one
took 0.08 ms instead of 9 ms). Nothing depends on it: when the warm-up comes too early, too
late or fails (no write access, another cgroup layout), the child waits as before.

The driver starts it at the end of ``set_all_labels``, after its mkdirs and the BPF attach: the
kernel holds ``cgroup_mutex`` through the whole wait, and every cgroupfs mkdir and program
attach needs that mutex too (a warm-up started at ``preflight`` made them wait for it; in sum
that was slower). The child's move comes a few milliseconds later (fork, the child's first
steps), so it waits for what is left of the grace period instead of all of it.

The own placement is read from ``/proc/self/cgroup`` just before the thread starts, so the
write names the cgroup the process is in (a failed write is ignored). A write of a pid that
does not exist does not warm the lock (the kernel looks the pid up before it locks), hence the
write of the process itself.
"""

from __future__ import annotations

import _thread
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")


def own_procs_file(mount: str, controller: str | None) -> str | None:
    """``cgroup.procs`` of the cgroup this process is in, in the hierarchy mounted at ``mount``:
    the cgroup v2 one when ``controller`` is None, else the v1 one holding ``controller``."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _num, ctrls, path = parts
        if (ctrls == "") if controller is None else (controller in ctrls.split(",")):
            return os.path.normpath(f"{mount}/{path.strip('/')}/cgroup.procs")
    return None


def _write_self(path: str) -> None:
    """The thread: only system calls, which run without the GIL."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"0")
    except OSError:
        pass
    finally:
        os.close(fd)


def warm_up(mount: str, controller: str | None) -> bool:
    """Start the warm-up write in a thread of its own (see the module docstring); False when
    there is nothing to write to. The thread is started without waiting for it to run
    (``_thread``: ``threading.Thread.start`` waits until the new thread has been scheduled,
    which on a busy machine costs the caller milliseconds)."""
    path = own_procs_file(mount, controller)
    if path is None:
        return False
    _thread.start_new_thread(_write_self, (path,))
    return True
