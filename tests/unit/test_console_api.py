"""The console route (``GET /v1/domains/{key}/console``, a WebSocket to the domain's pty) with
a real pty standing in for QEMU's: typed input reaches the guest, a guest that stops reading
its console never stalls the session (the client can always close it, pings go on), and the
input it does not take is bounded and dropped with a log line."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.unit.test_httpserver import connect, read_frame, ws_frame
from vmconfine.daemon import api
from vmconfine.daemon.events import EventBus
from vmconfine.daemon.httpserver import Server


class Manager:
    """The two things the console route asks of the domain manager."""

    def __init__(self, pty: str) -> None:
        self.pty = pty
        self.conn = SimpleNamespace(instance=SimpleNamespace(uri="qemu:///embed?root=/x"))

    async def console_pty(self, key: str) -> tuple[str, str]:
        return "dom", self.pty


async def open_console(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await connect(path)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(("GET /v1/domains/dom/console HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


def test_a_guest_that_stops_reading_never_stalls_the_session(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    master, slave = os.openpty()
    app = api.make_app(cast(Any, Manager(os.ttyname(slave))), EventBus(), readonly=False)

    async def main() -> None:
        server = Server(app)
        path = str(tmp_path / "s.sock")
        await server.listen_unix(path)
        try:
            reader, writer, head = await open_console(path)
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.write(ws_frame(b"hello"))
            await writer.drain()
            got = b""
            loop = asyncio.get_running_loop()
            while b"hello" not in got:  # control: typed input reaches the guest
                got += await loop.run_in_executor(None, os.read, master, 4096)
            # the guest stops reading: 3 MiB of paste, then the client leaves
            for _ in range(48):
                writer.write(ws_frame(b"x" * 65000))
            writer.write(ws_frame(struct.pack("!H", 1000), opcode=8))
            await writer.drain()
            while True:  # the close is answered although the guest took nothing more
                opcode, _ = await asyncio.wait_for(read_frame(reader), 10)
                if opcode == 8:
                    break
            writer.close()
            await asyncio.sleep(0.2)
            assert app.state["consoles"] == set()  # released: the next client may connect
            reader, writer, head = await open_console(path)
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.close()
        finally:
            await server.close(grace=5)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        os.close(master)
        os.close(slave)
    assert any("does not read its console" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_one_session_per_domain_across_sockets_and_none_outlives_the_daemon(
        tmp_path: Path) -> None:
    master, slave = os.openpty()
    shared: set[str] = set()
    manager = cast(Any, Manager(os.ttyname(slave)))
    rw = api.make_app(manager, EventBus(), readonly=False, consoles=shared)
    tls = api.make_app(manager, EventBus(), readonly=False, consoles=shared)

    async def main() -> None:
        async with asyncio.timeout(60):
            await session()

    async def session() -> None:
        servers = [Server(rw), Server(tls)]
        paths = [str(tmp_path / "rw.sock"), str(tmp_path / "tls.sock")]
        for server, path in zip(servers, paths, strict=True):
            await server.listen_unix(path)
        _reader, writer, head = await open_console(paths[0])
        assert head.startswith(b"HTTP/1.1 101 "), head
        for _ in range(40):  # input the guest never takes: the session waits on the pty
            writer.write(ws_frame(b"y" * 65000))
        await writer.drain()
        other = await connect(paths[1])
        key = base64.b64encode(os.urandom(16)).decode()
        other[1].write(("GET /v1/domains/dom/console HTTP/1.1\r\nHost: x\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
                        ).encode())
        busy = await asyncio.wait_for(other[0].read(), 15)
        assert busy.startswith(b"HTTP/1.1 409 "), busy  # the other socket: already in use
        other[1].close()
        await asyncio.gather(*(server.close(grace=5) for server in servers))
        await asyncio.sleep(0.1)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, left  # the session's pumps ended with it, before its pty closed
        assert shared == set()
        writer.close()

    try:
        asyncio.run(main())
    finally:
        os.close(master)
        os.close(slave)


def test_the_console_client_gives_up_on_a_silent_daemon_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vmconfine console`` against a socket that accepts and never answers: a one-line
    error after the handshake wait, not a terminal stuck in raw mode."""
    import socket
    import threading
    import time

    from vmconfine import client
    from vmconfine.errors import VmconfineError

    monkeypatch.setattr(client, "HANDSHAKE_WAIT", 0.5)
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    fake = cast(Any, SimpleNamespace(transport=SimpleNamespace(headers={})))
    t0 = time.monotonic()
    try:
        with pytest.raises(VmconfineError, match=r"^the console did not answer within 0 s$"):
            client.console_session(fake, "/v1/domains/dom/console", path)
        assert time.monotonic() - t0 < 10
    finally:
        for s in held:
            s.close()
        listener.close()
