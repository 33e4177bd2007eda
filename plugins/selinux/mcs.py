"""sVirt MCS levels: vmconfine's category range, and a persistent, locked label registry.

Each dynamic domain gets ``sN:cA,cB`` with two *different* categories A < B from the range of
vmconfine's own context (a single category would be a subset of every pair containing it:
CVE-2021-3631). :func:`parse_process_range` applies libvirt's parsing rules.

The registry makes allocation unique across every vmconfine process of an instance and
survives restarts. It lives in one directory (the instance's ``lib_dir/selinux-mcs``):

* ``lock``: every operation holds an exclusive ``flock`` on it;
* ``pool-<sens>-c<min>.c<max>``: the allocator, one file per category range, mmap'd. It is a
  free list: ``free[0:nfree]`` holds the free pair numbers and ``pos[pair]`` where each one
  sits, so taking a random free pair, taking a given pair and giving one back are all O(1) at
  any occupancy (no retry loop: a full pool is an error, never a hang). A header carries the
  boot time (a new boot starts empty: no domain survives a reboot) and a dirty flag (set
  around every change; a pool found dirty after a crash is rebuilt from the leases);
* ``leases/<uuid>``: who holds which level (one small JSON file per domain). The leases are
  the truth; the pool is an index rebuilt from them when in doubt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError
from vmconfine_selinux.contexts import Context
from vmconfine_selinux.remember import boot_time

log = logging.getLogger(__name__)

#: fewer categories than this cannot give domains useful pairs (libvirt's rule)
MIN_CATEGORIES = 8
DEFAULT_CATEGORIES = (0, 1023)

_HEADER = struct.Struct("<8sIIIIQ32s")  # magic, version, dirty, npairs, nfree, boot, key
_DIRTY_AT = 12  # byte offsets of the two fields changed in place
_NFREE_AT = 20
_MAGIC = b"VMCMCS01"
_VERSION = 1
_INT = 4
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


class McsPool:
    """The O(1) free-list allocator over one mmap'd file (callers hold the registry lock)."""

    def __init__(self, path: Path, rng: McsRange, boot: int) -> None:
        self.path = path
        self.range = rng
        self.n = rng.pairs
        self.size = _HEADER.size + 2 * _INT * self.n
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fresh = os.fstat(fd).st_size != self.size
            if fresh:
                os.ftruncate(fd, self.size)
            self._mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self._ints = memoryview(self._mm)[_HEADER.size:].cast("i")
        self.free = self._ints[: self.n]
        self.pos = self._ints[self.n :]
        self.valid = not fresh and self._header_ok(boot)

    def close(self) -> None:
        self.free.release()
        self.pos.release()
        self._ints.release()
        self._mm.close()

    # ---- header ------------------------------------------------------------------------------
    def _header(self) -> tuple[bytes, int, int, int, int, int, bytes]:
        return _HEADER.unpack_from(self._mm, 0)  # type: ignore[return-value]

    def _header_ok(self, boot: int) -> bool:
        magic, version, dirty, n, _nfree, stamp, key = self._header()
        return (magic == _MAGIC and version == _VERSION and dirty == 0 and n == self.n
                and stamp == boot and key.rstrip(b"\0") == self.range.key.encode())

    @property
    def nfree(self) -> int:
        return int(struct.unpack_from("<I", self._mm, _NFREE_AT)[0])

    def _set_nfree(self, value: int) -> None:
        struct.pack_into("<I", self._mm, _NFREE_AT, value)

    def _dirty(self, on: bool) -> None:
        struct.pack_into("<I", self._mm, _DIRTY_AT, 1 if on else 0)

    @property
    def used(self) -> int:
        return self.n - self.nfree

    def reset(self, boot: int, taken: list[int]) -> None:
        """Start over: every pair free, then ``taken`` used."""
        self._dirty(True)
        ident = memoryview(bytes(_array_range(self.n))).cast("i")
        self.free[:] = ident
        self.pos[:] = ident
        self._set_nfree(self.n)
        for pair in taken:
            self._take(pair)
        _HEADER.pack_into(self._mm, 0, _MAGIC, _VERSION, 1, self.n, self.nfree, boot,
                          self.range.key.encode())
        self._dirty(False)
        self.valid = True

    # ---- operations (each bracketed by the dirty flag) -----------------------------------------
    def is_used(self, pair: int) -> bool:
        return self.pos[pair] >= self.nfree

    def _take(self, pair: int) -> bool:
        nfree = self.nfree
        p = self.pos[pair]
        if p >= nfree:
            return False
        last = self.free[nfree - 1]
        self.free[p] = last
        self.pos[last] = p
        self.free[nfree - 1] = pair
        self.pos[pair] = nfree - 1
        self._set_nfree(nfree - 1)
        return True

    def take(self, pair: int) -> bool:
        """Mark ``pair`` used; False when it already was."""
        self._dirty(True)
        ok = self._take(pair)
        self._dirty(False)
        return ok

    def take_random(self) -> int | None:
        """A uniformly random free pair, now used; None when the pool is full."""
        nfree = self.nfree
        if nfree == 0:
            return None
        pair = self.free[secrets.randbelow(nfree)]
        self.take(pair)
        return pair

    def put(self, pair: int) -> bool:
        """Give ``pair`` back; False when it was free already."""
        nfree = self.nfree
        p = self.pos[pair]
        if p < nfree:
            return False
        self._dirty(True)
        other = self.free[nfree]
        self.free[p] = other
        self.pos[other] = p
        self.free[nfree] = pair
        self.pos[pair] = nfree
        self._set_nfree(nfree + 1)
        self._dirty(False)
        return True


def _array_range(n: int) -> bytes:
    import array

    return array.array("i", range(n)).tobytes()


@dataclass(frozen=True)
class Lease:
    """One domain's level in the registry."""

    owner: str  #: the domain UUID
    name: str
    level: str
    boot: int


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
        self.leases_dir = directory / "leases"
        self._pool: McsPool | None = None

    # ---- locking and consistency -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[McsPool]:
        self.leases_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            pool = self._open_pool()
            yield pool
        finally:
            os.close(fd)

    def _open_pool(self) -> McsPool:
        boot = boot_time()
        if self._pool is None:
            self._pool = McsPool(self.dir / f"pool-{self.range.key}", self.range, boot)
        pool = self._pool
        if not pool._header_ok(boot):
            self._rebuild(pool, boot)
        return pool

    def _rebuild(self, pool: McsPool, boot: int) -> None:
        """Rebuild the pool from the leases (first use, new boot, or a crash mid-change)."""
        taken = []
        for lease in self._read_leases():
            if lease.boot != boot:
                self._drop_lease(lease.owner)
                continue
            pair = self.range.pair(lease.level)
            if pair is not None:
                taken.append(pair)
        log.debug("MCS pool %s rebuilt from %d leases", pool.path, len(taken))
        pool.reset(boot, taken)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ---- leases ------------------------------------------------------------------------------
    def _lease_path(self, owner: str) -> Path:
        if not _UUID_RE.fullmatch(owner):
            raise LabelError(f"invalid registry owner {owner!r} (expected a domain UUID)")
        return self.leases_dir / owner

    def _read_lease(self, owner: str) -> Lease | None:
        try:
            data = json.loads(self._lease_path(owner).read_text())
            return Lease(owner, str(data["name"]), str(data["level"]), int(data["boot"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("MCS registry: unreadable lease %s; dropping it", owner)
            self._drop_lease(owner)
            return None

    def _read_leases(self) -> list[Lease]:
        out = []
        for p in sorted(self.leases_dir.iterdir()) if self.leases_dir.is_dir() else []:
            if p.name.startswith("."):
                continue
            lease = self._read_lease(p.name)
            if lease is not None:
                out.append(lease)
        return out

    def _write_lease(self, lease: Lease) -> None:
        # a torn write (crash) leaves an unreadable lease: it is dropped and the pool rebuilt
        data = json.dumps({"name": lease.name, "level": lease.level, "boot": lease.boot})
        fd = os.open(self._lease_path(lease.owner),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def _drop_lease(self, owner: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._lease_path(owner).unlink()

    def _holder(self, level: str, but: str) -> Lease | None:
        """The lease of another owner on ``level`` (O(leases): only for odd paths)."""
        return next((x for x in self._read_leases() if x.level == level and x.owner != but),
                    None)

    # ---- API ---------------------------------------------------------------------------------
    def allocate(self, owner: str, name: str) -> str:
        """A fresh level for domain ``owner`` (its UUID); raises when the pool is full."""
        with self._locked() as pool:
            old = self._read_lease(owner)
            if old is not None:  # one label per domain: a leftover of an earlier start
                log.warning("MCS registry: domain %s still held %s from an earlier start; "
                            "releasing it", name, old.level)
                self._release_locked(pool, owner, old)
            pair = pool.take_random()
            if pair is None and self.is_live is not None:
                self._reconcile_locked(pool)
                pair = pool.take_random()
            if pair is None:
                raise LabelError(
                    f"no free MCS category pair in {self.range} ({pool.used} in use); stop a "
                    "domain, or run vmconfine in a context with a wider category range"
                )
            level = self.range.level(pair)
            self._write_lease(Lease(owner, name, level, boot_time()))
            return level

    def reserve(self, owner: str, name: str, level: str, label: str) -> None:
        """Mark the level of running domain ``owner`` (label ``label``) as in use."""
        with self._locked() as pool:
            mine = self._read_lease(owner)
            if mine is not None and mine.level == level:
                return
            pair = self.range.pair(level)
            taken = (pool.is_used(pair) if pair is not None
                     else self._holder(level, owner) is not None)
            if taken:
                raise LabelError(
                    f"MCS level for existing domain label {label} already reserved; another "
                    "domain holds the same categories: stop one of them"
                )
            if mine is not None:
                self._release_locked(pool, owner, mine)
            if pair is not None:
                pool.take(pair)
            self._write_lease(Lease(owner, name, level, boot_time()))

    def release(self, owner: str, level: str | None = None) -> None:
        """Give back the level of ``owner`` (idempotent). ``level`` is freed too when no other
        domain holds it (a label whose lease was lost)."""
        with self._locked() as pool:
            lease = self._read_lease(owner)
            if lease is not None:
                self._release_locked(pool, owner, lease)
            if level is not None and (lease is None or lease.level != level):
                pair = self.range.pair(level)
                if pair is not None and self._holder(level, owner) is None:
                    pool.put(pair)

    def _release_locked(self, pool: McsPool, owner: str, lease: Lease) -> None:
        pair = self.range.pair(lease.level)
        self._drop_lease(owner)
        if pair is not None and self._holder(lease.level, owner) is None:
            pool.put(pair)

    def reconcile(self) -> list[Lease]:
        """Drop the leases of domains that no longer exist; return them."""
        with self._locked() as pool:
            return self._reconcile_locked(pool)

    def _reconcile_locked(self, pool: McsPool) -> list[Lease]:
        dropped = []
        leases = self._read_leases()
        for lease in leases:
            if self.is_live is not None and not self.is_live(lease):
                log.info("MCS registry: domain %s is gone; releasing %s", lease.name,
                         lease.level)
                self._release_locked(pool, lease.owner, lease)
                dropped.append(lease)
        live = [x for x in leases if x not in dropped and self.range.pair(x.level) is not None]
        if pool.used != len({x.level for x in live}):  # pairs taken without a lease: rebuild
            self._rebuild(pool, boot_time())
        return dropped

    def leases(self) -> list[Lease]:
        with self._locked():
            return self._read_leases()

    def in_use(self) -> int:
        with self._locked() as pool:
            return pool.used

    def fill(self, pairs: list[int]) -> None:
        """Mark ``pairs`` used without leases (benchmarks and tests of a busy pool)."""
        with self._locked() as pool:
            for pair in pairs:
                pool.take(pair)


def ensure_dir(path: Path) -> None:
    """Create the registry directory (0700)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise LabelError(f"cannot create the MCS registry directory {path}: "
                             f"{exc.strerror}") from None
