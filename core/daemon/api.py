"""The daemon's API: JSON over HTTP on unix sockets (aiohttp), documented in docs/api.md.

HTTP on a unix socket is the convention of Incus, podman and Docker: framing, errors, streaming
and upgrades come from a well-kept library instead of a home-made protocol, and any HTTP client
(curl --unix-socket) can talk to it. Two sockets serve the same routes: the read-write one
(root-only by default, like libvirt-sock) and the read-only one (like libvirt-sock-ro), which
refuses every request that changes something. Every request is logged with the peer's
credentials (SO_PEERCRED). Errors are ``{"error": "<the CLI's one-line message>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from vmconfine import __version__
from vmconfine.config.instance import parse_uri
from vmconfine.daemon.events import EventBus
from vmconfine.daemon.manager import DomainManager, OperationError
from vmconfine.errors import NotRunningError, VmconfineError, XMLError

log = logging.getLogger(__name__)

MAX_BODY = 10 * 1024 * 1024  # the domain XML limit
EVENT_KEEPALIVE = 15.0
ACTIONS = ("start", "shutdown", "reboot", "reset", "suspend", "resume", "destroy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MANAGER = web.AppKey("manager", DomainManager)
EVENTS = web.AppKey("events", EventBus)
READONLY = web.AppKey("readonly", bool)
CONSOLES = web.AppKey("consoles", set)
TLS_DNS = web.AppKey("tls_dns", list)
#: Python's names of certificate subject attributes -> the short names in libvirt's DNs
DN_NAMES = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
            "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
            "emailAddress": "emailAddress", "domainComponent": "DC"}


def client_dn(request: web.Request) -> str | None:
    """The TLS client certificate's subject as libvirt writes it (``C=GB,O=x,CN=y``)."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        return None
    return ",".join(f"{DN_NAMES.get(k, k)}={v}" for rdn in cert.get("subject", ())
                    for k, v in rdn)


def peer(request: web.Request) -> str:
    """``uid=U gid=G pid=P`` of the process on the other end of the unix socket, or the
    address and certificate DN of a TLS client."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return "unknown peer"
    if sock.family != socket.AF_UNIX:
        addr = request.transport.get_extra_info("peername") if request.transport else None
        return f"tls {addr[0] if addr else '?'} dn={client_dn(request)!r}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "unknown peer"
    pid, uid, gid = struct.unpack("3i", creds)
    return f"uid={uid} gid={gid} pid={pid}"


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read-only enforcement, one-line JSON errors, and a log line per request."""
    who = peer(request)
    readonly = request.app[READONLY]
    allowed = request.app[TLS_DNS]
    if allowed:
        dn = client_dn(request) or ""
        if not any(fnmatch.fnmatchcase(dn, pattern) for pattern in allowed):
            log.warning("%s %s %s: refused, DN not in tls_allowed_dn_list", who,
                        request.method, request.path)
            return error(403, f"the client certificate's distinguished name '{dn}' is not on "
                              "the server's list of allowed clients (tls_allowed_dn_list)")
    wanted = request.headers.get("X-Vmconfine-URI")
    served = request.app[MANAGER].conn.instance.uri
    if wanted and not same_instance(wanted, served):
        return error(404, f"this daemon serves {served}, not {wanted}")
    if readonly and request.method not in ("GET", "HEAD"):
        log.warning("%s %s %s: refused on the read-only socket", who, request.method,
                    request.path)
        return error(403, "this connection is read-only: use the read-write socket "
                          "(root, or a member of unix_sock_group) to change domains")
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            response = error(413, f"request too large (at most {MAX_BODY} bytes)")
        elif exc.status == 404:
            response = error(404, f"no such API path: {request.method} {request.path}")
        elif exc.status == 405:
            response = error(405, f"method {request.method} not allowed on {request.path}")
        else:
            response = error(exc.status, exc.reason)
    except (NotRunningError, LookupError) as exc:
        response = error(404, getattr(exc, "message", str(exc)))
    except OperationError as exc:
        response = error(409, exc.message)
    except XMLError as exc:
        response = error(400, exc.message)
    except VmconfineError as exc:
        response = error(422, exc.message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a server never dies of a request
        log.exception("internal error serving %s %s", request.method, request.path)
        response = error(500, f"internal error: {type(exc).__name__}: {exc}")
    log.info("%s %s %s -> %d", who, request.method, request.path_qs, response.status)
    return response


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(reason=f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="request body must be a JSON object")
    return body


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(reason=f"'{key}' must be true or false")
    return value


def _seconds(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise web.HTTPBadRequest(reason=f"'{key}' must be a number of seconds (0-86400)")
    return float(value)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise web.HTTPBadRequest(reason=f"'{key}' must be a non-empty string")
    return value


# ---- handlers ------------------------------------------------------------------------------


async def version(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER]
    return web.json_response({"version": __version__, "uri": mgr.conn.instance.uri,
                              "readonly": request.app[READONLY]})


async def list_domains(request: web.Request) -> web.Response:
    all_ = request.query.get("all", "") in ("1", "true", "yes")
    return web.json_response({"domains": request.app[MANAGER].list(all_=all_)})


async def domain_info(request: web.Request) -> web.Response:
    rows = request.app[MANAGER].info(request.match_info["key"])
    return web.json_response({"info": [list(r) for r in rows]})


async def domain_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[MANAGER].state(request.match_info["key"]))


async def domain_xml(request: web.Request) -> web.Response:
    inactive = request.query.get("inactive", "") in ("1", "true", "yes")
    text = request.app[MANAGER].xml(request.match_info["key"], inactive=inactive)
    return web.Response(text=text, content_type="application/xml")


async def post_domains(request: web.Request) -> web.Response:
    """Define (persistent) or create (transient, started) a domain from XML."""
    body = await _json_body(request)
    xml = _text(body, "xml")
    action = body.get("action", "define")
    mgr = request.app[MANAGER]
    if action == "define":
        name = mgr.define(xml)
    elif action == "create":
        name = await mgr.create(xml, paused=_flag(body, "paused"))
    else:
        raise web.HTTPBadRequest(reason=f"unknown action {action!r} (define or create)")
    return web.json_response({"name": name})


async def undefine(request: web.Request) -> web.Response:
    keep_tpm = request.query.get("keep_tpm", "0") not in ("0", "", "false")
    name = request.app[MANAGER].undefine(request.match_info["key"], keep_tpm=keep_tpm)
    return web.json_response({"name": name})


async def domain_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    body = await _json_body(request)
    mgr = request.app[MANAGER]
    key = request.match_info["key"]
    if action == "start":
        name = await mgr.start(key, paused=_flag(body, "paused"),
                               reset_nvram=_flag(body, "reset_nvram"))
    elif action == "shutdown":
        name = await mgr.shutdown(key, timeout=_seconds(body, "timeout"))
    else:
        name = await getattr(mgr, action)(key)
    return web.json_response({"name": name})


async def autostart(request: web.Request) -> web.Response:
    body = await _json_body(request)
    name = request.app[MANAGER].set_autostart(request.match_info["key"],
                                              _flag(body, "enable"))
    return web.json_response({"name": name})


async def devices(request: web.Request) -> web.Response:
    """attach-device / detach-device (disk, serial/console/channel, USB hostdev):
    ``{"xml", "live", "config", "persistent"}``."""
    body = await _json_body(request)
    mgr = request.app[MANAGER]
    op = mgr.attach_device if request.match_info["op"] == "attach" else mgr.detach_device
    name = await op(request.match_info["key"], _text(body, "xml"), live=_flag(body, "live"),
                    config=_flag(body, "config"), persistent=_flag(body, "persistent"))
    return web.json_response({"name": name})


async def change_media(request: web.Request) -> web.Response:
    """change-media: ``{"target", "source", "action", "live", "config", "force"}``."""
    body = await _json_body(request)
    source = body.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        raise web.HTTPBadRequest(reason="'source' must be a non-empty string or null")
    line = await request.app[MANAGER].change_media(
        request.match_info["key"], _text(body, "target"), source, _text(body, "action"),
        live=_flag(body, "live"), config=_flag(body, "config"), force=_flag(body, "force"))
    return web.json_response({"message": line})


async def events(request: web.Request) -> web.StreamResponse:
    """Lifecycle events as newline-delimited JSON until the client goes away."""
    bus = request.app[EVENTS]
    only = request.query.get("domain")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    queue = bus.subscribe()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), EVENT_KEEPALIVE)
            except TimeoutError:
                await response.write(b"\n")  # keepalive; finds a client that went away
                continue
            if ev is None:  # dropped: too slow
                break
            if only and ev.domain != only:
                continue
            await response.write(json.dumps(ev.to_json()).encode() + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        bus.unsubscribe(queue)
    return response


async def console(request: web.Request) -> web.StreamResponse:
    """The domain's serial console as a WebSocket (binary frames both ways), one client at a
    time, like virsh console (read-write socket only: it types into the guest)."""
    if request.app[READONLY]:
        return error(403, "this connection is read-only: the console needs the read-write "
                          "socket")
    mgr = request.app[MANAGER]
    name, pty = await mgr.console_pty(request.match_info["key"])
    busy = request.app[CONSOLES]
    if name in busy:
        return error(409, f"an active console session exists for domain '{name}'")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
    if not ws.can_prepare(request).ok:
        return error(400, "the console is a WebSocket: connect with 'vmconfine console'")
    try:
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return error(409, f"cannot open the console of domain '{name}' ({pty}): "
                          f"{exc.strerror}")
    busy.add(name)
    loop = asyncio.get_running_loop()
    try:
        with contextlib.suppress(termios.error):
            _make_raw(fd)
        await ws.prepare(request)
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

        async def from_client() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    os.write(fd, msg.data)
                elif msg.type == WSMsgType.TEXT:
                    os.write(fd, msg.data.encode())

        loop.add_reader(fd, readable)
        pumps = {asyncio.ensure_future(to_client()), asyncio.ensure_future(from_client())}
        _done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        os.close(fd)
        busy.discard(name)
        if ws.prepared:
            await ws.close()
    return ws


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
    except VmconfineError:
        return False
    return (pa.kind, pa.root) == (pb.kind, pb.root)


def make_app(manager: DomainManager, events_bus: EventBus, *, readonly: bool,
             tls_dn_list: list[str] | None = None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[MANAGER] = manager
    app[EVENTS] = events_bus
    app[READONLY] = readonly
    app[CONSOLES] = set()
    app[TLS_DNS] = tls_dn_list or []
    app.router.add_get("/v1/version", version)
    app.router.add_get("/v1/domains", list_domains)
    app.router.add_post("/v1/domains", post_domains)
    app.router.add_get("/v1/domains/{key}", domain_info)
    app.router.add_delete("/v1/domains/{key}", undefine)
    app.router.add_get("/v1/domains/{key}/state", domain_state)
    app.router.add_get("/v1/domains/{key}/xml", domain_xml)
    app.router.add_put("/v1/domains/{key}/autostart", autostart)
    app.router.add_post("/v1/domains/{key}/devices/{op:attach|detach}", devices)
    app.router.add_post("/v1/domains/{key}/media", change_media)
    app.router.add_post("/v1/domains/{key}/{action}", domain_action)
    app.router.add_get("/v1/domains/{key}/console", console)
    app.router.add_get("/v1/events", events)
    return app
