"""The daemon's client: HTTP over the instance's unix socket, standard library only.

The CLI's daemon verbs import this module and nothing heavier (no lxml, no pluggy, no driver),
so ``vmconfine list`` against a running daemon starts as fast as the interpreter allows.
Every error the daemon returns is already the one line the CLI prints.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmconfine.errors import VmconfineError

DEFAULT_TIMEOUT = 600.0
SPAWN_WAIT = 30.0
#: seconds the auto-started session daemon stays up with no running domain and no client
SESSION_IDLE_TIMEOUT = float(os.environ.get("VMCONFINE_SESSION_DAEMON_TIMEOUT", "30") or 30)


class DaemonUnavailable(VmconfineError):
    """No daemon listens on the instance's socket."""


class Transport:
    """How to reach a daemon: a connected stream socket per request."""

    where = ""
    headers: dict[str, str] = {}

    def connect(self, timeout: float) -> socket.socket:
        raise NotImplementedError

    def failure(self) -> str | None:
        """Why the last connection broke, when the transport knows better than the socket."""
        return None


class UnixTransport(Transport):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"the vmconfine daemon at {path}"

    def connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except PermissionError:
            sock.close()
            raise VmconfineError(f"permission denied connecting to {self.where}: use root "
                                 "or a member of its unix_sock_group, or the read-only socket "
                                 "(-r) for queries") from None
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonUnavailable(f"no vmconfine daemon listens on {self.path}") from None
        return sock


class _Connection(http.client.HTTPConnection):
    def __init__(self, transport: Transport, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.transport = transport

    def connect(self) -> None:
        self.sock = self.transport.connect(self.timeout)


class DaemonClient:
    """Requests to one daemon, over a unix socket or a remote transport."""

    def __init__(self, transport: Transport | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.transport = transport if isinstance(transport, Transport) else \
            UnixTransport(transport)
        self.timeout = timeout

    def _open(self, method: str, url: str, body: dict[str, Any] | None,
              timeout: float) -> tuple[_Connection, http.client.HTTPResponse]:
        conn = _Connection(self.transport, timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = dict(self.transport.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        where = self.transport.where
        try:
            conn.request(method, url, body=payload, headers=headers)
            return conn, conn.getresponse()
        except VmconfineError:
            conn.close()
            raise
        except TimeoutError:
            conn.close()
            raise VmconfineError(f"{where} did not answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            why = self.transport.failure() or str(exc) or type(exc).__name__
            raise VmconfineError(f"talking to {where} failed: {why}") from None

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON (or text) answer, or the daemon's error raised."""
        conn, resp = self._open(method, url, body, self.timeout)
        try:
            data = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        if resp.status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status} {resp.reason}"
            raise VmconfineError(str(message))
        if ctype.startswith("application/json"):
            return json.loads(data)
        return data.decode()

    def stream(self, url: str, *, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Newline-delimited JSON objects until the daemon ends the stream or ``timeout``
        seconds pass (then it just stops)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn, resp = self._open("GET", url, None, 20.0)
        try:
            if resp.status >= 400:
                data = resp.read()
                try:
                    message = str(json.loads(data)["error"])
                except (ValueError, KeyError, TypeError):
                    message = f"HTTP {resp.status} {resp.reason}"
                raise VmconfineError(message)
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    assert conn.sock is not None
                    conn.sock.settimeout(min(left, 20.0))
                try:
                    line = resp.readline()
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    continue
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


def listening(path: Path) -> bool:
    """True when a daemon accepts connections on ``path`` (a socket file left behind by a
    daemon that was killed is not one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(path))
    except PermissionError:
        return True  # it listens; the request will say who may use it
    except OSError:
        return False
    finally:
        sock.close()
    return True


def spawn_session_daemon(uri: str, socket_path: Path) -> None:
    """Start the session daemon for ``uri`` (as libvirt's client starts its session daemon)
    and wait until it listens. It exits by itself once idle with no running domain."""
    cmd = [sys.executable, "-m", "vmconfine", "-c", uri, "daemon", "--daemon",
           "--timeout", f"{SESSION_IDLE_TIMEOUT:g}"]
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=SPAWN_WAIT,
                   env={**os.environ, "VMCONFINE_DEBUG": ""})
    deadline = time.monotonic() + SPAWN_WAIT
    while time.monotonic() < deadline:
        if listening(socket_path):
            return
        time.sleep(0.05)
    raise VmconfineError(f"the session daemon for {uri} did not start; run "
                         f"'vmconfine -c {uri} daemon' to see why")


ESCAPE = b"\x1d"  # ^], as virsh console


def console_session(client: DaemonClient, url: str, path: Path) -> None:
    """Relay this terminal to the domain's serial console until ^] (or the console closes),
    over the unix socket ``path`` (the daemon's, or a relay to a remote one). The terminal is
    in raw mode meanwhile and restored afterwards."""
    import asyncio
    import contextlib
    import termios
    import tty

    import aiohttp  # only the console needs a WebSocket client

    async def relay(path: Path) -> None:
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector,
                                         headers=client.transport.headers) as session:
            try:
                ws = await session.ws_connect(f"http://localhost{url}", heartbeat=30)
            except aiohttp.WSServerHandshakeError:
                client.call("GET", url)  # raises the daemon's one-line reason
                raise VmconfineError("the console connection was refused") from None
            loop = asyncio.get_running_loop()
            typed: asyncio.Queue[bytes] = asyncio.Queue()

            def stdin_ready() -> None:
                data = os.read(0, 4096)
                if not data:
                    loop.remove_reader(0)  # no more input: keep showing the console
                    return
                if ESCAPE in data:
                    data = data[:data.index(ESCAPE)]
                    loop.remove_reader(0)
                    typed.put_nowait(data)
                    typed.put_nowait(b"")
                    return
                typed.put_nowait(data)

            async def send() -> None:
                while data := await typed.get():  # b"": ^] typed, detach
                    await ws.send_bytes(data)

            async def receive() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        os.write(1, msg.data)

            loop.add_reader(0, stdin_ready)
            tasks = {asyncio.ensure_future(send()), asyncio.ensure_future(receive())}
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                with contextlib.suppress(Exception):
                    loop.remove_reader(0)
                for task in tasks:
                    task.cancel()
                await ws.close()

    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        asyncio.run(relay(path))
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
