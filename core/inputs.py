"""Reading a user-named input file (or stdin) with a size cap, with one-line errors."""

from __future__ import annotations

import sys

from vmconfine.errors import VmconfineError

#: the most vmconfine reads from one input file (libvirt's cap for XML and configs)
MAX_INPUT = 10 * 1024 * 1024


def read_bounded(path: str, *, expected: str, error: type[VmconfineError] = VmconfineError,
                 too_large_hint: str = "") -> tuple[bytes, str]:
    """The bytes of ``path`` (``-`` = stdin) and its name for messages; never reads more than
    :data:`MAX_INPUT` + 1 bytes. ``expected`` names what the file should be ("a domain XML
    file"); errors are ``error`` with one line."""
    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_INPUT + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected {expected}") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except (OSError, AttributeError) as exc:  # AttributeError: no stdin at all
        raise error(f"{source}: cannot read it: {exc}") from None
    if len(data) > MAX_INPUT:
        raise error(f"{source}: larger than 10 MiB{too_large_hint}")
    return data, source


def read_text(path: str, *, expected: str) -> tuple[str, str]:
    """:func:`read_bounded`, decoded as UTF-8 (one-line error naming the first bad byte)."""
    data, source = read_bounded(path, expected=expected)
    try:
        return data.decode(), source
    except UnicodeDecodeError as exc:
        raise VmconfineError(f"{source}: not UTF-8 text (byte {exc.start})") from None
