"""sVirt MCS levels: vmconfine's category range, and a persistent, locked label registry.

Each dynamic domain gets ``sN:cA,cB`` with two *different* categories A < B from the range of
vmconfine's own context (a single category would be a subset of every pair containing it:
CVE-2021-3631). :func:`parse_process_range` applies libvirt's parsing rules.

The registry makes allocation unique across every vmconfine process of an instance and
survives vmconfine restarts. It is a :class:`vmconfine.plugin.leases.LeaseRegistry` (shared with the
DAC driver's per-domain uids). Its contents are per boot (no domain survives a reboot), so it
lives in the instance's run directory (``run_dir/selinux-mcs``; tmpfs on a normal host):

* ``lock``: every operation holds an exclusive ``flock`` on it;
* ``leases``: who holds which level (:mod:`vmconfine.plugin.leasetable`): one mmap'd table, the
  truth, shared by every category range;
* ``pool-<sens>-c<min>.c<max>``: the O(1) allocator of one category range
  (:mod:`vmconfine.plugin.freepool`), an index rebuilt from the leases when in doubt (first
  use, new boot, out of date, or left dirty by a crash).

Allocation, reservation and release are O(1) at any occupancy and create no files; nothing is
fsynced (a crash of the machine means a new boot, which starts empty). A registry left in the
instance's ``lib_dir`` by an earlier vmconfine is taken over once (:meth:`import_legacy`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmconfine.errors import LabelError
from vmconfine.plugin.leases import FreePool, Lease, LeaseRegistry
from vmconfine_selinux.contexts import Context
from vmconfine_selinux.remember import boot_time

__all__ = ["DEFAULT_CATEGORIES", "MIN_CATEGORIES", "FreePool", "LabelRegistry", "Lease",
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

    @property
    def capacity(self) -> int:
        """The registry's values: the pairs (:class:`vmconfine.plugin.leases.LeaseRange`)."""
        return self.pairs

    def value(self, number: int) -> str:
        """:meth:`level` (inline: allocation is timed in microseconds)."""
        b = (1 + math.isqrt(1 + 8 * number)) // 2
        if b * (b - 1) // 2 > number:
            b -= 1
        low = self.cat_min
        return f"{self.sens}:c{low + number - b * (b - 1) // 2},c{low + b}"

    def number(self, value: str) -> int | None:
        return self.pair(value)

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


def _boot() -> int:
    """This boot (looked up at each call: tests replace :func:`boot_time`)."""
    return boot_time()


class LabelRegistry(LeaseRegistry):
    """The instance's MCS registry: a per-boot :class:`vmconfine.plugin.leases.LeaseRegistry` of
    category pairs (leases hold levels).

    ``is_live(lease)`` says whether a lease's domain still exists (running, starting, or
    waiting for crash recovery); leases of other domains are reclaimed when the pool is full
    (and by :meth:`reconcile`).
    """

    what = "MCS registry"

    def __init__(self, directory: Path, rng: McsRange,
                 is_live: Callable[[Lease], bool] | None = None) -> None:
        super().__init__(directory, rng, is_live, boot=_boot)

    def full_message(self, used: int) -> str:
        return (f"no free MCS category pair in {self.range} ({used} in use); stop a domain, "
                "or run vmconfine in a context with a wider category range")

    def taken_message(self, label: str) -> str:
        return (f"MCS level for existing domain label {label} already reserved; another "
                "domain holds the same categories: stop one of them")

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
                if pair is not None:
                    pool.take(pair)
                self._add(table, pool, owner, name, pair, level)
                count += 1
        log.info("MCS registry: took over %d lease(s) from %s", count, old)
        shutil.rmtree(old, ignore_errors=True)
        return count


def ensure_dir(path: Path) -> None:
    """Create the registry directory (0700)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise LabelError(f"cannot create the MCS registry directory {path}: "
                             f"{exc.strerror}") from None
