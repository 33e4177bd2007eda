"""Safe file operations for the DAC driver: resolve once, then act on an fd, never on a name.

A resource path is resolved once (:func:`resolve`), its ``(st_dev, st_ino)`` recorded, and the
resolved path is then opened component by component with ``O_PATH | O_NOFOLLOW``
(:meth:`FileHandle.open`): a symlink anywhere in the resolved path (which has none by
construction) means the tree changed underneath us, and the open is refused. The handle's
inode must be the one that was checked; otherwise :class:`SwappedError` is raised. Every
change (owner, mode, xattrs) then goes through the handle:

* regular files and block devices are reopened through ``/proc/self/fd/N`` with a real access
  mode (``O_RDWR``, else ``O_RDONLY``), which allows ``fchown``/``fsetxattr`` and the metadata
  lock (a POSIX lock on byte 1, as libvirt takes it, so QEMU's own image locks never collide);
* other inodes (directories, sockets, FIFOs, character devices) keep the ``O_PATH`` fd and are
  changed through the ``/proc/self/fd/N`` magic link, which names the opened inode itself
  (``fchown`` does not work on ``O_PATH`` fds).

A :class:`DirCache` shares that work between the files of one operation (a domain's set or
restore touches many files, usually in a few directories: every layer of a backing chain in
one): each directory is resolved and opened (the same symlink-refusing walk) once, a file in it
is resolved with one ``lstat`` and opened with ``openat`` on the directory's fd, still
``O_NOFOLLOW`` and still checked against the resolved inode. A regular file is opened with its
access mode at once (no ``O_PATH`` step: opening a regular file has no side effects); anything
else takes the ``O_PATH`` route above. A directory replaced after it was opened cannot redirect
anything: the fd names the directory that was checked.

Also here: the permission check used by preflight and the NFS fallback (:func:`can_access`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import NamedTuple

from vmconfine.errors import LabelError
from vmconfine.perms import R, W, X, can_access, describe_mode, has_acl  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: Test seam: called as ``hook(original_path, resolved_path)`` between resolving a path and
#: opening it (the window a symlink swap would use). None in production.
after_resolve_hook: Callable[[str, str], None] | None = None

#: seconds to wait for another process's metadata lock (libvirt: 10 000 x 1 ms)
LOCK_WAIT = 10.0



class SwappedError(LabelError):
    """The file at a path changed between the check and the use."""


#: O_PATH fds of directories a :class:`DirCache` keeps open at most
DIR_CACHE_SIZE = 64

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_IO_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
#: the access modes a regular file is opened with, tried in order (for the metadata lock: RW)
_LOCK_MODES = (os.O_RDWR | os.O_NOFOLLOW | _IO_FLAGS, os.O_RDONLY | os.O_NOFOLLOW | _IO_FLAGS)
_READ_MODES = (os.O_RDONLY | os.O_NOFOLLOW | _IO_FLAGS,)
#: names that are no file name of a directory's entry
_NOT_NAMES = frozenset({"", ".", ".."})


class Resolved(NamedTuple):
    """A path resolved once: the original name, the canonical name, and the checked inode
    (``mode``: its st_mode when known, else 0)."""

    path: str
    resolved: str
    dev: int
    ino: int
    mode: int = 0


def resolve(path: str) -> Resolved:
    """Resolve every symlink in ``path`` once and stat the result (raises OSError)."""
    real = os.path.realpath(path, strict=True)
    st = os.stat(real, follow_symlinks=False)
    return Resolved(path, real, st.st_dev, st.st_ino, st.st_mode)


class DirCache:
    """The directories of one operation, each resolved and opened once (see the module doc).

    Use as a context manager; it closes its fds on exit. At most :data:`DIR_CACHE_SIZE`
    directory fds stay open (the oldest is closed first).
    """

    def __init__(self) -> None:
        #: a directory as named → (its resolved name, that name with a trailing "/")
        self._real: dict[str, tuple[str, str]] = {}
        self._fds: dict[str, int] = {}

    def resolve(self, path: str) -> Resolved:
        """:func:`resolve`, with the directory part resolved (and opened) once per operation."""
        return self._lookup(path)[0]

    def open(self, path: str, want_lock: bool) -> tuple[Resolved, FileHandle]:
        """:meth:`resolve`, then :meth:`FileHandle.open` (``lock=False``) of what it resolved:
        the same checks in the same order, the directory looked up once for both."""
        head, sep, name = path.rpartition("/")
        real = self._real.get(head or "/") if sep and name not in _NOT_NAMES else None
        dfd = self._fds.get(real[0]) if real is not None else None
        if dfd is not None:
            # the common case, without the general path's calls: a regular file in a
            # directory opened already (the layers of a chain, a domain's disks)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                res = Resolved(path, real[1] + name, st.st_dev,  # type: ignore[index]
                               st.st_ino, st.st_mode)
                if after_resolve_hook is not None:
                    after_resolve_hook(res.path, res.resolved)
                try:
                    return res, FileHandle._open_regular(dfd, name, res, want_lock)
                except OSError as exc:
                    raise _swapped(res, exc) from None
        res, dfd, name = self._lookup(path)
        if dfd < 0:
            return res, FileHandle.open(res, want_lock=want_lock, dirs=self, lock=False)
        return res, FileHandle.open_at(res, dfd, name, want_lock)

    def _lookup(self, path: str) -> tuple[Resolved, int, str]:
        """The resolved path, and the fd of its directory and its name in it when the file was
        resolved relative to that fd (else -1 and "")."""
        head, sep, name = path.rpartition("/")
        if not sep or name in _NOT_NAMES:
            return resolve(path), -1, ""
        head = head or "/"
        real = self._real.get(head)
        if real is None:
            real = self._resolve_dir(head)
        dfd = self._fds.get(real[0])
        if dfd is not None:  # relative to the directory already opened (and checked)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        else:
            st, dfd = os.stat(real[1] + name, follow_symlinks=False), -1
        if stat.S_ISLNK(st.st_mode):  # the file itself is a symlink: resolve it in full
            return resolve(path), -1, ""
        return Resolved(path, real[1] + name, st.st_dev, st.st_ino, st.st_mode), dfd, name

    def _resolve_dir(self, head: str) -> tuple[str, str]:
        """Resolve the directory ``head`` (following its symlinks, as ``realpath`` does) by
        opening it: the kernel resolves the name, ``/proc/self/fd`` names what it opened, and
        that fd — the directory whose name is recorded, whatever happens to the name later —
        is kept for the files in it (two system calls instead of an ``lstat`` per component
        and the symlink-refusing walk of :meth:`dir_fd`)."""
        fd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            real_head = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real_head = ""
        if not real_head.startswith("/") or real_head.endswith(" (deleted)"):
            # no usable name from /proc (not mounted, a removed directory): the slow way
            os.close(fd)
            real_head, fd = os.path.realpath(head, strict=True), -1
        real = self._real[head] = (real_head,
                                   real_head if real_head.endswith("/") else real_head + "/")
        if fd >= 0:
            if real_head in self._fds:
                os.close(fd)  # the same directory by another name: opened already
            else:
                self._add_fd(real_head, fd)
        return real

    def dir_fd(self, directory: str) -> int:
        """An O_PATH fd of ``directory`` (resolved), opened without following any symlink."""
        fd = self._fds.get(directory)
        if fd is None:
            fd = _open_resolved_dir(directory)
            self._add_fd(directory, fd)
        return fd

    def _add_fd(self, directory: str, fd: int) -> None:
        if len(self._fds) >= DIR_CACHE_SIZE:
            os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[directory] = fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._real.clear()

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _swapped(res: Resolved, exc: OSError) -> Exception:
    """What an open failing with ``exc`` raises: ELOOP and ENOTDIR mean a directory on the
    way became a symlink (:class:`SwappedError`); anything else as it is."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return SwappedError(
            f"{res.path}: a directory on the way to {res.resolved} became a symlink while it "
            "was being labelled; refusing to change its owner")
    return exc


def _open_resolved_dir(directory: str) -> int:
    """An O_PATH fd of ``directory`` (absolute, already resolved), reached through no symlink.

    The kernel opens it and ``/proc/self/fd`` names what it opened: when that is ``directory``
    itself, the fd is the directory at that path (a symlink on the way would have led to
    another name), found with two system calls. Otherwise (a symlink or a swap on the way,
    no /proc) the component walk of :func:`_open_nofollow` decides, and refuses.
    """
    if directory.startswith("/"):
        try:
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == directory:
                    return fd
            except OSError:
                pass
            os.close(fd)
    return _open_nofollow(directory, directory=True)


def _open_nofollow(path: str, *, directory: bool = False) -> int:
    """Open ``path`` (absolute, already resolved) with O_PATH, refusing any symlink on the way
    (``directory``: the last component must be a directory too)."""
    if not os.path.isabs(path):
        raise LabelError(f"{path}: not an absolute path")
    parts = [p for p in path.split("/") if p]
    flags = _PATH_FLAGS
    fd = os.open("/", flags | os.O_DIRECTORY)
    try:
        for i, name in enumerate(parts):
            if name in (".", ".."):
                raise LabelError(f"{path}: unexpected '{name}' in a resolved path")
            last = i == len(parts) - 1 and not directory
            nxt = os.open(name, flags if last else flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            # O_DIRECTORY refuses a symlink itself (ENOTDIR); the last component is checked
            if last and stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SwappedError(
                    f"{path} became a symlink while it was being labelled; refusing to change "
                    "its owner (check who can write to its directory)"
                )
        return fd
    except BaseException:
        os.close(fd)
        raise


class FileHandle:
    """An opened inode; every owner/mode/xattr change of the DAC driver goes through one."""

    __slots__ = ("_io_fd", "_lockable", "_path_fd", "locked", "name", "opened_stat")

    def __init__(self, name: str, path_fd: int | None, io_fd: int | None) -> None:
        self.name = name
        self._path_fd = path_fd
        self._io_fd = io_fd
        self._lockable = False
        self.locked = False
        #: the inode's stat as it was checked when the handle was opened
        self.opened_stat: os.stat_result | None = None

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, res: Resolved, *, want_lock: bool = False, dirs: DirCache | None = None,
             lock: bool = True) -> FileHandle:
        """Open ``res.resolved`` without following symlinks; verify it is the checked inode.

        With ``want_lock`` a regular file or block device is opened read-write and its
        metadata lock taken (``self.locked`` says whether that worked); ``lock=False`` leaves
        taking it to :meth:`lock` (several files locked in a fixed order). ``dirs`` opens the
        file relative to its directory's cached fd.
        """
        if after_resolve_hook is not None:
            after_resolve_hook(res.path, res.resolved)
        try:
            if dirs is not None:
                handle = cls._open_in(dirs, res, want_lock)
            else:
                handle = cls._open_path(res, _open_nofollow(res.resolved), want_lock)
        except OSError as exc:
            raise _swapped(res, exc) from None
        if lock:
            try:
                handle.lock()
            except BaseException:
                handle.close()
                raise
        return handle

    @classmethod
    def open_at(cls, res: Resolved, dfd: int, name: str, want_lock: bool) -> FileHandle:
        """:meth:`open` (``lock=False``) of ``name`` in the directory fd ``dfd`` that ``res``
        was resolved in (:meth:`DirCache.open`)."""
        if after_resolve_hook is not None:
            after_resolve_hook(res.path, res.resolved)
        try:
            return cls._open_at(dfd, name, res, want_lock)
        except OSError as exc:
            raise _swapped(res, exc) from None

    @classmethod
    def _open_in(cls, dirs: DirCache, res: Resolved, want_lock: bool) -> FileHandle:
        head, _sep, name = res.resolved.rpartition("/")
        if name in _NOT_NAMES:
            return cls._open_path(res, _open_nofollow(res.resolved), want_lock)
        dfd = dirs._fds.get(head or "/")
        if dfd is None:
            dfd = dirs.dir_fd(head or "/")
        return cls._open_at(dfd, name, res, want_lock)

    @classmethod
    def _open_at(cls, dfd: int, name: str, res: Resolved, want_lock: bool) -> FileHandle:
        mode = res.mode or os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
        if stat.S_ISREG(mode):
            return cls._open_regular(dfd, name, res, want_lock)
        return cls._open_path(res, os.open(name, _PATH_FLAGS, dir_fd=dfd), want_lock)

    @classmethod
    def _open_regular(cls, dfd: int, name: str, res: Resolved, want_lock: bool) -> FileHandle:
        """Open ``name`` in ``dfd``, a regular file when it was resolved, with its access mode
        (read-write first for the metadata lock) and no ``O_PATH`` step."""
        for flags in _LOCK_MODES if want_lock else _READ_MODES:
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise SwappedError(
                        f"{res.resolved} became a symlink while it was being labelled; "
                        "refusing to change its owner (check who can write to its "
                        "directory)") from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise
                log.debug("%s: open with flags %o failed: %s", res.resolved, flags, exc)
                continue
            handle = cls(res.resolved, None, fd)
            st = handle.opened_stat = os.fstat(fd)
            if st.st_ino != res.ino or st.st_dev != res.dev or stat.S_ISLNK(st.st_mode):
                try:
                    handle._check(res, st)  # raises: the file was replaced
                finally:
                    handle.close()
            handle._lockable = flags == _LOCK_MODES[0]
            return handle
        return cls._open_path(res, os.open(name, _PATH_FLAGS, dir_fd=dfd), want_lock)

    @classmethod
    def _open_path(cls, res: Resolved, fd: int, want_lock: bool) -> FileHandle:
        """Finish opening from the O_PATH fd ``fd`` of ``res.resolved``."""
        handle = cls(res.resolved, fd, None)
        try:
            st = os.fstat(fd)
            handle._check(res, st)
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                handle._reopen(want_lock, st)
        except BaseException:
            handle.close()
            raise
        return handle

    def _check(self, res: Resolved, st: os.stat_result) -> None:
        self.opened_stat = st
        if st.st_ino == res.ino and st.st_dev == res.dev and not stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISLNK(st.st_mode):
            raise SwappedError(
                f"{res.resolved} became a symlink while it was being labelled; refusing to "
                "change its owner (check who can write to its directory)"
            )
        if (st.st_dev, st.st_ino) != (res.dev, res.ino):
            raise SwappedError(
                f"{res.resolved} was replaced while it was being labelled (inode "
                f"{res.dev}:{res.ino} became {st.st_dev}:{st.st_ino}); refusing to change "
                "its owner (check who can write to its directory)"
            )

    def _reopen(self, want_lock: bool, ref: os.stat_result) -> None:
        link = f"/proc/self/fd/{self._path_fd}"
        modes = (os.O_RDWR, os.O_RDONLY) if want_lock else (os.O_RDONLY,)
        for mode in modes:
            try:
                fd = os.open(link, mode | _IO_FLAGS)  # the magic link must be followed
            except OSError as exc:
                log.debug("%s: reopen with mode %o failed: %s", self.name, mode, exc)
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (ref.st_dev, ref.st_ino):  # cannot happen via the link
                os.close(fd)
                raise SwappedError(f"{self.name}: reopened a different inode; refusing")
            self._io_fd = fd
            self._lockable = want_lock and mode == os.O_RDWR
            return

    def lock(self) -> None:
        """Take the metadata lock when the handle was opened for it (no-op otherwise)."""
        if self._lockable and not self.locked:
            self._lock()

    def _lock(self) -> None:
        """Take the metadata lock (byte 1), waiting up to LOCK_WAIT seconds for another
        vmconfine process that is relabelling the same file."""
        assert self._io_fd is not None
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.lockf(self._io_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
                self.locked = True
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    # e.g. a file system without POSIX locks: go on without remembering
                    log.info("%s: cannot take the metadata lock (%s); its owner is kept in "
                             "the journal only", self.name, exc.strerror)
                    return
            if time.monotonic() > deadline:
                raise LabelError(f"unable to lock {self.name} for metadata change (another "
                                 "process holds it); try again")
            time.sleep(0.01)

    def close(self) -> None:
        io_fd, path_fd = self._io_fd, self._path_fd
        self._io_fd = self._path_fd = None
        self.locked = False
        try:
            if io_fd is not None:
                os.close(io_fd)  # closing releases the lock
        finally:
            if path_fd is not None:
                os.close(path_fd)

    def __enter__(self) -> FileHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the operations ---------------------------------------------------------------------
    @property
    def _target(self) -> int | str:
        """An fd usable by the *f*() calls, else the magic link naming the opened inode."""
        if self._io_fd is not None:
            return self._io_fd
        return f"/proc/self/fd/{self._path_fd}"

    def stat(self) -> os.stat_result:
        fd = self._path_fd if self._path_fd is not None else self._io_fd
        assert fd is not None
        return os.fstat(fd)

    def chown(self, uid: int, gid: int) -> None:
        if self._io_fd is not None:
            os.fchown(self._io_fd, uid, gid)
        else:
            os.chown(self._target, uid, gid)  # follows the magic link to the opened inode

    def chmod(self, mode: int) -> None:
        target = self._target
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)

    def getxattr(self, name: str) -> bytes | None:
        """The xattr's value, or None when absent (other errors raise)."""
        try:
            return os.getxattr(self._io_fd if self._io_fd is not None else self._target, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def setxattr(self, name: str, value: bytes) -> None:
        os.setxattr(self._target, name, value)

    def removexattr(self, name: str) -> None:
        try:
            os.removexattr(self._target, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def listxattr(self) -> list[str]:
        return os.listxattr(self._io_fd if self._io_fd is not None else self._target)
