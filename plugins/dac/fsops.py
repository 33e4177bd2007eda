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
from dataclasses import dataclass

from vmconfine.errors import LabelError

log = logging.getLogger(__name__)

#: Test seam: called as ``hook(original_path, resolved_path)`` between resolving a path and
#: opening it (the window a symlink swap would use). None in production.
after_resolve_hook: Callable[[str, str], None] | None = None

#: seconds to wait for another process's metadata lock (libvirt: 10 000 x 1 ms)
LOCK_WAIT = 10.0

#: access bits for :func:`can_access`
R, W, X = 4, 2, 1


class SwappedError(LabelError):
    """The file at a path changed between the check and the use."""


@dataclass(frozen=True)
class Resolved:
    """A path resolved once: the original name, the canonical name, and the checked inode."""

    path: str
    resolved: str
    dev: int
    ino: int


def resolve(path: str) -> Resolved:
    """Resolve every symlink in ``path`` once and stat the result (raises OSError)."""
    real = os.path.realpath(path, strict=True)
    st = os.stat(real, follow_symlinks=False)
    return Resolved(path, real, st.st_dev, st.st_ino)


def _open_nofollow(path: str) -> int:
    """Open ``path`` (absolute, already resolved) with O_PATH, refusing any symlink on the way."""
    if not os.path.isabs(path):
        raise LabelError(f"{path}: not an absolute path")
    parts = [p for p in path.split("/") if p]
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags | os.O_DIRECTORY)
    try:
        for i, name in enumerate(parts):
            if name in (".", ".."):
                raise LabelError(f"{path}: unexpected '{name}' in a resolved path")
            last = i == len(parts) - 1
            nxt = os.open(name, flags if last else flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
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

    def __init__(self, name: str, path_fd: int, io_fd: int | None) -> None:
        self.name = name
        self._path_fd = path_fd
        self._io_fd = io_fd
        self.locked = False

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, res: Resolved, *, want_lock: bool = False) -> FileHandle:
        """Open ``res.resolved`` without following symlinks; verify it is the checked inode.

        With ``want_lock`` a regular file or block device is reopened read-write and its
        metadata lock taken (``self.locked`` says whether that worked).
        """
        if after_resolve_hook is not None:
            after_resolve_hook(res.path, res.resolved)
        try:
            fd = _open_nofollow(res.resolved)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SwappedError(
                    f"{res.path}: a directory on the way to {res.resolved} became a symlink "
                    "while it was being labelled; refusing to change its owner"
                ) from None
            raise
        handle = cls(res.resolved, fd, None)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (res.dev, res.ino):
                raise SwappedError(
                    f"{res.resolved} was replaced while it was being labelled (inode "
                    f"{res.dev}:{res.ino} became {st.st_dev}:{st.st_ino}); refusing to change "
                    "its owner (check who can write to its directory)"
                )
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                handle._reopen(want_lock)
        except BaseException:
            handle.close()
            raise
        return handle

    def _reopen(self, want_lock: bool) -> None:
        link = f"/proc/self/fd/{self._path_fd}"
        base = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC  # the magic link must be followed
        modes = (os.O_RDWR, os.O_RDONLY) if want_lock else (os.O_RDONLY,)
        for mode in modes:
            try:
                fd = os.open(link, mode | base)
            except OSError as exc:
                log.debug("%s: reopen with mode %o failed: %s", self.name, mode, exc)
                continue
            st, ref = os.fstat(fd), os.fstat(self._path_fd)
            if (st.st_dev, st.st_ino) != (ref.st_dev, ref.st_ino):  # cannot happen via the link
                os.close(fd)
                raise SwappedError(f"{self.name}: reopened a different inode; refusing")
            self._io_fd = fd
            if want_lock and mode == os.O_RDWR:
                self._lock()
            return

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
        for attr in ("_io_fd", "_path_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                try:
                    os.close(fd)  # closing releases the lock
                finally:
                    setattr(self, attr, None)
        self.locked = False

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
        assert self._path_fd is not None
        return os.fstat(self._path_fd)

    def chown(self, uid: int, gid: int) -> None:
        target = self._target
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid)  # follows the magic link to the opened inode

    def chmod(self, mode: int) -> None:
        target = self._target
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)

    def getxattr(self, name: str) -> bytes | None:
        """The xattr's value, or None when absent (other errors raise)."""
        try:
            return os.getxattr(self._target, name)
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
        return os.listxattr(self._target)


def can_access(st: os.stat_result, uid: int, gid: int, groups: tuple[int, ...] | list[int],
               want: int, *, privileged: bool = False) -> bool:
    """Would a process with these ids (and no capabilities unless ``privileged``) get ``want``
    (a mask of R/W/X) on an inode with this owner and mode? POSIX ACLs are not evaluated."""
    if privileged:
        if want & X and not stat.S_ISDIR(st.st_mode):
            return bool(st.st_mode & 0o111)
        return True
    mode = st.st_mode
    if st.st_uid == uid:
        bits = (mode >> 6) & 7
    elif st.st_gid == gid or st.st_gid in groups:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def has_acl(path: str) -> bool:
    """True when ``path`` carries a POSIX access ACL (mode bits alone do not decide access)."""
    try:
        os.getxattr(path, "system.posix_acl_access")
        return True
    except OSError:
        return False


def describe_mode(st: os.stat_result) -> str:
    """``+UID:+GID 0MODE`` of an inode, for messages."""
    return f"+{st.st_uid}:+{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
