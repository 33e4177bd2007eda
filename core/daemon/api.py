"""The daemon's API: JSON over HTTP on unix sockets, documented in docs/api.md.

HTTP on a unix socket is the convention of Incus, podman and Docker: framing, errors, streaming
and upgrades follow a standard (served by :mod:`vmconfine.daemon.httpserver`, on h11 and
wsproto) instead of a home-made protocol, and any HTTP client (curl --unix-socket) can talk to
it. Two sockets serve the same routes: the read-write one (root-only by default, like
libvirt-sock) and the read-only one (like libvirt-sock-ro), which refuses every request that
changes something. Every request is logged with the peer's credentials (SO_PEERCRED). Errors
are ``{"error": "<the CLI's one-line message>"}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import re
import termios
from typing import Any

from vmconfine import __version__
from vmconfine.config.instance import parse_uri
from vmconfine.daemon.events import EventBus
from vmconfine.daemon.httpserver import (
    App,
    ClientGone,
    Handler,
    HTTPError,
    Request,
    Response,
    client_dn,
    json_response,
    text_response,
)
from vmconfine.daemon.manager import DomainManager, OperationError
from vmconfine.domain.xml import without_secrets
from vmconfine.errors import NotRunningError, VmconfineError, XMLError

log = logging.getLogger(__name__)

MAX_BODY = 10 * 1024 * 1024  # the domain XML limit
EVENT_KEEPALIVE = 15.0
CONSOLE_HEARTBEAT = 30.0
CONSOLE_MAX_MESSAGE = 1 << 20
#: typed console input the guest has not taken yet; more is dropped (and logged)
CONSOLE_INPUT_BACKLOG = 1 << 20
ACTIONS = ("start", "shutdown", "reboot", "reset", "suspend", "resume", "destroy")


def manager(request: Request) -> DomainManager:
    return request.app.state["manager"]


def readonly(request: Request) -> bool:
    return request.app.state["readonly"]


def error(status: int, message: str) -> Response:
    return json_response({"error": message}, status=status)


#: what ``*`` and ``?`` of a tls_allowed_dn_list pattern match: characters of one attribute
#: value (an escaped character is one), never the ``,`` between two RDNs
_DN_ANY = r"(?:[^,\\]|\\.)*"
_DN_ONE = r"(?:[^,\\]|\\.)"


@functools.lru_cache(maxsize=256)
def _dn_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(_DN_ANY if c == "*" else _DN_ONE if c == "?" else re.escape(c)
                              for c in pattern), re.S)


def dn_matches(dn: str, pattern: str) -> bool:
    """libvirt's tls_allowed_dn_list match (``*`` and ``?`` wildcards, case-sensitive), with
    a wildcard kept inside one RDN: ``C=GB,O=*,CN=admin`` does not take
    ``C=GB,O=Evil,CN=bob\\,CN=admin`` (a CN of the attacker's choosing). ``*`` alone is any
    certificate the CA signed."""
    return pattern == "*" or _dn_pattern(pattern).fullmatch(dn) is not None


def authorize(request: Request) -> Response | None:
    """Who may ask what, decided on the request's head before any body is read: the TLS
    client's DN against tls_allowed_dn_list, the instance the client meant, the read-only
    socket. Returns the refusal (logged), or None."""
    who = request.peer
    allowed = request.app.state["tls_dns"]
    if allowed:
        dn = client_dn(request.extra) or ""
        if not any(dn_matches(dn, pattern) for pattern in allowed):
            log.warning("%s %s %s: refused, DN not in tls_allowed_dn_list", who,
                        request.method, request.target)
            return error(403, f"the client certificate's distinguished name '{dn}' is not on "
                              "the server's list of allowed clients (tls_allowed_dn_list)")
    wanted = request.headers.get("x-vmconfine-uri")
    served = manager(request).conn.instance.uri
    if wanted and not same_instance(wanted, served):
        log.info("%s %s %s: refused, meant for %r", who, request.method, request.target,
                 wanted)
        return error(404, f"this daemon serves {served}, not {wanted}")
    if readonly(request) and request.method not in ("GET", "HEAD"):
        log.warning("%s %s %s: refused on the read-only socket", who, request.method,
                    request.target)
        return error(403, "this connection is read-only: use the read-write socket "
                          "(root, or a member of unix_sock_group) to change domains")
    return None


async def guard(request: Request) -> Response | None:
    """One-line JSON errors for everything a handler raises, and a log line per request."""
    who = request.peer
    status: int | str
    try:
        response = await request.app.dispatch(request)
    except HTTPError as exc:
        response = error(exc.status, exc.message)
    except (NotRunningError, LookupError) as exc:
        response = error(404, getattr(exc, "message", str(exc)))
    except OperationError as exc:
        response = error(409, exc.message)
    except XMLError as exc:
        response = error(400, exc.message)
    except VmconfineError as exc:
        response = error(422, exc.message)
    except (asyncio.CancelledError, ClientGone):
        raise
    except Exception as exc:  # a server never dies of a request
        log.exception("internal error serving %s %s", request.method, request.target)
        response = error(500, f"internal error: {type(exc).__name__}: {exc}")
    status = response.status if response is not None else "closed"
    log.info("%s %s %s -> %s", who, request.method, request.target, status)
    return response


def _json_body(request: Request) -> dict[str, Any]:
    if not request.has_body:
        return {}
    try:
        body = request.json()
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError...
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise HTTPError(400, f"'{key}' must be true or false")
    return value


def _seconds(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise HTTPError(400, f"'{key}' must be a number of seconds (0-86400)")
    return float(value)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"'{key}' must be a non-empty string")
    return value


# ---- handlers ------------------------------------------------------------------------------


async def version(request: Request) -> Response:
    return json_response({"version": __version__, "uri": manager(request).conn.instance.uri,
                          "readonly": readonly(request)})


async def list_domains(request: Request) -> Response:
    all_ = request.query.get("all", "") in ("1", "true", "yes")
    return json_response({"domains": manager(request).list(all_=all_)})


async def domain_info(request: Request) -> Response:
    rows = manager(request).info(request.match_info["key"])
    return json_response({"info": [list(r) for r in rows]})


async def domain_state(request: Request) -> Response:
    return json_response(manager(request).state(request.match_info["key"]))


async def domain_xml(request: Request) -> Response:
    inactive = request.query.get("inactive", "") in ("1", "true", "yes")
    secure = request.query.get("secure", "") in ("1", "true", "yes")
    if secure and readonly(request):
        return error(403, "this connection is read-only: security-sensitive information "
                          "(--security-info: graphics passwords) needs the read-write socket")
    text = manager(request).xml(request.match_info["key"], inactive=inactive)
    if not secure:
        text = without_secrets(text, "<dumpxml>")
    return text_response(text, "application/xml")


async def post_domains(request: Request) -> Response:
    """Define (persistent) or create (transient, started) a domain from XML."""
    body = _json_body(request)
    xml = _text(body, "xml")
    action = body.get("action", "define")
    mgr = manager(request)
    if action == "define":
        name = mgr.define(xml)
    elif action == "create":
        name = await mgr.create(xml, paused=_flag(body, "paused"))
    else:
        raise HTTPError(400, f"unknown action {action!r} (define or create)")
    return json_response({"name": name})


async def undefine(request: Request) -> Response:
    keep_tpm = request.query.get("keep_tpm", "0") not in ("0", "", "false")
    name = manager(request).undefine(request.match_info["key"], keep_tpm=keep_tpm)
    return json_response({"name": name})


async def domain_action(request: Request) -> Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise HTTPError(404, f"no such API path: {request.method} {request.path}")
    body = _json_body(request)
    mgr = manager(request)
    key = request.match_info["key"]
    if action == "start":
        name = await mgr.start(key, paused=_flag(body, "paused"),
                               reset_nvram=_flag(body, "reset_nvram"))
    elif action == "shutdown":
        name = await mgr.shutdown(key, timeout=_seconds(body, "timeout"))
    else:
        name = await getattr(mgr, action)(key)
    return json_response({"name": name})


async def autostart(request: Request) -> Response:
    body = _json_body(request)
    name = manager(request).set_autostart(request.match_info["key"],
                                              _flag(body, "enable"))
    return json_response({"name": name})


async def devices(request: Request) -> Response:
    """attach-device / detach-device (disk, serial/console/channel, USB hostdev):
    ``{"xml", "live", "config", "persistent"}``."""
    body = _json_body(request)
    mgr = manager(request)
    op = mgr.attach_device if request.match_info["op"] == "attach" else mgr.detach_device
    name = await op(request.match_info["key"], _text(body, "xml"), live=_flag(body, "live"),
                    config=_flag(body, "config"), persistent=_flag(body, "persistent"))
    return json_response({"name": name})


async def change_media(request: Request) -> Response:
    """change-media: ``{"target", "source", "action", "live", "config", "force"}``."""
    body = _json_body(request)
    source = body.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        raise HTTPError(400, "'source' must be a non-empty string or null")
    line = await manager(request).change_media(
        request.match_info["key"], _text(body, "target"), source, _text(body, "action"),
        live=_flag(body, "live"), config=_flag(body, "config"), force=_flag(body, "force"))
    return json_response({"message": line})


async def events(request: Request) -> Response | None:
    """Lifecycle events as newline-delimited JSON until the client goes away."""
    bus: EventBus = request.app.state["events"]
    only = request.query.get("domain")
    stream = await request.stream("application/x-ndjson")
    queue = bus.subscribe()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), EVENT_KEEPALIVE)
            except TimeoutError:
                await stream.write(b"\n")  # keepalive; finds a client that went away
                continue
            if ev is None:  # dropped: too slow
                break
            if only and ev.domain != only:
                continue
            await stream.write(json.dumps(ev.to_json()).encode() + b"\n")
    except ConnectionResetError:  # the client went away (or stopped reading: dropped)
        pass
    finally:
        bus.unsubscribe(queue)
    return None


async def console(request: Request) -> Response | None:
    """The domain's serial console as a WebSocket (binary frames both ways), one client at a
    time, like virsh console (read-write socket only: it types into the guest)."""
    if readonly(request):
        return error(403, "this connection is read-only: the console needs the read-write "
                          "socket")
    name, pty = await manager(request).console_pty(request.match_info["key"])
    busy: set[str] = request.app.state["consoles"]
    if name in busy:
        return error(409, f"an active console session exists for domain '{name}'")
    if not request.wants_websocket:
        return error(400, "the console is a WebSocket: connect with 'vmconfine console'")
    try:
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return error(409, f"cannot open the console of domain '{name}' ({pty}): "
                          f"{exc.strerror}")
    busy.add(name)
    loop = asyncio.get_running_loop()
    ws = None
    try:
        with contextlib.suppress(termios.error):
            _make_raw(fd)
        ws = await request.websocket(heartbeat=CONSOLE_HEARTBEAT,
                                     max_message=CONSOLE_MAX_MESSAGE)
        out: asyncio.Queue[bytes] = asyncio.Queue(256)

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # QEMU went away
                loop.remove_reader(fd)
            if out.full():  # a client that does not read loses console output, not memory
                return
            out.put_nowait(data)

        async def to_client() -> None:
            while data := await out.get():
                await ws.send_bytes(data)

        typed: collections.deque[bytes] = collections.deque()
        backlog = [0, 0]  # bytes typed and not yet taken by the guest; bytes dropped
        wake = asyncio.Event()

        async def from_client() -> None:
            # always reading the WebSocket (its pings, its close), whatever the guest does
            async for data in ws.messages():
                if backlog[0] + len(data) > CONSOLE_INPUT_BACKLOG:
                    if not backlog[1]:
                        log.warning("console of domain %s: the guest does not read its "
                                    "console; input over %d bytes is dropped", name,
                                    CONSOLE_INPUT_BACKLOG)
                    backlog[1] += len(data)
                    continue
                typed.append(data)
                backlog[0] += len(data)
                wake.set()

        async def to_guest() -> None:
            while True:
                await wake.wait()
                wake.clear()
                while typed:
                    data = typed.popleft()
                    await _write_all(fd, data)
                    backlog[0] -= len(data)

        loop.add_reader(fd, readable)
        pumps = {asyncio.ensure_future(to_client()), asyncio.ensure_future(from_client()),
                 asyncio.ensure_future(to_guest())}
        try:
            done, _pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled (the daemon stops): none outlives the fd
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        for task in done:  # how the session ended: a client that left, a console that closed
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, OSError):
                log.error("console of domain %s: %s: %s", name, type(exc).__name__, exc)
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        os.close(fd)
        busy.discard(name)
        if ws is not None:
            await ws.close()
    return None


async def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking pty ``fd``, waiting while the guest does not
    read (the console's input queue holds what is typed meanwhile, up to
    :data:`CONSOLE_INPUT_BACKLOG`)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _writable(loop, fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _make_raw(fd: int) -> None:
    """cfmakeraw(3) on the pty (no echo, no line editing, 8 bits), as libvirt does."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
               termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


def same_instance(a: str, b: str) -> bool:
    try:
        pa, pb = parse_uri(a), parse_uri(b)
    except (VmconfineError, ValueError):  # ValueError: urllib's, e.g. "qemu://[/system"
        return False
    return (pa.kind, pa.root) == (pb.kind, pb.root)


def make_app(manager: DomainManager, events_bus: EventBus, *, readonly: bool,
             tls_dn_list: list[str] | None = None, consoles: set[str] | None = None) -> App:
    """The API on one socket. ``consoles``: the domains with a console session, shared by
    every socket of the daemon (one session per domain, whichever socket it came by)."""
    app = App(max_body=MAX_BODY)
    app.handle = guard
    app.authorize = authorize
    app.state.update(manager=manager, events=events_bus, readonly=readonly,
                     consoles=set() if consoles is None else consoles,
                     tls_dns=tls_dn_list or [])
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/v1/version", version),
        ("GET", "/v1/domains", list_domains),
        ("POST", "/v1/domains", post_domains),
        ("GET", "/v1/domains/{key}", domain_info),
        ("DELETE", "/v1/domains/{key}", undefine),
        ("GET", "/v1/domains/{key}/state", domain_state),
        ("GET", "/v1/domains/{key}/xml", domain_xml),
        ("PUT", "/v1/domains/{key}/autostart", autostart),
        ("POST", "/v1/domains/{key}/devices/{op:attach|detach}", devices),
        ("POST", "/v1/domains/{key}/media", change_media),
        ("POST", "/v1/domains/{key}/{action}", domain_action),
        ("GET", "/v1/domains/{key}/console", console),
        ("GET", "/v1/events", events),
    ]
    for method, pattern, handler in routes:
        app.add(method, pattern, handler)
    return app
