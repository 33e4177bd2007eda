"""The launch pipeline: the one path every driver hooks into.

start: parse + validate → check seclabel models → resolve backing chains → gen labels → build
argv → preflight → set all labels (transaction with rollback, journaled) → monitor sockets →
fork → child: cgroup → exec label → identity → capabilities → no_new_privs → confine → exec
QEMU → QMP handshake → verify the confinement the kernel reports (fail closed) → status XML →
guest CPUs start.

stop (any cause): kill QEMU if needed → restore all labels → release labels → remove runtime
dir, status and journal. Each host change is journaled before it is made, so
:meth:`vmconfine.config.connection.Connection.recover` can finish a teardown after a crash.

``VMCONFINE_PAUSE_AT=STEP`` stops the pipeline at STEP (it prints ``paused at STEP`` on stderr and
sleeps) so tests can SIGKILL vmconfine at every step. Steps: see :data:`STEPS`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.domain.chain import resolve_chain
from vmconfine.errors import LaunchError, VmconfineError
from vmconfine.launch import runtime
from vmconfine.launch.journal import Journal
from vmconfine.plugin.context import DomainContext
from vmconfine.plugin.stack import CHILD_HOOKS
from vmconfine.qemu.argv import CommandPaths, QemuCommand, build_command

if TYPE_CHECKING:
    from vmconfine.config.connection import Connection
    from vmconfine.domain import Domain
    from vmconfine.plugin.stack import Stack

log = logging.getLogger(__name__)

STEPS = ("begin", "labels", "preflight", "set-labels", "sockets", "forked", "qmp", "verified",
         "running")
PAUSE_ENV = "VMCONFINE_PAUSE_AT"
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def checkpoint(step: str) -> None:
    """Pause here when VMCONFINE_PAUSE_AT names this step (for crash tests)."""
    if os.environ.get(PAUSE_ENV) == step:
        sys.stderr.write(f"vmconfine: paused at {step}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


@dataclass
class Launched:
    """A started domain, supervised by this process."""

    ctx: DomainContext
    command: QemuCommand
    pid: int
    starttime: int | None
    domain_id: int
    lock: runtime.DomainLock
    log_path: Path
    monitor_socks: list[socket.socket] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.ctx.domain.name


def command_paths(conn: Connection, domain: Domain, *, symbolic: bool) -> CommandPaths:
    inst = conn.instance
    return CommandPaths(
        monitor_socket=str(inst.monitor_path(domain.name)),
        home_dir=str(inst.domain_lib_dir(domain.name)),
        runtime_dir=str(inst.domain_run_dir(domain.name)),
        user=_qemu_user_name(conn),
        path_env="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        user_monitor_socket=str(inst.user_monitor_path(domain.name)),
    )


def _qemu_user_name(conn: Connection) -> str:
    import pwd

    if not conn.instance.privileged:
        try:
            return pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            return str(os.getuid())
    user = conn.instance.config.user
    if user.startswith("+"):
        with contextlib.suppress(KeyError, ValueError):
            return pwd.getpwuid(int(user[1:])).pw_name
        return user[1:]
    return user


def prepare_domain(conn: Connection, domain: Domain) -> None:
    """Validation that changes nothing: seclabel models, driver checks, backing chains."""
    conn.stack.check_models(domain)
    conn.stack.verify(domain)
    for disk in domain.disks:
        if disk.source is not None and disk.type in ("file", "block"):
            resolve_chain(disk.source)


def native_command(conn: Connection, domain: Domain) -> QemuCommand:
    """What ``domxml-to-native`` prints: the argv ``run`` would execute, per-start values
    shown symbolically."""
    prepare_domain(conn, domain)
    return build_command(domain, conn.instance.config, command_paths(conn, domain, symbolic=True),
                         symbolic=True)


# ------------------------------------------------------------------------------------------------
# start
# ------------------------------------------------------------------------------------------------


def start(conn: Connection, domain: Domain, *, paused: bool = False) -> Launched:
    """Start ``domain`` confined; return once QEMU's confinement is verified (and its CPUs run
    unless ``paused``). On any failure everything done so far is undone before raising."""
    inst = conn.instance
    inst.ensure_dirs()
    stack = conn.stack
    prepare_domain(conn, domain)
    lock = runtime.DomainLock(inst, domain.name)
    journal = Journal(inst.journal_path(domain.name))
    with runtime.instance_lock(inst):
        for other in conn.running():
            if other.name == domain.name:
                raise LaunchError(f"domain '{domain.name}' is already running (id {other.id})")
            if other.domain.uuid == domain.uuid:
                raise LaunchError(
                    f"domain '{domain.name}' has the same UUID {domain.uuid} as running "
                    f"domain '{other.name}'; give it another <uuid>"
                )
        for name, uuid in _starting(conn):
            if name != domain.name and uuid == domain.uuid:
                raise LaunchError(
                    f"domain '{domain.name}' has the same UUID {domain.uuid} as domain "
                    f"'{name}', which is starting; give it another <uuid>"
                )
        if not lock.try_acquire():
            raise LaunchError(f"domain '{domain.name}' is being started by another process")
        domain_id = runtime.next_domain_id(inst)
        from vmconfine.launch.supervisor import destroy_marker

        destroy_marker(conn, domain.name).unlink(missing_ok=True)  # a stale one from before
        try:
            # written under the instance lock, so a concurrent start sees this UUID
            journal.record("pipeline", "begin", xml=domain.to_xml(), supervisor=os.getpid(),
                           id=domain_id, uuid=domain.uuid, stack=stack.names())
        except BaseException:
            lock.release()
            raise
    ctx = DomainContext(conn.host, domain, journal)
    if domain.qemu_args or domain.qemu_env:
        ctx.taint("custom-argv")
        log.warning("domain %s is tainted: custom-argv (custom configuration parameters "
                    "specified)", domain.name)
    labels_generated = False
    launched: Launched | None = None
    try:
        checkpoint("begin")
        stack.gen_labels(ctx)
        labels_generated = True
        journal.record("pipeline", "labels", xml=domain.to_xml(live=True))
        checkpoint("labels")
        command = build_command(domain, inst.config, command_paths(conn, domain, symbolic=False))
        ctx.state["pipeline"] = {"command": command}
        stack.preflight(ctx)
        checkpoint("preflight")
        _make_runtime_dirs(ctx)
        stack.set("set_all_labels", ctx)
        checkpoint("set-labels")
        socks = _monitor_sockets(stack, ctx)
        checkpoint("sockets")
        log_path = inst.log_path(domain.name)
        pid = _fork_exec(stack, ctx, command, socks, log_path)
        starttime = ctx.state["pipeline"]["starttime"]
        journal.record("pipeline", "started", pid=pid, starttime=starttime)
        launched = Launched(ctx, command, pid, starttime, domain_id, lock, log_path, socks)
        checkpoint("forked")
        return launched
    except BaseException as exc:
        if ctx.pid is not None:
            from vmconfine.config.connection import kill_process

            kill_process(ctx.pid, ctx.state.get("pipeline", {}).get("starttime"))
        errors = teardown(stack, ctx, labels_generated=labels_generated)
        lock.release()
        if errors:
            log.error("teardown after failed start left problems: %s", "; ".join(errors))
        if isinstance(exc, VmconfineError):
            raise
        if isinstance(exc, OSError):
            raise LaunchError(f"starting domain '{domain.name}' failed: {exc}") from exc
        raise


def _starting(conn: Connection) -> list[tuple[str, str]]:
    """(name, uuid) of domains whose supervisor is alive but that have no status yet."""
    out = []
    for rec in runtime.known_domains(conn.instance):
        if not rec.alive or rec.status_path.exists() or not rec.journal_path.exists():
            continue
        begin = Journal(rec.journal_path).last("pipeline", "begin")
        if begin and begin.get("uuid"):
            out.append((rec.name, str(begin["uuid"])))
    return out


def _make_runtime_dirs(ctx: DomainContext) -> None:
    inst = ctx.instance
    for d in (inst.domain_run_dir(ctx.domain.name), inst.domain_lib_dir(ctx.domain.name)):
        if d.exists():
            shutil.rmtree(d)
        ctx.journal.record("pipeline", "mkdir", path=str(d))
        d.mkdir(mode=0o750, parents=True)


def _monitor_sockets(stack: Stack, ctx: DomainContext) -> list[socket.socket]:
    """Create the listening QMP sockets in the parent; QEMU gets them as fds."""
    inst = ctx.instance
    stack.set("set_socket_label", ctx)
    try:
        socks = []
        for path in (inst.monitor_path(ctx.domain.name), inst.user_monitor_path(ctx.domain.name)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            s.bind(str(path))
            os.chmod(path, 0o600)
            s.listen(8)
            socks.append(s)
        return socks
    finally:
        stack.restore("clear_socket_label", ctx)


def _fork_exec(stack: Stack, ctx: DomainContext, command: QemuCommand,
               socks: list[socket.socket], log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(log_fd, f"{time.strftime('%Y-%m-%d %H:%M:%S')}: starting up\n"
                     f"{command.format_native()}\n".encode())
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    fds = [s.fileno() for s in socks]
    argv = command.argv(fds=fds)
    env = dict(command.env)
    parent_pid = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or None: nothing buffered to duplicate
            stream.flush()
    pid = os.fork()
    if pid == 0:  # ---- child ----
        try:
            os.close(err_r)
            _child(stack, ctx, argv, env, fds, log_fd, null_fd, parent_pid)
        except BaseException as exc:  # report to the parent, never return into its code
            msg = str(exc) if isinstance(exc, VmconfineError) else (
                f"{type(exc).__name__}: {exc}")
            if os.environ.get("VMCONFINE_DEBUG"):
                msg += "\n" + traceback.format_exc()
            with contextlib.suppress(OSError):
                os.write(err_w, msg.encode(errors="replace")[:65536])
        os._exit(127)
    # ---- parent ----
    # journal the child before it can exec (a parent-death signal is not enough: an exec
    # label change clears it), so a crash from here on is recovered by pid
    ctx.pid = pid
    starttime = runtime.proc_starttime(pid)
    ctx.state["pipeline"]["starttime"] = starttime
    with contextlib.suppress(Exception):
        ctx.journal.record("pipeline", "forked", pid=pid, starttime=starttime)
    os.close(err_w)
    os.close(log_fd)
    os.close(null_fd)
    chunks = []
    while True:
        data = os.read(err_r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(err_r)
    if chunks:
        os.waitpid(pid, 0)
        raise LaunchError(
            f"domain '{ctx.domain.name}': preparing the QEMU process failed: "
            f"{b''.join(chunks).decode(errors='replace')}"
        )
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:  # died before exec without a word (e.g. killed)
        raise LaunchError(
            f"domain '{ctx.domain.name}': the QEMU process died before exec "
            f"(status {os.waitstatus_to_exitcode(status)})")
    return pid


def _close_inherited(keep: set[int]) -> None:
    """Close every fd above 2 that would survive exec (inherited from whoever started
    vmconfine: an open /etc/shadow on fd 9 must not reach a confined QEMU), except ``keep``.
    Close-on-exec fds (the journal, the error pipe, drivers' pipes) stay usable until exec."""
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


def _child(stack: Stack, ctx: DomainContext, argv: list[str], env: dict[str, str],
           fds: list[int], log_fd: int, null_fd: int, parent_pid: int) -> None:
    """In the forked child: apply the confinement in libvirt's order, then exec QEMU."""
    for sig in signal.valid_signals():  # QEMU starts with default dispositions, no mask
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.setsid()  # a terminal's ^C goes to vmconfine, which asks the guest to power off
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _close_inherited(keep=set(fds))
    for fd in fds:
        os.set_inheritable(fd, True)
    for hook in CHILD_HOOKS:
        if hook == "child_confine":
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise LaunchError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno "
                                  f"{ctypes.get_errno()}")
        stack.run_child_hook(hook, ctx)
    # the identity switch cleared any parent-death signal: set it last, then make sure the
    # parent did not die before it took effect
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise LaunchError("vmconfine exited while QEMU was being prepared")
    os.execve(argv[0], argv, env)


# ------------------------------------------------------------------------------------------------
# verification and teardown
# ------------------------------------------------------------------------------------------------


def core_checks(pid: int) -> list[str]:
    """What the pipeline itself guarantees: no_new_privs is set on QEMU."""
    try:
        nnp = runtime.proc_status(pid).get("NoNewPrivs")
    except OSError as exc:
        return [f"cannot read /proc/{pid}/status: {exc}"]
    if nnp is None:
        return ["NoNewPrivs missing from /proc/PID/status"]
    return [] if nnp == "1" else ["NoNewPrivs is 0, expected 1"]


def teardown(stack: Stack, ctx: DomainContext, *, labels_generated: bool = True) -> list[str]:
    """Undo everything the journal lists; return the problems (the journal is kept if any)."""
    errors = stack.restore("restore_all_labels", ctx)
    if labels_generated:
        errors += stack.release_labels(ctx)
    for rec in reversed(ctx.journal.records("pipeline", "mkdir")):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(rec["path"])
    ctx.instance.status_path(ctx.domain.name).unlink(missing_ok=True)
    ctx.instance.qmp_lock_path(ctx.domain.name).unlink(missing_ok=True)
    if not errors:
        ctx.journal.remove()
    else:
        ctx.journal.close()
    return errors
