"""Supervising a started domain: QMP handshake, verification, guest start, waiting, teardown.

``vmconfine run`` (foreground, like libvirt's virt-qemu-run) and the in-process API both use
:func:`supervise`. It returns when QEMU has exited for any reason, after teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from vmconfine.config.connection import Connection, kill_process
from vmconfine.errors import LaunchError
from vmconfine.launch import runtime
from vmconfine.launch.pipeline import Launched, checkpoint, core_checks, teardown
from vmconfine.qemu import qmp
from vmconfine.report.build import open_failure_hint

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 8


@dataclass
class Outcome:
    """How a supervised domain ended."""

    reason: str  # guest-shutdown | destroyed | crashed | failed
    detail: str
    exit_status: int | None

    @property
    def ok(self) -> bool:
        return self.reason in ("guest-shutdown", "destroyed")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """QEMU's last lines of the current run (after its command line), joined by " | "."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    starts = [i for i, ln in enumerate(all_lines) if ln.endswith(": starting up")]
    if starts:
        all_lines = all_lines[starts[-1] + 2:]  # skip the marker and the command line
    tail = [ln for ln in all_lines if ln.strip()][-lines:]
    return " | ".join(tail)


def destroy_marker(conn: Connection, name: str) -> Path:
    return conn.instance.run_dir / f"{name}.destroy"


class _Supervisor:
    def __init__(self, conn: Connection, launched: Launched, *, paused: bool,
                 shutdown_timeout: float, on_ready: Callable[[Launched], None] | None) -> None:
        self.conn = conn
        self.l = launched
        self.paused = paused
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self.shutdown_event: dict | None = None
        self.client: QMPClient | None = None
        self.exited = asyncio.Event()
        self.wait_status: int | None = None
        self.stop_requested = 0
        self._tasks: list[asyncio.Future[None]] = []

    # -- process exit through a pidfd -------------------------------------------------------
    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> int:
        pidfd = os.pidfd_open(self.l.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            _, status = os.waitpid(self.l.pid, 0)
            self.wait_status = status
            self.exited.set()

        loop.add_reader(pidfd, on_exit)
        return pidfd

    async def _events(self, client: QMPClient) -> None:
        async for event in client.events:
            if event["event"] == "SHUTDOWN":
                self.shutdown_event = dict(event.get("data", {}))

    def _on_signal(self) -> None:
        self.stop_requested += 1
        if self.stop_requested == 1 and self.client is not None:
            log.warning("asking domain %s to power off (ACPI); again to destroy it", self.l.name)
            self._tasks.append(asyncio.ensure_future(self._powerdown()))
        else:
            log.warning("destroying domain %s", self.l.name)
            destroy_marker(self.conn, self.l.name).touch()  # asked for: not a crash
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.l.pid, signal.SIGKILL)

    async def _connect(self) -> QMPClient:
        """QMP handshake, or a clear error as soon as QEMU exits instead of answering."""
        connect = asyncio.ensure_future(qmp.connect(
            self.conn.instance.monitor_path(self.l.name), f"vmconfine-{self.l.name}"))
        exited = asyncio.ensure_future(self.exited.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if connect.done():
            return connect.result()  # raises LaunchError when the handshake failed
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        status = self.wait_status
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        raise LaunchError(f"domain '{self.l.name}': QEMU exited during start-up "
                          f"(exit status {code})")

    async def _powerdown(self) -> None:
        assert self.client is not None
        with contextlib.suppress(Exception):
            await self.client.execute("system_powerdown")
        try:
            await asyncio.wait_for(self.exited.wait(), self.shutdown_timeout)
        except TimeoutError:
            log.warning("domain %s did not power off within %ss: destroying it",
                        self.l.name, self.shutdown_timeout)
            destroy_marker(self.conn, self.l.name).touch()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.l.pid, signal.SIGKILL)

    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        pidfd = self._watch_exit(loop)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal)
        events_task = None
        try:
            self.client = await self._connect()
            events_task = asyncio.ensure_future(self._events(self.client))
            checkpoint("qmp")
            problems = core_checks(self.l.pid) + self.conn.stack.verify_process(
                self.l.ctx, self.l.pid)
            if problems:
                raise LaunchError(
                    f"domain '{self.l.name}': QEMU is not confined as asked, killed it: "
                    + "; ".join(problems)
                )
            checkpoint("verified")
            self._write_status()
            if not self.paused:
                await self.client.execute("cont")
            checkpoint("running")
            if self.on_ready is not None:
                try:
                    self.on_ready(self.l)
                except OSError as exc:  # e.g. stdout closed (| head): keep the guest running
                    log.debug("on_ready: %s", exc)
            await self.exited.wait()
            # QEMU writes SHUTDOWN just before it exits: let the event reader drain the socket
            for _ in range(200):
                if self.shutdown_event is not None or events_task.done():
                    break
                await asyncio.sleep(0.005)
        except BaseException:
            kill_process(self.l.pid, self.l.starttime)
            raise
        finally:
            if events_task is not None:
                events_task.cancel()
            if self.client is not None:
                await qmp.disconnect(self.client)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._outcome()

    def _write_status(self) -> None:
        launched = self.l
        state = {
            "id": str(launched.domain_id),
            "pid": str(launched.pid),
            "starttime": str(launched.starttime or ""),
            "supervisor": str(os.getpid()),
            "taints": ",".join(launched.ctx.taints),
        }
        xml = launched.ctx.domain.to_xml(live=True,
                                         extra={"id": launched.domain_id, "state": state})
        with runtime.instance_lock(self.conn.instance):
            runtime.write_atomic(self.conn.instance.status_path(launched.name), xml)

    def _outcome(self) -> Outcome:
        status = self.wait_status
        destroyed = destroy_marker(self.conn, self.l.name).exists()
        reason_qemu = (self.shutdown_event or {}).get("reason", "")
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        if destroyed:
            return Outcome("destroyed", "destroyed", code)
        if reason_qemu == "guest-shutdown" or (self.stop_requested and code == 0):
            return Outcome("guest-shutdown", "guest powered off", code)
        if not reason_qemu and code == 0 and "terminating on signal" not in log_tail(
                self.l.log_path, 3):
            # the SHUTDOWN event was lost in the exit race: a clean exit that no signal
            # caused is a guest power-off
            return Outcome("guest-shutdown", "guest powered off", code)
        if reason_qemu == "guest-panic":
            return Outcome("crashed", "the guest panicked", code)
        if code is not None and code < 0:
            return Outcome("crashed", f"QEMU was killed by signal {-code}", code)
        if reason_qemu:
            return Outcome("failed", f"QEMU shut down ({reason_qemu}), exit status {code}", code)
        return Outcome("failed", f"QEMU exited with status {code}", code)


def supervise(conn: Connection, launched: Launched, *, paused: bool = False,
              shutdown_timeout: float | None = None,
              on_ready: Callable[[Launched], None] | None = None) -> Outcome:
    """Verify, start and wait for ``launched``; always tear down; return how it ended.

    Raises LaunchError when the confinement check fails or QEMU dies before QMP answers.
    """
    timeout = shutdown_timeout if shutdown_timeout is not None else float(
        getattr(conn.instance.config, "shutdown_timeout", 30))
    sup = _Supervisor(conn, launched, paused=paused, shutdown_timeout=timeout, on_ready=on_ready)
    try:
        outcome = asyncio.run(sup.run())
    except BaseException as exc:
        kill_process(launched.pid, launched.starttime)
        tail = log_tail(launched.log_path)
        tail += open_failure_hint(conn, launched.ctx, tail)  # which layer denied a path
        _finish(conn, launched)
        if isinstance(exc, LaunchError) and tail and "not confined" not in exc.message:
            raise LaunchError(f"{exc.message}; QEMU log: {tail}") from None
        raise
    errors = _finish(conn, launched)
    if errors:
        raise LaunchError(
            f"domain '{launched.name}' stopped ({outcome.detail}) but teardown left problems: "
            + "; ".join(errors)
        )
    if not outcome.ok:
        tail = log_tail(launched.log_path)
        outcome.detail += f"; QEMU log: {tail}" if tail else ""
    return outcome


def _finish(conn: Connection, launched: Launched) -> list[str]:
    for s in launched.monitor_socks:
        s.close()
    errors = teardown(conn.stack, launched.ctx)
    destroy_marker(conn, launched.name).unlink(missing_ok=True)
    launched.lock.release()
    return errors
