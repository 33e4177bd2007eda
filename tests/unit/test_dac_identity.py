"""Per-domain identity (qemu.conf ``user_range`` / ``shared_group``): the keys' checks, the
persistent, collision-free uid registry, the DAC driver's allocation, journal-driven release,
shared images and the /proc identity check."""

from __future__ import annotations

import grp
import multiprocessing
import os
import pwd
import stat
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_dac_support import disk, domain_xml, host_for, make_file, prepared, scratch
from vmconfine.errors import ConfigError, LabelError
from vmconfine_dac.identity import Identity, verify_status
from vmconfine_dac.idleases import IdentityRegistry
from vmconfine_dac.idrange import UidRange, parse_range, range_config


def free_range(size: int, start: int = 3_200_000) -> tuple[int, int, int]:
    """(low, high, shared gid): ids no account or group of this host uses."""
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    low = start
    while any(i in used for i in range(low - 1, low + size)):
        low += size + 1
    return low, low + size - 1, low - 1


def range_conf(size: int = 10) -> tuple[str, UidRange, int]:
    low, high, shared = free_range(size)
    text = (f'security_driver = "none"\nuser_range = "{low}-{high}"\n'
            f'shared_group = "+{shared}"\n')
    return text, UidRange(low, high), shared


@pytest.fixture
def d() -> Iterator[Path]:
    with scratch() as path:
        yield path


def _owner(n: int) -> str:
    return str(uuidlib.UUID(int=n))


# ---- the keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("200000", "is not LOW-HIGH"),
    ("200-300", "is a system id"),
    ("300000-200000", "200000 is below 300000"),
    ("4294967290-4294967295", "above the highest usable id"),
])
def test_range_syntax_is_checked(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_range(text)


def test_bad_range_is_a_file_line_error(d: Path) -> None:
    with pytest.raises(ConfigError, match=r"qemu.conf:2: 'user_range' '1-2-3' is not LOW-HIGH"):
        _ = host_for(d, 'security_driver = "none"\nuser_range = "1-2-3"\n').config


def test_range_overlapping_an_account_or_without_shared_group_is_refused(d: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    host = host_for(d, f'user_range = "{nobody - 5}-{nobody + 5}"\nshared_group = "+1"\n')
    with pytest.raises(ConfigError, match=r"overlaps the account 'nobody' \(uid 65534\) in the "
                                          "user database; choose a range no account uses"):
        range_config(host.config)
    text, rng, _shared = range_conf()
    no_group = text.replace(f'shared_group = "+{rng.low - 1}"\n', "")
    with pytest.raises(ConfigError, match="user_range needs shared_group"):
        range_config(host_for(d, no_group).config)
    inside = text.replace(f'"+{rng.low - 1}"', f'"+{rng.low}"')
    with pytest.raises(ConfigError, match="must be neither root's group nor inside user_range"):
        range_config(host_for(d, inside).config)


# ---- the registry -------------------------------------------------------------------------

def test_registry_is_persistent_collision_free_and_refuses_when_exhausted(d: Path) -> None:
    rng = UidRange(3_300_000, 3_300_009)
    reg = IdentityRegistry(d / "reg", rng)
    uids = [reg.allocate(_owner(i), f"vm{i}", keep=True) for i in range(10)]
    assert len(set(uids)) == 10 and all(int(u) in rng for u in uids)
    with pytest.raises(LabelError, match=r"user_range 3300000-3300009 is exhausted \(10 uids "
                                         r"held by running or defined domains\)"):
        reg.allocate(_owner(10), "vm10")
    reg.close()
    # a new process (and a new boot: the boot never resets it) sees the same leases
    again = IdentityRegistry(d / "reg", rng)
    assert again.allocate(_owner(3), "vm3", keep=True) == uids[3]
    assert {x.owner: x.value for x in again.leases()} == {
        _owner(i): uids[i] for i in range(10)}
    again.release(_owner(3))
    assert again.allocate(_owner(10), "vm10") == uids[3]  # the only free one
    # leases of domains that are gone are reclaimed when the range is full
    gone = IdentityRegistry(d / "reg", rng, lambda lease: lease.owner != _owner(5))
    assert gone.allocate(_owner(11), "vm11") == uids[5]


def _allocate_many(directory: str, first: int, queue: multiprocessing.Queue) -> None:
    reg = IdentityRegistry(Path(directory), UidRange(3_400_000, 3_400_039))
    queue.put([reg.allocate(_owner(first + i), f"p{first + i}") for i in range(10)])


def test_parallel_processes_never_get_the_same_uid(d: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(d / "reg"), 100 * w, queue))
             for w in range(4)]
    for p in procs:
        p.start()
    got = [uid for _ in procs for uid in queue.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert len(got) == 40 and len(set(got)) == 40


# ---- the driver -----------------------------------------------------------------------------

def test_allocation_is_journaled_and_given_back_unless_defined(d: Path) -> None:
    text, rng, shared = range_conf()
    host = host_for(d, text)
    img = make_file(d / "own.img", 0, 0, 0o600)
    xml = domain_xml("idt", disk(img)).replace(
        "<name>idt</name>", f"<name>idt</name><uuid>{_owner(7)}</uuid>")
    drv, ctx = prepared(host, xml)
    uid = int(ctx.domain.seclabel("dac").label.split(":")[0][1:])
    assert uid in rng
    assert [(r["owner"], r["range"]) for r in ctx.journal.records("dac", "identity")] == [
        (_owner(7), str(rng))]
    drv.preflight(ctx)
    drv.set_all_labels(ctx)
    st = os.stat(img)
    assert (st.st_uid, st.st_gid) == (uid, uid)
    reg = drv.registry(rng)
    assert [x.value for x in reg.leases()] == [str(uid)]
    # a defined domain keeps its uid between runs
    definition = host.instance.definition_path("idt")
    definition.parent.mkdir(parents=True, exist_ok=True)
    definition.write_text(xml)
    drv.restore_all_labels(ctx)
    assert (os.stat(img).st_uid, os.stat(img).st_gid) == (0, 0)
    assert [x.value for x in reg.leases()] == [str(uid)]
    _drv2, ctx2 = prepared(host, xml)  # its next start: the same uid
    assert ctx2.domain.seclabel("dac").label == f"+{uid}:+{uid}"
    # undefine gives it back (and repeating is harmless)
    definition.unlink()
    drv.forget_domain(host, ctx.domain)
    drv.forget_domain(host, ctx.domain)
    assert reg.leases() == []
    # a transient domain's uid goes back at teardown, once
    drv3, ctx3 = prepared(host, xml.replace(_owner(7), _owner(8)))
    assert len(reg.leases()) == 1
    drv3.restore_all_labels(ctx3)
    drv3.restore_all_labels(ctx3)
    assert reg.leases() == []
    assert shared not in (uid,)


def test_shared_images_get_the_shared_group_never_world_access(d: Path) -> None:
    text, _rng, shared = range_conf()
    host = host_for(d, text)
    ro = make_file(d / "ro.iso", 0, 0, 0o600)
    readable = make_file(d / "public.iso", 0, 0, 0o644)
    shareable = make_file(d / "shared.img", 0, 0, 0o600)
    own = make_file(d / "own.img", 0, 0, 0o600)
    devices = (disk(own) + disk(ro, "vdb", extra="<readonly/>")
               + disk(readable, "vdc", extra="<readonly/>")
               + disk(shareable, "vdd", extra="<shareable/>"))
    drv, ctx = prepared(host, domain_xml("shr", devices))
    ident = drv.describe(ctx)
    assert ident["own_identity"] and ident["shared_gid"] == shared
    drv.set_all_labels(ctx)
    uid = ident["uid"]

    def mode(p: Path) -> tuple[int, int, int]:
        st = os.stat(p)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert mode(own) == (uid, uid, 0o600)
    assert mode(ro) == (0, shared, 0o640)
    assert mode(readable) == (0, 0, 0o644)  # QEMU can read it: untouched
    assert mode(shareable) == (0, shared, 0o660)
    drv.restore_all_labels(ctx)
    assert mode(own) == (0, 0, 0o600)
    assert mode(ro) == (0, shared, 0o640)  # kept, as libvirt keeps shared images


def test_static_label_inside_the_range_is_refused(d: Path) -> None:
    text, rng, _shared = range_conf()
    host = host_for(d, text)
    xml = domain_xml("st", extra=f"<seclabel type='static' model='dac'><label>+{rng.low}:"
                                 f"+{rng.low}</label></seclabel>")
    with pytest.raises(LabelError, match=r"is inside qemu\.conf user_range"):
        prepared(host, xml)


def test_proc_check_refuses_another_domains_uid() -> None:
    mine = Identity(3_300_001, 3_300_001, (3_299_999, 3_300_001), shared_gid=3_299_999)
    other = {"Uid": "3300002\t3300002\t3300002\t3300002",
             "Gid": "3300002\t3300002\t3300002\t3300002", "Groups": "3299999 3300002",
             **{k: "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                "CapAmb")}}
    problems = verify_status(other, mine)
    assert problems[:2] == ["Uid is 3300002 3300002 3300002 3300002, expected 3300001 "
                            "everywhere", "Gid is 3300002 3300002 3300002 3300002, "
                            "expected 3300001 everywhere"]
    assert "Groups are [3299999 3300002]" in problems[2]
