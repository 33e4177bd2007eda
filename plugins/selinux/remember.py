"""Remembered labels: a file's original SELinux context, kept in ``trusted.`` xattrs on it.

The record is the shared remembered-label scheme of :mod:`vmconfine.remember` (libvirt's
``security_util.c``) for the driver ``selinux``, reached by path
(:class:`vmconfine.remember.PathXattrs`):

* ``PREFIX.selinux``            the original context (empty: the file had no context);
* ``PREFIX.ref_selinux``        how many running domains use the file (decimal);
* ``PREFIX.timestamp_selinux``  the host boot time when the record was made (decimal seconds).

:func:`remember` counts one more user and stores the context when it is the first;
:func:`recall` counts one user less and hands the context back when it was the last. A stale
record (another boot, a crash) is discarded with libvirt's warning. Paths given here are
already resolved; no call follows a final symlink.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmconfine import remember as shared
from vmconfine.remember import UNSUPPORTED, PathXattrs, Record, boot_time

__all__ = ["DRIVER", "UNSUPPORTED", "Names", "Recall", "Record", "boot_time", "clear", "peek",
           "read", "recall", "remember"]

log = logging.getLogger(__name__)

DRIVER = "selinux"

_SCHEME = shared.Scheme(
    DRIVER, log, what="the remembered SELinux context",
    unsupported_note="cannot remember its SELinux context in xattrs (%s); restore will use "
                     "the policy default",
)


class Names(shared.Names):
    """The three ``selinux`` xattr names under one prefix."""

    @classmethod
    def for_prefix(cls, prefix: str) -> Names:
        return cls.of(prefix, DRIVER)


def read(path: str, names: shared.Names) -> Record:
    """The record on ``path`` as it is (raises OSError, e.g. ENOTSUP)."""
    return shared.read(PathXattrs(path), names)


def clear(path: str, names: shared.Names) -> None:
    """Remove the whole record (the admin's reset, and the end of a record's life)."""
    shared.clear(PathXattrs(path), names)


def peek(path: str, names: shared.Names) -> Record | None:
    """The valid record on ``path`` (``ref`` 0: none), None when the file system cannot keep
    xattrs. A stale record is discarded."""
    return _SCHEME.peek(PathXattrs(path), names)


def remember(path: str, names: shared.Names, label: str | None) -> int | None:
    """Count one more user of ``path``; store ``label`` (None = "had no context") when it is
    the first. Returns the new refcount, or None when the file system cannot keep xattrs."""
    return _SCHEME.remember(PathXattrs(path), names, label or "")


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


def recall(path: str, names: shared.Names) -> Recall:
    """Count one user less; hand the remembered context back when it was the last one."""
    got = _SCHEME.recall(PathXattrs(path), names)
    return Recall(found=got.label is not None, label=got.label or None, in_use=got.in_use,
                  remaining=got.remaining)
