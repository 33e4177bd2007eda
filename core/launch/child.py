"""From fork to exec: the QEMU child process.

The parent forks; the child resets signal dispositions and mask, starts a session, points
stdin at /dev/null and stdout/stderr at the domain log, closes every inherited fd except the
descriptors vmconfine pre-opened for QEMU (sockets, chardev files), then runs the stack's
child hooks in libvirt's order (cgroup → namespace → exec label → identity →
capabilities → no_new_privs → confine) and execs QEMU. Any failure in the child is
written to a close-on-exec pipe, so the parent learns of it exactly when exec did not happen.

The cgroup v2 group the drivers name (``spawn_cgroup``) is not joined but born in: the process
is created inside it (:mod:`~.respawn`: ``CLONE_INTO_CGROUP``; from a parent with other
threads, the child makes a second process in it and exits). The child reports the pid that
will exec on a pipe; the parent journals it (``forked``) and only then lets it exec.
"""

from __future__ import annotations

import _signal  # signal.signal without the enum round trip of its result (~1 µs a call)
import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.errors import LaunchError, VmconfineError
from vmconfine.launch import respawn, runtime
from vmconfine.plugin.stack import CHILD_HOOKS

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.stack import Stack
    from vmconfine.qemu.argv import QemuCommand

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_SIGNALS = tuple(int(s) for s in signal.valid_signals())
_close_range = getattr(_libc, "close_range", None)  # glibc >= 2.34
if _close_range is not None:
    _close_range.argtypes = (ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
CLOSE_RANGE_CLOEXEC = 4


def spawn(stack: Stack, ctx: DomainContext, command: QemuCommand,
          passed: Mapping[str, int], log_path: Path, *, outlive: bool = False) -> int:
    """Fork; in the child apply every driver's child hooks in libvirt's order and exec QEMU
    with the pre-opened resources (``passed``: descriptor by name, see
    :mod:`vmconfine.launch.preopen`) as inherited fds. Returns QEMU's pid once it has exec'd
    (or raises with the child's own error message). Unless ``outlive``, QEMU gets SIGKILL
    when this process dies (``run``); a daemon's QEMUs outlive it and are reconnected."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(log_fd, f"{time.strftime('%Y-%m-%d %H:%M:%S')}: starting up\n"
                     f"{command.format_native()}\n".encode())
    fds = sorted({passed[p.name] for p in command.inherited})

    def forked(pid: int) -> None:
        # journal the child before it can exec (a parent-death signal is not enough: an exec
        # label change clears it), so a crash from here on is recovered by pid. Written, not
        # fsynced: a crash of vmconfine leaves the line readable (page cache), and a power
        # loss or kernel crash, which could lose it, ends QEMU too; every record of a change
        # to undo was made durable before that change
        ctx.pid = pid
        starttime = runtime.proc_starttime(pid)
        ctx.state["pipeline"]["starttime"] = starttime
        with contextlib.suppress(Exception):
            ctx.journal.note("pipeline", "forked", pid=pid, starttime=starttime)

    return fork_exec(command.argv(fds=passed), dict(command.env), fds, log_fd,
                     lambda hook: stack.run_child_hook(hook, ctx), forked,
                     stack.spawn_groups(ctx),
                     what=f"domain '{ctx.domain.name}': preparing the QEMU process",
                     outlive=outlive)


def spawn_helper(stack: Stack, ctx: DomainContext, helper: Helper, argv: list[str],
                 fds: list[int], log_fd: int, forked: Callable[[int], None], *,
                 env: Mapping[str, str] | None = None, outlive: bool = False) -> int:
    """Fork and exec a helper process of the domain (``swtpm``), confined through every
    driver's ``child_helper`` in the same steps as QEMU; ``forked(pid)`` journals it before it
    can exec. ``log_fd`` (closed here) becomes its stdout/stderr. The environment is
    ``LC_ALL=C``, a system ``PATH`` and ``env``."""
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
    return fork_exec(argv, env, fds, log_fd,
                     lambda hook: stack.run_helper_child(hook, ctx, helper), forked,
                     stack.spawn_groups(ctx),
                     what=f"domain '{ctx.domain.name}': preparing the {helper.name} process",
                     outlive=outlive)


def fork_exec(argv: list[str], env: dict[str, str], fds: list[int], log_fd: int,
              run_step: Callable[[str], None], forked: Callable[[int], None],
              groups: list[int], *, what: str, outlive: bool) -> int:
    """Fork (created in the cgroup v2 group ``groups[0]`` when there is one, the child
    entering the others); the child runs ``run_step(hook)`` for each of :data:`CHILD_HOOKS`
    (no_new_privs before ``child_confine``) and execs ``argv``; ``forked(pid)`` runs in the
    parent before the child can exec (the child waits for it). Returns the pid once it has
    exec'd, or raises with the child's error (prefixed by ``what``). ``log_fd`` and the
    ``groups`` descriptors are closed here."""
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)  # the child: the pid that will exec
    go_r, go_w = os.pipe2(os.O_CLOEXEC)  # the parent: journaled, exec now
    parent_pid = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or None: nothing buffered to duplicate
            stream.flush()
    pid = -1
    try:
        if groups:
            with contextlib.suppress(OSError):  # refused, or other threads: forked as usual
                pid = respawn.spawn_into(groups[0])
                os.close(groups.pop(0))  # the child was born in it
        if pid < 0:
            pid = os.fork()
    except BaseException:  # a signal handler's exception (^C), before any child exists
        for fd in (null_fd, err_r, err_w, pid_r, pid_w, go_r, go_w, log_fd, *groups):
            os.close(fd)
        raise
    if pid == 0:  # ---- child ----
        try:
            for fd in (err_r, pid_r, go_w):
                os.close(fd)
            _child(run_step, argv, env, fds, log_fd, null_fd, parent_pid, outlive, pid_w, go_r,
                   groups)
        except BaseException as exc:  # report to the parent, never return into its code
            msg = str(exc) if isinstance(exc, VmconfineError) else (
                f"{type(exc).__name__}: {exc}")
            if os.environ.get("VMCONFINE_DEBUG"):
                msg += "\n" + traceback.format_exc()
            with contextlib.suppress(OSError):
                os.write(err_w, msg.encode(errors="replace")[:65536])
        os._exit(127)
    # ---- parent ----
    for fd in (err_w, pid_w, go_r, log_fd, null_fd, *groups):
        os.close(fd)
    failure: BaseException | None = None
    try:
        try:
            report = os.read(pid_r, 32)
        finally:
            os.close(pid_r)
        final = int(report) if report.isdigit() else 0
        if final:
            try:
                forked(final)  # before the go: QEMU is journaled before it can exec
            except BaseException as exc:  # re-raised once the children are reaped
                failure = exc
            else:
                with contextlib.suppress(OSError):  # a child that died already: its error
                    os.write(go_w, b"g")           # follows on the error pipe
    finally:
        os.close(go_w)  # without the go, the child gives up before exec
    chunks = []
    while True:
        data = os.read(err_r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(err_r)
    if failure is not None or chunks or not final:
        status = 0
        for child_pid in {pid, final} - {0}:
            with contextlib.suppress(ChildProcessError):
                status = os.waitpid(child_pid, 0)[1]
        if failure is not None:
            raise failure
        if chunks:
            raise LaunchError(f"{what} failed: {b''.join(chunks).decode(errors='replace')}")
        raise LaunchError(f"{what}: the process died before exec (status "
                          f"{os.waitstatus_to_exitcode(status)})")
    if final != pid:  # the first child only made the process that exec'd: it has exited
        os.waitpid(pid, 0)
    # the exec is done: look /proc/PID up once at once. procfs gives a pid directory the
    # process's (new) SELinux context only when a lookup revalidates it, and a per-domain root
    # view binds the entry the child looked up before exec (the bind's root is never looked up
    # again): this lookup relabels that same inode for QEMU (docs/namespaces.md)
    with contextlib.suppress(OSError):
        os.stat(f"/proc/{final}")
    done, status = os.waitpid(final, os.WNOHANG)
    if done:  # died before exec without a word (e.g. killed)
        raise LaunchError(
            f"{what}: the process died before exec (status "
            f"{os.waitstatus_to_exitcode(status)})")
    return final


def _close_inherited(keep: set[int]) -> None:
    """Close every fd above 2 that would survive exec (inherited from whoever started
    vmconfine: an open /etc/shadow on fd 9 must not reach a confined QEMU), except ``keep``
    (made inheritable by the caller afterwards). Close-on-exec fds (the journal, the error
    pipe, drivers' pipes) stay usable until exec. One ``close_range(CLOSE_RANGE_CLOEXEC)``
    (Linux 5.11) marks them all; else each fd of ``/proc/self/fd`` is looked at."""
    if _close_range is not None and _close_range(3, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC) == 0:
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the fd of the listdir itself, already closed
        if not flags & fcntl.FD_CLOEXEC:
            os.close(fd)


def _child(run_step: Callable[[str], None], argv: list[str], env: dict[str, str],
           fds: list[int], log_fd: int, null_fd: int, parent_pid: int,
           outlive: bool, pid_w: int, go_r: int, groups: list[int]) -> None:
    """In the forked child: apply the confinement in libvirt's order, then exec."""
    for sig in _SIGNALS:  # QEMU starts with default dispositions, no mask
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    respawn.set_signal_mask(signal.SIG_SETMASK, respawn.NO_SIGNALS)
    os.setsid()  # a terminal's ^C goes to vmconfine, which asks the guest to power off
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _close_inherited(keep=set(fds))
    for fd in fds:
        os.set_inheritable(fd, True)
    _enter_groups(groups, pid_w)  # the cgroup v2 groups not born in, before child_cgroup
    for hook in CHILD_HOOKS:
        if hook == "child_confine":
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise LaunchError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno "
                                  f"{ctypes.get_errno()}")
        run_step(hook)
    # the identity switch cleared any parent-death signal: set it last, then make sure the
    # parent did not die before it took effect (or, for a QEMU that outlives its parent,
    # before it was journaled: the parent says so)
    if not outlive:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.read(go_r, 1) != b"g" or os.getppid() != parent_pid:
        raise LaunchError("vmconfine exited while the process was being prepared")
    os.execve(argv[0], argv, env)


def _enter_groups(groups: list[int], pid_w: int) -> None:
    """Enter the cgroup v2 groups the child was not created in (:func:`~.respawn.enter`) and
    report on ``pid_w`` the pid that will exec. A child that went on in a new process exits
    here; the new process starts a session of its own."""
    me = os.getpid()
    goes_on = respawn.enter(groups)
    if goes_on != os.getpid():  # the old process: the new one, in the groups, goes on
        os.write(pid_w, str(goes_on).encode())
        os._exit(0)
    if goes_on != me:
        os.setsid()
    else:
        os.write(pid_w, str(me).encode())
    os.close(pid_w)
