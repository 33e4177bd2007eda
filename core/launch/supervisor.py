"""Supervising a started domain: signals, QMP events, waiting for QEMU to exit, teardown.

:func:`run_domain` is ``vmconfine run`` (foreground, like libvirt's virt-qemu-run): the start
sequence of :mod:`vmconfine.launch.pipeline`, then :func:`supervise` until QEMU has exited for
any reason, then teardown — all on one event loop, so the QMP connection opened by the start
sequence is the one that receives the guest's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmconfine.errors import LaunchError
from vmconfine.launch.pipeline import Diagnose, Launched, finish, start
from vmconfine.launch.process import log_tail
from vmconfine.qemu import qmp

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Outcome:
    """How a supervised domain ended."""

    reason: str  # guest-shutdown | destroyed | crashed | failed
    detail: str
    exit_status: int | None

    @property
    def ok(self) -> bool:
        return self.reason in ("guest-shutdown", "destroyed")


class _Supervisor:
    def __init__(self, conn: Connection, launched: Launched, *, shutdown_timeout: float,
                 on_ready: Callable[[Launched], None] | None) -> None:
        self.conn = conn
        self.l = launched
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self.shutdown_event: dict | None = None
        self.stop_requested = 0
        self._tasks: list[asyncio.Future[None]] = []

    async def _events(self) -> None:
        assert self.l.client is not None
        async for event in self.l.client.events:
            if event["event"] == "SHUTDOWN":
                self.shutdown_event = dict(event.get("data", {}))

    def _destroy(self) -> None:
        self.conn.instance.destroy_marker_path(self.l.name).touch()  # asked for: not a crash
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.l.pid, signal.SIGKILL)

    def _on_signal(self) -> None:
        self.stop_requested += 1
        if self.stop_requested == 1 and self.l.client is not None:
            log.warning("asking domain %s to power off (ACPI); again to destroy it", self.l.name)
            self._tasks.append(asyncio.ensure_future(self._powerdown()))
        else:
            log.warning("destroying domain %s", self.l.name)
            self._destroy()

    async def _powerdown(self) -> None:
        assert self.l.client is not None
        with contextlib.suppress(Exception):
            await self.l.client.execute("system_powerdown")
        try:
            await asyncio.wait_for(self.l.process.exited.wait(), self.shutdown_timeout)
        except TimeoutError:
            log.warning("domain %s did not power off within %ss: destroying it",
                        self.l.name, self.shutdown_timeout)
            self._destroy()

    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        events_task = asyncio.ensure_future(self._events())
        try:
            if self.on_ready is not None:
                try:
                    self.on_ready(self.l)
                except OSError as exc:  # e.g. stdout closed (| head): keep the guest running
                    log.debug("on_ready: %s", exc)
            await self.l.process.exited.wait()
            # QEMU writes SHUTDOWN just before it exits: let the event reader drain the socket
            for _ in range(200):
                if self.shutdown_event is not None or events_task.done():
                    break
                await asyncio.sleep(0.005)
        except BaseException:
            self.l.process.kill()
            raise
        finally:
            events_task.cancel()
            for task in self._tasks:
                task.cancel()
            if self.l.client is not None:
                await qmp.disconnect(self.l.client)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        return self._outcome()

    def _outcome(self) -> Outcome:
        destroyed = self.conn.instance.destroy_marker_path(self.l.name).exists()
        reason_qemu = (self.shutdown_event or {}).get("reason", "")
        code = self.l.process.exit_code
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


async def supervise(conn: Connection, launched: Launched, *,
                    shutdown_timeout: float | None = None,
                    on_ready: Callable[[Launched], None] | None = None) -> Outcome:
    """Wait for a started domain until QEMU exits; always tear down; return how it ended.

    SIGINT/SIGTERM/SIGHUP ask the guest to power off (ACPI), a second one (or
    ``shutdown_timeout`` seconds without power-off) destroys it.
    """
    timeout = shutdown_timeout if shutdown_timeout is not None else float(
        getattr(conn.instance.config, "shutdown_timeout", 30))
    sup = _Supervisor(conn, launched, shutdown_timeout=timeout, on_ready=on_ready)
    try:
        outcome = await sup.run()
    except BaseException:
        finish(conn, launched)
        raise
    errors = finish(conn, launched)
    if errors:
        raise LaunchError(
            f"domain '{launched.name}' stopped ({outcome.detail}) but teardown left problems: "
            + "; ".join(errors)
        )
    if not outcome.ok:
        tail = log_tail(launched.log_path)
        outcome.detail += f"; QEMU log: {tail}" if tail else ""
    return outcome


def run_domain(conn: Connection, domain: Domain, *, paused: bool = False,
               shutdown_timeout: float | None = None,
               on_ready: Callable[[Launched], None] | None = None,
               diagnose: Diagnose | None = None, reset_nvram: bool = False) -> Outcome:
    """Start ``domain`` and supervise it until it stops, in this process (``vmconfine run``).

    While it starts, SIGTERM and SIGHUP interrupt the start like ^C does, so every change made
    so far is undone before vmconfine exits; once the guest runs they ask it to power off.
    """

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    async def lifecycle() -> Outcome:
        launched = await start(conn, domain, paused=paused, diagnose=diagnose,
                               reset_nvram=reset_nvram)
        return await supervise(conn, launched, shutdown_timeout=shutdown_timeout,
                               on_ready=on_ready)

    old = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return asyncio.run(lifecycle())
    finally:
        for s, handler in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, handler)
