"""Remembered owners: the original owner of a file, kept in ``trusted.`` xattrs on the file.

The scheme is libvirt's (``security_util.c``) under vmconfine's own prefix (qemu.conf
``remember_owner_xattr_prefix``, default ``trusted.vmconfine.security``):

* ``PREFIX.dac``           the original owner, ``"+UID:+GID"``;
* ``PREFIX.ref_dac``       how many running domains use the file (decimal);
* ``PREFIX.timestamp_dac`` the host boot time when the record was made (decimal seconds).

:func:`remember` counts one more user and stores the owner when it is the first;
:func:`recall` counts one user less and hands the owner back when it was the last. A record
whose timestamp is not this boot's is stale (the host crashed or rebooted with domains
running): it is discarded with a warning. ``trusted.`` xattrs need CAP_SYS_ADMIN, so neither
guests nor users can forge them.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError
from vmconfine_dac.fsops import FileHandle

log = logging.getLogger(__name__)

DRIVER = "dac"

#: errno values meaning "this file system cannot keep the record" (caller falls back)
UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EROFS,
                         errno.EACCES, errno.ENOSYS})

_boot_time: int | None = None


def boot_time() -> int:
    """The host boot time (``btime`` of /proc/stat), read once per process."""
    global _boot_time
    if _boot_time is None:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                _boot_time = int(line.split()[1])
                break
        else:  # pragma: no cover - every Linux kernel has it
            raise LabelError("/proc/stat has no btime line; cannot date remembered owners")
    return _boot_time


@dataclass(frozen=True)
class Names:
    """The three xattr names under one prefix."""

    label: str
    ref: str
    timestamp: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Names:
        return cls(f"{prefix}.{DRIVER}", f"{prefix}.ref_{DRIVER}", f"{prefix}.timestamp_{DRIVER}")


@dataclass(frozen=True)
class Record:
    """What the xattrs on a file say (``ref`` 0 = no record)."""

    ref: int
    label: str | None
    timestamp: int | None


def format_owner(uid: int, gid: int) -> str:
    return f"+{uid}:+{gid}"


def parse_owner(text: str) -> tuple[int, int]:
    """``"+UID:+GID"`` (as written by :func:`format_owner`) → ids."""
    user, sep, group = text.partition(":")
    try:
        if not sep or not user.startswith("+") or not group.startswith("+"):
            raise ValueError(text)
        return int(user[1:]), int(group[1:])
    except ValueError:
        raise LabelError(f"remembered owner '{text}' is not +UID:+GID") from None


def _unsupported(exc: OSError) -> bool:
    return exc.errno in UNSUPPORTED


def read(h: FileHandle, names: Names) -> Record:
    """The record on ``h`` as it is (raises OSError, e.g. ENOTSUP)."""
    raw_ref = h.getxattr(names.ref)
    raw_label = h.getxattr(names.label)
    raw_ts = h.getxattr(names.timestamp)
    try:
        ref = int(raw_ref.decode()) if raw_ref is not None else 0
    except ValueError:
        ref = -1  # garbage: treated as stale
    try:
        ts = int(raw_ts.decode()) if raw_ts is not None else None
    except ValueError:
        ts = None
    return Record(ref, raw_label.decode(errors="replace") if raw_label is not None else None, ts)


def clear(h: FileHandle, names: Names) -> None:
    for name in (names.ref, names.label, names.timestamp):
        h.removexattr(name)


def _current(h: FileHandle, names: Names) -> Record:
    """The record, with a stale one (other boot, garbage) discarded with a warning."""
    rec = read(h, names)
    if rec.ref == 0 and rec.label is None and rec.timestamp is None:
        return rec
    if rec.ref <= 0 or rec.timestamp != boot_time():
        log.warning("Invalid XATTR timestamp detected on %s secdriver=%s (a record from an "
                    "earlier boot or a crash); discarding it", h.name, DRIVER)
        clear(h, names)
        return Record(0, None, None)
    return rec


def peek_ref(h: FileHandle, names: Names) -> int | None:
    """The current (valid) refcount, None when xattrs are unsupported. Discards stale records."""
    try:
        return _current(h, names).ref
    except OSError as exc:
        if _unsupported(exc):
            return None
        raise


def remember(h: FileHandle, names: Names, uid: int, gid: int) -> int | None:
    """Count one more user of ``h``; store ``uid:gid`` when it is the first.

    Returns the new refcount, or None when the file system cannot keep xattrs.
    """
    try:
        rec = _current(h, names)
        ref = rec.ref + 1
        if ref == 1:
            h.setxattr(names.label, format_owner(uid, gid).encode())
            h.setxattr(names.timestamp, str(boot_time()).encode())
        h.setxattr(names.ref, str(ref).encode())
        return ref
    except OSError as exc:
        if _unsupported(exc):
            log.info("%s: cannot remember its owner in xattrs (%s); the journal keeps it",
                     h.name, exc.strerror)
            return None
        raise LabelError(f"{h.name}: cannot update remembered owner: {exc.strerror}") from None


@dataclass(frozen=True)
class Recall:
    """Result of :func:`recall`: ``owner`` to restore, or ``in_use`` (others still use it),
    or neither (no valid record: the caller falls back to the journal)."""

    owner: tuple[int, int] | None = None
    in_use: bool = False
    remaining: int = 0


def recall(h: FileHandle, names: Names) -> Recall:
    """Count one user less; hand the remembered owner back when it was the last one."""
    try:
        rec = _current(h, names)
        if rec.ref == 0:
            return Recall()
        ref = rec.ref - 1
        if ref > 0:
            h.setxattr(names.ref, str(ref).encode())
            return Recall(in_use=True, remaining=ref)
        clear(h, names)
    except OSError as exc:
        if _unsupported(exc):
            return Recall()
        raise LabelError(f"{h.name}: cannot update remembered owner: {exc.strerror}") from None
    if rec.label is None:
        return Recall()
    try:
        return Recall(owner=parse_owner(rec.label))
    except LabelError as exc:
        log.warning("%s: %s; using the journal's record instead", h.name, exc)
        return Recall()
