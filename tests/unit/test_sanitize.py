"""vmconfine.sanitize: text from QEMU, the guest or files vmconfine did not write never reaches
the terminal raw."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from vmconfine import cli
from vmconfine.launch.process import log_tail
from vmconfine.sanitize import SafeStream, decode, one_line, printable, terminal_text


def test_printable_escapes_every_control_and_format_character() -> None:
    assert printable("plain /path-ok é") == "plain /path-ok é"
    assert one_line("a\x1b]0;t\x07b\nc\rd\x7f\x9b\u202e") == \
        "a\\x1b]0;t\\x07b\\x0ac\\x0dd\\x7f\\x9b\\u202e"
    assert decode(b"bad \xff byte") == "bad \\xff byte"
    assert terminal_text("a\r\nb\tc\rd") == "a\nb\tc\\x0dd"


def test_safe_stream_is_what_the_cli_writes_through(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    SafeStream(buf).write("x\x1b[2Jy\n")
    assert buf.getvalue() == "x\\x1b[2Jy\n"
    # an error naming a hostile value is one escaped line
    rc = cli.main(["-c", "qemu:///embed?root=relative\x1b[2J", "list"])
    err = capsys.readouterr().err
    assert rc == 1 and "\x1b" not in err and "\\x1b[2J" in err and err.count("\n") == 1


def test_log_tail_splits_on_line_feeds_only(tmp_path: Path) -> None:
    log = tmp_path / "q.log"
    log.write_bytes(b"2026-01-01 00:00:00: starting up\nARGV\nfirst\r\nfake\rerror: x\x1b[K\n")
    assert log_tail(log) == "first | fake\\x0derror: x\\x1b[K"


def test_json_output_stays_valid_and_printable() -> None:
    import json

    from vmconfine.sanitize import json_text

    text = json_text({"desc": "x\x7fy\x1b]0;t\x07\u009b"}, indent=2)
    assert terminal_text(text) == text  # nothing for SafeStream to change
    assert json.loads(text) == {"desc": "x\x7fy\x1b]0;t\x07\u009b"}
