"""The Landlock system calls through ctypes: ABI detection, structs, access-right tables.

Landlock has three system calls, with the same numbers on every architecture that has them
(they were added after the syscall tables were unified): ``landlock_create_ruleset`` (444),
``landlock_add_rule`` (445) and ``landlock_restrict_self`` (446).

Access rights are handled here by *name* (``"read_file"``, ``"bind_tcp"``, ...); each name has a
bit and the ABI version that introduced it. :func:`fs_rights`, :func:`net_rights`,
:func:`scopes` and :func:`restrict_flags` give the names a kernel ABI supports, so a ruleset
written for the newest ABI is masked down for an older kernel (best effort) instead of failing.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446

CREATE_RULESET_VERSION = 1 << 0
CREATE_RULESET_ERRATA = 1 << 1

RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

#: The newest ABI this module knows. A newer kernel is used at this level.
MAX_KNOWN_ABI = 7

#: Filesystem access rights: name -> (bit, first ABI).
FS_ACCESS: dict[str, tuple[int, int]] = {
    "execute": (1 << 0, 1),
    "write_file": (1 << 1, 1),
    "read_file": (1 << 2, 1),
    "read_dir": (1 << 3, 1),
    "remove_dir": (1 << 4, 1),
    "remove_file": (1 << 5, 1),
    "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1),
    "make_reg": (1 << 8, 1),
    "make_sock": (1 << 9, 1),
    "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1),
    "make_sym": (1 << 12, 1),
    "refer": (1 << 13, 2),
    "truncate": (1 << 14, 3),
    "ioctl_dev": (1 << 15, 5),
}

#: Rights that may be granted on a non-directory (the kernel refuses the others: EINVAL).
FILE_ONLY_ACCESS = frozenset({"execute", "write_file", "read_file", "truncate", "ioctl_dev"})

#: Network access rights: name -> (bit, first ABI).
NET_ACCESS: dict[str, tuple[int, int]] = {
    "bind_tcp": (1 << 0, 4),
    "connect_tcp": (1 << 1, 4),
}

#: IPC scopes: name -> (bit, first ABI).
SCOPES: dict[str, tuple[int, int]] = {
    "abstract_unix_socket": (1 << 0, 6),
    "signal": (1 << 1, 6),
}

#: ``landlock_restrict_self`` flags: name -> (bit, first ABI).
RESTRICT_FLAGS: dict[str, tuple[int, int]] = {
    "log_same_exec_off": (1 << 0, 7),
    "log_new_exec_on": (1 << 1, 7),
    "log_subdomains_off": (1 << 2, 7),
}

#: ``struct landlock_ruleset_attr`` size the kernel expects for each ABI: the struct grew a
#: field at ABI 4 (handled_access_net) and ABI 6 (scoped).
_ATTR_FIELDS_BY_ABI = ((6, 3), (4, 2), (1, 1))


class RulesetAttr(ctypes.Structure):
    """``struct landlock_ruleset_attr`` (ABI 6 layout; shorter sizes are passed for older)."""

    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class PathBeneathAttr(ctypes.Structure):
    """``struct landlock_path_beneath_attr`` (packed: 12 bytes)."""

    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class NetPortAttr(ctypes.Structure):
    """``struct landlock_net_port_attr`` (16 bytes)."""

    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


_libc: ctypes.CDLL | None = None


def _syscall(number: int, *args: object) -> int:
    """Raw ``syscall(2)``; raises OSError with the errno on -1."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (syscall {number})")
    return int(ret)


# --------------------------------------------------------------------------------------------
# ABI detection
# --------------------------------------------------------------------------------------------


def abi_version() -> int:
    """The kernel's Landlock ABI version (>= 1). Raises OSError (ENOSYS / EOPNOTSUPP) when the
    kernel lacks Landlock or has it disabled."""
    return _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                    ctypes.c_uint32(CREATE_RULESET_VERSION))


def errata() -> int:
    """Bitmask of Landlock errata fixed in this kernel (0 when the kernel cannot tell)."""
    try:
        return _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(CREATE_RULESET_ERRATA))
    except OSError:
        return 0


def unavailable_reason(err: OSError) -> str:
    """One line explaining why Landlock cannot be used, and what fixes it."""
    if err.errno == errno.ENOSYS:
        return ("the kernel has no Landlock (CONFIG_SECURITY_LANDLOCK is not set, or the kernel "
                "is older than 5.13); use a kernel built with Landlock")
    if err.errno == errno.EOPNOTSUPP:
        return ("Landlock is built into the kernel but disabled at boot; add 'landlock' to the "
                "lsm= kernel parameter (see /sys/kernel/security/lsm)")
    return f"landlock_create_ruleset failed: {err.strerror}"


def probe_abi() -> tuple[int, str]:
    """``(abi, "")`` when Landlock works, else ``(0, reason)``."""
    try:
        return abi_version(), ""
    except OSError as err:
        return 0, unavailable_reason(err)


# --------------------------------------------------------------------------------------------
# Names and masks per ABI
# --------------------------------------------------------------------------------------------


def _names(table: dict[str, tuple[int, int]], abi: int) -> frozenset[str]:
    return frozenset(name for name, (_bit, since) in table.items() if since <= abi)


def fs_rights(abi: int) -> frozenset[str]:
    """Filesystem rights a kernel with ``abi`` can handle."""
    return _names(FS_ACCESS, abi)


def net_rights(abi: int) -> frozenset[str]:
    """Network rights a kernel with ``abi`` can handle (none below ABI 4)."""
    return _names(NET_ACCESS, abi)


def scopes(abi: int) -> frozenset[str]:
    """IPC scopes a kernel with ``abi`` can apply (none below ABI 6)."""
    return _names(SCOPES, abi)


def restrict_flags(abi: int) -> frozenset[str]:
    """``landlock_restrict_self`` flags a kernel with ``abi`` accepts (none below ABI 7)."""
    return _names(RESTRICT_FLAGS, abi)


def _mask(table: dict[str, tuple[int, int]], names: Iterable[str]) -> int:
    bits = 0
    for name in names:
        try:
            bits |= table[name][0]
        except KeyError:
            raise ValueError(f"unknown Landlock right or flag {name!r}") from None
    return bits


def fs_mask(names: Iterable[str]) -> int:
    return _mask(FS_ACCESS, names)


def net_mask(names: Iterable[str]) -> int:
    return _mask(NET_ACCESS, names)


def scope_mask(names: Iterable[str]) -> int:
    return _mask(SCOPES, names)


def flags_mask(names: Iterable[str]) -> int:
    return _mask(RESTRICT_FLAGS, names)


def attr_size(abi: int) -> int:
    """Bytes of ``struct landlock_ruleset_attr`` to pass for ``abi``."""
    for since, fields in _ATTR_FIELDS_BY_ABI:
        if abi >= since:
            return 8 * fields
    raise ValueError(f"no Landlock ABI {abi}")


# --------------------------------------------------------------------------------------------
# The calls
# --------------------------------------------------------------------------------------------


def create_ruleset(abi: int, handled_fs: int, handled_net: int = 0, scoped: int = 0) -> int:
    """``landlock_create_ruleset``: a new ruleset fd (close-on-exec, as the kernel makes it)."""
    attr = RulesetAttr(handled_fs, handled_net, scoped)
    return _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(attr_size(abi)),
                    ctypes.c_uint32(0))


def add_path_rule(ruleset_fd: int, parent_fd: int, access: int) -> None:
    """``landlock_add_rule(LANDLOCK_RULE_PATH_BENEATH)``: allow ``access`` beneath ``parent_fd``."""
    attr = PathBeneathAttr(access, parent_fd)
    _syscall(SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(RULE_PATH_BENEATH),
             ctypes.byref(attr), ctypes.c_uint32(0))


def add_net_rule(ruleset_fd: int, port: int, access: int) -> None:
    """``landlock_add_rule(LANDLOCK_RULE_NET_PORT)``: allow ``access`` on TCP ``port``."""
    attr = NetPortAttr(access, port)
    _syscall(SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(RULE_NET_PORT),
             ctypes.byref(attr), ctypes.c_uint32(0))


def restrict_self(ruleset_fd: int, flags: int = 0) -> None:
    """``landlock_restrict_self``: enforce the ruleset on this thread (needs no_new_privs or
    CAP_SYS_ADMIN) and on everything it executes from now on."""
    _syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(flags))
