"""Reader and writer for libvirt's ``virConf`` syntax, the syntax of ``qemu.conf``.

The grammar follows libvirt's ``src/util/virconf.c`` rule for rule, with the same error texts:

* A file is a sequence of statements ``name = value``. Statements are separated by a line
  break or by ``;`` (otherwise: ``expecting a separator``). Blanks are spaces and tabs; CR and
  LF both end a line.
* ``#`` starts a comment that runs to the end of the line. A comment is either a line of its
  own (kept as a :class:`ConfComment`) or trails a value (kept in :attr:`ConfEntry.comment`).
* A name starts with an ASCII letter, followed by ASCII letters, digits or ``_``
  (``expecting a name``); ``=`` must follow (``expecting an assignment``).
* A value is one of (otherwise ``expecting a value``):

  - a string in ``'...'`` or ``"..."`` on a single line, without escape sequences
    (``unterminated string``), or a Python-style ``\"\"\"...\"\"\"`` string that may span
    lines;
  - an integer: an optional ``+`` or ``-`` and decimal digits (``unterminated number``).
    There are no floats, no hex numbers and no bare words: ``true`` and ``yes`` are syntax
    errors, booleans are written ``0`` and ``1``;
  - a list ``[ v, v, ... ]`` of any values (nested lists too), which may span lines and may
    end with a trailing comma (``expecting a separator in list``,
    ``list is not closed with ]``). Comments are not allowed inside a list.

* Looking a name up returns its **first** occurrence; later duplicates are kept in
  :attr:`ConfFile.entries` but have no effect.
* Files larger than 10 MiB are refused.

Every error is a :class:`vmconfine.errors.ConfigError` whose message starts
``FILE:LINE: <libvirt's message>`` and continues with a short hint in parentheses.

Deliberate differences from libvirt, each making vmconfine stricter-or-kinder only where
libvirt misbehaves:

* A file holding only blanks and line breaks is accepted (libvirt reports
  ``expecting a name``).
* A lone CR counts as a line break for line numbers (libvirt counts only LF).
* Integers are never truncated to 64 bits at parse time; the typed settings layer
  (:mod:`vmconfine.config.settings`) checks each key's range.
* Lists nest at most :data:`MAX_LIST_DEPTH` levels deep.
* The writer uses triple quotes for a string holding CR as well as LF, and refuses the
  strings the syntax cannot hold (those needing triple quotes that contain ``\"\"\"`` or end
  in ``"``) instead of writing a file that cannot be read back.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from vmconfine.errors import ConfigError

#: The largest configuration file accepted, in bytes (libvirt's ``MAX_CONFIG_FILE_SIZE``).
MAX_CONFIG_FILE_SIZE = 10 * 1024 * 1024

#: The deepest list nesting accepted.
MAX_LIST_DEPTH = 64

#: A configuration value: a string, an integer or a (possibly nested) list of values.
ConfValue: TypeAlias = "str | int | list[ConfValue]"

_BLANKS = re.compile(r"[ \t]*")
_BLANKS_EOL = re.compile(r"[ \t\r\n]*")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]*")
_TO_EOL = re.compile(r"[^\r\n]*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_TRIPLE = '"""'

_HINTS = {
    "expecting a separator": "put each setting on its own line or separate settings with ';'",
    "expecting a name": "a setting name starts with a letter, then letters, digits or '_'",
    "expecting an assignment": "write the setting as: name = value",
    "expecting a value": (
        "strings need quotes, numbers are plain digits, booleans are 0 or 1, "
        "lists are written [ a, b ]"
    ),
    "unterminated string": (
        "close the quote on the same line, or use \"\"\" quotes for text spanning lines"
    ),
    "unterminated number": "a '+' or '-' sign must be followed by digits",
    "expecting a separator in list": (
        "separate list items with ','; comments are not allowed inside a list"
    ),
}


@dataclass(frozen=True)
class ConfEntry:
    """One ``name = value`` statement.

    ``line`` is the 1-based line of the name; ``comment`` is the text after a trailing ``#``
    (without the ``#``), or None.
    """

    name: str
    value: ConfValue
    line: int
    comment: str | None = None


@dataclass(frozen=True)
class ConfComment:
    """A comment on a line of its own: ``text`` is everything after the ``#``."""

    text: str
    line: int


@dataclass
class ConfFile:
    """A parsed configuration file: its statements and whole-line comments, in file order."""

    filename: str
    items: list[ConfEntry | ConfComment] = field(default_factory=list)

    @property
    def entries(self) -> list[ConfEntry]:
        """Every statement in file order, duplicates included."""
        return [item for item in self.items if isinstance(item, ConfEntry)]

    def get(self, name: str) -> ConfEntry | None:
        """The first statement setting ``name`` (libvirt's rule), or None if it is not set."""
        for item in self.items:
            if isinstance(item, ConfEntry) and item.name == name:
                return item
        return None

    def where(self, entry: ConfEntry) -> str:
        """``FILE:LINE`` of a statement of this file."""
        return f"{self.filename}:{entry.line}"

    def write(self) -> str:
        """Serialise as libvirt's writer does: one item per line, blank lines dropped."""
        out: list[str] = []
        for item in self.items:
            if isinstance(item, ConfComment):
                out.append(f"#{item.text}\n")
            elif item.comment is None:
                out.append(f"{item.name} = {format_value(item.value)}\n")
            else:
                out.append(f"{item.name} = {format_value(item.value)} #{item.comment}\n")
        return "".join(out)


def string_is_writable(text: str) -> bool:
    """True when :func:`format_value` can write ``text`` so that it reads back unchanged."""
    if _needs_triple_quotes(text):
        return _TRIPLE not in text and not text.endswith('"')
    return True


def _needs_triple_quotes(text: str) -> bool:
    return "\n" in text or "\r" in text or ('"' in text and "'" in text)


def format_value(value: ConfValue) -> str:
    """Write one value in virConf syntax (libvirt's ``virConfSaveValue`` rules).

    Strings are written ``"..."``; ``'...'`` when they contain ``"``; ``\"\"\"...\"\"\"`` when
    they contain both quote characters or a line break. Lists are written ``[ a, b ]``.
    Raises ValueError for a value the syntax cannot hold.
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not string_is_writable(value):
            raise ValueError(
                f"cannot write the string {value!r} in qemu.conf syntax: it needs triple "
                "quotes (a line break, or both quote characters) but contains '\"\"\"' or "
                "ends with '\"'"
            )
        if _needs_triple_quotes(value):
            return f"{_TRIPLE}{value}{_TRIPLE}"
        if '"' not in value:
            return f'"{value}"'
        return f"'{value}'"
    if isinstance(value, list):
        return "[ " + ", ".join(format_value(item) for item in value) + " ]"
    raise ValueError(f"cannot write a {type(value).__name__} in qemu.conf syntax")


class _Parser:
    """Cursor over the text; one method per grammar rule of virconf.c."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self.end = len(text)
        self.line_starts = [m.end() for m in _LINE_BREAK.finditer(text)]

    # -- helpers ---------------------------------------------------------------------------

    def line_at(self, pos: int) -> int:
        return bisect.bisect_right(self.line_starts, pos) + 1

    def error(self, message: str, *, pos: int | None = None, hint: str | None = None) -> None:
        line = self.line_at(self.pos if pos is None else pos)
        hint = hint or _HINTS.get(message)
        suffix = f" ({hint})" if hint else ""
        raise ConfigError(f"{self.filename}:{line}: {message}{suffix}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.end else ""

    def skip_blanks(self) -> None:
        self.pos = _BLANKS.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def skip_blanks_and_eol(self) -> None:
        self.pos = _BLANKS_EOL.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def rest_of_line(self) -> str:
        match = _TO_EOL.match(self.text, self.pos)
        assert match is not None
        self.pos = match.end()
        return match.group()

    # -- grammar ---------------------------------------------------------------------------

    def parse(self) -> ConfFile:
        conf = ConfFile(self.filename)
        while self.pos < self.end:
            self.statement(conf)
            self.separator()
        return conf

    def statement(self, conf: ConfFile) -> None:
        self.skip_blanks_and_eol()
        if self.pos >= self.end:
            return
        start = self.pos
        if self.peek() == "#":
            self.pos += 1
            conf.items.append(ConfComment(self.rest_of_line(), self.line_at(start)))
            return
        match = _NAME.match(self.text, self.pos)
        if match is None:
            self.error("expecting a name")
        assert match is not None
        self.pos = match.end()
        self.skip_blanks()
        if self.peek() != "=":
            self.error("expecting an assignment")
        self.pos += 1
        value = self.value(0)
        self.skip_blanks()
        comment = None
        if self.peek() == "#":
            self.pos += 1
            comment = self.rest_of_line()
        conf.items.append(ConfEntry(match.group(), value, self.line_at(start), comment))

    def separator(self) -> None:
        self.skip_blanks()
        char = self.peek()
        if char == "":
            return
        if char in "\r\n":
            self.skip_blanks_and_eol()
        elif char == ";":
            self.pos += 1
            self.skip_blanks_and_eol()
        else:
            self.error("expecting a separator")

    def value(self, depth: int) -> ConfValue:
        self.skip_blanks()
        char = self.peek()
        if char in ("'", '"'):
            return self.string()
        if char == "[":
            return self.list(depth + 1)
        if char != "" and char in "0123456789+-":
            return self.number()
        self.error("expecting a value")
        raise AssertionError("unreachable")

    def string(self) -> str:
        start = self.pos
        quote = self.text[start]
        # libvirt only recognises """ when at least 7 characters remain.
        if self.text.startswith(_TRIPLE, start) and start + 6 < self.end:
            close = self.text.find(_TRIPLE, start + 3)
            if close < 0:
                self.pos = self.end
                self.error(
                    "unterminated string",
                    hint=f'the """ string opened on line {self.line_at(start)} is never closed',
                )
            self.pos = close + 3
            return self.text[start + 3 : close]
        self.pos += 1
        body = _TO_EOL.match(self.text, self.pos)
        assert body is not None
        close = self.text.find(quote, self.pos, body.end())
        if close < 0:
            self.error("unterminated string", pos=body.end())
        self.pos = close + 1
        return self.text[start + 1 : close]

    def number(self) -> int:
        start = self.pos
        if self.peek() in ("+", "-"):
            self.pos += 1
        digits = _DIGITS.match(self.text, self.pos)
        assert digits is not None
        if not digits.group():
            self.error("unterminated number")
        self.pos = digits.end()
        return int(self.text[start : self.pos])

    def list(self, depth: int) -> list[ConfValue]:
        start = self.pos
        if depth > MAX_LIST_DEPTH:
            self.error(
                "lists are nested too deeply",
                hint=f"at most {MAX_LIST_DEPTH} levels of [ ] are accepted",
            )
        self.pos += 1
        self.skip_blanks_and_eol()
        items: list[ConfValue] = []
        if self.pos < self.end and self.peek() != "]":
            items.append(self.value(depth))
            self.skip_blanks_and_eol()
        while self.pos < self.end and self.peek() != "]":
            if self.peek() != ",":
                self.error("expecting a separator in list")
            self.pos += 1
            self.skip_blanks_and_eol()
            if self.peek() == "]":
                break
            items.append(self.value(depth))
            self.skip_blanks_and_eol()
        if self.peek() != "]":
            self.error(
                "list is not closed with ]",
                hint=f"the list opened on line {self.line_at(start)} needs a closing ']'",
            )
        self.pos += 1
        return items


def parse_conf(text: str, filename: str = "memory conf") -> ConfFile:
    """Parse virConf text; ``filename`` names the text in error messages.

    Raises ConfigError(``"FILE:LINE: message (hint)"``) on the first syntax error.
    """
    if len(text) > MAX_CONFIG_FILE_SIZE:
        raise ConfigError(
            f"{filename}: configuration text is larger than the "
            f"{MAX_CONFIG_FILE_SIZE // (1024 * 1024)} MiB limit; shorten it"
        )
    return _Parser(text, filename).parse()


def read_conf_file(path: str | Path) -> ConfFile:
    """Read and parse a configuration file, refusing files over 10 MiB.

    Bytes that are not UTF-8 are carried through unchanged (as surrogate escapes), as libvirt
    treats the file as bytes. Raises ConfigError naming the path when the file cannot be read.
    """
    name = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_FILE_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{name}: cannot read configuration file: it does not exist; create it or "
            "give the right path"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{name}: cannot read configuration file: it is a directory; give the path of "
            "the qemu.conf file inside it"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{name}: cannot read configuration file: {err.strerror or err}; check its "
            "permissions and that vmconfine runs as a user allowed to read it"
        ) from None
    if len(data) > MAX_CONFIG_FILE_SIZE:
        raise ConfigError(
            f"{name}: configuration file is larger than the "
            f"{MAX_CONFIG_FILE_SIZE // (1024 * 1024)} MiB limit; shorten it"
        )
    return parse_conf(data.decode("utf-8", errors="surrogateescape"), name)
