"""Remembered labels: a file's original SELinux context, kept in ``trusted.`` xattrs on it.

The scheme is libvirt's (``security_util.c``) under vmconfine's own prefix (qemu.conf
``remember_owner_xattr_prefix``, default ``trusted.vmconfine.security``):

* ``PREFIX.selinux``            the original context (empty: the file had no context);
* ``PREFIX.ref_selinux``        how many running domains use the file (decimal);
* ``PREFIX.timestamp_selinux``  the host boot time when the record was made (decimal seconds).

:func:`remember` counts one more user and stores the context when it is the first;
:func:`recall` counts one user less and hands the context back when it was the last. A record
whose timestamp is not this boot's is stale (the host crashed or rebooted with domains
running): it is discarded with libvirt's warning. ``trusted.`` xattrs need CAP_SYS_ADMIN, so
neither guests nor unprivileged users can forge them. Paths given here are already resolved;
no call follows a final symlink.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError

log = logging.getLogger(__name__)

DRIVER = "selinux"

#: errno values meaning "this file system cannot keep the record" (the caller falls back)
UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EROFS,
                         errno.EACCES, errno.ENOSYS})

_boot_time: int | None = None


def boot_time() -> int:
    """The host boot time (``btime`` in /proc/stat), read once per process."""
    global _boot_time
    if _boot_time is None:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                _boot_time = int(line.split()[1])
                break
        else:  # pragma: no cover - every Linux kernel has it
            raise LabelError("/proc/stat has no btime line; cannot date remembered labels")
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
    """What the xattrs on a file say (``ref`` 0 = no record, -1 = garbage)."""

    ref: int
    label: str | None
    timestamp: int | None


def _get(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _set(path: str, name: str, value: str) -> None:
    os.setxattr(path, name, value.encode(), follow_symlinks=False)


def _remove(path: str, name: str) -> None:
    try:
        os.removexattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


def read(path: str, names: Names) -> Record:
    """The record on ``path`` as it is (raises OSError, e.g. ENOTSUP)."""
    raw_ref, raw_label, raw_ts = (_get(path, n) for n in (names.ref, names.label, names.timestamp))
    try:
        ref = int(raw_ref.decode()) if raw_ref is not None else 0
    except ValueError:
        ref = -1
    try:
        ts = int(raw_ts.decode()) if raw_ts is not None else None
    except ValueError:
        ts = None
    label = raw_label.decode(errors="replace") if raw_label is not None else None
    return Record(ref, label, ts)


def clear(path: str, names: Names) -> None:
    """Remove the whole record (the admin's reset, and the end of a record's life)."""
    for name in (names.ref, names.label, names.timestamp):
        _remove(path, name)


def _current(path: str, names: Names) -> Record:
    """The record, with a stale one (other boot, garbage) discarded with a warning."""
    rec = read(path, names)
    if rec.ref == 0 and rec.label is None and rec.timestamp is None:
        return rec
    if rec.ref <= 0 or rec.timestamp != boot_time():
        log.warning("Invalid XATTR timestamp detected on %s secdriver=%s (a record from an "
                    "earlier boot or a crash); discarding it", path, DRIVER)
        clear(path, names)
        return Record(0, None, None)
    return rec


def remember(path: str, names: Names, label: str | None) -> int | None:
    """Count one more user of ``path``; store ``label`` (None = "had no context") when it is
    the first. Returns the new refcount, or None when the file system cannot keep xattrs."""
    try:
        rec = _current(path, names)
        ref = rec.ref + 1
        if ref == 1:
            _set(path, names.label, label or "")
            _set(path, names.timestamp, str(boot_time()))
        _set(path, names.ref, str(ref))
        return ref
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            log.info("%s: cannot remember its SELinux context in xattrs (%s); restore will use "
                     "the policy default", path, exc.strerror)
            return None
        raise LabelError(f"{path}: cannot update the remembered SELinux context: "
                         f"{exc.strerror}") from None


@dataclass(frozen=True)
class Recall:
    """Result of :func:`recall`.

    ``found`` with ``label`` (None = the file had no context): restore it. ``in_use``: other
    domains still use the file, leave it. Neither: no valid record, the caller falls back.
    """

    found: bool = False
    label: str | None = None
    in_use: bool = False
    remaining: int = 0


def recall(path: str, names: Names) -> Recall:
    """Count one user less; hand the remembered context back when it was the last one."""
    try:
        rec = _current(path, names)
        if rec.ref == 0:
            return Recall()
        ref = rec.ref - 1
        if ref > 0:
            _set(path, names.ref, str(ref))
            return Recall(in_use=True, remaining=ref)
        clear(path, names)
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return Recall()
        raise LabelError(f"{path}: cannot update the remembered SELinux context: "
                         f"{exc.strerror}") from None
    if rec.label is None:
        return Recall()
    return Recall(found=True, label=rec.label or None)
