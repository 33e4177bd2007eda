"""The daemon's HTTP/1.1 + WebSocket server (h11, wsproto) on a real unix socket: routing,
keep-alive, HEAD, 100-continue, and every limit a hostile or broken client meets (head too
large, body too large, slow heads, too many connections, bad WebSocket handshakes, oversized
messages, clients that stop answering pings), each with a control that passes the limit."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vmconfine.daemon import httpserver
from vmconfine.daemon.httpserver import App, HTTPError, Request, Response, Server, json_response

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def make_app(max_body: int = 1024) -> App:
    app = App(max_body=max_body)

    async def hello(request: Request) -> Response:
        return json_response({"hello": request.match_info.get("who", "world"),
                              "query": request.query})

    async def echo(request: Request) -> Response:
        return Response(request.body, content_type="application/octet-stream")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.3)
        return json_response({"slow": True})

    async def stream(request: Request) -> None:
        out = await request.stream("application/x-ndjson")
        for i in range(3):
            await out.write(f"{i}\n".encode())
        await asyncio.sleep(3600)  # a stream that never ends by itself

    async def ws(request: Request) -> Response | None:
        if not request.wants_websocket:
            raise HTTPError(400, "a WebSocket")
        sock = await request.websocket(heartbeat=0.3, max_message=100)
        async for data in sock.messages():
            await sock.send_bytes(data.upper())
        await sock.close()
        return None

    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    app.add("GET", "/hello", hello)
    app.add("GET", "/hello/{who}", hello)
    app.add("POST", "/echo", echo)
    app.add("GET", "/slow", slow)
    app.add("GET", "/stream", stream)
    app.add("GET", "/ws", ws)
    app.add("GET", "/pick/{op:a|b}", hello)
    app.add("GET", "/broken", broken)
    return app


def serve(tmp_path: Path, test: Callable[[Server, str], Awaitable[None]],
          app: App | None = None, **options: int) -> None:
    async def main() -> None:
        server = Server(app or make_app(), **options)
        path = str(tmp_path / "s.sock")
        await server.listen_unix(path)
        try:
            await test(server, path)
        finally:
            await server.close(grace=5)
    asyncio.run(asyncio.wait_for(main(), 60))


async def connect(path: str) -> Client:
    return await asyncio.open_unix_connection(path)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return status, headers, body


async def exchange(path: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(path)
    writer.write(data)
    await writer.drain()
    try:
        return await read_reply(reader)
    finally:
        writer.close()


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_routes_params_query_and_errors(tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        status, _, body = await exchange(path, get("/hello/a%2Fb?x=1&x=2&y="))
        assert status == 200
        assert json.loads(body) == {"hello": "a/b", "query": {"x": "1", "y": ""}}
        assert (await exchange(path, get("/pick/a")))[0] == 200
        status, _, body = await exchange(path, get("/pick/c"))
        assert status == 404 and json.loads(body)["error"] == "no such API path: GET /pick/c"
        status, _, body = await exchange(path, b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 405
        assert json.loads(body)["error"] == "method DELETE not allowed on /hello"
        status, _, body = await exchange(path, get("/broken"))
        assert status == 500 and b"RuntimeError: boom" in body  # served, not a dead server
        assert (await exchange(path, get("/hello")))[0] == 200
    serve(tmp_path, test)


def test_keepalive_serves_requests_one_after_another_and_head_has_no_body(
        tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        reader, writer = await connect(path)
        for who in ("one", "two", "three"):
            writer.write(get(f"/hello/{who}"))
            await writer.drain()
            status, headers, body = await read_reply(reader)
            assert status == 200 and json.loads(body)["hello"] == who
            assert headers.get("connection") != "close"
        writer.write(b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        rest = await reader.read()  # the server closes after it (Connection: close)
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\n"), rest
        assert b"content-length: " in rest.lower()
        writer.close()
    serve(tmp_path, test)


def test_bodies_json_100_continue_and_the_size_limit(tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        body = b"x" * 1024  # exactly the limit: control
        status, _, echoed = await exchange(
            path, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n" + body)
        assert status == 200 and echoed == body
        # 100-continue: the server asks for the body before the client sends it
        reader, writer = await connect(path)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        writer.write(b"ok")
        assert (await read_reply(reader))[2] == b"ok"
        writer.close()
        # over the limit, declared: refused at once, and the reply reaches a client that
        # goes on writing its body (the server drains it before closing)
        big = b"y" * (64 * 1024)
        status, headers, err = await exchange(
            path, f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n"
            .encode() + big)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(err)["error"] == "request too large (at most 1024 bytes)"
        # over the limit, chunked (no length declared): refused when it gets there
        chunked = b"".join(b"%x\r\n%s\r\n" % (100, b"z" * 100) for _ in range(20)) + b"0\r\n\r\n"
        status, _, err = await exchange(
            path, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked)
        assert status == 413
        assert (await exchange(path, get("/hello")))[0] == 200
    serve(tmp_path, test)


def test_malformed_and_oversized_heads_get_an_error_and_the_server_goes_on(
        tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        status, _, body = await exchange(path, b"\x00\x01\x02garbage\r\n\r\n")
        assert status == 400 and json.loads(body)["error"].startswith("malformed HTTP request")
        huge = get("/hello", "X-Big: " + "a" * (httpserver.MAX_HEAD + 10) + "\r\n")
        status, _, body = await exchange(path, huge)
        assert status == 431 and json.loads(body)["error"] == (
            f"request head too large ({len(huge)} bytes, at most {httpserver.MAX_HEAD})")
        # a head that never ends: h11's own limit on what it has not parsed yet
        endless = b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * (httpserver.MAX_HEAD * 2)
        status, _, body = await exchange(path, endless)
        assert status == 431 and "malformed HTTP request" in json.loads(body)["error"]
        control = get("/hello", "X-Big: " + "a" * (httpserver.MAX_HEAD // 2) + "\r\n")
        assert (await exchange(path, control))[0] == 200
        status, _, _ = await exchange(path, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nx")
        assert status == 400
    serve(tmp_path, test)


def test_a_slow_head_is_cut_off_and_does_not_block_others(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(httpserver, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(httpserver, "KEEPALIVE_TIMEOUT", 0.5)

    async def test(server: Server, path: str) -> None:
        reader, writer = await connect(path)
        writer.write(b"GET /hel")  # and nothing more
        await writer.drain()
        silent_reader, silent_writer = await connect(path)  # says nothing at all
        # meanwhile another client is served at once
        assert (await exchange(path, get("/hello")))[0] == 200
        status, _, body = await read_reply(reader)
        assert status == 408 and "no complete request" in json.loads(body)["error"]
        assert await silent_reader.read() == b""  # closed without a reply
        writer.close()
        silent_writer.close()
        # an idle kept-alive connection is closed too, after its requests were answered
        reader, writer = await connect(path)
        writer.write(get("/hello"))
        assert (await read_reply(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    serve(tmp_path, test)


def test_connections_beyond_max_clients_are_closed_on_accept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test(server: Server, path: str) -> None:
        held = [await connect(path) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert len(server.connections) == 2
        reader, writer = await connect(path)
        writer.write(get("/hello"))
        try:
            refused = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            refused = b""
        assert refused == b""  # closed unanswered
        writer.close()
        for _ in range(5):  # more refusals: not one log line each
            (await connect(path))[1].close()
        await asyncio.sleep(0.2)
        held[0][1].close()
        await asyncio.sleep(0.2)
        assert (await exchange(path, get("/hello")))[0] == 200  # a slot is free again
        held[1][1].close()
    serve(tmp_path, test, max_clients=2)
    refusals = [r for r in caplog.records if "(max_clients)" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


def ws_frame(payload: bytes, opcode: int = 2) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    return b0 & 0x0F, await reader.readexactly(n)


async def ws_connect(path: str, key: bool = True) -> Client:
    reader, writer = await connect(path)
    extra = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             + (f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                if key else ""))
    writer.write(get("/ws", extra))
    await writer.drain()
    return reader, writer


def test_websocket_echo_ping_close_and_limits(tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        reader, writer = await ws_connect(path)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(ws_frame(b"hello") + ws_frame(b"text", opcode=1))
        assert await read_frame(reader) == (2, b"HELLO")
        assert await read_frame(reader) == (2, b"TEXT")
        writer.write(ws_frame(b"p", opcode=9))  # ping -> pong
        assert await read_frame(reader) == (10, b"p")
        writer.write(ws_frame(struct.pack("!H", 1000), opcode=8))  # close -> close reply
        opcode, payload = await read_frame(reader)
        assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1000
        writer.close()
        # a message over max_message (100): closed with 1009; 100 bytes is fine (control)
        reader, writer = await ws_connect(path)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ws_frame(b"a" * 100))
        assert await read_frame(reader) == (2, b"A" * 100)
        writer.write(ws_frame(b"b" * 101))
        opcode, payload = await read_frame(reader)
        assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1009
        writer.close()
        # a client that stops answering pings is dropped (heartbeat 0.3 s)
        reader, writer = await ws_connect(path)
        await reader.readuntil(b"\r\n\r\n")
        opcode, _ = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 9  # the server's ping, left unanswered
        assert (await asyncio.wait_for(read_frame(reader), 5))[0] == 8  # then: closed
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # a handshake without its key is refused, and a plain GET is the handler's business
        reader, writer = await ws_connect(path, key=False)
        status, _, body = await read_reply(reader)
        assert status == 400 and "not a valid WebSocket upgrade" in json.loads(body)["error"]
        writer.close()
        assert (await exchange(path, get("/ws")))[0] == 400
    serve(tmp_path, test)


def test_close_ends_streams_at_once_and_waits_for_requests_in_progress(
        tmp_path: Path) -> None:
    async def main() -> None:
        server = Server(make_app())
        path = str(tmp_path / "s.sock")
        await server.listen_unix(path)
        sreader, swriter = await connect(path)
        swriter.write(get("/stream"))
        head = await sreader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        breader, bwriter = await connect(path)
        bwriter.write(get("/slow"))
        await bwriter.drain()
        idle = await connect(path)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(server.close(grace=10), 10)
        status, _, body = await read_reply(breader)  # the request in progress finished
        assert status == 200 and json.loads(body) == {"slow": True}
        rest = await sreader.read()  # the stream ended (its last chunk), not left hanging
        assert rest.startswith(b"2\r\n0\n\r\n") and rest.endswith(b"0\r\n\r\n"), rest
        assert await idle[0].read() == b""
        assert not server.connections
        for w in (swriter, bwriter, idle[1]):
            w.close()
        with pytest.raises(OSError):
            await connect(path)  # no longer listening
    asyncio.run(asyncio.wait_for(main(), 60))


def test_authorization_and_routes_are_decided_before_a_body_is_read(tmp_path: Path) -> None:
    """A refused, misrouted or body-less route never makes the server take a body: no
    ``100 Continue`` is sent, the refusal is the answer, the connection closes."""
    app = make_app(max_body=1 << 20)
    app.authorize = lambda request: (json_response({"error": "no"}, status=403)
                                     if request.headers.get("x-who") == "mallory" else None)

    async def test(server: Server, path: str) -> None:
        for head, status in (
                ("POST /echo HTTP/1.1\r\nHost: x\r\nX-Who: mallory\r\n", 403),
                ("POST /nowhere HTTP/1.1\r\nHost: x\r\n", 404),
                ("GET /hello HTTP/1.1\r\nHost: x\r\n", 413)):  # GET takes no body
            reader, writer = await connect(path)
            writer.write(f"{head}Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode())
            await writer.drain()
            got, headers, body = await read_reply(reader)
            assert got == status and headers["connection"] == "close", (head, got, body)
            assert not body.startswith(b"HTTP/1.1 100")
            writer.close()
        # control: the same request from someone else is answered after its body
        status, _, body = await exchange(
            path, b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Who: alice\r\nContent-Length: 3\r\n"
                  b"\r\nabc")
        assert status == 200 and body == b"abc"
    serve(tmp_path, test, app)


def test_content_length_with_transfer_encoding_is_refused_and_closed(tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        smuggled = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + get("/hello/smuggled"))
        reader, writer = await connect(path)
        writer.write(smuggled)
        await writer.drain()
        status, headers, body = await read_reply(reader)
        assert status == 400 and headers["connection"] == "close"
        assert "both Content-Length and Transfer-Encoding" in json.loads(body)["error"]
        assert await asyncio.wait_for(reader.read(), 15) == b""  # the second one never runs
        writer.close()
    serve(tmp_path, test)


def test_head_on_a_stream_and_a_body_that_stalls(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "BODY_TIMEOUT", 0.3)

    async def test(server: Server, path: str) -> None:
        reader, writer = await connect(path)
        writer.write(b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")  # a HEAD reply: no body follows
        assert head.startswith(b"HTTP/1.1 405 "), head
        writer.close()
        reader, writer = await connect(path)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        status, _, body = await read_reply(reader)
        assert status == 408 and "did not arrive in time" in json.loads(body)["error"]
        writer.close()
    serve(tmp_path, test)


def test_a_client_that_does_not_read_is_dropped_and_shutdown_does_not_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "WRITE_TIMEOUT", 0.5)
    monkeypatch.setattr(httpserver, "CLOSE_TIMEOUT", 0.5)
    app = make_app()

    async def flood(request: Request) -> None:
        out = await request.stream("application/octet-stream")
        while True:
            await out.write(b"x" * 65536)

    async def big(request: Request) -> Response:
        return Response(b"y" * (16 << 20))

    app.add("GET", "/flood", flood)
    app.add("GET", "/big", big)

    async def main() -> None:
        server = Server(app)
        path = str(tmp_path / "s.sock")
        await server.listen_unix(path)
        _r1, w1 = await connect(path)
        w1.write(get("/big"))  # and never read
        await asyncio.sleep(2)
        assert not server.connections  # dropped after WRITE_TIMEOUT
        _r2, w2 = await connect(path)
        w2.write(get("/flood"))  # a stream nobody reads, at shutdown
        await asyncio.sleep(0.3)
        assert len(server.connections) == 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(server.close(grace=30), 10)
        assert loop.time() - t0 < 5
        w1.close()
        w2.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_websocket_data_sent_with_the_handshake_and_protocol_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test(server: Server, path: str) -> None:
        reader, writer = await connect(path)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(get("/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                "Sec-WebSocket-Version: 13\r\n"
                                f"Sec-WebSocket-Key: {key}\r\n") + ws_frame(b"early"))
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(read_frame(reader), 5) == (2, b"EARLY")
        writer.write(b"\x82\x03abc")  # unmasked: a protocol error (RFC 6455 5.1)
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1002
        writer.close()
        # an upgrade over HTTP/1.0 is no WebSocket handshake: the handler's own 400
        status, _, _ = await exchange(
            path, b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                  + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")
        assert status == 400
    serve(tmp_path, test)
    assert any("WebSocket protocol error" in r.getMessage() for r in caplog.records)


def test_client_dn_escapes_values_so_one_cannot_pose_as_more_rdns() -> None:
    def dn(*rdns: tuple[tuple[str, str], ...]) -> str | None:
        cert = {"subject": rdns}
        return httpserver.client_dn(lambda name: cert if name == "peercert" else None)

    admin = dn((("countryName", "GB"),), (("organizationName", "Example"),),
               (("commonName", "admin"),))
    assert admin == "C=GB,O=Example,CN=admin"
    forged = dn((("countryName", "GB"),), (("organizationName", "Example,CN=admin"),))
    assert forged == "C=GB,O=Example\\,CN=admin" and forged != admin
    assert dn((("organizationName", 'a+b="c";<d>\\'),)) == 'O=a\\+b=\\"c\\"\\;\\<d\\>\\\\'
    assert dn((("commonName", " #x "),)) == "CN=\\ #x\\ "
    assert dn((("commonName", "a"), ("userId", "b"))) == "CN=a+userId=b"  # multi-valued RDN
    assert httpserver.client_dn(lambda name: None) is None


@pytest.mark.parametrize(("soft", "hard", "servers", "cap", "budget", "raised"), [
    (1024, 2048, 2, 5000, 256, 1024),  # the soft limit, not raised (QEMU would inherit it)
    (1024, 1024, 2, 5000, 256, 1024),
    (1024, 1024, 3, 5000, 170, 1024),  # with the TLS listener
    (100, 100, 2, 5000, 16, 100),  # never below 16
    (1024, 1024, 2, 100, 100, 1024),  # never above max_clients
])
def test_client_budget_keeps_descriptors_for_the_daemon(soft: int, hard: int, servers: int,
                                                        cap: int, budget: int,
                                                        raised: int) -> None:
    """In a child: lowering a hard limit cannot be undone without CAP_SYS_RESOURCE."""
    import subprocess
    import sys
    code = ("import resource\nfrom vmconfine.daemon import main\n"
            f"main.MAX_CLIENTS = {cap}\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            f"print(main.client_budget({servers}), "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == [str(budget), str(raised)]


def test_one_peer_cannot_hold_every_slot(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-root uid (here: every client, as seen through peer_key) holds at most a quarter
    of a server's connections (at least 16); root is never limited (control)."""
    async def test(server: Server, path: str) -> None:
        assert server.max_per_peer == 25
        held = [await connect(path) for _ in range(30)]
        await asyncio.sleep(0.3)
        assert len(server.connections) == 25
        for _, w in held:
            w.close()
    monkeypatch.setattr(httpserver, "peer_key", lambda extra: "uid:1000")
    serve(tmp_path, test, max_clients=100)

    async def as_root(server: Server, path: str) -> None:
        held = [await connect(path) for _ in range(30)]
        await asyncio.sleep(0.3)
        assert len(server.connections) == 30
        for _, w in held:
            w.close()
    monkeypatch.setattr(httpserver, "peer_key", lambda extra: None)
    serve(tmp_path, as_root, max_clients=100)


@pytest.mark.parametrize(("max_handshaking", "held"), [(None, 5), (3, 3)])
def test_tls_handshakes_are_bounded_timed_and_logged(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture,
                                                     max_handshaking: int | None,
                                                     held: int) -> None:
    """At most 5 handshakes from one address (max_anonymous_clients, 20 by default, is the
    cap of all of them; a lower one caps one address too)."""
    import ssl
    import subprocess
    monkeypatch.setattr(httpserver, "TLS_HANDSHAKE_TIMEOUT", 1.0)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True,
                   timeout=60)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)

    async def main() -> None:
        server = Server(make_app(), **({} if max_handshaking is None else
                                       {"max_handshaking": max_handshaking}))
        await server.listen_tcp("127.0.0.1", 0, server_ctx)
        port = server._listeners[0].sockets[0].getsockname()[1]
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(25)]
        await asyncio.sleep(0.3)
        # five (or max_handshaking) from this address may be in a handshake at once; the
        # others were refused
        assert len(server.connections) == held
        await asyncio.sleep(1.5)  # their handshake time is up
        assert not server.connections
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                       server_hostname="localhost")
        writer.write(get("/hello"))
        assert (await read_reply(reader))[0] == 200  # a real client gets in afterwards
        writer.close()
        for _, w in silent:
            w.close()
        await server.close(grace=5)

    asyncio.run(asyncio.wait_for(main(), 60))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("too many TLS handshakes in progress" in m for m in lines) == 1, lines
    assert sum("TLS handshake failed" in m for m in lines) == 1, lines  # 5 failed, 1 line


def test_head_errors_absolute_targets_and_streams_while_stopping(tmp_path: Path) -> None:
    async def test(server: Server, path: str) -> None:
        huge = b"HEAD /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        reader, writer = await connect(path)
        writer.write(huge)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), head  # answered, without a body
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        status, _, body = await exchange(path, get("http://localhost/hello/abs"))
        assert status == 200 and json.loads(body)["hello"] == "abs"  # RFC 9112 3.2.2
        reader, writer = await connect(path)
        await asyncio.sleep(0.1)
        server.closing = True  # as close() does first
        writer.write(get("/stream"))
        status, _, body = await read_reply(reader)
        assert status == 503 and json.loads(body)["error"] == "the daemon is stopping"
        writer.close()
        server.closing = False
    serve(tmp_path, test)
