"""Remembered labels: a file's original label, kept in ``trusted.`` xattrs on the file itself.

The scheme is libvirt's (``security_util.c``) under vmconfine's own prefix (qemu.conf
``remember_owner_xattr_prefix``, default ``trusted.vmconfine.security``). For a driver ``DRV``
(``dac``, ``selinux``...):

* ``PREFIX.DRV``            the original label, as text the driver chooses;
* ``PREFIX.ref_DRV``        how many running domains use the file (decimal);
* ``PREFIX.timestamp_DRV``  the host boot time when the record was made (decimal seconds).

:meth:`Scheme.remember` counts one more user and stores the label when it is the first;
:meth:`Scheme.recall` counts one user less and hands the label back when it was the last. A
record whose timestamp is not this boot's (or whose refcount is garbage) is stale: the host
crashed or rebooted with domains running, so it is discarded with a warning. A file system that
cannot keep the xattrs (errno in :data:`UNSUPPORTED`) is not an error: the calls say so and the
caller falls back (the journal, the policy default). ``trusted.`` xattrs need CAP_SYS_ADMIN, so
neither guests nor unprivileged users can forge them.

Drivers reach a file's xattrs in their own way, so every call takes an :class:`Xattrs`
accessor: the DAC driver's fd-based ``FileHandle`` is one as it stands; :class:`PathXattrs`
works on a resolved path without following a final symlink.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmconfine.errors import LabelError

#: errno values meaning "this file system cannot keep the record" (the caller falls back)
UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EROFS,
                         errno.EACCES, errno.ENOSYS})

_boot_time: int | None = None


def boot_time(dated: str = "remembered labels") -> int:
    """The host boot time (``btime`` in /proc/stat), read once per process.

    ``dated`` names what the time stamps, for the error when /proc/stat has no ``btime``.
    """
    global _boot_time
    if _boot_time is None:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                _boot_time = int(line.split()[1])
                break
        else:  # pragma: no cover - every Linux kernel has it
            raise LabelError(f"/proc/stat has no btime line; cannot date {dated}")
    return _boot_time


class Xattrs(Protocol):
    """How the scheme reaches one file's xattrs (the DAC driver's ``FileHandle`` is one)."""

    @property
    def name(self) -> str:
        """The file's name, for messages."""
        ...

    def getxattr(self, name: str) -> bytes | None:
        """The xattr's value, or None when it is absent (other errors raise OSError)."""
        ...

    def setxattr(self, name: str, value: bytes) -> None:
        """Create or replace the xattr (errors raise OSError)."""
        ...

    def removexattr(self, name: str) -> None:
        """Remove the xattr; an absent one is not an error (others raise OSError)."""
        ...


class PathXattrs:
    """:class:`Xattrs` on a path that is already resolved; never follows a final symlink."""

    def __init__(self, path: str) -> None:
        self._path = path

    @property
    def name(self) -> str:
        return self._path

    def getxattr(self, name: str) -> bytes | None:
        try:
            return os.getxattr(self._path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def setxattr(self, name: str, value: bytes) -> None:
        os.setxattr(self._path, name, value, follow_symlinks=False)

    def removexattr(self, name: str) -> None:
        try:
            os.removexattr(self._path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


@dataclass(frozen=True)
class Names:
    """The three xattr names of one driver under one prefix."""

    label: str
    ref: str
    timestamp: str

    @classmethod
    def of(cls, prefix: str, driver: str) -> Names:
        """``PREFIX.DRV``, ``PREFIX.ref_DRV``, ``PREFIX.timestamp_DRV``."""
        return cls(f"{prefix}.{driver}", f"{prefix}.ref_{driver}", f"{prefix}.timestamp_{driver}")


@dataclass(frozen=True)
class Record:
    """What the xattrs on a file say (``ref`` 0 = no record, -1 = garbage)."""

    ref: int
    label: str | None
    timestamp: int | None


@dataclass(frozen=True)
class Recalled:
    """Result of :meth:`Scheme.recall`.

    ``label``: the stored text, when this was the last user of a valid record (restore it).
    ``in_use``: other domains still use the file (``remaining`` of them), leave it. Neither:
    no valid record (or no xattrs here), the caller falls back.
    """

    label: str | None = None
    in_use: bool = False
    remaining: int = 0


def read(x: Xattrs, names: Names, listed: Collection[str] | None = None) -> Record:
    """The record on the file as it is (raises OSError, e.g. ENOTSUP). ``listed``: the file's
    xattr names, listed a moment ago under its lock (only those present are read: a file
    without a record costs no failing ``getxattr``)."""
    raw_ref, raw_label, raw_ts = (
        x.getxattr(n) if listed is None or n in listed else None
        for n in (names.ref, names.label, names.timestamp))
    try:
        ref = int(raw_ref.decode()) if raw_ref is not None else 0
    except ValueError:
        ref = -1  # garbage: treated as stale
    try:
        ts = int(raw_ts.decode()) if raw_ts is not None else None
    except ValueError:
        ts = None
    label = raw_label.decode(errors="replace") if raw_label is not None else None
    return Record(ref, label, ts)


def clear(x: Xattrs, names: Names) -> None:
    """Remove the whole record (the end of a record's life, and the admin's reset)."""
    for name in (names.ref, names.label, names.timestamp):
        x.removexattr(name)


@dataclass(frozen=True)
class Scheme:
    """One driver's use of the scheme: its name, its logger and the words of its messages."""

    #: the driver's name: the xattr suffix and ``secdriver=`` of the stale-record warning
    driver: str
    #: where the scheme logs (the driver module's logger)
    log: logging.Logger
    #: what cannot be updated, for LabelError: ``"NAME: cannot update {what}: STRERROR"``
    what: str
    #: the info line when the file system cannot keep xattrs; ``%s`` = strerror
    unsupported_note: str
    #: what the boot time stamps, for :func:`boot_time`'s error
    dated: str = "remembered labels"

    def names(self, prefix: str) -> Names:
        """This driver's xattr names under ``prefix``."""
        return Names.of(prefix, self.driver)

    def current(self, x: Xattrs, names: Names, seen: Record | None = None,
                listed: Collection[str] | None = None) -> Record:
        """The record, with a stale one (other boot, garbage) discarded with a warning.

        ``seen``: the record as :func:`read` (or this method) returned it a moment ago while
        the caller held the file's lock; it is checked instead of reading the xattrs again.
        ``listed``: see :func:`read`.
        """
        rec = seen if seen is not None else read(x, names, listed)
        if rec.ref == 0 and rec.label is None and rec.timestamp is None:
            return rec
        if rec.ref <= 0 or rec.timestamp != boot_time(self.dated):
            self.log.warning("Invalid XATTR timestamp detected on %s secdriver=%s (a record "
                             "from an earlier boot or a crash); discarding it",
                             x.name, self.driver)
            clear(x, names)
            return Record(0, None, None)
        return rec

    def peek_ref(self, x: Xattrs, names: Names) -> int | None:
        """The current (valid) refcount, None when xattrs are unsupported. Discards a stale
        record."""
        rec = self.peek(x, names)
        return None if rec is None else rec.ref

    def peek(self, x: Xattrs, names: Names,
             listed: Collection[str] | None = None) -> Record | None:
        """The current (valid) record, None when xattrs are unsupported. Discards a stale
        record. Pass it on as ``seen`` to :meth:`remember` under the same lock. ``listed``:
        see :func:`read`."""
        try:
            return self.current(x, names, listed=listed)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return None
            raise

    def remember(self, x: Xattrs, names: Names, label: str,
                 seen: Record | None = None) -> int | None:
        """Count one more user of the file; store ``label`` when it is the first.

        Returns the new refcount, or None when the file system cannot keep xattrs. ``seen``:
        see :meth:`current`.
        """
        try:
            ref = self.current(x, names, seen).ref + 1
            if ref == 1:
                x.setxattr(names.label, label.encode())
                x.setxattr(names.timestamp, str(boot_time(self.dated)).encode())
            x.setxattr(names.ref, str(ref).encode())
            return ref
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                self.log.info("%s: " + self.unsupported_note, x.name, exc.strerror)
                return None
            raise self._failed(x, exc) from None

    def recall(self, x: Xattrs, names: Names, seen: Record | None = None) -> Recalled:
        """Count one user less; hand the remembered label back when it was the last one.

        ``seen``: see :meth:`current`.
        """
        try:
            rec = self.current(x, names, seen)
            if rec.ref == 0:
                return Recalled()
            ref = rec.ref - 1
            if ref > 0:
                x.setxattr(names.ref, str(ref).encode())
                return Recalled(in_use=True, remaining=ref)
            clear(x, names)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return Recalled()
            raise self._failed(x, exc) from None
        return Recalled(label=rec.label)

    def _failed(self, x: Xattrs, exc: OSError) -> LabelError:
        return LabelError(f"{x.name}: cannot update {self.what}: {exc.strerror}")
