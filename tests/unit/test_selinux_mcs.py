"""MCS levels: libvirt's range parsing, the pair numbering, and the persistent label registry."""

from __future__ import annotations

import multiprocessing
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmconfine.errors import LabelError
from vmconfine.plugin import freepool as mcspool
from vmconfine_selinux import mcs
from vmconfine_selinux.contexts import Context
from vmconfine_selinux.mcs import (
    LabelRegistry,
    McsRange,
    pair_categories,
    pair_number,
    parse_process_range,
)

# libvirt tests/securityselinuxtest.c: process context -> sensitivity and category bounds
RANGE_CASES = [
    ("unconfined_u:unconfined_r:unconfined_t:s0", "s0", 0, 1023),
    ("unconfined_u:unconfined_r:unconfined_t:s0-s0", "s0", 0, 1023),
    ("unconfined_u:unconfined_r:unconfined_t:s0-s0:c0.c1023", "s0", 0, 1023),
    ("system_u:system_r:virtd_t:s0-s0:c0.c1023", "s0", 0, 1023),
    ("system_u:system_r:virtd_t:s0-s0:c0.c10", "s0", 0, 10),
    ("system_u:system_r:virtd_t:s2-s3:c0.c1023", "s2", 0, 1023),
    ("system_u:system_r:virtd_t", "s0", 0, 1023),
    ("system_u:system_r:virtd_t:s0:c100.c200", "s0", 100, 200),
]


@pytest.mark.parametrize(("context", "sens", "low", "high"), RANGE_CASES)
def test_process_range_follows_libvirt(context: str, sens: str, low: int, high: int) -> None:
    assert parse_process_range(context) == McsRange(sens, low, high)


@pytest.mark.parametrize(("context", "message"), [
    ("system_u:system_r:virtd_t:s0-s0:c5", "No category range available"),
    ("system_u:system_r:virtd_t:s0-s0:x0.c10", "Cannot parse category in x0.c10"),
    ("system_u:system_r:virtd_t:s0-s0:c0,c10", "Cannot parse category in c0,c10"),
    ("system_u:system_r:virtd_t:s0-s0:c0.10", "Cannot parse category in c0.10"),
    ("system_u:system_r:virtd_t:s0-s0:c0.c6", r"Category range c0-c6 too small"),
    ("not a context", "Unable to parse current SELinux context"),
])
def test_process_range_errors(context: str, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        parse_process_range(context)


def test_eight_categories_are_enough() -> None:
    rng = parse_process_range("u:r:t:s0-s0:c10.c17")
    assert rng.pairs == 28 and str(rng) == "s0:c10.c17"


def test_pair_numbering_is_a_bijection_on_distinct_pairs() -> None:
    size = 40
    seen = set()
    for b in range(size):
        for a in range(b):
            n = pair_number(a, b)
            assert pair_categories(n) == (a, b)
            seen.add(n)
    assert seen == set(range(size * (size - 1) // 2))


def test_levels_round_trip_and_foreign_levels_are_rejected() -> None:
    rng = McsRange("s0", 100, 200)
    for n in (0, 1, 57, rng.pairs - 1):
        level = rng.level(n)
        m = re.fullmatch(r"s0:c(\d+),c(\d+)", level)
        assert m and 100 <= int(m[1]) < int(m[2]) <= 200
        assert rng.pair(level) == n
    for foreign in ("s1:c100,c101", "s0:c101,c100", "s0:c100,c100", "s0:c99,c101",
                    "s0:c100,c201", "s0:c100", "s0", "s0:c100.c101"):
        assert rng.pair(foreign) is None


def _registry(tmp: Path, rng: McsRange | None = None, **kw: object) -> LabelRegistry:
    return LabelRegistry(tmp / "reg", rng or McsRange("s0", 0, 1023), **kw)  # type: ignore[arg-type]


def _owner(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012x}"


def _check_level(level: str, rng: McsRange) -> tuple[int, int]:
    m = re.fullmatch(rf"{rng.sens}:c(\d+),c(\d+)", level)
    assert m, level
    a, b = int(m[1]), int(m[2])
    # CVE-2021-3631: two DIFFERENT categories, ordered, inside the range
    assert rng.cat_min <= a < b <= rng.cat_max, level
    return a, b


def test_allocations_are_distinct_pairs_in_range(tmp_path: Path) -> None:
    rng = McsRange("s2", 10, 40)
    reg = _registry(tmp_path, rng)
    levels = [reg.allocate(_owner(i), f"vm{i}") for i in range(300)]
    assert len(set(levels)) == 300
    for level in levels:
        _check_level(level, rng)
    assert reg.in_use() == 300


def _allocate_many(args: tuple[str, int, int]) -> list[str]:
    directory, start, count = args
    reg = LabelRegistry(Path(directory), McsRange("s0", 0, 63))
    return [reg.allocate(_owner(start + i), f"vm{start + i}") for i in range(count)]


def test_registry_is_unique_across_processes(tmp_path: Path) -> None:
    directory = str(tmp_path / "reg")
    jobs = [(directory, p * 50, 50) for p in range(4)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_allocate_many, jobs)
    levels = [level for chunk in results for level in chunk]
    assert len(levels) == 200
    assert len(set(levels)) == 200, "two processes got the same MCS level"
    reg = LabelRegistry(Path(directory), McsRange("s0", 0, 63))
    assert reg.in_use() == 200
    assert {x.level for x in reg.leases()} == set(levels)


def test_registry_survives_a_restart(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    level = reg.allocate(_owner(1), "vm1")
    reg.close()
    again = _registry(tmp_path)  # a new vmconfine process
    assert again.in_use() == 1
    assert [(x.owner, x.level) for x in again.leases()] == [(_owner(1), level)]
    pair = again.range.pair(level)
    assert pair is not None and again._open_pool().is_used(pair)
    assert again.allocate(_owner(2), "vm2") != level


def test_reserve_marks_a_running_domain_and_refuses_a_taken_level(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    reg.reserve(_owner(1), "vm1", "s0:c5,c9", "system_u:system_r:svirt_t:s0:c5,c9")
    reg.reserve(_owner(1), "vm1", "s0:c5,c9", "system_u:system_r:svirt_t:s0:c5,c9")  # again: ok
    with pytest.raises(LabelError, match=r"MCS level for existing domain label "
                                         r"system_u:system_r:svirt_t:s0:c5,c9 already reserved"):
        reg.reserve(_owner(2), "vm2", "s0:c5,c9", "system_u:system_r:svirt_t:s0:c5,c9")
    reg.close()
    fresh = _registry(tmp_path)  # reserved levels are never handed out again
    rng = fresh.range
    with pytest.raises(LabelError, match="already reserved"):
        fresh.reserve(_owner(3), "vm3", "s0:c5,c9", "x")
    levels = {fresh.allocate(_owner(10 + i), f"d{i}") for i in range(200)}
    assert "s0:c5,c9" not in levels
    assert rng.pair("s0:c5,c9") is not None


def test_release_is_idempotent_and_frees_the_level(tmp_path: Path) -> None:
    rng = McsRange("s0", 0, 7)  # 28 pairs
    reg = _registry(tmp_path, rng)
    levels = [reg.allocate(_owner(i), f"vm{i}") for i in range(rng.pairs)]
    assert reg.in_use() == 28
    reg.release(_owner(3))
    reg.release(_owner(3))
    reg.release(_owner(3), levels[3])
    assert reg.in_use() == 27
    assert reg.allocate(_owner(99), "vm99") == levels[3]


def test_release_without_a_lease_frees_an_unheld_level(tmp_path: Path) -> None:
    rng = McsRange("s0", 0, 1023)
    reg = _registry(tmp_path, rng)
    lost = rng.level(77)
    reg.fill([77])  # in use, but no lease says by whom (a lost lease)
    held = reg.allocate(_owner(2), "vm2")
    reg.release(_owner(1), lost)
    assert reg.in_use() == 1
    reg.release(_owner(1), held)  # another domain's lease holds it: it stays taken
    assert reg.in_use() == 1 and [x.level for x in reg.leases()] == [held]
    reg.release(_owner(2))
    assert reg.in_use() == 0 and reg.leases() == []


def test_full_pool_is_an_error_not_a_loop(tmp_path: Path) -> None:
    rng = McsRange("s0", 0, 7)
    reg = _registry(tmp_path, rng)
    for i in range(rng.pairs):
        reg.allocate(_owner(i), f"vm{i}")
    with pytest.raises(LabelError, match=re.escape(
            "no free MCS category pair in s0:c0.c7 (28 in use)")):
        reg.allocate(_owner(100), "vm100")


def test_nearly_full_pool_still_allocates_the_last_pairs(tmp_path: Path) -> None:
    rng = McsRange("s0", 0, 1023)
    reg = _registry(tmp_path, rng)
    busy = rng.pairs - 5  # above 99.99% occupancy
    reg.fill(list(range(busy)))
    got = {reg.allocate(_owner(i), f"vm{i}") for i in range(5)}
    assert {rng.pair(x) for x in got} == set(range(busy, rng.pairs))
    with pytest.raises(LabelError, match=r"\(523776 in use\)"):
        reg.allocate(_owner(6), "vm6")


def test_full_pool_reclaims_leases_of_gone_domains(tmp_path: Path) -> None:
    rng = McsRange("s0", 0, 7)
    alive = {f"vm{i}" for i in range(rng.pairs)}
    reg = _registry(tmp_path, rng, is_live=lambda lease: lease.name in alive)
    levels = [reg.allocate(_owner(i), f"vm{i}") for i in range(rng.pairs)]
    alive.discard("vm4")
    assert reg.allocate(_owner(50), "vm50") == levels[4]
    assert _owner(4) not in {x.owner for x in reg.leases()}


def test_a_second_start_of_the_same_domain_replaces_its_stale_lease(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    reg.allocate(_owner(1), "vm1")
    reg.allocate(_owner(1), "vm1")
    assert reg.in_use() == 1 and len(reg.leases()) == 1


def test_a_new_boot_starts_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry(tmp_path)
    reg.allocate(_owner(1), "vm1")
    reg.close()
    monkeypatch.setattr(mcs, "boot_time", lambda: 12345)
    fresh = _registry(tmp_path)
    assert fresh.in_use() == 0 and fresh.leases() == []


def test_a_pool_left_dirty_by_a_crash_is_rebuilt_from_the_leases(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    keep = reg.allocate(_owner(1), "vm1")
    reg.fill([0, 1, 2])  # index entries without leases
    pool = reg._open_pool()
    struct.pack_into("<I", pool._mm, 12, 1)  # a crash in the middle of a change
    reg.close()
    fresh = _registry(tmp_path)
    assert fresh.in_use() == 1
    pool = fresh._open_pool()
    assert pool.is_used(fresh.range.pair(keep))  # type: ignore[arg-type]


def test_reconcile_drops_gone_domains_and_orphan_index_entries(tmp_path: Path) -> None:
    alive = {"vm1"}
    reg = _registry(tmp_path, is_live=lambda lease: lease.name in alive)
    reg.allocate(_owner(1), "vm1")
    gone = reg.allocate(_owner(2), "vm2")
    reg.fill([7])
    dropped = reg.reconcile()
    assert [x.level for x in dropped] == [gone]
    assert reg.in_use() == 1


def test_unreadable_lease_is_dropped(tmp_path: Path) -> None:
    from vmconfine.plugin import leasetable as leases

    reg = _registry(tmp_path)
    reg.allocate(_owner(1), "vm1")
    keep = reg.allocate(_owner(2), "vm2")
    reg.close()
    slot0 = 64  # the table's header size: the first lease's slot starts here
    with open(tmp_path / "reg" / "leases", "r+b") as fh:
        fh.seek(slot0 + leases.SLOT * 0 + 16)  # the owner field: not a UUID any more
        fh.write(b"../../etc/passwd")
    fresh = _registry(tmp_path)
    assert [(x.owner, x.level) for x in fresh.leases()] == [(_owner(2), keep)]
    fresh.reconcile()
    assert fresh.in_use() == 1


def test_owner_must_look_like_a_uuid(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="invalid registry owner"):
        _registry(tmp_path).allocate("../../etc/passwd", "x")


_OWNER_SPEC = re.compile(r"[0-9a-fA-F-]{1,64}")


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF-", max_size=70),
    st.text(alphabet="0123456789abcdefABCDEF-/.\n \x00\u0660g", max_size=70),
    st.text(max_size=70)))
def test_owner_check_accepts_exactly_1_to_64_hex_digits_and_dashes(owner: str) -> None:
    """The check on the allocation path uses string methods; it accepts what the spec
    regex accepts and nothing else (non-ASCII digits, newlines, NUL, 65 characters...)."""
    from vmconfine.plugin.leases import LeaseRegistry

    try:
        LeaseRegistry._check_owner(owner)
        accepted = True
    except LabelError:
        accepted = False
    assert accepted == bool(_OWNER_SPEC.fullmatch(owner))


def test_owner_check_edges() -> None:
    from vmconfine.plugin.leases import LeaseRegistry

    for good in ("a", "-", "F" * 64, _owner(3)):
        LeaseRegistry._check_owner(good)
    for bad in ("", "g", "a" * 65, "abc\n", "\u0661\u0662", "abc ", " abc", "ab/cd"):
        with pytest.raises(LabelError, match="invalid registry owner"):
            LeaseRegistry._check_owner(bad)


def test_allocation_draws_one_random_number_at_any_occupancy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No retry loop: one draw over the free list, however full the pool is."""
    rng = McsRange("s0", 0, 255)
    reg = _registry(tmp_path, rng)
    reg.fill(list(range(rng.pairs - 100)))  # 99.7% in use
    draws: list[int] = []
    real = mcspool._ENTROPY.below

    def counting(n: int) -> int:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(mcspool._ENTROPY, "below", counting)
    got = [reg.allocate(_owner(i), f"vm{i}") for i in range(100)]
    assert len(set(got)) == 100
    assert draws == list(range(100, 0, -1)), "exactly one draw over the free pairs each time"


def test_buffered_draws_are_uniform_and_not_shared_with_a_forked_child() -> None:
    """The pool draws from a buffer of os.urandom bytes: every value of 0..n-1 comes up, none
    outside it, and a forked child does not replay the parent's buffer."""
    entropy = mcspool._Entropy()
    counts = [0] * 7
    for _ in range(7000):
        counts[entropy.below(7)] += 1
    assert all(700 < c < 1300 for c in counts), counts
    assert {entropy.below(1) for _ in range(50)} == {0}
    entropy.below(1 << 40)  # fill the buffer
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its draws must not be the parent's next ones
        os.close(read)
        os.write(write, b"".join(entropy.below(1 << 62).to_bytes(8, "little")
                                 for _ in range(4)))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    mine = b"".join(entropy.below(1 << 62).to_bytes(8, "little") for _ in range(4))
    assert len(child) == 32 and child != mine


# ---- the lease table: one file, O(1) release, growth, crashes, forks ---------------------------


def test_allocations_create_no_files(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    reg.allocate(_owner(0), "vm0")
    files = sorted(p.name for p in (tmp_path / "reg").iterdir())
    levels = [reg.allocate(_owner(i), f"vm{i}") for i in range(1, 300)]  # grows the table
    for i in range(0, 300, 2):
        reg.release(_owner(i))
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == files
    assert files == ["leases", "lock", "pool-s0-c0.c1023"]
    assert reg.in_use() == 150
    assert {x.level for x in reg.leases()} == set(levels[0::2])


def test_release_reads_no_other_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """release() is O(1): the pool knows who holds a pair; it never walks the leases."""
    from vmconfine.plugin.leasetable import LeaseTable

    reg = _registry(tmp_path)
    levels = [reg.allocate(_owner(i), f"vm{i}") for i in range(100)]

    def walk(self: LeaseTable) -> None:
        raise AssertionError("release walked the lease table")

    monkeypatch.setattr(LeaseTable, "items", walk)
    reg.release(_owner(5))
    reg.release(_owner(6), levels[6])
    reg.release(_owner(7), levels[8])  # another domain's level: kept
    reg.release(_owner(5))  # again: nothing to do
    monkeypatch.undo()
    assert reg.in_use() == 97
    assert {x.level for x in reg.leases()} == set(levels) - {levels[5], levels[6], levels[7]}


def test_lease_table_matches_a_model_through_growth_restarts_and_releases(
        tmp_path: Path) -> None:
    """Random allocate / release / reserve from two registry objects (two processes) and
    restarts: the leases, the pool and the levels always match a plain dict."""
    import random

    rng = McsRange("s0", 0, 40)  # 820 pairs
    regs = [_registry(tmp_path, rng), _registry(tmp_path, rng)]
    model: dict[str, str] = {}
    rand = random.Random(5)
    for step in range(1500):
        reg = regs[step % 2]
        owner = _owner(rand.randrange(400))
        op = rand.random()
        if op < 0.55:
            model[owner] = reg.allocate(owner, f"n{owner[-4:]}")
        elif op < 0.9:
            reg.release(owner, model.pop(owner, None))
        else:
            reg.close()
            regs[step % 2] = _registry(tmp_path, rng)
        if step % 100 == 99:
            got = {x.owner: x.level for x in regs[0].leases()}
            assert got == model
            assert regs[1].in_use() == len(model) == len(set(model.values()))
            pool = regs[0]._open_pool()
            assert all(pool.is_used(rng.pair(level)) for level in model.values())  # type: ignore[arg-type]


def test_names_are_kept_and_too_long_ones_refused(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    reg.allocate(_owner(1), "vm-ü" * 20)
    with pytest.raises(LabelError, match="longer than 256 bytes"):
        reg.allocate(_owner(2), "x" * 300)
    assert [x.name for x in reg.leases()] == ["vm-ü" * 20]
    assert reg.in_use() == 1  # the refused allocation took nothing


def test_a_lease_table_left_dirty_by_a_crash_is_repaired(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    levels = {_owner(i): reg.allocate(_owner(i), f"vm{i}") for i in range(100)}
    reg.release(_owner(3))
    del levels[_owner(3)]
    reg.close()
    with open(tmp_path / "reg" / "leases", "r+b") as fh:  # died in the middle of a change
        fh.seek(12)
        fh.write(struct.pack("<I", 1))
        fh.seek(16)
        capacity = struct.unpack("<I", fh.read(4))[0]
        assert capacity == 128  # grown once, from 64
        fh.seek(64 + capacity * 512)  # and the owner index behind the slots is garbage
        fh.write(b"\xff" * 4 * capacity)
    fresh = _registry(tmp_path)
    assert {x.owner: x.level for x in fresh.leases()} == levels
    assert fresh.in_use() == 99
    fresh.release(_owner(10))
    assert fresh.allocate(_owner(10), "vm10") not in set(levels.values()) - {levels[_owner(10)]}


_INHERITED: list[LabelRegistry] = []


def _allocate_with(args: tuple[int, int]) -> list[str]:
    start, count = args
    reg = _INHERITED[0]  # the parent's object, inherited by fork
    return [reg.allocate(_owner(start + i), f"vm{start + i}") for i in range(count)]


def test_a_registry_inherited_across_fork_still_excludes(tmp_path: Path) -> None:
    """flock is per open file: children that inherited the parent's registry object open
    their own lock, so they exclude each other and the parent."""
    reg = LabelRegistry(tmp_path / "reg", McsRange("s0", 0, 63))
    first = reg.allocate(_owner(999), "parent")  # the parent's lock fd and mappings exist
    _INHERITED[:] = [reg]
    ctx = multiprocessing.get_context("fork")
    try:
        with ctx.Pool(4) as pool:
            results = pool.map(_allocate_with, [(p * 50, 50) for p in range(4)])
    finally:
        _INHERITED.clear()
    levels = [first] + [level for chunk in results for level in chunk]
    assert len(set(levels)) == 201, "two processes got the same MCS level"
    assert reg.in_use() == 201


def test_legacy_registry_in_lib_dir_is_taken_over(tmp_path: Path) -> None:
    import json

    from tests.unit.test_selinux_support import UUID_A, UUID_B, domain_xml, gen, make_ctx, setup
    from vmconfine_selinux.remember import boot_time

    host, drv, _be = setup(tmp_path)
    old = host.instance.lib_dir / "selinux-mcs"
    (old / "leases").mkdir(parents=True)
    (old / "leases" / UUID_B).write_text(json.dumps(
        {"name": "running", "level": "s0:c5,c9", "boot": boot_time()}))
    (old / "leases" / _owner(7)).write_text(json.dumps(
        {"name": "old-boot", "level": "s0:c1,c2", "boot": 1}))
    (old / "pool-s0-c0.c1023").write_bytes(b"\0" * 64)
    sec = gen(drv, make_ctx(host, domain_xml(name="vm1", uuid=UUID_A)))
    assert not old.exists()
    reg = drv.registry(make_ctx(host, domain_xml()))
    assert {(x.owner, x.level) for x in reg.leases()} == {
        (UUID_B, "s0:c5,c9"), (UUID_A, Context.parse(sec.label or "").range)}
    with pytest.raises(LabelError, match="already reserved"):
        reg.reserve(_owner(8), "other", "s0:c5,c9", "x")
