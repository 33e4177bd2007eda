"""The daemon's client: HTTP over the instance's unix socket, standard library only.

The CLI's daemon verbs import this module and nothing heavier (no lxml, no pluggy, no driver),
so ``vmconfine list`` against a running daemon starts as fast as the interpreter allows.
Every error the daemon returns is already the one line the CLI prints.

The HTTP/1.1 exchange is this module's own (:class:`Reply`): one request per connection
(``Connection: close``), a reply framed by ``Content-Length``, chunked transfer coding or the
end of the connection. The standard library's :mod:`http.client` would do the same, but
importing it (with the :mod:`email` package it parses headers with, and :mod:`ssl`) costs
more than the rest of the client's start-up together.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vmconfine.errors import VmconfineError

#: typing's own TYPE_CHECKING without importing typing (a query's start-up)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_TIMEOUT = 600.0
SPAWN_WAIT = 30.0
#: seconds the auto-started session daemon stays up with no running domain and no client
SESSION_IDLE_TIMEOUT = float(os.environ.get("VMCONFINE_SESSION_DAEMON_TIMEOUT", "30") or 30)
#: the longest status or header line, and the most header lines, a reply may have
MAX_LINE = 65536
MAX_HEADERS = 100
#: the largest reply body the client takes (a domain's XML, a list of domains: far less); an
#: event is one line (:data:`MAX_LINE`)
MAX_BODY = 64 << 20


class DaemonUnavailable(VmconfineError):
    """No daemon listens on the instance's socket."""


class DaemonTimeout(VmconfineError):
    """The daemon did not answer in time."""


class MalformedReply(Exception):
    """The daemon's answer is not the HTTP reply it should be."""


class ClosedWithoutReply(MalformedReply):
    """The connection closed before any reply (a transport may know why)."""


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


def request_bytes(method: str, url: str, headers: dict[str, str],
                  payload: bytes | None) -> bytes:
    """One HTTP/1.1 request, the connection closed after its reply."""
    fields = {"Host": "localhost", "Connection": "close", **headers}
    if payload is not None or method in ("POST", "PUT"):
        fields["Content-Length"] = str(len(payload or b""))
    lines = [f"{method} {url} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    if any(c in line for line in lines for c in "\r\n\0"):
        raise VmconfineError(f"a control character in the request for {url!r}")
    return "\r\n".join([*lines, "", ""]).encode() + (payload or b"")


class Reply:
    """The reply read from ``sock``: the status line and headers when made, the body as it
    is asked for (chunked or not). Bytes are taken from the buffer only once a whole line
    or chunk is there, so a timeout loses nothing (a later read goes on where it stopped)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._eof = False
        self._body = b""  # body bytes read but not yet returned by readline
        self._left: int | None = None  # body bytes still to come, when Content-Length says
        self._done = False
        status = self._line()
        if not status:
            raise ClosedWithoutReply("the connection closed without a reply")
        version, _, rest = status.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, self.reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise MalformedReply(f"not an HTTP reply: {status[:80]!r}")
        self.status = int(code)
        self.headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line().decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, sep, value = line.partition(":")
            if not sep:
                raise MalformedReply(f"a malformed header line {line[:80]!r}")
            self.headers[name.strip().lower()] = value.strip()
        else:
            raise MalformedReply(f"more than {MAX_HEADERS} header lines")
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if not self.chunked and "content-length" in self.headers:
            length = self.headers["content-length"]
            if not length.isdigit():
                raise MalformedReply(f"a malformed Content-Length {length[:80]!r}")
            self._left = int(length)
            if self._left > MAX_BODY:
                raise MalformedReply(f"a reply of {self._left} bytes (more than {MAX_BODY})")

    def _fill(self) -> bool:
        """Read more from the socket; False at the end of the connection."""
        if self._eof:
            return False
        data = self.sock.recv(65536)
        self._eof = not data
        self._buf += data
        return bool(data)

    def _line_end(self) -> int:
        """The length of the buffer's first line (its line feed included), reading until
        it is whole; 0 when the connection ends first."""
        while (i := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_LINE:
                raise MalformedReply("a line too long")
            if not self._fill():
                return 0
        return i + 1

    def _line(self) -> bytes:
        end = self._line_end() or len(self._buf)
        line, self._buf = self._buf[:end], self._buf[end:]
        return line

    def _want(self, size: int) -> None:
        while len(self._buf) < size:
            if not self._fill():
                raise MalformedReply("the reply ended early")

    def _piece(self) -> bytes:
        """The body's next piece; b"" at its end."""
        if self._done:
            return b""
        if self.chunked:
            end = self._line_end()
            if not end:
                raise MalformedReply("the reply ended early")
            size_text = self._buf[:end].split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise MalformedReply(f"a malformed chunk size {size_text[:80]!r}") from None
            if size == 0:
                self._done = True
                return b""
            if size > MAX_BODY:
                raise MalformedReply(f"a chunk of {size} bytes (more than {MAX_BODY})")
            self._want(end + size + 2)  # the chunk and its CRLF
            data, self._buf = self._buf[end:end + size], self._buf[end + size + 2:]
            return data
        if self._left is None:  # the body ends with the connection
            if not self._buf and not self._fill():
                self._done = True
            data, self._buf = self._buf, b""
            return data
        if self._left and not self._buf:
            self._want(1)
        data, self._buf = self._buf[:self._left], self._buf[self._left:]
        self._left -= len(data)
        self._done = not self._left
        return data

    def read(self) -> bytes:
        """The rest of the body."""
        parts = [self._body]
        size = len(self._body)
        self._body = b""
        while piece := self._piece():
            parts.append(piece)
            size += len(piece)
            if size > MAX_BODY:
                raise MalformedReply(f"a reply of more than {MAX_BODY} bytes")
        return b"".join(parts)

    def readline(self) -> bytes:
        """The body's next line (with its line feed); b"" at the end."""
        while b"\n" not in self._body:
            if len(self._body) > MAX_LINE:
                raise MalformedReply("a line too long")
            piece = self._piece()
            if not piece:
                line, self._body = self._body, b""
                return line
            self._body += piece
        line, _, self._body = self._body.partition(b"\n")
        return line + b"\n"


class DaemonClient:
    """Requests to one daemon, over a unix socket or a remote transport."""

    def __init__(self, transport: Transport | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.transport = transport if isinstance(transport, Transport) else \
            UnixTransport(transport)
        self.timeout = timeout

    def _open(self, method: str, url: str, body: dict[str, Any] | None,
              timeout: float) -> Reply:
        """Send the request; the reply with its status and headers read (the caller closes
        ``reply.sock``)."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = dict(self.transport.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        data = request_bytes(method, url, headers, payload)
        with _Guard(self.transport, timeout):
            sock = self.transport.connect(timeout)
            try:
                sock.sendall(data)
                return Reply(sock)
            except BaseException:
                sock.close()
                raise

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON (or text) answer, or the daemon's error raised."""
        reply = self._open(method, url, body, self.timeout)
        with _Guard(self.transport, self.timeout):
            try:
                data = reply.read()
            finally:
                reply.sock.close()
            if reply.status >= 400:
                raise VmconfineError(_error_message(reply, data))
            if reply.headers.get("content-type", "").startswith("application/json"):
                try:
                    return json.loads(data)
                except ValueError as exc:
                    raise MalformedReply(f"its JSON does not parse: {exc}") from None
            return data.decode(errors="replace")

    def stream(self, url: str, *, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Newline-delimited JSON objects until the daemon ends the stream or ``timeout``
        seconds pass (then it just stops)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reply = self._open("GET", url, None, 20.0)
        try:
            if reply.status >= 400:
                with _Guard(self.transport, 20.0):
                    raise VmconfineError(_error_message(reply, reply.read()))
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    reply.sock.settimeout(min(left, 20.0))
                try:
                    with _Guard(self.transport, 20.0):
                        line = reply.readline()
                except DaemonTimeout:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    continue
                if not line:
                    return
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise VmconfineError(f"talking to {self.transport.where} failed: "
                                             f"malformed event: {exc}") from None
        finally:
            reply.sock.close()


class _Guard:
    """Turns what can go wrong between client and daemon into one-line errors: a timeout,
    a broken connection (the transport may know why), a malformed reply."""

    def __init__(self, transport: Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:
        if exc is None or isinstance(exc, VmconfineError) or \
                not isinstance(exc, OSError | MalformedReply):
            return
        where = self.transport.where
        if isinstance(exc, TimeoutError):
            raise DaemonTimeout(f"{where} did not answer within {self.timeout:g}s") from None
        if isinstance(exc, ClosedWithoutReply):
            raise VmconfineError(f"talking to {where} failed: "
                                 f"{self.transport.failure() or exc}") from None
        if isinstance(exc, MalformedReply):
            raise VmconfineError(f"talking to {where} failed: malformed reply: {exc}") from None
        why = self.transport.failure() or str(exc) or type(exc).__name__
        raise VmconfineError(f"talking to {where} failed: {why}") from None


def _error_message(reply: Reply, data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status} {reply.reason}"


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
    import subprocess  # only a session client that finds no daemon starts one

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
HANDSHAKE_WAIT = 30.0  #: seconds the daemon may take to accept a console connection


def console_session(client: DaemonClient, url: str, path: Path) -> None:
    """Relay this terminal to the domain's serial console until ^] (or the console closes),
    over the unix socket ``path`` (the daemon's, or a relay to a remote one). The terminal is
    in raw mode meanwhile and restored afterwards."""
    import asyncio
    import contextlib
    import termios
    import tty

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        BytesMessage,
        CloseConnection,
        Ping,
        RejectConnection,
        Request,
    )
    from wsproto.utilities import RemoteProtocolError as WebSocketProtocolError

    async def relay(path: Path) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(str(path))
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(k.encode(), v.encode()) for k, v in client.transport.headers.items()]
        writer.write(ws.send(Request(host="localhost", target=url, extra_headers=headers)))
        accepted = False
        deadline = loop.time() + HANDSHAKE_WAIT
        while not accepted:  # the handshake: 101, or the daemon's refusal
            try:
                data = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
            except TimeoutError:
                writer.transport.abort()
                raise VmconfineError(f"the console did not answer within {HANDSHAKE_WAIT:.0f} "
                                     "s") from None
            try:
                ws.receive_data(data or None)
                events = list(ws.events())
            except WebSocketProtocolError as exc:  # not the daemon's HTTP, or cut short
                writer.close()
                raise VmconfineError(f"the console connection failed: {exc}") from None
            for event in events:
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, BytesMessage):  # sent right after the handshake
                    os.write(1, event.data)
                elif isinstance(event, RejectConnection):
                    writer.close()
                    client.call("GET", url)  # raises the daemon's one-line reason
                    raise VmconfineError("the console connection was refused")
            if not data and not accepted:
                writer.close()
                raise VmconfineError("the daemon closed the console connection")
        typed: asyncio.Queue[bytes] = asyncio.Queue(64)  # full: stop reading the terminal
        detached = loop.create_future()  # ^] typed: leave at once, whatever is pending
        paused = [False]

        def stdin_ready() -> None:
            data = os.read(0, 4096)
            if not data:
                loop.remove_reader(0)  # no more input: keep showing the console
                return
            if ESCAPE in data:
                loop.remove_reader(0)
                data = data[:data.index(ESCAPE)]
                if data and not typed.full():
                    typed.put_nowait(data)
                if not detached.done():
                    detached.set_result(None)
                return
            typed.put_nowait(data)
            if typed.full():  # the daemon is not taking input as fast as it comes
                loop.remove_reader(0)
                paused[0] = True

        async def send_typed() -> None:
            while not typed.empty():
                writer.write(ws.send(BytesMessage(data=typed.get_nowait())))
            await writer.drain()

        async def send() -> None:
            while True:
                data = await typed.get()
                if paused[0] and not detached.done():
                    paused[0] = False
                    loop.add_reader(0, stdin_ready)
                writer.write(ws.send(BytesMessage(data=data)))
                await writer.drain()

        async def receive() -> None:
            while data := await reader.read(65536):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, BytesMessage):
                        os.write(1, event.data)
                    elif isinstance(event, Ping):
                        writer.write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return

        loop.add_reader(0, stdin_ready)
        tasks = {asyncio.ensure_future(send()), asyncio.ensure_future(receive()), detached}
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(0)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):  # what was typed before ^], then goodbye
                await asyncio.wait_for(send_typed(), 2)
                writer.write(ws.send(CloseConnection(code=1000)))
                await asyncio.wait_for(writer.drain(), 2)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (Exception, asyncio.CancelledError):
                writer.transport.abort()
        for task in done:  # why the session ended, when not by ^] or the console closing
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                what = "the terminal" if isinstance(exc, BrokenPipeError) else "the console"
                raise VmconfineError(f"{what} connection broke: {exc}") from None

    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        asyncio.run(relay(path))
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
