"""A lease registry's lease table: who holds which value, in one mmap'd file.

Shared by every registry that hands out unique per-domain values (:mod:`vmconfine.plugin.leases`:
the SELinux driver's MCS levels, the DAC driver's per-domain uids). A lease is (owner = domain
UUID, domain name, value: an MCS level, a uid). The table is the registry's truth (the
per-range pools are indexes rebuilt from it), range-independent, and kept in one file so that
taking or giving back a lease touches a few pages of one mapping: no file is created or removed
per domain (creating an inode costs ~1 ms on some disks). A per-boot registry needs no
``fsync`` (after a crash of the machine a new boot starts the table empty); a persistent one
passes a constant boot and flushes the mapping after each operation (:meth:`LeaseTable.flush`).

Layout: a header, ``capacity`` fixed-size slots, then an owner index (open addressing, linear
probing, ``2 x capacity`` entries of slot + 1, 0 = empty). A slot holds a lease when its state
word is :data:`USED`; free slots below the high-water mark are chained. The table grows in place
(doubling): slots keep their numbers, the index is rebuilt behind them, and other processes
remap when they see the larger capacity in the shared header. Every change is bracketed by a
dirty flag; a table found dirty (a process died mid-change) gets its index and free chain
rebuilt from the slots, whose state word is written last.

Callers hold the registry's lock for every call.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError

log = logging.getLogger(__name__)

#: magic, version, dirty, capacity, count, high, free_head, boot, generation (native byte
#: order: the file is per boot and never leaves the host)
_HEADER = struct.Struct("=8sIIIIIiQQ")
_HEADER_SIZE = 64
#: the header's magic, version, dirty flag and capacity (a clean table's first 20 bytes)
_CLEAN = struct.Struct("=8sIII")
#: the header's 32-bit words and 64-bit words as indexes of int views into the mapping (an
#: index into a memoryview is several times cheaper than a struct call on the hot path)
_H_DIRTY, _H_CAP, _H_COUNT, _H_HIGH, _H_FREE = 3, 4, 5, 6, 7
_H_BOOT, _H_GEN = 0, 1
_MAGIC = b"VMCLEASE"
_VERSION = 1
#: state, next free, owner / name / level lengths (+ pad), then the three fields
_SLOT_HEAD = struct.Struct("=IiHHHH")
SLOT = 512
OWNER_MAX, NAME_MAX, LEVEL_MAX = 64, 256, 160
_OWNER_AT = _SLOT_HEAD.size
_OLEN_AT = 8  # the owner length's byte offset in a slot (even: read as a 16-bit word)
_NAME_AT = _OWNER_AT + OWNER_MAX
_LEVEL_AT = _NAME_AT + NAME_MAX
USED = 0x53454C56  # a slot holds a lease only with this exact state word
FIRST_CAPACITY = 64
_OWNER_RE = re.compile(r"[0-9a-fA-F-]{1,64}")
_FREE_LINK = struct.Struct("=Ii")  # a free slot's state word and next-free link
#: the three fields of a slot, written with one call (zero-padded) before its head
_FIELDS = struct.Struct(f"={OWNER_MAX}s{NAME_MAX}s{LEVEL_MAX}s")


@dataclass(frozen=True)
class Lease:
    """One domain's value in the registry."""

    owner: str  #: the domain UUID
    name: str
    value: str  #: what the domain holds (an MCS level, a uid)
    boot: int

    @property
    def level(self) -> str:
        """The value under the MCS registry's name for it."""
        return self.value


def _size(capacity: int) -> int:
    return _HEADER_SIZE + capacity * SLOT + 2 * capacity * 4


class LeaseTable:
    """The mmap'd lease table (see the module docstring). Callers hold the registry lock."""

    def __init__(self, path: Path, what: str = "lease registry") -> None:
        self.path = path
        self.what = what  #: the registry's name in messages ("MCS registry")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._mm: mmap.mmap | None = None
        self._index: memoryview | None = None
        self._h: memoryview | None = None  # header, 32-bit words
        self._h64: memoryview | None = None  # header, 64-bit words from byte 32
        self._u16: memoryview | None = None  # the whole mapping as 16-bit words
        self._i32: memoryview | None = None  # the whole mapping as 32-bit words
        self._clean = b""  # the header's first 20 bytes of a current, clean table (_CLEAN)
        self.capacity = 0
        self._mask = 0  # the owner index's size - 1
        #: (owner key, index position) where the last unsuccessful find() stopped probing:
        #: the position a new lease of that owner takes while the index is unchanged (cleared
        #: by every change of the index and at the start of every operation)
        self._hole: tuple[bytes, int] | None = None
        self._map()

    # ---- mapping -------------------------------------------------------------------------------
    def _map(self) -> None:
        self._unmap()
        size = os.fstat(self._fd).st_size
        if size < _size(FIRST_CAPACITY):
            return
        mm = mmap.mmap(self._fd, size)
        self._h = memoryview(mm)[:32].cast("i")
        self._h64 = memoryview(mm)[32:48].cast("q")
        self._u16 = memoryview(mm)[:size & ~1].cast("H")
        self._i32 = memoryview(mm)[:size & ~3].cast("i")
        cap = self._h[_H_CAP]
        if cap <= 0 or _size(cap) > size:  # garbage header: start over (open() resets it)
            cap = 0
        self._mm, self.capacity = mm, cap
        self._mask = 2 * cap - 1 if cap else 0
        self._clean = _CLEAN.pack(_MAGIC, _VERSION, 0, cap) if cap else b""
        if cap:
            start = _HEADER_SIZE + cap * SLOT
            self._index = memoryview(mm)[start:start + 8 * cap].cast("i")

    def _unmap(self) -> None:
        for view in (self._index, self._h, self._h64, self._u16, self._i32):
            if view is not None:
                view.release()
        self._index = self._h = self._h64 = self._u16 = self._i32 = None
        self._hole = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.capacity = 0

    def close(self) -> None:
        self._unmap()
        os.close(self._fd)

    def flush(self) -> None:
        """Write the mapping to disk (``msync``): a persistent registry's changes survive a
        crash of the machine."""
        if self._mm is not None:
            self._mm.flush()

    def open(self, boot: int) -> None:
        """Make the mapping current (another process may have grown the file), start over
        for a new boot or a bad header, and repair a table left dirty by a crash."""
        self._hole = None  # another process may have changed the index since
        mm, h64 = self._mm, self._h64
        # the usual case in one comparison: magic, version, clean, the capacity mapped
        if mm is not None and h64 is not None and mm[:20] == self._clean and \
                h64[_H_BOOT] == boot:
            return
        h = self._h
        if h is None or h[_H_CAP] != self.capacity:
            self._map()
            h = self._h
        mm, h64 = self._mm, self._h64
        if mm is None or h is None or h64 is None or self.capacity == 0:
            self._reset(boot)
            return
        if mm[:8] != _MAGIC or h[2] != _VERSION or h64[_H_BOOT] != boot:
            self._reset(boot)
        elif h[_H_DIRTY]:
            self._repair()

    def _reset(self, boot: int) -> None:
        """An empty table of FIRST_CAPACITY slots for ``boot``."""
        self._unmap()
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, _size(FIRST_CAPACITY))
        mm = mmap.mmap(self._fd, _size(FIRST_CAPACITY))
        _HEADER.pack_into(mm, 0, _MAGIC, _VERSION, 0, FIRST_CAPACITY, 0, 0, -1, boot, 1)
        mm.close()
        self._map()

    # ---- header fields -------------------------------------------------------------------------
    @property
    def _hdr(self) -> memoryview:
        assert self._h is not None
        return self._h

    def _dirty(self, on: bool) -> None:
        self._hdr[_H_DIRTY] = 1 if on else 0

    @property
    def count(self) -> int:
        return int(self._hdr[_H_COUNT])

    @property
    def boot(self) -> int:
        assert self._h64 is not None
        return int(self._h64[_H_BOOT])

    @property
    def generation(self) -> int:
        """Bumped by every change: a pool built for another generation is out of date."""
        h64 = self._h64
        assert h64 is not None
        return h64[_H_GEN]  # type: ignore[no-any-return]

    def _bump(self) -> None:
        assert self._h64 is not None
        self._h64[_H_GEN] += 1

    # ---- slots ---------------------------------------------------------------------------------
    def _slot_at(self, slot: int) -> int:
        return _HEADER_SIZE + slot * SLOT

    def _state(self, slot: int) -> int:
        assert self._mm is not None
        return int(_SLOT_HEAD.unpack_from(self._mm, self._slot_at(slot))[0])

    def _owner_bytes(self, slot: int) -> bytes:
        at = _HEADER_SIZE + slot * SLOT
        mm, u16 = self._mm, self._u16
        assert mm is not None and u16 is not None
        olen = u16[(at + _OLEN_AT) >> 1]
        return mm[at + _OWNER_AT:at + _OWNER_AT + min(olen, OWNER_MAX)]

    def get(self, slot: int) -> Lease | None:
        """The lease in ``slot``; None for a free slot. Raises ValueError for a corrupt one."""
        mm = self._mm
        assert mm is not None
        at = self._slot_at(slot)
        state, _next, olen, nlen, llen, _pad = _SLOT_HEAD.unpack_from(mm, at)
        if state != USED:
            return None
        if olen > OWNER_MAX or nlen > NAME_MAX or llen > LEVEL_MAX:
            raise ValueError("field lengths out of range")
        owner = mm[at + _OWNER_AT:at + _OWNER_AT + olen].decode("ascii")
        if not _OWNER_RE.fullmatch(owner):
            raise ValueError("bad owner")
        name = mm[at + _NAME_AT:at + _NAME_AT + nlen].decode("utf-8")
        level = mm[at + _LEVEL_AT:at + _LEVEL_AT + llen].decode("ascii")
        return Lease(owner, name, level, self.boot)

    def items(self) -> Iterator[tuple[int, Lease]]:
        """Every (slot, lease); a corrupt slot is dropped with a warning."""
        high = self._hdr[_H_HIGH]
        for slot in range(min(high, self.capacity)):
            try:
                lease = self.get(slot)
            except ValueError:
                log.warning("%s: unreadable lease in slot %d of %s; dropping it",
                            self.what, slot, self.path)
                self.remove(slot)
                continue
            if lease is not None:
                yield slot, lease

    # ---- the owner index -----------------------------------------------------------------------
    def _home(self, owner: bytes) -> int:
        return zlib.crc32(owner) & (2 * self.capacity - 1)

    def find(self, owner: str) -> int | None:
        """The slot of ``owner``'s lease, if any."""
        index, mm, u16 = self._index, self._mm, self._u16
        if index is None or mm is None or u16 is None:
            return None
        key = owner.encode("ascii")
        klen = len(key)
        mask = self._mask
        i = zlib.crc32(key) & mask
        while True:
            entry = index[i]
            if entry == 0:
                self._hole = (key, i)  # where add() puts this owner's lease
                return None
            at = _HEADER_SIZE + (entry - 1) * SLOT
            if u16[(at + _OLEN_AT) >> 1] == klen and \
                    mm[at + _OWNER_AT:at + _OWNER_AT + klen] == key:
                return entry - 1
            i = (i + 1) & mask

    def _index_add(self, slot: int, key: bytes) -> None:
        index = self._index
        assert index is not None
        self._hole = None
        mask = self._mask
        i = zlib.crc32(key) & mask
        while index[i] != 0:
            i = (i + 1) & mask
        index[i] = slot + 1

    def _index_remove(self, slot: int) -> None:
        """Remove ``slot`` from the index (backward-shift deletion keeps probes short)."""
        index = self._index
        assert index is not None
        self._hole = None
        mask = 2 * self.capacity - 1
        i = self._home(self._owner_bytes(slot))
        while index[i] != slot + 1:
            if index[i] == 0:
                return  # not indexed (a corrupt slot)
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            entry = index[j]
            if entry == 0:
                break
            home = self._home(self._owner_bytes(entry - 1))
            # move entry back into the hole at i unless its home lies cyclically in (i, j]
            if (j > i and (home <= i or home > j)) or (j < i and i >= home > j):
                index[i] = entry
                i = j
        index[i] = 0

    # ---- changes -------------------------------------------------------------------------------
    def add(self, owner: str, name: str, level: str) -> int:
        """Store a lease of value ``level``; return its slot. Raises LabelError for fields
        that do not fit."""
        key, nb, lb = owner.encode("ascii"), name.encode("utf-8"), level.encode("ascii")
        klen, nlen, llen = len(key), len(nb), len(lb)
        if nlen > NAME_MAX:
            raise LabelError(f"domain name '{name[:40]}...' is longer than {NAME_MAX} bytes; "
                             f"the {self.what} cannot hold it: give the domain a shorter name")
        if llen > LEVEL_MAX or klen > OWNER_MAX:
            raise LabelError(f"value '{level[:40]}...' is longer than {LEVEL_MAX} bytes; "
                             f"the {self.what} cannot hold it")
        h = self._h
        assert h is not None
        if h[_H_COUNT] + 1 > self.capacity:
            self._grow()
        mm, h, h64, i32 = self._mm, self._h, self._h64, self._i32
        assert mm is not None and h is not None and h64 is not None and i32 is not None
        h[_H_DIRTY] = 1
        free = h[_H_FREE]
        if free >= 0:
            slot = free
            h[_H_FREE] = i32[(_HEADER_SIZE + slot * SLOT) // 4 + 1]  # its next-free link
        else:
            slot = h[_H_HIGH]
            h[_H_HIGH] = slot + 1
        at = _HEADER_SIZE + slot * SLOT
        _FIELDS.pack_into(mm, at + _OWNER_AT, key, nb, lb)  # the fields, then the head:
        _SLOT_HEAD.pack_into(mm, at, USED, -1, klen, nlen, llen, 0)  # state word last
        hole, self._hole = self._hole, None
        index = self._index
        assert index is not None
        if hole is not None and hole[0] == key and index[hole[1]] == 0:
            index[hole[1]] = slot + 1  # where find() stopped probing for this owner
        else:
            self._index_add(slot, key)
        h[_H_COUNT] += 1
        h64[_H_GEN] += 1
        h[_H_DIRTY] = 0
        return slot

    def remove(self, slot: int) -> None:
        """Free ``slot`` (its lease, if any, is gone)."""
        h = self._hdr
        h[_H_DIRTY] = 1
        if self._state(slot) == USED:
            self._index_remove(slot)
            h[_H_COUNT] -= 1
        self._free_slot(slot)
        self._bump()
        h[_H_DIRTY] = 0

    def _free_slot(self, slot: int) -> None:
        assert self._mm is not None
        h = self._hdr
        _FREE_LINK.pack_into(self._mm, self._slot_at(slot), 0, h[_H_FREE])
        h[_H_FREE] = slot

    def _grow(self) -> None:
        """Double the capacity in place: slots keep their numbers, the index moves behind."""
        old = self.capacity
        new = 2 * old
        os.ftruncate(self._fd, _size(new))  # first: a header never names a size not there
        self._dirty(True)
        self._hdr[_H_CAP] = new  # a crash from here on: _repair() rebuilds at the new capacity
        self._map()
        assert self._mm is not None and self.capacity == new
        start = self._slot_at(old)
        self._mm[start:self._slot_at(new)] = bytes(self._slot_at(new) - start)
        self._repair()

    def _repair(self) -> None:
        """Rebuild the index, count and free chain from the slots' state words."""
        mm, index = self._mm, self._index
        assert mm is not None and index is not None
        h = self._hdr
        self._dirty(True)
        self._hole = None
        index[:] = memoryview(bytes(4 * len(index))).cast("i")
        h[_H_FREE] = -1
        high = min(h[_H_HIGH], self.capacity)
        count = 0
        for slot in range(high - 1, -1, -1):
            state, _next, olen, nlen, llen, _pad = _SLOT_HEAD.unpack_from(mm, self._slot_at(slot))
            if state == USED and olen <= OWNER_MAX and nlen <= NAME_MAX and llen <= LEVEL_MAX:
                self._index_add(slot, self._owner_bytes(slot))
                count += 1
            else:
                self._free_slot(slot)
        h[_H_HIGH] = high
        h[_H_COUNT] = count
        self._bump()
        self._dirty(False)
        log.debug("%s: lease table %s rebuilt: %d leases", self.what, self.path, count)
