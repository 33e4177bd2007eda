"""Remembered owners: the original owner of a file, kept in ``trusted.`` xattrs on the file.

The record is the shared remembered-label scheme of :mod:`vmconfine.remember` (libvirt's
``security_util.c``) for the driver ``dac``, reached through the file's fd-based
:class:`~vmconfine_dac.fsops.FileHandle`:

* ``PREFIX.dac``           the original owner, ``"+UID:+GID"``, and the file's capabilities
  (``security.capability``, cleared by the kernel on chown) as ``"+UID:+GID;caps=HEX"``;
* ``PREFIX.ref_dac``       how many running domains use the file (decimal);
* ``PREFIX.timestamp_dac`` the host boot time when the record was made (decimal seconds).

:func:`remember` counts one more user and stores the owner when it is the first;
:func:`recall` counts one user less and hands the owner back when it was the last. A stale
record (another boot, a crash) is discarded with a warning; a file system without xattrs
makes both calls say so, and the journal keeps the owner instead.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from vmconfine import remember as shared
from vmconfine.errors import LabelError
from vmconfine.remember import UNSUPPORTED, Record, clear, read
from vmconfine_dac.fsops import FileHandle

__all__ = ["DRIVER", "FCAPS", "UNSUPPORTED", "Names", "Recall", "Record", "boot_time", "clear",
           "file_caps", "format_owner", "list_names", "parse_owner", "parse_record", "peek",
           "peek_ref", "read", "recall", "remember"]

log = logging.getLogger(__name__)

DRIVER = "dac"

#: a file's capabilities (``setcap``); the kernel removes them on chown and on every write
FCAPS = "security.capability"


def list_names(h: FileHandle) -> list[str] | None:
    """The names of the xattrs of ``h`` (None: a file system without xattrs)."""
    try:
        return h.listxattr()
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return None
        raise


def file_caps(h: FileHandle, listed: Collection[str] | None = None) -> bytes | None:
    """The file capabilities of ``h`` (None: none, or a file system without xattrs). The names
    are listed first (or ``listed`` is what :func:`list_names` returned a moment ago): the
    usual answer, "none", then costs no ENODATA error (a third of the time of ``getxattr``
    failing)."""
    try:
        if listed is None:
            listed = h.listxattr()
        if FCAPS not in listed:
            return None
        return h.getxattr(FCAPS)
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return None
        raise


_SCHEME = shared.Scheme(
    DRIVER, log, what="remembered owner",
    unsupported_note="cannot remember its owner in xattrs (%s); the journal keeps it",
    dated="remembered owners",
)


def boot_time() -> int:
    """The host boot time (``btime`` of /proc/stat), read once per process."""
    return shared.boot_time(_SCHEME.dated)


class Names(shared.Names):
    """The three ``dac`` xattr names under one prefix."""

    @classmethod
    def for_prefix(cls, prefix: str) -> Names:
        return cls.of(prefix, DRIVER)


def format_owner(uid: int, gid: int, fcaps: bytes | None = None) -> str:
    """``"+UID:+GID"``, with ``";caps=HEX"`` when the file had capabilities
    (``security.capability``, which the kernel clears on chown)."""
    text = f"+{uid}:+{gid}"
    return f"{text};caps={fcaps.hex()}" if fcaps else text


def parse_record(text: str) -> tuple[int, int, bytes | None]:
    """What :func:`format_owner` wrote → ``(uid, gid, file capabilities or None)``."""
    owner, _, extra = text.partition(";")
    user, sep, group = owner.partition(":")
    try:
        if not sep or not user.startswith("+") or not group.startswith("+"):
            raise ValueError(text)
        fcaps = None
        if extra:
            if not extra.startswith("caps="):
                raise ValueError(text)
            fcaps = bytes.fromhex(extra[5:]) or None
        return int(user[1:]), int(group[1:]), fcaps
    except ValueError:
        raise LabelError(f"remembered owner '{text}' is not +UID:+GID[;caps=HEX]") from None


def parse_owner(text: str) -> tuple[int, int]:
    """``"+UID:+GID"`` (as written by :func:`format_owner`) → ids."""
    uid, gid, _fcaps = parse_record(text)
    return uid, gid


def peek_ref(h: FileHandle, names: shared.Names) -> int | None:
    """The current (valid) refcount, None when xattrs are unsupported. Discards stale records."""
    return _SCHEME.peek_ref(h, names)


def peek(h: FileHandle, names: shared.Names,
         listed: Collection[str] | None = None) -> Record | None:
    """The current (valid) record, None when xattrs are unsupported. Discards stale records.

    Hand it to :func:`remember` / :func:`recall` as ``seen`` while the file's metadata lock is
    still held: they then need not read the xattrs again. ``listed``: the file's xattr names
    (:func:`list_names`), listed under the lock: only those present are read.
    """
    return _SCHEME.peek(h, names, listed)


def remember(h: FileHandle, names: shared.Names, uid: int, gid: int,
             seen: Record | None = None, fcaps: bytes | None = None) -> int | None:
    """Count one more user of ``h``; store ``uid:gid`` (and its file capabilities ``fcaps``)
    when it is the first.

    Returns the new refcount, or None when the file system cannot keep xattrs.
    """
    return _SCHEME.remember(h, names, format_owner(uid, gid, fcaps), seen)


@dataclass(frozen=True)
class Recall:
    """Result of :func:`recall`: ``owner`` to restore, or ``in_use`` (others still use it),
    or neither (no valid record: the caller falls back to the journal)."""

    owner: tuple[int, int] | None = None
    in_use: bool = False
    remaining: int = 0
    fcaps: bytes | None = None  #: the file capabilities to give back with ``owner``


def recall(h: FileHandle, names: shared.Names, seen: Record | None = None) -> Recall:
    """Count one user less; hand the remembered owner back when it was the last one.

    ``seen``: the record :func:`read` returned a moment ago under the same lock.
    """
    got = _SCHEME.recall(h, names, seen)
    if got.in_use:
        return Recall(in_use=True, remaining=got.remaining)
    if got.label is None:
        return Recall()
    try:
        uid, gid, fcaps = parse_record(got.label)
        return Recall(owner=(uid, gid), fcaps=fcaps)
    except LabelError as exc:
        log.warning("%s: %s; using the journal's record instead", h.name, exc)
        return Recall()
