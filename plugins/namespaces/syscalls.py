"""The few Linux calls the namespaces driver makes, through ctypes on the C library.

Python 3.11's ``os`` has none of ``unshare``, ``mount``, ``umount2`` or ``pivot_root``; these
thin wrappers raise :class:`OSError` with the errno and the path, like ``os`` functions do.
Everything here runs in the forked child (or in a test's own child); nothing is cached that
a later call in another process could depend on.
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2
#: (pivot_root, capset) system call numbers; libc wraps neither
_SYSCALLS = {"x86_64": (155, 126), "aarch64": (41, 91), "riscv64": (41, 91)}
SYS_PIVOT_ROOT, SYS_CAPSET = _SYSCALLS.get(platform.machine(), (-1, -1))


def _check(rc: int, what: str, path: str | None = None) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {fstype or 'bind' if flags & MS_BIND else fstype} on {target}", target)


MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 1 << 21
#: statvfs ``f_flag`` bits -> the mount flags a bind remount must repeat (in a user namespace
#: the kernel locks them: a remount that drops one fails with EPERM)
_KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
               (os.ST_RELATIME, MS_RELATIME))


def mount_flags(path: str) -> int:
    """The per-mount flags of the mount ``path`` is on, as ``MS_*`` bits."""
    have = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEPT_FLAGS if have & st)


def bind(source: str, target: str, *, readonly: bool, recursive: bool = False,
         nosuid: bool = True) -> None:
    """Bind ``source`` on ``target``; read-only binds need a second, remount call, which
    keeps the flags the source's mount has (nosuid, nodev, noexec, atime) and adds
    ``nosuid`` unless told not to (the executable QEMU is started from: an SELinux exec
    transition from a nosuid mount needs a permission of its own, see docs/namespaces.md)."""
    flags = MS_BIND | (MS_REC if recursive else 0)
    mount(source, target, None, flags)
    if readonly:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | mount_flags(target)
              | (MS_NOSUID if nosuid else 0))


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    if SYS_PIVOT_ROOT < 0:
        raise OSError(38, f"pivot_root: no system call number known for {platform.machine()}")
    _check(int(_libc.syscall(SYS_PIVOT_ROOT, _b(new_root), _b(put_old))), "pivot_root",
           new_root)


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_all_capabilities(last_cap: int) -> None:
    """Empty the bounding and ambient sets, then effective/permitted/inheritable (capset).

    For a process that created a user namespace: it holds every capability *in* that
    namespace, which QEMU must not keep."""
    for cap in range(last_cap + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    if SYS_CAPSET < 0:
        raise OSError(38, f"capset: no system call number known for {platform.machine()}")
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(int(_libc.syscall(SYS_CAPSET, ctypes.byref(header), ctypes.byref(data))), "capset")


# ---- entering a running QEMU's namespaces (hotplug) -------------------------------------------
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
#: (open_tree, move_mount) system call numbers (the same on every architecture since 5.2)
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def open_tree(path: str) -> int:
    """A detached clone of the mount of ``path`` (a bind mount not attached anywhere yet)."""
    fd = int(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, _b(path),
                           OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))
    if fd < 0:
        _check(-1, "open_tree", path)
    return fd


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` at ``target`` (in the caller's mount namespace)."""
    _check(int(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, _b(target),
                             MOVE_MOUNT_F_EMPTY_PATH)), "move_mount", target)
