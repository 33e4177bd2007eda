"""cgroup v2 device filtering: a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program built from the rules.

The program is assembled here, instruction by instruction, from the same effective rule set the
v1 backend writes to ``devices.allow``; no compiler, libbpf or map is needed. It reads
``struct bpf_cgroup_dev_ctx`` (``access_type`` = access bits << 16 | device type, ``major``,
``minor``), checks the rules in order and returns 1 (allow) on the first match, else 0 (deny).
A rule matches when its type and numbers match (``*`` matches anything) and the requested
access bits are a subset of the rule's (so an ``access(F_OK)`` with no bits still matches).

The syscall layer talks to ``bpf(2)`` through ctypes: load, attach to a cgroup directory
(``BPF_F_ALLOW_MULTI``, replacing the previous program atomically with ``BPF_F_REPLACE``),
query the attached program ids, read a program's id and tag, and detach.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vmconfine_cgroups.rules import DeviceRule, effective

# -- kernel ABI constants (include/uapi/linux/bpf.h) ----------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

DEVCG_ACC_MKNOD, DEVCG_ACC_READ, DEVCG_ACC_WRITE = 1, 2, 4
DEVCG_DEV_BLOCK, DEVCG_DEV_CHAR = 1, 2

_ACCESS_BITS = {"m": DEVCG_ACC_MKNOD, "r": DEVCG_ACC_READ, "w": DEVCG_ACC_WRITE}
_TYPE_BITS = {"b": DEVCG_DEV_BLOCK, "c": DEVCG_DEV_CHAR}

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "i686": 357, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}

PROG_NAME = "vmconfine_dev"
LICENSE = b"GPL"

# -- instruction encoding -------------------------------------------------------------------
R0, R1, R2, R3, R4, R5 = range(6)
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_AND_K = 0x57  # BPF_ALU64 | BPF_AND | BPF_K
_RSH_K = 0x77  # BPF_ALU64 | BPF_RSH | BPF_K
_MOV_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_MOV_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X
_EXIT = 0x95  # BPF_JMP | BPF_EXIT


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def access_mask(access: str) -> int:
    """BPF_DEVCG_ACC_* bits of an access string such as ``"rw"``."""
    mask = 0
    for ch in access:
        mask |= _ACCESS_BITS[ch]
    return mask


def _rule_block(rule: DeviceRule) -> list[tuple[int, int, int, int, int | None]]:
    """The checks of one rule: (code, dst, src, imm, jump-to-next?) tuples, then allow+exit.

    A ``None`` last element means "no jump"; an int 0 marks a conditional jump whose offset is
    patched to land on the next rule's first instruction.
    """
    checks: list[tuple[int, int, int, int, int | None]] = []
    if rule.type in _TYPE_BITS:
        checks.append((_JNE_K, R2, 0, _TYPE_BITS[rule.type], 0))
    mask = access_mask(rule.access)
    if mask != access_mask("rwm"):
        checks.append((_MOV_X, R1, R3, 0, None))
        checks.append((_AND_K, R1, 0, mask, None))
        checks.append((_JNE_X, R1, R3, 0, 0))
    if rule.major is not None:
        checks.append((_JNE_K, R4, 0, rule.major, 0))
    if rule.minor is not None:
        checks.append((_JNE_K, R5, 0, rule.minor, 0))
    checks.append((_MOV_K, R0, 0, 1, None))
    checks.append((_EXIT, 0, 0, 0, None))
    return checks


def assemble(rules: Iterable[DeviceRule]) -> bytes:
    """The program for ``rules`` (an allow-list; everything else is denied)."""
    prologue = [
        _insn(_LDX_W, R2, R1, 0),  # r2 = ctx->access_type
        _insn(_AND_K, R2, 0, 0, 0xFFFF),  # r2 = device type
        _insn(_LDX_W, R3, R1, 0),  # r3 = ctx->access_type
        _insn(_RSH_K, R3, 0, 0, 16),  # r3 = requested access bits
        _insn(_LDX_W, R4, R1, 4),  # r4 = ctx->major
        _insn(_LDX_W, R5, R1, 8),  # r5 = ctx->minor
    ]
    body: list[bytes] = []
    for rule in effective(rules):
        block = _rule_block(rule)
        n = len(block)
        for i, (code, dst, src, imm, jump) in enumerate(block):
            off = (n - i - 1) if jump is not None else 0
            body.append(_insn(code, dst, src, off, imm))
    epilogue = [_insn(_MOV_K, R0, 0, 0, 0), _insn(_EXIT)]
    return b"".join(prologue + body + epilogue)


def insn_count(program: bytes) -> int:
    return len(program) // 8


# -- the bpf(2) syscall -----------------------------------------------------------------------
class BpfError(OSError):
    """A failed bpf(2) call (``errno`` set; ``verifier_log`` for a rejected program)."""

    def __init__(self, err: int, what: str, verifier_log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.verifier_log = verifier_log


_libc: ctypes.CDLL | None = None


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    global _libc
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"{what}: bpf(2) number unknown for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr,
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return int(ret)


def _attr(size: int = 128) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


def prog_load(program: bytes, name: str = PROG_NAME) -> int:
    """Load a CGROUP_DEVICE program; returns its fd (close it when done).

    Loaded without the verifier's log first (as libbpf does): a log of level 1 makes the
    kernel print its whole verification, 2.2 ms against 0.4 ms for the same program here. A
    load the kernel refuses is tried again with the log, for the error message."""
    try:
        return _prog_load(program, name, 0)
    except BpfError as exc:
        if exc.errno == errno.EPERM:
            raise  # not the program: the log would say nothing
    return _prog_load(program, name, 1)


def _prog_load(program: bytes, name: str, log_level: int) -> int:
    insns = ctypes.create_string_buffer(program, len(program))
    lic = ctypes.create_string_buffer(LICENSE)
    log = ctypes.create_string_buffer(65536 if log_level else 1)
    attr = _attr()
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, insn_count(program),
                     ctypes.addressof(insns), ctypes.addressof(lic), log_level,
                     len(log) if log_level else 0, ctypes.addressof(log) if log_level else 0)
    struct.pack_into("16s", attr, 48, name.encode()[:15])
    struct.pack_into("<I", attr, 68, BPF_CGROUP_DEVICE)  # expected_attach_type
    try:
        return _sys_bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
    except BpfError as exc:
        raise BpfError(exc.errno or errno.EINVAL, "BPF_PROG_LOAD",
                       log.value.decode(errors="replace") if log_level else "") from None


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel reports about a loaded program."""

    id: int
    tag: str
    type: int


def prog_info(fd: int) -> ProgInfo:
    """Id, tag (hex) and type of the program behind ``fd``."""
    info = ctypes.create_string_buffer(256)
    attr = _attr()
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    ptype, pid = struct.unpack_from("<II", info, 0)
    tag = bytes(info.raw[8:16]).hex()
    return ProgInfo(pid, tag, ptype)


def prog_fd_by_id(prog_id: int) -> int:
    """An fd for the loaded program ``prog_id`` (ENOENT when it no longer exists)."""
    attr = _attr()
    struct.pack_into("<I", attr, 0, prog_id)
    return _sys_bpf(BPF_PROG_GET_FD_BY_ID, attr, f"BPF_PROG_GET_FD_BY_ID {prog_id}")


def _cgroup_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def attach(cgroup_dir: str, prog_fd: int, replace_fd: int | None = None) -> None:
    """Attach ``prog_fd`` to ``cgroup_dir`` as a device program (multi-attach), atomically
    replacing ``replace_fd`` when given."""
    cfd = _cgroup_fd(cgroup_dir)
    try:
        attr = _attr()
        flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if replace_fd is not None else 0)
        struct.pack_into("<IIIII", attr, 0, cfd, prog_fd, BPF_CGROUP_DEVICE, flags,
                         replace_fd if replace_fd is not None else 0)
        _sys_bpf(BPF_PROG_ATTACH, attr, f"BPF_PROG_ATTACH {cgroup_dir}")
    finally:
        os.close(cfd)


def detach(cgroup_dir: str, prog_fd: int) -> None:
    """Detach the device program ``prog_fd`` from ``cgroup_dir``."""
    cfd = _cgroup_fd(cgroup_dir)
    try:
        attr = _attr()
        struct.pack_into("<III", attr, 0, cfd, prog_fd, BPF_CGROUP_DEVICE)
        _sys_bpf(BPF_PROG_DETACH, attr, f"BPF_PROG_DETACH {cgroup_dir}")
    finally:
        os.close(cfd)


def query(cgroup_dir: str, max_ids: int = 64) -> list[int]:
    """Ids of the device programs attached directly to ``cgroup_dir``."""
    cfd = _cgroup_fd(cgroup_dir)
    try:
        ids = (ctypes.c_uint32 * max_ids)()
        attr = _attr()
        struct.pack_into("<IIIIQI", attr, 0, cfd, BPF_CGROUP_DEVICE, 0, 0,
                         ctypes.addressof(ids), max_ids)
        _sys_bpf(BPF_PROG_QUERY, attr, f"BPF_PROG_QUERY {cgroup_dir}")
        count = struct.unpack_from("<I", attr, 24)[0]
        return [int(ids[i]) for i in range(min(count, max_ids))]
    finally:
        os.close(cfd)


def detach_id(cgroup_dir: str, prog_id: int) -> bool:
    """Detach program ``prog_id`` from ``cgroup_dir``; False when it was not attached there."""
    try:
        fd = prog_fd_by_id(prog_id)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    try:
        detach(cgroup_dir, fd)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)
    return True


def available() -> tuple[bool, str, int]:
    """Can this process load a CGROUP_DEVICE program? (loads a deny-all one and drops it).

    Returns ``(ok, why, errno)``; errno is EPERM/EACCES when only privileges are missing.
    """
    try:
        fd = prog_load(assemble([]))
    except OSError as exc:
        err = exc.errno or errno.ENOSYS
        return False, f"cannot load a cgroup device BPF program: {os.strerror(err)}", err
    os.close(fd)
    return True, "", 0
