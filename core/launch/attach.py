"""``vmconfine qemu-attach PID``: adopt a QEMU process started outside vmconfine.

The process's ``/proc/PID/cmdline`` and ``environ`` go through the ``domxml-from-native``
parser (:func:`vmconfine.qemu.fromnative.convert.from_argv`; the emulator is
``/proc/PID/exe``, a domain
without ``-name`` is called ``attach-pid-PID``, one without ``-uuid`` gets a random UUID). The
QEMU must have a QMP monitor on a unix socket it listens on (``-qmp unix:PATH,server=on,
wait=off``, or ``-chardev socket,path=PATH,server=on`` + ``-mon mode=control``); vmconfine
checks with ``SO_PEERCRED`` that the socket really belongs to PID and that QMP answers.

Adopting changes nothing on the host: no security driver runs (no relabelling, no cgroup, no
profile, and so nothing to restore); the live XML records the labels the process has now as
static ``relabel='no'`` seclabels, read through each driver's ``process_label`` (for DAC the
current ``+uid:+gid``). No journal is written, so if the supervising process dies the next
vmconfine command only forgets the domain. The domain is tainted ``external-launch``.

Supervision: like ``run``, a process holds the domain's lifetime lock (so ``list``,
``dumpxml``, ``dominfo``, ``qemu-monitor-command`` and ``destroy`` work) and waits for QEMU to
exit through a pidfd; then it removes the status. ``qemu-attach --foreground`` does this in
the command's own process (SIGINT/SIGTERM stop supervising and leave QEMU running); without
it, a detached supervisor process (double fork, new session, output to the domain log) does
it and the command returns once the domain is listed. vmconfine never holds a QMP connection
to an adopted QEMU (QEMU serves one client per QMP socket): ``qemu-monitor-command`` connects
per command, serialised by a lock file in the instance's run directory. The socket path is
the status XML state key ``qmp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import LaunchError, NotRunningError, VmconfineError
from vmconfine.launch import runtime
from vmconfine.launch.info import adopted_qmp_path
from vmconfine.launch.journal import Journal
from vmconfine.plugin.context import DomainContext
from vmconfine.qemu import qmp
from vmconfine.qemu.fromnative.convert import from_argv

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection, RunningDomain
    from vmconfine.qemu.fromnative.convert import NativeResult

log = logging.getLogger(__name__)

TAINT = "external-launch"
PROC_LIMIT = 1 << 20
QMP_TIMEOUT = 10.0
QMP_HINT = "start QEMU with -qmp unix:PATH,server=on,wait=off"


class AttachError(LaunchError):
    """The process cannot be adopted."""


class _Detach(Exception):
    """A signal asked the supervisor to stop supervising."""


@dataclass
class Adoption:
    """An adopted QEMU, locked in this instance, before its status is written."""

    domain: Domain
    pid: int
    starttime: int | None
    domain_id: int
    qmp: str
    qemu_status: str
    lock: runtime.DomainLock
    pidfd: int
    result: NativeResult
    labels: list[tuple[str, str, str]] = field(default_factory=list)
    taints: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.domain.name


# --------------------------------------------------------------------------- the process


def parse_pid(text: str | int) -> int:
    """A positive process id, or :class:`AttachError`."""
    try:
        pid = int(str(text), 10)
    except ValueError:
        pid = 0
    if not 0 < pid < 2**31:
        raise AttachError(f"PID must be a positive integer, not '{text}'")
    return pid


def _proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read(PROC_LIMIT)
    except (FileNotFoundError, ProcessLookupError):
        raise NotRunningError(f"no process {pid}; give the pid of a running QEMU") from None
    except PermissionError:
        raise AttachError(f"cannot read /proc/{pid}/{name}: permission denied; run vmconfine "
                          "as root or as the user QEMU runs as") from None


def read_process(pid: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(environment, argv with argv[0] = the resolved ``/proc/PID/exe``)."""
    try:
        args = [a.decode() for a in _proc(pid, "cmdline").split(b"\0")]
        env_raw = [e.decode() for e in _proc(pid, "environ").split(b"\0")]
    except UnicodeDecodeError:
        raise AttachError(f"the command line or environment of process {pid} is not UTF-8 "
                          "text") from None
    if args and args[-1] == "":
        args.pop()
    if not args:
        raise AttachError(f"process {pid} has no command line (a kernel thread or a zombie)")
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except PermissionError:
        raise AttachError(f"cannot read /proc/{pid}/exe: permission denied; run vmconfine as "
                          "root or as the user QEMU runs as") from None
    except FileNotFoundError:
        raise NotRunningError(f"process {pid} exited") from None
    env = [(k, v) for k, sep, v in (e.partition("=") for e in env_raw if e) if sep]
    return env, [exe, *args[1:]]


def qmp_socket(result: NativeResult, pid: int) -> str:
    """The path of a QMP monitor QEMU listens on (relative paths: QEMU's cwd)."""
    qmps = [m for m in result.monitors if m.protocol == "qmp"]
    usable = [m for m in qmps if m.kind == "unix" and m.server and m.path]
    if not usable:
        found = "; ".join(m.option for m in qmps) or "none"
        raise AttachError(f"QEMU process {pid} has no QMP monitor on a unix socket it listens "
                          f"on (QMP monitors found: {found}); {QMP_HINT}")
    path = str(usable[0].path)
    if not os.path.isabs(path):
        with contextlib.suppress(OSError):
            path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
    return path


def _read_msg(reader: Any, path: str) -> dict[str, Any]:
    line = reader.readline()
    if not line:
        raise AttachError(f"the QMP socket {path} closed the connection")
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        raise AttachError(f"the QMP socket {path} sent something that is not JSON") from None
    if not isinstance(msg, dict):
        raise AttachError(f"the QMP socket {path} sent something that is not a QMP message")
    return msg


def qmp_exchange(path: str, pid: int, payloads: list[dict[str, Any]],
                 timeout: float = QMP_TIMEOUT) -> list[dict[str, Any]]:
    """Connect to ``path`` (which must belong to ``pid``), negotiate, send each payload and
    return the replies (``{"return": ...}`` or ``{"error": {...}}``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise AttachError(f"cannot connect to the QMP socket {path} of QEMU process {pid}: "
                              f"{exc.strerror or exc}; {QMP_HINT}") from None
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = struct.unpack("3i", cred)[0]
        if peer != pid:
            raise AttachError(f"the QMP socket {path} belongs to process {peer}, not to QEMU "
                              f"process {pid}; give the socket that process listens on")
        reader = sock.makefile("rb")
        if "QMP" not in _read_msg(reader, path):
            raise AttachError(f"{path} is not a QMP monitor (no QMP greeting); {QMP_HINT}")
        replies = []
        for payload in [{"execute": "qmp_capabilities"}, *payloads]:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            msg = _read_msg(reader, path)
            while "return" not in msg and "error" not in msg:  # skip events
                msg = _read_msg(reader, path)
            msg.pop("id", None)
            replies.append(msg)
        return replies[1:]
    except TimeoutError:
        raise AttachError(f"the QMP socket {path} of QEMU process {pid} did not answer within "
                          f"{timeout:g} s; QEMU serves one client per QMP socket, close the "
                          "other client") from None
    finally:
        sock.close()


# --------------------------------------------------------------------------- adopting


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _check_free(conn: Connection, domain: Domain, pid: int) -> None:
    for other in conn.running():
        if other.pid == pid:
            raise AttachError(f"process {pid} is already domain '{other.name}' (id {other.id}) "
                              f"of {conn.instance.uri}")
        if other.name == domain.name:
            raise AttachError(f"domain '{domain.name}' is already running (id {other.id}); "
                              "give the QEMU another -name")
        if other.domain.uuid == domain.uuid:
            raise AttachError(f"domain '{domain.name}' has the same UUID {domain.uuid} as "
                              f"running domain '{other.name}'")


def adopt(conn: Connection, pid: int) -> Adoption:
    """Read, check and lock an external QEMU; nothing on the host is changed."""
    inst = conn.instance
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunningError(f"no process {pid}; give the pid of a running QEMU") from None
    lock: runtime.DomainLock | None = None
    try:
        starttime = runtime.proc_starttime(pid)
        env, argv = read_process(pid)
        if _exited(pidfd) or runtime.proc_starttime(pid) != starttime:
            raise NotRunningError(f"process {pid} exited while it was being read")
        result = from_argv(env, argv, source=f"/proc/{pid}/cmdline", name=f"attach-pid-{pid}",
                           uuid=str(uuidlib.uuid4()), skip_bad_env=True)
        domain = result.domain
        _check_free(conn, domain, pid)
        qmp = qmp_socket(result, pid)
        reply = qmp_exchange(qmp, pid, [{"execute": "query-status"}])[0]
        status = str(reply.get("return", {}).get("status", "unknown"))
        inst.ensure_dirs()
        lock = runtime.DomainLock(inst, domain.name)
        with runtime.instance_lock(inst):
            _check_free(conn, domain, pid)
            if not lock.try_acquire():
                raise AttachError(f"domain '{domain.name}' is being started by another process")
            domain_id = runtime.next_domain_id(inst)
        ctx = DomainContext(conn.host, domain, Journal(inst.journal_path(domain.name)), pid=pid)
        labels = conn.stack.process_labels(ctx, pid)
        for model, _doi, label in labels:
            if domain.seclabel(model) is not None:
                continue
            sec = domain.add_seclabel(model, type="static" if label else "none",
                                      implicit=False)
            if label:
                sec.label = label
        taints = [TAINT] + (["custom-argv"] if domain.qemu_args or domain.qemu_env else [])
        return Adoption(domain=domain, pid=pid, starttime=starttime, domain_id=domain_id,
                        qmp=qmp, qemu_status=status, lock=lock, pidfd=pidfd, result=result,
                        labels=labels, taints=taints)
    except BaseException:
        os.close(pidfd)
        if lock is not None:
            lock.release()
        raise


def write_status(conn: Connection, a: Adoption, supervisor: int) -> None:
    """The live status XML that makes the domain visible to every other command."""
    state = {"id": str(a.domain_id), "pid": str(a.pid), "starttime": str(a.starttime or ""),
             "supervisor": str(supervisor), "taints": ",".join(a.taints), "qmp": a.qmp,
             "adopted": "yes"}
    xml = a.domain.to_xml(live=True, extra={"id": a.domain_id, "state": state})
    with runtime.instance_lock(conn.instance):
        runtime.write_atomic(conn.instance.status_path(a.name), xml, durable=False)


def _qmp_lock_path(conn: Connection, name: str) -> Path:
    return conn.instance.qmp_lock_path(name)


def finish(conn: Connection, a: Adoption) -> str:
    """Forget the domain (status, markers, lock); returns how it ended."""
    marker = conn.instance.destroy_marker_path(a.name)
    how = "destroyed" if marker.exists() else (
        "stopped: QEMU exited" if _exited(a.pidfd) else
        "no longer supervised (QEMU keeps running)")
    conn.instance.status_path(a.name).unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    _qmp_lock_path(conn, a.name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        os.close(a.pidfd)
    a.lock.release()
    return how


def _stop(signum: int, _frame: object) -> None:
    raise _Detach(signum)


@contextlib.contextmanager
def _detach_signals() -> Iterator[None]:
    """While active, SIGINT/SIGTERM/SIGHUP raise :class:`_Detach` (stop supervising)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, _stop) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def wait(a: Adoption) -> None:
    """Block until QEMU exits (call inside :func:`_detach_signals`)."""
    poller = select.poll()
    poller.register(a.pidfd, select.POLLIN)
    while not poller.poll(None):
        pass


def _supervise(conn: Connection, a: Adoption, ready: Any) -> str:
    """Write the status, call ``ready()``, wait; always forget the domain at the end."""
    try:
        with _detach_signals():
            try:
                write_status(conn, a, os.getpid())
                ready()
                wait(a)
            except _Detach:
                log.warning("no longer supervising domain %s; QEMU process %d keeps running",
                            a.name, a.pid)
    finally:
        how = finish(conn, a)
    return how


# --------------------------------------------------------------------------- the command


def _print_attached(a: Adoption) -> None:
    print(f"Domain '{a.name}' attached (id {a.domain_id}, pid {a.pid})")
    print(f"  QMP monitor: {a.qmp} (QEMU status: {a.qemu_status})")
    for model, _doi, label in a.labels:
        print(f"  security model {model}: {label or '-'} (as found; not changed)")
    print(f"  tainted: {', '.join(a.taints)}")
    sys.stdout.flush()


def _detach(conn: Connection, a: Adoption) -> None:
    """Hand the adoption to a detached supervisor process; return once it is listed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # ---- first child: start the supervisor and exit ----
        os.close(r)
        try:
            os.setsid()
            if os.fork() == 0:
                _supervisor(conn, a, w)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(w)
    os.waitpid(child, 0)
    chunks = []
    while data := os.read(r, 4096):
        chunks.append(data)
    os.close(r)
    reply = b"".join(chunks).decode(errors="replace")
    os.close(a.pidfd)
    a.lock.release(remove=False)  # the supervisor holds the same lock
    if reply != "ok":
        raise AttachError(f"domain '{a.name}': the supervising process failed: "
                          f"{reply or 'it exited before it was ready'}")


def _supervisor(conn: Connection, a: Adoption, w: int) -> None:
    """The detached supervisor (never returns)."""
    code = 0
    pipe = [w]

    def ready() -> None:
        os.write(w, b"ok")
        os.close(pipe.pop())

    try:
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(conn.instance.log_path(a.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                      0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        print(f"domain '{a.name}' {_supervise(conn, a, ready)}", flush=True)
    except BaseException as exc:
        code = 1
        if pipe:  # the parent is still waiting for the outcome
            with contextlib.suppress(OSError):
                os.write(w, str(exc).encode(errors="replace")[:4096])
    os._exit(code)


def attach_command(conn: Connection, pid_text: str, *, foreground: bool = False) -> int:
    """``vmconfine qemu-attach [--foreground] PID``."""
    a = adopt(conn, parse_pid(pid_text))
    warning = a.result.warning
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if not foreground:
        _detach(conn, a)
        _print_attached(a)
        return 0
    how = _supervise(conn, a, lambda: _print_attached(a))
    print(f"Domain '{a.name}' {how}")
    return 0


# --------------------------------------------------------------------------- other verbs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def monitor_command(conn: Connection, dom: RunningDomain,
                    payload: dict[str, Any]) -> dict[str, Any]:
    """``qemu-monitor-command``: the user monitor of a vmconfine-started domain, or the QMP
    socket of an adopted one."""
    path = adopted_qmp_path(dom)
    if path is None:
        return qmp.command(conn.instance.user_monitor_path(dom.name), payload,
                           conn.instance.qmp_lock_path(dom.name))
    if not isinstance(payload, dict) or "execute" not in payload:
        raise VmconfineError('QMP command must be a JSON object with an "execute" member, '
                             'e.g. {"execute": "query-status"}')
    with _locked(_qmp_lock_path(conn, dom.name)):
        return qmp_exchange(path, dom.pid, [payload])[0]
