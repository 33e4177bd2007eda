"""QMP access through ``qemu.qmp``.

The supervising process keeps one QMP connection on the domain's ``monitor.sock``; every other
process (``qemu-monitor-command``, ``dominfo`` queries, ``destroy``) uses the second monitor,
``monitor-user.sock``, serialised by a lock file, so both work at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message

from vmconfine.errors import LaunchError, VmconfineError

DEFAULT_TIMEOUT = 10.0
#: how long a starting QEMU may take to answer its first QMP handshake (libvirt's monitor
#: wait, QEMU_DEFAULT_MONITOR_WAIT, is 30 s too); the launch pipeline stops waiting at once
#: when QEMU exits instead, so this only bounds a QEMU that hangs during start-up
START_TIMEOUT = 30.0
#: seconds instead of START_TIMEOUT, for a host where QEMU starts slowly (nested emulation:
#: the lsm tier's guests load QEMU's SPICE and display modules over 9p under TCG)
START_TIMEOUT_ENV = "VMCONFINE_QMP_START_TIMEOUT"


def start_timeout() -> float:
    """How long a starting QEMU may take to answer (``START_TIMEOUT_ENV`` when set to a
    positive number, else START_TIMEOUT)."""
    try:
        value = float(os.environ.get(START_TIMEOUT_ENV, ""))
    except ValueError:
        return START_TIMEOUT
    return value if value > 0 else START_TIMEOUT


async def connect(path: Path | str, name: str, timeout: float = DEFAULT_TIMEOUT) -> QMPClient:
    """Connect and negotiate capabilities (QMP ready)."""
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(str(path)), timeout)
    except (TimeoutError, OSError, EOFError, QMPError) as exc:
        # the library's own errors too (ConnectError when QEMU closes the socket mid-handshake)
        raise LaunchError(f"cannot connect to QMP socket {path}: {describe(exc)}") from None
    return client


def describe(exc: BaseException) -> str:
    """One line for an error of the QMP library or the connection under it."""
    if isinstance(exc, ConnectError):  # "Failed to establish session: EOFError"
        cause = exc.exc
        return f"{exc.error_message}: {describe(cause) if cause is not None else ''}".rstrip(": ")
    if isinstance(exc, EOFError):
        return "QEMU closed the connection"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def disconnect(client: QMPClient, timeout: float = 5.0) -> None:
    """Close the connection; never raises and never waits longer than ``timeout`` (right
    after QEMU quits the library may raise EOFError, or wait on a peer that is gone)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), timeout)


async def _raw(path: Path, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    client = await connect(path, "vmconfine-user", timeout)
    try:
        msg = Message(payload)
        try:
            reply = await asyncio.wait_for(client.execute_msg(msg), timeout)
        except ExecuteError as exc:
            return {"error": dict(exc.error.error._raw)}
        return {"return": reply}
    finally:
        await disconnect(client)


@contextlib.contextmanager
def monitor_lock(lock: Path):  # type: ignore[no-untyped-def]
    """Exclusive use of a domain's user monitor (QEMU serves one client per socket)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def command(path: Path, payload: dict[str, Any], lock: Path,
            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send one QMP command (a dict with ``execute`` and optional ``arguments``) on the user
    monitor and return ``{"return": ...}`` or ``{"error": ...}``."""
    if not isinstance(payload, dict) or "execute" not in payload:
        raise VmconfineError(
            'QMP command must be a JSON object with an "execute" member, '
            'e.g. {"execute": "query-status"}'
        )
    with monitor_lock(lock):
        return asyncio.run(_raw(path, payload, timeout))


def parse_command_text(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VmconfineError(
            f"QMP command is not valid JSON ({exc.msg} at column {exc.colno}); "
            "use --hmp for human monitor commands"
        ) from None
    if not isinstance(obj, dict):
        raise VmconfineError(
            'QMP command must be a JSON object such as {"execute": "query-status"}')
    return obj


def hmp_payload(text: str) -> dict[str, Any]:
    return {"execute": "human-monitor-command", "arguments": {"command-line": text}}
