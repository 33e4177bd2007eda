"""Hostile domain XML: every attack ends in one clear XMLError line naming source and line."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmconfine.domain import MAX_XML_BYTES, parse_domain
from vmconfine.errors import XMLError

VALID = ("<domain type='kvm'>\n  <name>ok</name>\n  <memory>1024</memory>\n"
         "  <os>\n    <type>hvm</type>\n  </os>\n</domain>\n")
LINE = re.compile(r"^hostile\.xml: line (\d+): \S.*$")


def reject(data: bytes | str) -> tuple[int, str]:
    """Parse ``data`` expecting a rejection; return (line, message)."""
    with pytest.raises(XMLError) as info:
        parse_domain(data, "hostile.xml")
    msg = str(info.value)
    match = LINE.match(msg)
    assert match, msg
    assert "\n" not in msg and len(msg) < 400, msg
    return int(match.group(1)), msg


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    """A local TCP server: a fetch of a DTD or entity would show up as a connection."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


def assert_no_connection(srv: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        conn, _ = srv.accept()
        conn.close()


def test_billion_laughs_is_refused_without_expansion() -> None:
    lol = "".join(f'  <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">\n'
                  for i in range(1, 10))
    doc = (f'<?xml version="1.0"?>\n<!DOCTYPE domain [\n  <!ENTITY lol0 "lol">\n{lol}]>\n'
           "<domain type='kvm'><name>&lol9;</name><memory>1</memory>"
           "<os><type>hvm</type></os></domain>")
    line, msg = reject(doc)
    assert line == 2 and "DOCTYPE and ENTITY declarations are refused" in msg
    assert "lollol" not in msg


def test_external_entity_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER\n")
    for target in ("file:///etc/passwd", secret.as_uri()):
        doc = (f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "{target}">]>\n'
               "<domain type='kvm'><name>&xxe;</name><memory>1</memory>"
               "<os><type>hvm</type></os></domain>")
        line, msg = reject(doc)
        assert line == 1 and "TOP-SECRET-MARKER" not in msg and "root:" not in msg
        line, msg = reject(doc.encode())
        assert line == 1 and "DOCTYPE" in msg


def test_undeclared_entity_reference_is_malformed() -> None:
    line, msg = reject("<domain type='kvm'>\n<name>&xxe;</name></domain>")
    assert line == 2 and "malformed XML" in msg and "xxe" in msg


def test_dtd_with_network_url_is_not_fetched(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    docs = [
        f'<!DOCTYPE domain SYSTEM "http://127.0.0.1:{port}/evil.dtd">\n' + VALID,
        f'<!DOCTYPE domain PUBLIC "-//EVIL//x" "http://127.0.0.1:{port}/p.dtd">' + VALID,
        f'<!DOCTYPE domain [<!ENTITY % pe SYSTEM "http://127.0.0.1:{port}/pe"> %pe;]>'
        + VALID,
        f'<!DOCTYPE domain [<!ENTITY net SYSTEM "http://127.0.0.1:{port}/e">]>'
        "<domain type='kvm'><name>&net;</name></domain>",
    ]
    for doc in docs:
        line, msg = reject(doc)
        assert line == 1 and "DOCTYPE" in msg
    assert_no_connection(listener)


def test_xinclude_is_not_processed(tmp_path: Path) -> None:
    secret = tmp_path / "inc.txt"
    secret.write_text("INCLUDED-MARKER")
    doc = (f"<domain type='kvm' xmlns:xi='http://www.w3.org/2001/XInclude'><name>x</name>"
           f"<memory>1</memory><os><type>hvm</type></os><description><xi:include "
           f"href='{secret.as_uri()}' parse='text'/></description></domain>")
    d = parse_domain(doc, "hostile.xml")
    assert d.description is None and "INCLUDED-MARKER" not in d.to_xml()


def test_oversized_input() -> None:
    chunk = "<!--" + "x" * 1000 + "-->\n"
    room = MAX_XML_BYTES - len(VALID)
    exact = VALID + chunk * (room // len(chunk)) + " " * (room % len(chunk))
    assert len(exact.encode()) == MAX_XML_BYTES
    assert parse_domain(exact, "hostile.xml").name == "ok"  # the limit itself is accepted
    line, msg = reject(exact + " ")
    assert line == exact.count("\n") + 1 and "over the 10 MiB limit" in msg
    assert str(MAX_XML_BYTES + 1) in msg
    lines = (VALID + "\n" * MAX_XML_BYTES).encode()
    line, msg = reject(lines)  # the line is where the input crosses the limit
    assert line == lines[:MAX_XML_BYTES].count(b"\n") + 1 and "10 MiB" in msg
    # multi-byte characters count as bytes, not characters
    line, _ = reject("<!--" + "é" * (MAX_XML_BYTES // 2) + "-->" + VALID)
    assert line == 1


@pytest.mark.parametrize(("data", "line"), [
    (b"<domain type='kvm'>\x00</domain>", 1),
    (VALID.replace("<memory>", "<memory>\x00").encode(), 3),
    (VALID.replace("</os>", "</os>\x00"), 6),
    ("\x00" + VALID, 1),
    ("<domain type='kvm'><name>ok</name></domain>".encode("utf-16"), 1),
])
def test_nul_bytes(data: bytes | str, line: int) -> None:
    got, msg = reject(data)
    assert got == line and "NUL byte" in msg


@pytest.mark.parametrize("cut", [1, 5, 19, 30, 47, 60, len(VALID) - 3])
def test_truncated_xml(cut: int) -> None:
    line, msg = reject(VALID[:cut])
    assert "malformed XML" in msg
    assert 1 <= line <= VALID[:cut].count("\n") + 1


@pytest.mark.parametrize(("doc", "line", "needle"), [
    ("", 1, "malformed XML"),
    ("   \n  ", 2, "malformed XML"),
    ("<domain type='kvm'>\n<a></b></domain>", 2, "mismatch"),
    ("<domain type='kvm' type='qemu'/>", 1, "redefined"),
    ("<domain type='kvm'/><domain type='kvm'/>", 1, "Extra content"),
    (b"<?xml version='1.0' encoding='no-such-enc'?><domain/>", 1, "malformed XML"),
    (b"<domain type='kvm'><name>\xff\xfe</name></domain>", 1, "malformed XML"),
    ("<domain type='kvm'>" + "<a>" * 300 + "</a>" * 300 + "</domain>", 1, "malformed XML"),
    ("<!-- a\n-- b -->\n<domain/>", 2, "Double hyphen within comment"),
    ("<domain type='kvm'>\n<name>x</name><uuid>12\n34</uuid></domain>", 2, r"'12\n34'"),
    ("<domain type='kvm'><name>" + "n/" * 5000 + "</name></domain>", 1, "..."),
])
def test_malformed(doc: str | bytes, line: int, needle: str) -> None:
    got, msg = reject(doc)
    assert got == line and needle in msg


@pytest.mark.parametrize(("doc", "line", "needle"), [
    ("<domstatus>\n<domain type='kvm'/></domstatus>", 1,
     "root element is <domstatus>, expected <domain>"),
    ("\n\n<network><name>x</name></network>", 3, "root element is <network>"),
    ("<d:domain xmlns:d='urn:x' type='kvm'/>", 1, "root element is <{urn:x}domain>"),
    ("<!-- c -->\n<Domain type='kvm'/>", 2, "root element is <Domain>"),
])
def test_wrong_root(doc: str, line: int, needle: str) -> None:
    got, msg = reject(doc)
    assert got == line and needle in msg


def test_str_input_with_declared_encoding_and_bad_types() -> None:
    doc = ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<domain type="kvm"><name>café</name>'
           '<memory>1</memory><os><type>hvm</type></os></domain>')
    assert parse_domain(doc).name == "café"
    assert parse_domain(doc.encode("latin-1")).name == "café"
    line, msg = reject("<domain type='kvm'>\n<name>\ud800</name></domain>")
    assert line == 2 and "surrogate" in msg
    with pytest.raises(TypeError):
        parse_domain(123)  # type: ignore[arg-type]


def test_default_source_name() -> None:
    with pytest.raises(XMLError, match=r"^<stdin>: line 1: "):
        parse_domain("<domain")


FULL = (Path(__file__).resolve().parent.parent / "data" / "domains" / "full.xml").read_bytes()


def test_every_truncation_is_one_clean_error() -> None:
    for cut in range(0, len(FULL) - 12, 3):
        with pytest.raises(XMLError) as info:
            parse_domain(FULL[:cut], "cut.xml")
        assert str(info.value).startswith("cut.xml: line ") and "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FULL) - 1), st.binary(min_size=0, max_size=4)),
                min_size=1, max_size=4))
def test_random_mutations_never_crash(edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(FULL)
    for pos, repl in edits:
        data[pos:pos + len(repl) or pos + 1] = repl
    try:
        d = parse_domain(bytes(data), "fuzz.xml")
    except XMLError as exc:
        assert str(exc).startswith("fuzz.xml: line ") and "\n" not in str(exc)
    else:
        assert parse_domain(d.to_xml(), "again.xml").to_xml() == d.to_xml()
