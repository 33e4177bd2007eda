"""Text from QEMU, the guest or files vmconfine did not write, made safe for a terminal.

QEMU's log holds guest-influenced text (a serial port on stdio, a guest-chosen device name in an
error), and ``/proc`` strings, xattrs, image headers and domain XML values are written by
others: printed raw, an escape sequence in them can set the terminal's title, clear lines or
forge vmconfine's own output. :func:`printable` is the one function that neutralises such text:
every character that is not printable (C0/C1 controls, DEL, Unicode format and separator
characters such as bidi overrides, undecodable bytes) is shown escaped (``\\x1b``, ``\\u202e``).

:class:`SafeStream` applies it to everything the command line writes, keeping only line feeds
and tabs (and a CRLF becomes a line feed), so no path around it exists; messages that must stay
on one line (a log tail, a probe's stderr) use :func:`one_line`.
"""

from __future__ import annotations

import io
import json

#: typing's own TYPE_CHECKING without importing typing (a query's start-up)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character escaped, except those in ``keep``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


def one_line(text: str) -> str:
    """``text`` safe to print as (part of) one line: line breaks are escaped too."""
    return printable(text)


def terminal_text(text: str) -> str:
    """``text`` safe to write to a terminal as it is: line feeds and tabs stay."""
    return printable(text.replace("\r\n", "\n"), keep="\n\t")


def decode(data: bytes) -> str:
    """Bytes from a file or process vmconfine did not write, as printable one-line text."""
    return one_line(data.decode("utf-8", errors="surrogateescape"))


def json_text(value: Any, indent: int | None = None) -> str:
    """JSON of ``value`` in printable ASCII only (DEL, which JSON leaves raw, as ``\\u007f``),
    so :class:`SafeStream` passes it unchanged and it stays valid JSON."""
    return json.dumps(value, indent=indent, ensure_ascii=True).replace("\x7f", "\\u007f")


class SafeStream(io.TextIOBase):
    """A text stream that writes :func:`terminal_text` of everything to ``raw``."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, s: str) -> int:
        self.raw.write(terminal_text(s))
        return len(s)

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.raw, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)
