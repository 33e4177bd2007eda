"""The daemon's HTTP/1.1 and WebSocket server: h11 and wsproto over asyncio's streams.

The protocols come from python-hyper's sans-I/O libraries, each made for exactly this: h11
parses and frames HTTP/1.1 (request heads, ``Content-Length`` and chunked bodies, keep-alive,
``Connection: close``, HEAD) and refuses what does not follow RFC 9112; wsproto does RFC 6455
(the upgrade handshake, framing, masking, ping/pong, the closing handshake). This module adds
only what a server needs around them: routing, the limits that keep one client from hurting the
daemon or other clients, and the connection bookkeeping the daemon's idle exit and shutdown
use. Why not aiohttp, which served the same API before: its package imports its HTTP client
half as well (yarl, multidict, the ``email`` package, ``urllib.request``, ``http.server``...),
~15 MiB of the daemon's resident memory against ~2 MiB for h11 and wsproto
(docs/performance.md, P7a).

Limits, each answered with a one-line JSON error or a closed connection, and logged: a request
head over :data:`MAX_HEAD` bytes (431), a body on a route that takes none or over the
application's ``max_body`` (413), both ``Content-Length`` and ``Transfer-Encoding`` (400, the
request-smuggling shape), a head that does not arrive whole within :data:`HEAD_TIMEOUT` and a
body that stalls for :data:`BODY_TIMEOUT` or is not whole within :data:`BODY_DEADLINE` (408),
a kept-alive connection idle for :data:`KEEPALIVE_TIMEOUT`, a client that does not read a
reply for :data:`WRITE_TIMEOUT` (dropped), more than the server's ``max_clients`` connections
(closed on accept), a TLS handshake that fails or takes over :data:`TLS_HANDSHAKE_TIMEOUT`,
anything
that is not HTTP (400). The application's ``authorize`` runs and its route is resolved before
a body is read: a refused or misrouted request never makes the server buffer a body. Every
connection is served by its own task: a slow client never blocks another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError
from wsproto.utilities import RemoteProtocolError as WebSocketProtocolError

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  #: request line and headers together
HEAD_TIMEOUT = 60.0  #: a request's head must be whole within this
BODY_TIMEOUT = 60.0  #: a body may stall this long between two pieces
BODY_DEADLINE = 300.0  #: ... and must be whole within this
WRITE_TIMEOUT = 60.0  #: a client that does not take a reply's data for this long is dropped
CLOSE_TIMEOUT = 5.0  #: a closing connection's last data may take this long to leave
KEEPALIVE_TIMEOUT = 75.0  #: a kept-alive connection may idle this long between requests
MAX_CLIENTS = 5000  #: connections at once per server, by default (libvirtd's max_clients)
REFUSAL_LOG_INTERVAL = 10.0  #: refused connections, failed handshakes: one log line per this
#: TLS connections not yet authenticated at once, by default (libvirtd's max_anonymous_clients)
MAX_HANDSHAKING = 20
MAX_HANDSHAKING_PER_ADDRESS = 5  #: ... from one address
TLS_HANDSHAKE_TIMEOUT = 10.0  #: a TLS handshake must be done within this
LINGER_TIME = 10.0  #: after an error reply, discard what the client still sends this long
LINGER_TIMEOUT = 2.0  #: ... or until it pauses this long
SHUTDOWN_GRACE = 60.0  #: how long stopping the server waits for requests in progress
READ_SIZE = 65536

#: Python's names of certificate subject attributes -> the short names in libvirt's DNs
DN_NAMES = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
            "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
            "emailAddress": "emailAddress", "domainComponent": "DC"}


class HTTPError(Exception):
    """An error reply: ``status`` and the one-line ``message`` of its JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(ConnectionResetError):
    """The client closed its connection while a reply was being written."""


class Response:
    def __init__(self, body: bytes = b"", *, status: int = 200,
                 content_type: str = "application/json") -> None:
        self.body = body
        self.status = status
        self.content_type = content_type


def json_response(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status=status)


def text_response(text: str, content_type: str) -> Response:
    return Response(text.encode(), content_type=f"{content_type}; charset=utf-8")


def _dn_value(value: str) -> str:
    """An attribute value escaped as RFC 4514 says: a value can never pose as more RDNs."""
    out = "".join(f"\\{c}" if c in ',+"\\<>;' else "\\00" if c == "\0" else c
                  for c in value)
    if value.startswith((" ", "#")):
        out = "\\" + out
    if value.endswith(" ") and len(value) > 1:  # (a lone space: escaped as the first one)
        out = out[:-1] + "\\ "
    return out


def client_dn(extra: Callable[[str], Any]) -> str | None:
    """The TLS client certificate's subject as libvirt writes it (``C=GB,O=x,CN=y``), values
    escaped as RFC 4514 says (``O=a\\,CN=b`` is one organisation, not a CN) and the attributes
    of a multi-valued RDN joined with ``+``."""
    cert = extra("peercert")
    if not cert:
        return None
    return ",".join("+".join(f"{DN_NAMES.get(k, k)}={_dn_value(v)}" for k, v in rdn)
                    for rdn in cert.get("subject", ()))


def _peer_creds(sock: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process on the other end of the unix socket ``sock``."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)


def peer_key(extra: Callable[[str], Any]) -> str | None:
    """Whose connection this is, for per-peer limits: ``uid:U`` on a unix socket (None for
    root, who is never limited), ``ip:ADDRESS`` on TCP."""
    sock = extra("socket")
    if sock is None:
        return None
    if sock.family != socket.AF_UNIX:
        addr = extra("peername")
        return f"ip:{addr[0]}" if addr else None
    creds = _peer_creds(sock)
    return None if creds is None or creds[1] == 0 else f"uid:{creds[1]}"


def describe_peer(extra: Callable[[str], Any]) -> str:
    """``uid=U gid=G pid=P`` of the process on the other end of a unix socket, or the address
    and certificate DN of a TLS client."""
    sock = extra("socket")
    if sock is None:
        return "unknown peer"
    if sock.family != socket.AF_UNIX:
        addr = extra("peername")
        return f"tls {addr[0] if addr else '?'} dn={client_dn(extra)!r}"
    creds = _peer_creds(sock)
    if creds is None:
        return "unknown peer"
    pid, uid, gid = creds
    return f"uid={uid} gid={gid} pid={pid}"


class Request:
    """One request, its body read whole (at most the application's ``max_body``)."""

    def __init__(self, conn: _Connection, event: h11.Request) -> None:
        self._conn = conn
        self.app = conn.server.app
        self.method = event.method.decode("ascii")
        self.target = event.target.decode("latin-1")
        origin = self.target
        if origin.startswith(("http://", "https://")):  # absolute form (RFC 9112 3.2.2)
            origin = "/" + origin.split("://", 1)[1].partition("/")[2]
        raw_path, _, query = origin.partition("?")
        self.raw_path = raw_path
        self.path = unquote(raw_path)
        self.query: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            self.query.setdefault(key, value)
        self.raw_headers = list(event.headers)
        self.headers: dict[str, str] = {}
        for name, value in event.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self.http_version = event.http_version
        self.body = b""
        self.body_error: HTTPError | None = None
        self.handler: Handler | None = None
        self.match_info: dict[str, str] = {}
        self.peer = conn.peer

    def extra(self, name: str) -> Any:
        """The transport's ``get_extra_info(name)`` (``socket``, ``peercert``...)."""
        return self._conn.writer.get_extra_info(name)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def has_body(self) -> bool:
        return bool(self.body)

    @property
    def wants_websocket(self) -> bool:
        """A WebSocket handshake: ``GET`` over HTTP/1.1 with ``Connection: upgrade`` and
        ``Upgrade: websocket`` (RFC 6455 4.1)."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return (self.method == "GET" and self.http_version == b"1.1" and "upgrade" in tokens
                and self.headers.get("upgrade", "").lower() == "websocket")

    async def stream(self, content_type: str) -> Stream:
        """Start a reply of unknown length (chunked); the connection ends with it."""
        if self.method != "GET":
            raise HTTPError(405, f"method {self.method} not allowed on {self.path} (a stream: "
                                 "GET only)")
        return await self._conn.start_stream(content_type)

    async def websocket(self, *, heartbeat: float, max_message: int) -> WebSocket:
        """Accept this request's WebSocket upgrade (101); the connection ends with it."""
        return await self._conn.upgrade(self, heartbeat=heartbeat, max_message=max_message)


#: a handler's reply; ``None`` when it took the connection over (a stream, a WebSocket)
Handler = Callable[[Request], Awaitable[Response | None]]


class App:
    """Routes (``/v1/domains/{key}``, ``{op:attach|detach}``), the request handler the server
    calls (``handle``, e.g. a guard around :meth:`dispatch`) and the state handlers share."""

    def __init__(self, *, max_body: int) -> None:
        self.max_body = max_body
        self.state: dict[str, Any] = {}
        self._routes: list[tuple[list[tuple[str, set[str] | None]], dict[str, Handler]]] = []
        self.handle: Handler = self.dispatch
        #: before a body is read: a reply that refuses the request (logged by it), or None
        self.authorize: Callable[[Request], Response | None] = lambda request: None

    def body_limit(self, method: str) -> int:
        """The largest body a request may carry: ``max_body`` for POST and PUT, else none."""
        return self.max_body if method in ("POST", "PUT") else 0

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        segments: list[tuple[str, set[str] | None]] = []
        for part in pattern.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                name, _, choices = part[1:-1].partition(":")
                segments.append(("{" + name, set(choices.split("|")) if choices else None))
            else:
                segments.append((part, None))
        for route, methods in self._routes:
            if route == segments:
                methods[method] = handler
                return
        self._routes.append((segments, {method: handler}))

    def resolve(self, request: Request) -> Handler:
        parts = [unquote(p) for p in request.raw_path.strip("/").split("/")]
        path_matched = False
        for route, methods in self._routes:
            params = _match(route, parts)
            if params is None:
                continue
            path_matched = True
            handler = methods.get(request.method)
            if handler is None and request.method == "HEAD":
                handler = methods.get("GET")
            if handler is not None:
                request.match_info = params
                return handler
        if path_matched:
            raise HTTPError(405, f"method {request.method} not allowed on {request.path}")
        raise HTTPError(404, f"no such API path: {request.method} {request.path}")

    async def dispatch(self, request: Request) -> Response | None:
        if request.body_error is not None:
            raise request.body_error
        handler = request.handler or self.resolve(request)
        return await handler(request)


def _match(route: list[tuple[str, set[str] | None]], parts: list[str]) -> dict[str, str] | None:
    if len(route) != len(parts):
        return None
    params: dict[str, str] = {}
    for (name, choices), part in zip(route, parts, strict=True):
        if name.startswith("{"):
            if not part or (choices is not None and part not in choices):
                return None
            params[name[1:]] = part
        elif name != part:
            return None
    return params


class Stream:
    """A reply written piece by piece (chunked transfer coding)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    async def write(self, data: bytes) -> None:
        await self._conn.write(self._conn.h11.send(h11.Data(data=data)))


class WebSocket:
    """The server end of an accepted WebSocket; binary and text messages both arrive as bytes
    (in pieces as they come: a large message never sits whole in memory)."""

    def __init__(self, conn: _Connection, ws: WSConnection, *, heartbeat: float,
                 max_message: int) -> None:
        self._conn = conn
        self._ws = ws
        self._heartbeat = heartbeat
        self._max_message = max_message

    async def send_bytes(self, data: bytes) -> None:
        if self._ws.state is ConnectionState.OPEN:
            await self._conn.write(self._ws.send(BytesMessage(data=data)))

    async def messages(self) -> AsyncIterator[bytes]:
        """The client's message data until it closes, goes away, or stops answering pings."""
        size = 0
        waiting_for_pong = False
        data = b"?"  # first: what arrived together with the handshake, already given to wsproto
        while True:
            for event in self._ws.events():
                if isinstance(event, BytesMessage | TextMessage):
                    chunk = event.data.encode() if isinstance(event, TextMessage) else event.data
                    size += len(chunk)
                    if size > self._max_message:
                        log.warning("%s: WebSocket message over %d bytes; closing",
                                    self._conn.peer, self._max_message)
                        await self.close(1009)
                        return
                    if event.message_finished:
                        size = 0
                    yield bytes(chunk)
                elif isinstance(event, Ping):
                    await self._conn.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._conn.write(self._ws.send(event.response()))
                    elif self._ws.state is ConnectionState.OPEN:
                        # wsproto could not parse a frame: say why, with its code (a lost
                        # connection or the answer to our close left the state CLOSED)
                        log.warning("%s: WebSocket protocol error: %s (%d); closing",
                                    self._conn.peer, event.reason, event.code)
                        await self.close(event.code)
                    return
            if not data:
                return
            try:
                data = await asyncio.wait_for(self._conn.reader.read(READ_SIZE),
                                              self._heartbeat)
            except TimeoutError:
                if waiting_for_pong:
                    log.info("%s: WebSocket client stopped answering pings; closing",
                             self._conn.peer)
                    await self.close(1001)
                    return
                waiting_for_pong = True
                await self._conn.write(self._ws.send(Ping()))
                data = b"?"
                continue
            except OSError:
                data = b""
            waiting_for_pong = False
            self._ws.receive_data(data or None)

    async def close(self, code: int = 1000) -> None:
        if self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(ConnectionResetError, LocalProtocolError):
                await self._conn.write(self._ws.send(CloseConnection(code=code)))


class _Connection:
    """One client connection: requests one after another until it closes."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.peer = describe_peer(writer.get_extra_info)
        self.busy = False  #: a handler that changes something is running (shutdown waits)
        self.taken_over = False  #: a stream or WebSocket: the connection ends with its handler
        self._fed = 0  #: bytes given to h11 (the size of a request head)
        self.aborted = False  #: its transport was aborted (a failed TLS handshake)
        self.head_only = False  #: the request being answered is a HEAD

    async def write(self, data: bytes) -> None:
        """Send ``data``; a client that does not take it within :data:`WRITE_TIMEOUT` is
        dropped (its connection aborted): it cannot hold a task or a slot forever."""
        if not data:
            return
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT)
        except TimeoutError:
            log.warning("%s: the client did not read for %.0f s; dropping it", self.peer,
                        WRITE_TIMEOUT)
            self.writer.transport.abort()
            raise ClientGone("the client stopped reading") from None
        except OSError as exc:
            raise ClientGone(str(exc)) from None

    async def _event(self, deadline: float, idle: float | None = None) -> Any:
        """h11's next event; data must come before ``deadline`` and, with ``idle``, pause no
        longer than that."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE),
                                              min(left, idle) if idle else left)
            except TimeoutError:  # an OSError too: not a connection that broke
                raise
            except OSError:
                data = b""
            self._fed += len(data)
            self.h11.receive_data(data)

    async def serve(self) -> None:
        first = True
        app = self.server.app
        while True:
            wait = HEAD_TIMEOUT if first else KEEPALIVE_TIMEOUT
            first = False
            self.head_only = False
            buffered = len(self.h11.trailing_data[0])
            self._fed = 0
            try:
                event = await self._event(time.monotonic() + wait)
            except TimeoutError:
                if self._started_a_request():
                    log.warning("%s: no complete request in %.0f s; closing", self.peer, wait)
                    await self._error(408, f"no complete request within {wait:.0f} s")
                return
            except h11.RemoteProtocolError as exc:
                log.warning("%s: malformed HTTP request: %s", self.peer, exc)
                status = exc.error_status_hint
                await self._error(status, f"malformed HTTP request: {exc} "
                                          f"({HTTPStatus(status).phrase})")
                await self._linger()
                return
            if not isinstance(event, h11.Request):  # ConnectionClosed
                return
            self.head_only = event.method == b"HEAD"
            head = buffered + self._fed - len(self.h11.trailing_data[0])
            if head > MAX_HEAD:  # h11 only limits heads it has not yet parsed whole
                log.warning("%s: request head of %d bytes (at most %d); refused", self.peer,
                            head, MAX_HEAD)
                await self._error(431, f"request head too large ({head} bytes, at most "
                                       f"{MAX_HEAD})")
                await self._linger()
                return
            request = Request(self, event)
            reply = await self._before_body(request)
            if reply is None:
                if request.body_error is None and not await self._read_body(
                        request, app.body_limit(request.method)):
                    return
                reply = await self._handle(request)
                if self.taken_over:
                    if self.h11.our_state is h11.SEND_BODY:  # a stream: its last chunk
                        self.writer.write(self.h11.send(h11.EndOfMessage()))
                    return
                assert reply is not None
            await self._reply(request, reply)
            if self.h11.their_state is not h11.DONE:  # a body left unread
                await self._linger()
                return
            if self.h11.our_state is not h11.DONE or self.server.closing:
                return
            self.h11.start_next_cycle()

    async def _before_body(self, request: Request) -> Response | None:
        """What is decided on the head alone: the request-smuggling shape, the application's
        authorization (a refusal is the reply) and the route (an error for the guard)."""
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            log.warning("%s: %s %s with both Content-Length and Transfer-Encoding; refused",
                        self.peer, request.method, request.target)
            request.body_error = HTTPError(400, "a request may not carry both Content-Length "
                                                "and Transfer-Encoding")
            return None
        refusal = self.server.app.authorize(request)
        if refusal is not None:
            return refusal
        try:
            request.handler = self.server.app.resolve(request)
        except HTTPError as exc:
            request.body_error = exc
        return None

    def _started_a_request(self) -> bool:
        # h11 keeps an incomplete head in its buffer; trailing_data shows it
        return bool(self.h11.trailing_data[0])

    async def _linger(self) -> None:
        """After an error reply with the request not read whole: stop sending and discard
        what the client still sends, for a bounded time, so that it gets to read the reply
        (closing at once would reset the connection under a client still writing)."""
        with contextlib.suppress(Exception):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        deadline = time.monotonic() + LINGER_TIME
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE),
                                              min(left, LINGER_TIMEOUT))
            except (TimeoutError, OSError):
                return
            if not data:
                return

    async def _read_body(self, request: Request, limit: int) -> bool:
        """Read the body whole, or note why not (the guard answers with that error); False:
        the connection is over (the client went away, or its body stalled: answered 408)."""
        too_large = HTTPError(413, f"request too large (at most {limit} bytes)" if limit else
                              f"{request.method} {request.path} takes no request body")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            request.body_error = too_large
            return True
        if self.h11.they_are_waiting_for_100_continue:
            await self.write(self.h11.send(h11.InformationalResponse(status_code=100,
                                                                     headers=[])))
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + BODY_DEADLINE
        try:
            while True:
                event = await self._event(deadline, BODY_TIMEOUT)
                if isinstance(event, h11.EndOfMessage):
                    break
                if not isinstance(event, h11.Data):  # the client went away mid-body
                    return False
                size += len(event.data)
                if size > limit:
                    request.body_error = too_large
                    return True
                chunks.append(event.data)
        except TimeoutError:
            stalled = time.monotonic() < deadline
            log.warning("%s: %s %s: %s; closing", self.peer, request.method, request.target,
                        f"the body stalled for {BODY_TIMEOUT:.0f} s" if stalled else
                        f"the body was not whole in {BODY_DEADLINE:.0f} s")
            await self._error(408, "the request body did not arrive in time")
            return False
        except h11.RemoteProtocolError as exc:
            request.body_error = HTTPError(400, f"malformed HTTP request body: {exc}")
            return True
        request.body = b"".join(chunks)
        return True

    async def _handle(self, request: Request) -> Response | None:
        """The application's reply; an error it did not turn into one itself becomes a JSON
        error here (500 for a bug: logged, the connection and the server go on)."""
        self.busy = True
        try:
            return await self.server.app.handle(request)
        except HTTPError as exc:
            if self.taken_over:
                return None
            return json_response({"error": exc.message}, status=exc.status)
        except asyncio.CancelledError:
            if self.taken_over and self.h11.our_state is h11.SEND_BODY:
                with contextlib.suppress(Exception):  # a stream ends with its last chunk
                    self.writer.write(self.h11.send(h11.EndOfMessage()))
            raise
        except ClientGone:
            raise
        except Exception as exc:
            log.exception("%s: internal error serving %s %s", self.peer, request.method,
                          request.target)
            if self.taken_over:
                return None
            return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                 status=500)
        finally:
            self.busy = False

    async def _reply(self, request: Request, reply: Response) -> None:
        headers = [("content-type", reply.content_type),
                   ("content-length", str(len(reply.body))), ("server", "vmconfine")]
        if (request.body_error is not None or self.h11.their_state is not h11.DONE
                or self.server.closing):
            headers.append(("connection", "close"))  # the rest of the body stays unread
        data = self.h11.send(h11.Response(status_code=reply.status, headers=headers,
                                          reason=HTTPStatus(reply.status).phrase))
        if reply.body and request.method != "HEAD":
            data += self.h11.send(h11.Data(data=reply.body))
        data += self.h11.send(h11.EndOfMessage())
        await self.write(data)

    async def _error(self, status: int, message: str) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": message}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("connection", "close"), ("server", "vmconfine")]
        with contextlib.suppress(ClientGone, h11.LocalProtocolError):
            data = self.h11.send(h11.Response(status_code=status, headers=headers,
                                              reason=HTTPStatus(status).phrase))
            if not self.head_only:  # a reply to HEAD has no body (h11 refuses one)
                data += self.h11.send(h11.Data(data=body))
            await self.write(data + self.h11.send(h11.EndOfMessage()))

    async def start_stream(self, content_type: str) -> Stream:
        if self.server.closing:  # it would only be ended again at once
            raise HTTPError(503, "the daemon is stopping")
        self.taken_over = True
        self.busy = False
        await self.write(self.h11.send(h11.Response(
            status_code=200, reason=b"OK",
            headers=[("content-type", content_type), ("cache-control", "no-cache"),
                     ("server", "vmconfine")])))
        return Stream(self)

    async def upgrade(self, request: Request, *, heartbeat: float,
                      max_message: int) -> WebSocket:
        if not request.wants_websocket:
            raise HTTPError(400, "not a WebSocket handshake (GET over HTTP/1.1 with "
                                 "'Connection: upgrade' and 'Upgrade: websocket')")
        if self.server.closing:
            raise HTTPError(503, "the daemon is stopping")
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(request.raw_headers, request.target)
        except (WebSocketProtocolError, LocalProtocolError, h11.ProtocolError) as exc:
            raise HTTPError(400, f"not a valid WebSocket upgrade: {exc}") from None
        list(ws.events())  # the handshake's Request event
        self.taken_over = True
        self.busy = False
        await self.write(ws.send(AcceptConnection()))
        trailing, _closed = self.h11.trailing_data
        if trailing:
            ws.receive_data(trailing)
        return WebSocket(self, ws, heartbeat=heartbeat, max_message=max_message)


class Server:
    """Serves one :class:`App` on any number of listening sockets, at most ``max_clients``
    connections at once."""

    def __init__(self, app: App, *, max_clients: int = MAX_CLIENTS,
                 max_handshaking: int = MAX_HANDSHAKING) -> None:
        self.app = app
        self.max_clients = max_clients
        self.max_handshaking = max_handshaking
        #: one non-root uid's (or one address's) share: nobody can hold every slot
        self.max_per_peer = max(16, max_clients // 4)
        self.connections: dict[asyncio.Task[None], _Connection] = {}
        self.closing = False  #: connections end after the request in progress
        self._listeners: list[asyncio.base_events.Server] = []
        self._tls: Any = None
        self._per_peer: dict[str, int] = {}
        self._handshaking: dict[str, int] = {}
        self._refused: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    async def listen_unix(self, path: str) -> None:
        self._listeners.append(await asyncio.start_unix_server(self._accept, path=path))

    async def listen_tcp(self, host: str, port: int, ssl: Any = None) -> None:
        """Listen on TCP; with ``ssl`` (a server context) every connection is TLS, its
        handshake done per connection (counted, timed and logged like a request)."""
        self._tls = ssl
        self._listeners.append(await asyncio.start_server(self._accept, host, port))

    def _note(self, kind: str, line: str, *args: object) -> None:
        """Log ``line`` at most once per :data:`REFUSAL_LOG_INTERVAL` per ``kind``, with how
        many more there were since: a flood of clients cannot flood the log."""
        self._refused[kind] = self._refused.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(kind, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            log.warning(line + " (%d like it since the last such line)", *args,
                        self._refused[kind])
            self._logged[kind] = now
            self._refused[kind] = 0

    def _admit(self, key: str | None, writer: asyncio.StreamWriter) -> bool:
        if self.closing:
            return False
        refusal = self._over_a_limit(key)
        if refusal is not None:  # the peer is described (its credentials read) only now
            kind, line, *args = refusal
            self._note(kind, line, describe_peer(writer.get_extra_info), *args)
            return False
        return True

    def _over_a_limit(self, key: str | None) -> tuple[Any, ...] | None:
        """(kind, log line, its arguments after the peer) of the limit a new connection from
        ``key`` is over, or None."""
        if len(self.connections) >= self.max_clients:
            return ("max_clients", "%s: refused, %d connections already (max_clients)",
                    self.max_clients)
        if key is not None and self._per_peer.get(key, 0) >= self.max_per_peer:
            return ("per_peer", "%s: refused, %d connections from it already",
                    self.max_per_peer)
        if self._tls is not None:
            everyone = sum(self._handshaking.values()) >= self.max_handshaking
            this_one = self._handshaking.get(key or "?", 0) >= min(
                MAX_HANDSHAKING_PER_ADDRESS, self.max_handshaking)
            if everyone or this_one:
                return ("handshaking", "%s: refused, too many TLS handshakes in progress")
        return None

    async def _handshake(self, conn: _Connection, key: str | None) -> bool:
        """The TLS handshake, counted apart while it lasts (at most ``max_handshaking``,
        :data:`MAX_HANDSHAKING_PER_ADDRESS` from one address, :data:`TLS_HANDSHAKE_TIMEOUT`
        each): unauthenticated clients cannot take authenticated ones' places."""
        slot = key or "?"
        self._handshaking[slot] = self._handshaking.get(slot, 0) + 1
        try:
            await conn.writer.start_tls(self._tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError, EOFError) as exc:
            self._note("handshake", "%s: TLS handshake failed: %s", conn.peer,
                       getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            conn.writer.transport.abort()  # nothing to send: no orderly close to wait for
            conn.aborted = True
            return False
        finally:
            self._handshaking[slot] -= 1
            if not self._handshaking[slot]:
                del self._handshaking[slot]
        conn.peer = describe_peer(conn.writer.get_extra_info)
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        key = peer_key(writer.get_extra_info)
        if not self._admit(key, writer):
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer)
        self.connections[task] = conn
        if key is not None:
            self._per_peer[key] = self._per_peer.get(key, 0) + 1
        try:
            if self._tls is None or await self._handshake(conn, key):
                await conn.serve()
        except (ClientGone, asyncio.CancelledError):
            pass
        except Exception:  # a server never dies of a client
            log.exception("%s: internal error serving a connection", conn.peer)
        finally:
            try:
                if not conn.aborted:
                    await self._close(writer)
            finally:
                del self.connections[task]
                if key is not None:
                    self._per_peer[key] -= 1
                    if not self._per_peer[key]:
                        del self._per_peer[key]

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close, letting the last data leave for :data:`CLOSE_TIMEOUT`; a client that does
        not take it is aborted."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
        except (Exception, asyncio.CancelledError):
            writer.transport.abort()

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop listening; end idle connections, streams and WebSockets at once; give
        requests in progress ``grace`` seconds, then cancel them too."""
        self.closing = True
        for listener in self._listeners:
            listener.close()
        for task, conn in list(self.connections.items()):
            if not conn.busy:
                task.cancel()
        busy = [t for t, c in self.connections.items() if c.busy]
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
        left = dict(self.connections)
        if left:
            _done, stuck = await asyncio.wait(left, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                left[task].writer.transport.abort()
