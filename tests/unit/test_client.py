"""The daemon client's HTTP/1.1 exchange against canned replies on a real unix socket: every
framing the daemon (h11) uses, and every way a reply can be wrong ending in one line.

The real daemon is exercised in tests/host/test_daemon.py; these replies are ones a working
daemon never sends (a dead or impostor server, a truncated reply).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmconfine.client import DaemonClient, request_bytes
from vmconfine.errors import VmconfineError

JSON = b"Content-Type: application/json; charset=utf-8\r\n"


class Canned:
    """A unix socket server that answers each connection with the next canned reply (the
    bytes, split where given by ``None`` pauses) and records the requests it got."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: list[list[bytes]] = []
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                if not data:  # a probe that only connects (the CLI's listening())
                    continue
                head, _, body = data.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        while len(body) < int(line.split(b":")[1]):
                            body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                try:
                    for part in self.replies.pop(0) if self.replies else []:
                        conn.sendall(part)
                except OSError:  # the client gave up early
                    continue

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Canned]:
    s = Canned(tmp_path / "sock")
    yield s
    s.close()


def ok(body: bytes, headers: bytes = JSON) -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\n" + headers +
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body]


def test_content_length_reply_and_the_request_sent(server: Canned) -> None:
    server.replies.append(ok(b'{"domains": []}'))
    assert DaemonClient(server.path).call("POST", "/v1/domains/x%2Fy/start",
                                          {"paused": True}) == {"domains": []}
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/domains/x%2Fy/start HTTP/1.1"
    assert b"Connection: close" in lines and b"Content-Type: application/json" in lines
    assert body == b'{"paused": true}' and f"Content-Length: {len(body)}".encode() in lines


def test_chunked_text_and_close_delimited_replies(server: Canned) -> None:
    server.replies.append([b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n4\r\n<dom\r\n",
                           b"3;ext=1\r\nain\r\n1\r\n>\r\n0\r\n\r\n"])
    server.replies.append([b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall ",
                           b"until close"])
    c = DaemonClient(server.path)
    assert c.call("GET", "/v1/domains/a/xml") == "<domain>"
    assert c.call("GET", "/v1/version") == "all until close"


def test_event_stream_lines_across_chunks(server: Canned) -> None:
    events = b'{"event": "started", "n": 1}\n\n{"event": "stopped", "n": 2}\n'
    parts = [events[:7], events[7:40], events[40:]]
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts]
    server.replies.append([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *chunks,
                           b"0\r\n\r\n"])
    got = list(DaemonClient(server.path).stream("/v1/events", timeout=30))
    assert got == [{"event": "started", "n": 1}, {"event": "stopped", "n": 2}]


def test_daemon_error_is_its_message(server: Canned) -> None:
    server.replies.append([ok(b'{"error": "Domain not found"}')[0].replace(
        b"200 OK", b"404 Not Found")])
    server.replies.append([b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nnope"])
    c = DaemonClient(server.path)
    with pytest.raises(VmconfineError, match=r"^Domain not found$"):
        c.call("GET", "/v1/domains/ghost")
    with pytest.raises(VmconfineError, match=r"^HTTP 502 Bad Gateway$"):
        c.call("GET", "/v1/domains")


@pytest.mark.parametrize(("reply", "message"), [
    ([], "the connection closed without a reply"),
    ([b"SSH-2.0-OpenSSH_9.6\r\n"], "malformed reply: not an HTTP reply"),
    ([b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"], "malformed reply: a malformed header"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"], "malformed reply: a malformed "
                                                         "Content-Length"),
    ([b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 100\r\n\r\n{}"],
     "malformed reply: the reply ended early"),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
     "malformed reply: a malformed chunk size"),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort"],
     "malformed reply: the reply ended early"),
    (ok(b"{not json"), "malformed reply: its JSON does not parse"),
    ([b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n"], "more than 100 header lines"),
    ([b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000], "a line too long"),
])
def test_malformed_replies_are_one_line_errors(server: Canned, reply: list[bytes],
                                               message: str) -> None:
    server.replies.append(reply)
    with pytest.raises(VmconfineError) as err:
        DaemonClient(server.path).call("GET", "/v1/domains")
    text = str(err.value)
    assert text.startswith(f"talking to the vmconfine daemon at {server.path} failed: ")
    assert message in text and "\n" not in text


def test_a_silent_daemon_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent"  # it accepts (the kernel's backlog) and never answers
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(1)
    try:
        with pytest.raises(VmconfineError, match=r"did not answer within 0\.2s$"):
            DaemonClient(path, timeout=0.2).call("GET", "/v1/domains")
    finally:
        silent.close()


def test_control_characters_never_reach_the_wire() -> None:
    assert request_bytes("GET", "/v1/x", {}, None).startswith(b"GET /v1/x HTTP/1.1\r\n")
    with pytest.raises(VmconfineError, match="control character"):
        request_bytes("GET", "/v1/x", {"X-Vmconfine-URI": "a\r\nEvil: 1"}, None)


def test_cli_errors_on_a_malformed_daemon_are_one_line(tmp_path: Path) -> None:
    """The whole command: a 'daemon' on the instance socket that speaks no HTTP gives one
    line on stderr and exit status 1, for each query verb."""
    root = tmp_path / "inst"
    (root / "run").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n')
    server = Canned(root / "run" / "vmconfine-sock")
    try:
        for verb in (["list", "--all"], ["dominfo", "x"], ["domstate", "x"]):
            server.replies.append([b"garbage\r\n"])
            out = subprocess.run([sys.executable, "-m", "vmconfine", "-c",
                                  f"qemu:///embed?root={root}", *verb], capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert out.returncode == 1, out
            assert out.stderr == (f"error: talking to the vmconfine daemon at {server.path} "
                                  "failed: malformed reply: not an HTTP reply: "
                                  "b'garbage\\r\\n'\n"), out.stderr
            assert out.stdout == ""
    finally:
        server.close()


def test_oversized_replies_are_refused_not_buffered(server: Canned,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over the client's limit (declared, in chunks, or until close) and an event line
    over the line limit end in one-line errors instead of growing the client's memory."""
    from vmconfine import client

    monkeypatch.setattr(client, "MAX_BODY", 1000)
    monkeypatch.setattr(client, "MAX_LINE", 100)
    server.replies.append([b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"])
    server.replies.append([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"1000\r\n" + b"x" * 100])
    server.replies.append([b"HTTP/1.0 200 OK\r\n\r\n", b"y" * 3000])
    c = DaemonClient(server.path)
    for message in ("a reply of 5000 bytes", "a chunk of 4096 bytes", "a reply of more than"):
        with pytest.raises(VmconfineError, match=message):
            c.call("GET", "/v1/domains")
    server.replies.append([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                           b"c8\r\n" + b"z" * 200 + b"\r\n", b"0\r\n\r\n"])
    with pytest.raises(VmconfineError, match="a line too long"):
        list(c.stream("/v1/events", timeout=30))
