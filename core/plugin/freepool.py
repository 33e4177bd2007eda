"""A lease registry's per-range allocator: an O(1) free list in one mmap'd file.

The range's values are numbered ``0 .. n-1`` (MCS category pairs, uids of a range): the code
below calls them pairs. ``free[0:nfree]`` holds the free pair numbers and ``pos[pair]`` where
each one sits, so taking a random free pair, taking a given pair and giving one back are all
O(1) at any occupancy (no retry loop: a full pool is an error, never a hang). ``holder[pair]``
is the lease-table slot (+1) of the lease that holds a used pair, 0 for none, so a release
knows in O(1) whether another domain holds the value. In the file ``free`` comes first, then
``pos`` and ``holder`` interleaved (one cache line per pair).

The header carries the boot time (a new boot starts empty), the lease-table generation the
pool was built for (the registry rebuilds a pool that is out of date, e.g. after another
category range changed the leases) and a dirty flag, set by the registry for the whole of an
operation: a pool found dirty (a process died mid-change) is rebuilt from the leases.

Callers hold the registry's lock.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class PoolRange(Protocol):
    """What a pool needs of its range: how many values, and a key naming the range."""

    @property
    def capacity(self) -> int: ...

    @property
    def key(self) -> str: ...

#: magic, version, dirty, npairs, nfree, boot, range key, lease-table generation (native byte
#: order, like the int arrays behind it: the file is per boot and never leaves the host)
_HEADER = struct.Struct("=8sIIIIQ32sQ")
#: the 32-bit header words (version, dirty, npairs, nfree) as indexes of an int view
_H_VERSION, _H_DIRTY, _H_N, _H_NFREE = 2, 3, 4, 5
_KEY_AT, _GEN_AT = 32, 64
_NFREE_AT, _BOOT_AT = 20, 24
_CLEAN = struct.Struct("=8sIII")  # magic, version, dirty, npairs
_MAGIC = b"VMCMCS01"
_VERSION = 3  # 3: pos and holder interleaved
_INT = 4
assert array.array("Q").itemsize == 8


class _Entropy:
    """``os.urandom`` bytes drawn 4 KiB at a time, as 64-bit words: a uniform draw costs no
    system call (one ``getrandom`` per draw was a tenth of an allocation). A forked child starts
    afresh, so parent and child never draw the same numbers."""

    def __init__(self) -> None:
        self.words = array.array("Q")
        self.at = 0
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.words, self.at = array.array("Q"), 0

    def below(self, n: int) -> int:
        """Uniform in ``0 .. n-1`` (rejection sampling on the top bits of 64-bit words)."""
        shift = 64 - n.bit_length()
        words = self.words
        while True:
            at = self.at
            if at >= len(words):
                words = self.words = array.array("Q", os.urandom(4096))
                at = 0
            self.at = at + 1
            value = words[at] >> shift
            if value < n:
                return value


_ENTROPY = _Entropy()


class FreePool:
    """The O(1) free-list allocator over one mmap'd file (see the module docstring)."""

    def __init__(self, path: Path, rng: PoolRange) -> None:
        self.path = path
        self.range = rng
        self.n = rng.capacity
        self.size = _HEADER.size + 3 * _INT * self.n
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self.size)
            self._mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self._h = memoryview(self._mm)[:24].cast("i")
        self._boot = memoryview(self._mm)[24:32].cast("q")
        self._gen = memoryview(self._mm)[_GEN_AT:_GEN_AT + 8].cast("q")
        self._key = rng.key.encode().ljust(_GEN_AT - _KEY_AT, b"\0")
        #: the header's first bytes when clean (magic, version, dirty 0, npairs), and its
        #: boot + range key for the boot last checked: :meth:`valid` compares bytes
        self._clean = _CLEAN.pack(_MAGIC, _VERSION, 0, self.n)
        self._ident_boot: int | None = None
        self._ident = b""
        self._ints = memoryview(self._mm)[_HEADER.size:].cast("i")
        self.free = self._ints[: self.n]
        # pos[pair] and holder[pair] side by side: an operation on a random pair touches one
        # cache line (and one page) of the 6 MiB behind them instead of two
        self.pos = self._ints[self.n :: 2]
        self.holder = self._ints[self.n + 1 :: 2]

    def close(self) -> None:
        for view in (self.free, self.pos, self.holder, self._ints, self._h, self._boot,
                     self._gen):
            view.release()
        self._mm.close()

    # ---- header ------------------------------------------------------------------------------
    def valid(self, boot: int, generation: int) -> bool:
        """Built for this boot and lease-table generation, and not left dirty."""
        mm = self._mm
        if boot != self._ident_boot:
            self._ident_boot = boot
            self._ident = boot.to_bytes(8, sys.byteorder, signed=True) + self._key
        # magic, version, clean, size; then boot and range key; then the generation
        return (self._gen[0] == generation and mm[:_NFREE_AT] == self._clean
                and mm[_BOOT_AT:_GEN_AT] == self._ident)

    @property
    def nfree(self) -> int:
        return int(self._h[_H_NFREE])

    def _set_nfree(self, value: int) -> None:
        self._h[_H_NFREE] = value

    def begin(self) -> None:
        """Mark the pool dirty for the duration of an operation."""
        self._h[_H_DIRTY] = 1

    def end(self, generation: int) -> None:
        """The operation is complete: the pool matches lease-table ``generation``."""
        self._gen[0] = generation
        self._h[_H_DIRTY] = 0

    @property
    def used(self) -> int:
        return self.n - self.nfree

    def reset(self, boot: int, taken: Iterable[tuple[int, int]]) -> None:
        """Start over (left dirty: the caller's :meth:`end` completes it): every pair free,
        then each (pair, holder) of ``taken`` used."""
        self.begin()
        ident = memoryview(array.array("i", range(self.n)).tobytes()).cast("i")
        self.free[:] = ident
        self.pos[:] = ident
        self.holder[:] = memoryview(bytes(_INT * self.n)).cast("i")
        self._set_nfree(self.n)
        for pair, holder in taken:
            if self.take(pair):
                self.holder[pair] = holder
        _HEADER.pack_into(self._mm, 0, _MAGIC, _VERSION, 1, self.n, self.nfree, boot,
                          self.range.key.encode(), 0)

    # ---- operations --------------------------------------------------------------------------
    def is_used(self, pair: int) -> bool:
        return self.pos[pair] >= self.nfree

    def take(self, pair: int) -> bool:
        """Mark ``pair`` used (no holder yet); False when it already was."""
        h, free, pos = self._h, self.free, self.pos
        nfree = h[_H_NFREE]
        p = pos[pair]
        if p >= nfree:
            return False
        last = free[nfree - 1]
        free[p] = last
        pos[last] = p
        free[nfree - 1] = pair
        pos[pair] = nfree - 1
        self.holder[pair] = 0
        h[_H_NFREE] = nfree - 1
        return True

    def take_random(self) -> int | None:
        """A uniformly random free pair, now used; None when the pool is full."""
        nfree = self._h[_H_NFREE]
        if nfree == 0:
            return None
        pair = self.free[_ENTROPY.below(nfree)]
        self.take(pair)
        return pair

    def put(self, pair: int) -> bool:
        """Give ``pair`` back; False when it was free already."""
        nfree = self.nfree
        p = self.pos[pair]
        if p < nfree:
            return False
        other = self.free[nfree]
        self.free[p] = other
        self.pos[other] = p
        self.free[nfree] = pair
        self.pos[pair] = nfree
        self.holder[pair] = 0
        self._set_nfree(nfree + 1)
        return True
