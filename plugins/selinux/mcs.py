"""sVirt MCS levels: vmconfine's category range, and a persistent, locked label registry.

Each dynamic domain gets ``sN:cA,cB`` with two *different* categories A < B from the range of
vmconfine's own context (a single category would be a subset of every pair containing it:
CVE-2021-3631). :func:`parse_process_range` applies libvirt's parsing rules.

The registry makes allocation unique across every vmconfine process of an instance and
survives vmconfine restarts. Its contents are per boot (no domain survives a reboot), so it
lives in the instance's run directory (``run_dir/selinux-mcs``; tmpfs on a normal host):

* ``lock``: every operation holds an exclusive ``flock`` on it;
* ``leases``: who holds which level (:mod:`vmconfine_selinux.leases`): one mmap'd table, the
  truth, shared by every category range;
* ``pool-<sens>-c<min>.c<max>``: the O(1) allocator of one category range
  (:mod:`vmconfine_selinux.mcspool`), an index rebuilt from the leases when in doubt (first
  use, new boot, out of date, or left dirty by a crash).

Allocation, reservation and release are O(1) at any occupancy and create no files; nothing is
fsynced (a crash of the machine means a new boot, which starts empty). A registry left in the
instance's ``lib_dir`` by an earlier vmconfine is taken over once (:meth:`import_legacy`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError
from vmconfine_selinux.contexts import Context
from vmconfine_selinux.leases import Lease, LeaseTable
from vmconfine_selinux.mcspool import McsPool
from vmconfine_selinux.remember import boot_time

__all__ = ["DEFAULT_CATEGORIES", "MIN_CATEGORIES", "LabelRegistry", "Lease", "McsPool",
           "McsRange", "boot_time", "ensure_dir", "pair_categories", "pair_number",
           "parse_process_range"]

log = logging.getLogger(__name__)

#: fewer categories than this cannot give domains useful pairs (libvirt's rule)
MIN_CATEGORIES = 8
DEFAULT_CATEGORIES = (0, 1023)

_LEVEL_RE = re.compile(r"(s\d+):c(\d+),c(\d+)")
_UUID_RE = re.compile(r"[0-9a-fA-F-]{1,64}")


@dataclass(frozen=True)
class McsRange:
    """The categories vmconfine may hand out: ``sens`` and ``c<cat_min>..c<cat_max>``."""

    sens: str
    cat_min: int
    cat_max: int

    def __post_init__(self) -> None:
        if self.cat_max - self.cat_min + 1 < MIN_CATEGORIES:
            raise LabelError(
                f"Category range c{self.cat_min}-c{self.cat_max} too small; vmconfine needs at "
                f"least {MIN_CATEGORIES} categories in the range of its own SELinux context"
            )

    @property
    def size(self) -> int:
        return self.cat_max - self.cat_min + 1

    @property
    def pairs(self) -> int:
        """How many two-category levels the range holds."""
        return self.size * (self.size - 1) // 2

    @property
    def key(self) -> str:
        return f"{self.sens}-c{self.cat_min}.c{self.cat_max}"

    def __str__(self) -> str:
        return f"{self.sens}:c{self.cat_min}.c{self.cat_max}"

    def level(self, pair: int) -> str:
        """Pair number → ``sN:cA,cB`` (A < B)."""
        a, b = pair_categories(pair)
        return f"{self.sens}:c{self.cat_min + a},c{self.cat_min + b}"

    def pair(self, level: str) -> int | None:
        """``sN:cA,cB`` of this range → pair number; None for anything else."""
        m = _LEVEL_RE.fullmatch(level)
        if m is None or m.group(1) != self.sens:
            return None
        a, b = int(m.group(2)) - self.cat_min, int(m.group(3)) - self.cat_min
        if not (0 <= a < b < self.size):
            return None
        return pair_number(a, b)


def pair_number(a: int, b: int) -> int:
    """Categories (offsets) a < b → their pair number in 0 .. n(n-1)/2 - 1."""
    return b * (b - 1) // 2 + a


def pair_categories(pair: int) -> tuple[int, int]:
    """Inverse of :func:`pair_number`."""
    b = (1 + math.isqrt(1 + 8 * pair)) // 2
    if b * (b - 1) // 2 > pair:
        b -= 1
    return pair - b * (b - 1) // 2, b


def parse_process_range(context: str) -> McsRange:
    """vmconfine's own context → the range to allocate from (libvirt's rules).

    ``...:s0`` / ``...:s0-s0`` / no range at all → ``s0`` with c0..c1023; ``...:s0-s0:c0.c10`` →
    c0..c10; ``...:s2-s3:c0.c1023`` → sensitivity s2. The category part must be ``cN.cM``.
    """
    try:
        rng = Context.parse(context).range or "s0"
    except ValueError as exc:
        raise LabelError(f"Unable to parse current SELinux context '{context}': {exc}") from None
    sens_part, sep, cats = rng.partition(":")
    sens = sens_part.split("-", 1)[0]
    if not sep:
        return McsRange(sens, *DEFAULT_CATEGORIES)
    m = re.fullmatch(r"c(\d+)(.*)", cats)
    if m is None:
        raise LabelError(f"Cannot parse category in {cats} (own context '{context}')")
    if not m.group(2):
        raise LabelError(f"No category range available in '{context}'; run vmconfine in a "
                         "context with a category range such as s0-s0:c0.c1023")
    m2 = re.fullmatch(r"\.c(\d+)", m.group(2))
    if m2 is None:
        raise LabelError(f"Cannot parse category in {cats} (own context '{context}')")
    low, high = int(m.group(1)), int(m2.group(1))
    if low > high:
        raise LabelError(f"Cannot parse category in {cats}: c{low} is above c{high}")
    return McsRange(sens, low, high)


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


class LabelRegistry:
    """Persistent, file-locked MCS allocation shared by every vmconfine process of an instance.

    ``is_live(lease)`` says whether a lease's domain still exists (running, starting, or
    waiting for crash recovery); leases of other domains are reclaimed when the pool is full
    (and by :meth:`reconcile`).
    """

    def __init__(self, directory: Path, rng: McsRange,
                 is_live: Callable[[Lease], bool] | None = None) -> None:
        self.dir = directory
        self.range = rng
        self.is_live = is_live
        self._lock_fd: int | None = None
        self._lock_forks = -1  # the _FORKS.count the lock fd was opened at
        self._lock_owner = 0  # the pid that opened it
        self._table: LeaseTable | None = None
        self._pool: McsPool | None = None

    # ---- locking and consistency -------------------------------------------------------------
    def _lock(self) -> int:
        """The lock file's fd, opened once per process (a forked child opens its own: flock
        is per open file, and parent and child must exclude each other)."""
        if self._lock_fd is not None and self._lock_forks == _FORKS.count:
            return self._lock_fd
        self.dir.mkdir(parents=True, exist_ok=True)
        # (a child leaves its copy of the parent's fd alone: its number may be reused)
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock_forks = _FORKS.count
        self._lock_owner = os.getpid()
        return self._lock_fd

    def _locked(self) -> _Operation:
        """Hold the lock; the pool is marked dirty until the operation completes (a deliberate
        LabelError also completes it: those are raised where nothing is half done)."""
        return _Operation(self)

    def _open(self) -> tuple[LeaseTable, McsPool]:
        boot = boot_time()
        table, pool = self._table, self._pool
        if table is not None and pool is not None:  # the usual case: both open already
            table.open(boot)
            if not pool.valid(boot, table.generation):
                self._rebuild(table, pool)
            return table, pool
        if self._table is None:
            self._table = LeaseTable(self.dir / "leases")
        table = self._table
        table.open(boot)
        if self._pool is None:
            self._pool = McsPool(self.dir / f"pool-{self.range.key}", self.range)
        pool = self._pool
        if not pool.valid(boot, table.generation):
            self._rebuild(table, pool)
        return table, pool

    def _open_pool(self) -> McsPool:
        """The pool, consistent (tests and benchmarks look into it)."""
        with self._locked() as (_table, pool):
            return pool

    def _rebuild(self, table: LeaseTable, pool: McsPool) -> None:
        """Rebuild the pool from the leases (first use, new boot, out of date, or a crash)."""
        taken = []
        for slot, lease in table.items():
            pair = self.range.pair(lease.level)
            if pair is not None:
                taken.append((pair, slot + 1))
        log.debug("MCS pool %s rebuilt from %d leases", pool.path, len(taken))
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
        if not _UUID_RE.fullmatch(owner):
            raise LabelError(f"invalid registry owner {owner!r} (expected a domain UUID)")

    @staticmethod
    def _lease(table: LeaseTable, owner: str) -> tuple[int, Lease] | None:
        slot = table.find(owner)
        if slot is None:
            return None
        try:
            lease = table.get(slot)
        except ValueError:
            log.warning("MCS registry: unreadable lease of %s; dropping it", owner)
            lease = None
        if lease is None:
            table.remove(slot)
            return None
        return slot, lease

    def _release_slot(self, table: LeaseTable, pool: McsPool, slot: int, lease: Lease) -> None:
        """Drop a lease; free its pair unless another lease holds the same level."""
        table.remove(slot)
        pair = self.range.pair(lease.level)
        if pair is not None and pool.is_used(pair) and not self._held(table, pool, pair,
                                                                     lease.level, slot):
            pool.put(pair)

    @staticmethod
    def _held(table: LeaseTable, pool: McsPool, pair: int, level: str, but: int) -> bool:
        """True when a lease other than slot ``but`` holds ``level`` (O(1): the pool's holder)."""
        holder = pool.holder[pair] - 1
        if holder < 0 or holder == but:
            return False
        try:
            other = table.get(holder)
        except ValueError:
            return False
        return other is not None and other.level == level

    @staticmethod
    def _foreign_holder(table: LeaseTable, level: str, but: str) -> Lease | None:
        """The lease of another owner on a level outside the range (O(leases): odd path)."""
        return next((x for _s, x in table.items() if x.level == level and x.owner != but),
                    None)

    # ---- API ---------------------------------------------------------------------------------
    def allocate(self, owner: str, name: str) -> str:
        """A fresh level for domain ``owner`` (its UUID); raises when the pool is full."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            old = self._lease(table, owner)
            if old is not None:  # one label per domain: a leftover of an earlier start
                log.warning("MCS registry: domain %s still held %s from an earlier start; "
                            "releasing it", name, old[1].level)
                self._release_slot(table, pool, *old)
            pair = pool.take_random()
            if pair is None and self.is_live is not None:
                self._reconcile_locked(table, pool)
                pair = pool.take_random()
            if pair is None:
                raise LabelError(
                    f"no free MCS category pair in {self.range} ({pool.used} in use); stop a "
                    "domain, or run vmconfine in a context with a wider category range"
                )
            level = self.range.level(pair)
            try:
                slot = table.add(owner, name, level)
            except LabelError:
                pool.put(pair)
                raise
            pool.holder[pair] = slot + 1
            return level

    def reserve(self, owner: str, name: str, level: str, label: str) -> None:
        """Mark the level of running domain ``owner`` (label ``label``) as in use."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            mine = self._lease(table, owner)
            if mine is not None and mine[1].level == level:
                return
            pair = self.range.pair(level)
            taken = (pool.is_used(pair) if pair is not None
                     else self._foreign_holder(table, level, owner) is not None)
            if taken:
                raise LabelError(
                    f"MCS level for existing domain label {label} already reserved; another "
                    "domain holds the same categories: stop one of them"
                )
            if mine is not None:
                self._release_slot(table, pool, *mine)
            slot = table.add(owner, name, level)
            if pair is not None:
                pool.take(pair)
                pool.holder[pair] = slot + 1

    def release(self, owner: str, level: str | None = None) -> None:
        """Give back the level of ``owner`` (idempotent). ``level`` is freed too when no other
        domain holds it (a label whose lease was lost). O(1)."""
        self._check_owner(owner)
        with self._locked() as (table, pool):
            mine = self._lease(table, owner)
            if mine is not None:
                self._release_slot(table, pool, *mine)
            if level is not None and (mine is None or mine[1].level != level):
                pair = self.range.pair(level)
                if pair is not None and not self._held(table, pool, pair, level, -1):
                    pool.put(pair)

    def reconcile(self) -> list[Lease]:
        """Drop the leases of domains that no longer exist; return them."""
        with self._locked() as (table, pool):
            return self._reconcile_locked(table, pool)

    def _reconcile_locked(self, table: LeaseTable, pool: McsPool) -> list[Lease]:
        dropped = []
        for slot, lease in list(table.items()):
            if self.is_live is not None and not self.is_live(lease):
                log.info("MCS registry: domain %s is gone; releasing %s", lease.name,
                         lease.level)
                self._release_slot(table, pool, slot, lease)
                dropped.append(lease)
        live = {x.level for _s, x in table.items() if self.range.pair(x.level) is not None}
        if pool.used != len(live):  # pairs taken without a lease: rebuild
            self._rebuild(table, pool)
        return dropped

    def leases(self) -> list[Lease]:
        with self._locked() as (table, _pool):
            return sorted((x for _s, x in table.items()), key=lambda x: x.owner)

    def in_use(self) -> int:
        with self._locked() as (_table, pool):
            return pool.used

    def fill(self, pairs: list[int]) -> None:
        """Mark ``pairs`` used without leases (benchmarks and tests of a busy pool)."""
        with self._locked() as (_table, pool):
            for pair in pairs:
                pool.take(pair)

    def import_legacy(self, old: Path) -> int:
        """Take over the leases of this boot from an earlier vmconfine's registry directory
        (one JSON file per lease in ``old/leases``), then remove ``old``. Returns how many."""
        leases_dir = old / "leases"
        if not leases_dir.is_dir():
            return 0
        count = 0
        with self._locked() as (table, pool):
            for path in sorted(leases_dir.iterdir()):
                try:
                    data = json.loads(path.read_text())
                    name, level, boot = str(data["name"]), str(data["level"]), int(data["boot"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                owner = path.name
                if (boot != table.boot or not _UUID_RE.fullmatch(owner)
                        or table.find(owner) is not None):
                    continue
                pair = self.range.pair(level)
                if pair is not None and pool.is_used(pair):
                    log.warning("MCS registry: %s of domain %s is taken twice; not importing "
                                "it", level, name)
                    continue
                slot = table.add(owner, name, level)
                if pair is not None:
                    pool.take(pair)
                    pool.holder[pair] = slot + 1
                count += 1
        log.info("MCS registry: took over %d lease(s) from %s", count, old)
        shutil.rmtree(old, ignore_errors=True)
        return count


class _Operation:
    """One registry operation (see :meth:`LabelRegistry._locked`); a class, not a generator
    context manager, because allocation is timed in microseconds."""

    __slots__ = ("fd", "pool", "registry", "table")

    def __init__(self, registry: LabelRegistry) -> None:
        self.registry = registry

    def __enter__(self) -> tuple[LeaseTable, McsPool]:
        self.fd = self.registry._lock()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            self.table, self.pool = self.registry._open()
            self.pool.begin()
        except BaseException:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            raise
        return self.table, self.pool

    def __exit__(self, exc_type: type[BaseException] | None, _exc: object,
                 _tb: object) -> None:
        try:
            if exc_type is None or issubclass(exc_type, LabelError):
                self.pool.end(self.table.generation)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def ensure_dir(path: Path) -> None:
    """Create the registry directory (0700)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise LabelError(f"cannot create the MCS registry directory {path}: "
                             f"{exc.strerror}") from None
