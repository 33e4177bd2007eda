"""A persistent, file-locked registry of unique per-domain values (leases).

Drivers that give each domain a value no other domain may hold use it: the SELinux driver's
MCS levels (``vmconfine_selinux.mcs.LabelRegistry``, per boot) and the DAC driver's per-domain
uids (``vmconfine_dac.idrange``, persistent), and the launch pipeline's display ports
(``vmconfine.launch.ports``, per boot, first fit: :meth:`LeaseRegistry.allocate_first`).
Drivers never import each other, so the machinery lives here; each user supplies its range
(a :class:`LeaseRange`: how many values, a key, and the mapping between value numbers and
their text) and its messages.

A registry is a directory:

* ``lock``: every operation holds an exclusive ``flock`` on it;
* ``leases``: who holds which value (:mod:`vmconfine.plugin.leasetable`): one mmap'd
  table, the truth, shared by every range;
* ``pool-<range key>``: the O(1) allocator of one range (:mod:`vmconfine.plugin.freepool`),
  an index rebuilt from the leases when in doubt (first use, new boot, out of date, or left
  dirty by a crash).

Allocation, reservation and release are O(1) at any occupancy and create no files. A per-boot
registry (``boot`` = the host's boot time) starts empty after a reboot and never fsyncs; a
persistent one (``boot`` constant, ``durable=True``) keeps its leases across reboots and
flushes the lease table after every operation that changed it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from vmconfine.errors import LabelError
from vmconfine.plugin.freepool import FreePool
from vmconfine.plugin.leasetable import Lease, LeaseTable
from vmconfine.remember import boot_time

__all__ = ["FreePool", "Lease", "LeaseRange", "LeaseRegistry", "LeaseTable"]

log = logging.getLogger(__name__)

#: an owner is 1-64 of these (a domain UUID; the lease table's owner field holds 64 bytes)
_UUID_CHARS = "0123456789abcdefABCDEF-"
_flock, _LOCK_EX, _LOCK_UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN


class LeaseRange(Protocol):
    """The values a registry hands out, numbered ``0 .. capacity-1``."""

    @property
    def capacity(self) -> int: ...

    @property
    def key(self) -> str: ...

    def value(self, number: int) -> str:
        """Value number → its text (an MCS level, a uid)."""

    def number(self, value: str) -> int | None:
        """A value's text → its number; None for a value outside the range."""


class _ForkCount:
    """How many forks lie between this process and the one that imported the module: a
    registry whose lock fd was opened at another count is in a forked child, which must open
    its own (a ``flock`` is per open file). A counter, not ``os.getpid()`` per operation."""

    def __init__(self) -> None:
        self.count = 0
        os.register_at_fork(after_in_child=self.bump)

    def bump(self) -> None:
        self.count += 1


_FORKS = _ForkCount()


class LeaseRegistry:
    """Persistent, file-locked allocation shared by every vmconfine process of an instance.

    ``is_live(lease)`` says whether a lease's domain still exists; leases of other domains
    are reclaimed when the pool is full (and by :meth:`reconcile`). Subclasses word the
    errors (:meth:`full_message`, :meth:`taken_message`).
    """

    what = "lease registry"  #: the registry's name in messages

    def __init__(self, directory: Path, rng: LeaseRange,
                 is_live: Callable[[Lease], bool] | None = None, *,
                 boot: Callable[[], int] = boot_time, durable: bool = False) -> None:
        self.dir = directory
        self.range = rng
        self.is_live = is_live
        self.boot = boot
        self.durable = durable
        self._lock_fd: int | None = None
        self._lock_forks = -1  # the _FORKS.count the lock fd was opened at
        self._lock_owner = 0  # the pid that opened it
        self._table: LeaseTable | None = None
        self._pool: FreePool | None = None

    # ---- messages (subclasses word them for their values) -------------------------------------
    def full_message(self, used: int) -> str:
        return f"no free value in {self.range.key} ({used} in use)"

    def taken_message(self, label: str) -> str:
        return f"{label} is already reserved by another domain"

    # ---- locking and consistency -------------------------------------------------------------
    def _lock(self) -> int:
        """The lock file's fd, opened once per process (a forked child opens its own: flock
        is per open file, and parent and child must exclude each other)."""
        if self._lock_fd is not None and self._lock_forks == _FORKS.count:
            return self._lock_fd
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # (a child leaves its copy of the parent's fd alone: its number may be reused)
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock_forks = _FORKS.count
        self._lock_owner = os.getpid()
        return self._lock_fd

    def _locked(self) -> _Operation:
        """Hold the lock; the pool is marked dirty until the operation completes (a deliberate
        LabelError also completes it: those are raised where nothing is half done)."""
        return _Operation(self)

    def _begin(self) -> tuple[int, LeaseTable, FreePool, int]:
        """Start an operation: the lock taken, table and pool consistent, the pool marked
        dirty. Returns (lock fd, table, pool, the table's generation); :meth:`_end` ends it.
        (:meth:`_locked` wraps the pair; :meth:`allocate` calls them itself: it is timed in
        microseconds.)"""
        fd = self._lock_fd
        if fd is None or self._lock_forks != _FORKS.count:
            fd = self._lock()
        _flock(fd, _LOCK_EX)
        try:
            table, pool = self._table, self._pool
            if table is None or pool is None:
                table, pool = self._files()
            boot = self.boot()
            table.open(boot)  # remapped, reset or repaired when another process made it so
            if not pool.valid(boot, table.generation):
                self._rebuild(table, pool)
            generation = table.generation
            pool.begin()
        except BaseException:
            _flock(fd, _LOCK_UN)
            raise
        return fd, table, pool, generation

    def _end(self, fd: int, table: LeaseTable, pool: FreePool, generation: int,
             completed: bool) -> None:
        """End an operation: a completed one (no exception, or a deliberate LabelError)
        marks the pool clean for the table's generation; a persistent registry flushes a
        changed table; the lock is released in every case."""
        try:
            if completed:
                pool.end(table.generation)
            if self.durable and table.generation != generation:
                table.flush()
        finally:
            _flock(fd, _LOCK_UN)

    def _files(self) -> tuple[LeaseTable, FreePool]:
        """The lease table and the pool, opened (or created) on first use; :meth:`_begin`
        checks them before every operation."""
        if self._table is None:
            self._table = LeaseTable(self.dir / "leases", self.what)
        if self._pool is None:
            self._pool = FreePool(self.dir / f"pool-{self.range.key}", self.range)
        return self._table, self._pool

    def _open_pool(self) -> FreePool:
        """The pool, consistent (tests and benchmarks look into it)."""
        with self._locked() as (_table, pool):
            return pool

    def _rebuild(self, table: LeaseTable, pool: FreePool) -> None:
        """Rebuild the pool from the leases (first use, new boot, out of date, or a crash)."""
        taken = []
        for slot, lease in table.items():
            number = self.range.number(lease.value)
            if number is not None:
                taken.append((number, slot + 1))
        log.debug("%s: pool %s rebuilt from %d leases", self.what, pool.path, len(taken))
        pool.reset(table.boot, taken)

    def close(self) -> None:
        for obj in (self._pool, self._table):
            if obj is not None:
                obj.close()
        self._pool = self._table = None
        if self._lock_fd is not None and self._lock_owner == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None

    # ---- leases ------------------------------------------------------------------------------
    @staticmethod
    def _check_owner(owner: str) -> None:
        # string methods, not a regex: this runs on every allocation
        if not 0 < len(owner) <= 64 or owner.strip(_UUID_CHARS):
            raise LabelError(f"invalid registry owner {owner!r} (expected a domain UUID)")

    def _lease(self, table: LeaseTable, owner: str) -> tuple[int, Lease] | None:
        slot = table.find(owner)
        if slot is None:
            return None
        try:
            lease = table.get(slot)
        except ValueError:
            log.warning("%s: unreadable lease of %s; dropping it", self.what, owner)
            lease = None
        if lease is None:
            table.remove(slot)
            return None
        return slot, lease

    def _release_slot(self, table: LeaseTable, pool: FreePool, slot: int, lease: Lease) -> None:
        """Drop a lease; free its value unless another lease holds the same one."""
        table.remove(slot)
        number = self.range.number(lease.value)
        if number is not None and pool.is_used(number) and not self._held(
                table, pool, number, lease.value, slot):
            pool.put(number)

    @staticmethod
    def _held(table: LeaseTable, pool: FreePool, number: int, value: str, but: int) -> bool:
        """True when a lease other than slot ``but`` holds ``value`` (O(1): the pool's
        holder)."""
        holder = pool.holder[number] - 1
        if holder < 0 or holder == but:
            return False
        try:
            other = table.get(holder)
        except ValueError:
            return False
        return other is not None and other.value == value

    @staticmethod
    def _foreign_holder(table: LeaseTable, value: str, but: str) -> Lease | None:
        """The lease of another owner on a value outside the range (O(leases): odd path)."""
        return next((x for _s, x in table.items() if x.value == value and x.owner != but),
                    None)

    def _add(self, table: LeaseTable, pool: FreePool, owner: str, name: str,
             number: int | None, value: str) -> None:
        """Store the lease of a value already taken in the pool (given back on failure)."""
        try:
            slot = table.add(owner, name, value)
        except LabelError:
            if number is not None:
                pool.put(number)
            raise
        if number is not None:
            pool.holder[number] = slot + 1

    # ---- API ---------------------------------------------------------------------------------
    def lookup(self, owner: str) -> Lease | None:
        """The lease domain ``owner`` holds, if any."""
        self._check_owner(owner)
        with self._locked() as (table, _pool):
            found = self._lease(table, owner)
            return found[1] if found is not None else None

    def allocate(self, owner: str, name: str, *, keep: bool = False) -> str:
        """A fresh value for domain ``owner`` (its UUID); raises when the pool is full.
        ``keep``: a value the domain already holds is returned as it is (a persistent
        per-domain value) instead of being replaced."""
        self._check_owner(owner)
        fd, table, pool, generation = self._begin()  # what _locked() does, without an object
        try:
            value = self._allocate_locked(table, pool, owner, name, keep)
        except BaseException as exc:
            self._end(fd, table, pool, generation, isinstance(exc, LabelError))
            raise
        self._end(fd, table, pool, generation, True)
        return value

    def _allocate_locked(self, table: LeaseTable, pool: FreePool, owner: str, name: str,
                         keep: bool) -> str:
        old = self._lease(table, owner)
        if old is not None:
            if keep and self.range.number(old[1].value) is not None:
                return old[1].value
            # one value per domain: a leftover of an earlier start
            log.warning("%s: domain %s still held %s from an earlier start; releasing "
                        "it", self.what, name, old[1].value)
            self._release_slot(table, pool, *old)
        number = pool.take_random()
        if number is None and self.is_live is not None:
            self._reconcile_locked(table, pool)
            number = pool.take_random()
        if number is None:
            raise LabelError(self.full_message(pool.used))
        value = self.range.value(number)
        self._add(table, pool, owner, name, number, value)
        return value

    def allocate_first(self, owner: str, name: str, numbers: Sequence[int],
                       usable: Callable[[int], bool]) -> str | None:
        """The first of ``numbers`` (in their order) that no lease holds and ``usable``
        accepts, now held by domain-part ``owner``; None when there is none (libvirt's
        virPortAllocatorAcquire: first fit, each candidate checked under the lock). A value
        ``owner`` still held is given back first. O(len(numbers)) at worst."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            old = self._lease(table, owner)
            if old is not None:
                self._release_slot(table, pool, *old)
            for attempt in range(2):
                for number in numbers:
                    if pool.is_used(number) or not usable(number):
                        continue
                    pool.take(number)
                    value = self.range.value(number)
                    self._add(table, pool, owner, name, number, value)
                    return value
                if attempt or self.is_live is None or not self._reconcile_locked(table, pool):
                    break  # nothing to reclaim: the second pass would find nothing either
            return None

    def reserve(self, owner: str, name: str, value: str, label: str) -> None:
        """Mark the value of running domain ``owner`` (label ``label``) as in use."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            mine = self._lease(table, owner)
            if mine is not None and mine[1].value == value:
                return
            number = self.range.number(value)
            taken = (pool.is_used(number) if number is not None
                     else self._foreign_holder(table, value, owner) is not None)
            if taken:
                raise LabelError(self.taken_message(label))
            if mine is not None:
                self._release_slot(table, pool, *mine)
            if number is not None:
                pool.take(number)
            self._add(table, pool, owner, name, number, value)

    def release(self, owner: str, value: str | None = None) -> None:
        """Give back the value of ``owner`` (idempotent). ``value`` is freed too when no other
        domain holds it (a label whose lease was lost). O(1)."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            mine = self._lease(table, owner)
            if mine is not None:
                self._release_slot(table, pool, *mine)
            if value is not None and (mine is None or mine[1].value != value):
                number = self.range.number(value)
                if number is not None and not self._held(table, pool, number, value, -1):
                    pool.put(number)

    def reconcile(self) -> list[Lease]:
        """Drop the leases of domains that no longer exist; return them."""
        with self._locked() as (table, pool):
            return self._reconcile_locked(table, pool)

    def _reconcile_locked(self, table: LeaseTable, pool: FreePool) -> list[Lease]:
        dropped = []
        for slot, lease in list(table.items()):
            if self.is_live is not None and not self.is_live(lease):
                log.info("%s: domain %s is gone; releasing %s", self.what, lease.name,
                         lease.value)
                self._release_slot(table, pool, slot, lease)
                dropped.append(lease)
        live = {x.value for _s, x in table.items() if self.range.number(x.value) is not None}
        if pool.used != len(live):  # values taken without a lease: rebuild
            self._rebuild(table, pool)
        return dropped

    def leases(self) -> list[Lease]:
        with self._locked() as (table, _pool):
            return sorted((x for _s, x in table.items()), key=lambda x: x.owner)

    def in_use(self) -> int:
        with self._locked() as (_table, pool):
            return pool.used

    def fill(self, numbers: list[int]) -> None:
        """Mark ``numbers`` used without leases (benchmarks and tests of a busy pool)."""
        with self._locked() as (_table, pool):
            for number in numbers:
                pool.take(number)


class _Operation:
    """One registry operation (see :meth:`LeaseRegistry._locked`); a class, not a generator
    context manager, because allocation is timed in microseconds."""

    __slots__ = ("fd", "generation", "pool", "registry", "table")

    def __init__(self, registry: LeaseRegistry) -> None:
        self.registry = registry

    def __enter__(self) -> tuple[LeaseTable, FreePool]:
        self.fd, self.table, self.pool, self.generation = self.registry._begin()
        return self.table, self.pool

    def __exit__(self, exc_type: type[BaseException] | None, _exc: object,
                 _tb: object) -> None:
        self.registry._end(self.fd, self.table, self.pool, self.generation,
                           exc_type is None or issubclass(exc_type, LabelError))
