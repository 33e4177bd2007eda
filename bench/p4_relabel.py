"""P4: set + restore every label of a 200-layer backing chain and of 256 disks.

Drivers, called directly on an embed instance (as root): **DAC** (chown to vmconfine-qemu,
original owners remembered in ``trusted.`` xattrs, journal) and **SELinux** on its fake
backend (file contexts in an ordinary xattr, originals remembered in ``trusted.`` xattrs, MCS
level from the registry, journal) — this host has no SELinux.

After vmconfine set and restored the labels, the changes it made are read back from the files
(owners and xattrs before, after set, after restore), and two plain Python loops make exactly
those changes on the same files:

* the **raw loop** (reported): one ``chown``/``setxattr``/``removexattr`` by path per change;
* the **safety floor** (the peer): what any symlink-safe, crash-safe relabel must do at least
  (docs/performance.md, P4): each directory opened once; per file ``fstatat`` (resolve, no
  symlink), ``openat(O_NOFOLLOW)``, ``fstat`` (the inode is the resolved one), when the set's
  chown changes the owner of a regular file one ``fgetxattr`` of ``security.capability``
  (the kernel clears file capabilities on chown; a relabel that gives them back on restore
  must read them before), the changes on the fd, ``close``; and the journal: created by the
  set, one ``write`` + ``fsync`` per batch of 128 files before the batch's changes (set and
  restore each), one line per file with what an undo needs (path, device and inode, owner,
  mode, capabilities).

Before each timed part the young generations of Python's garbage collector are collected,
untimed (:func:`settle`): without it, a collection triggered by the setup's allocations landed
inside vmconfine's set in every sample (30 of 30 at 50 layers, 0.07-0.2 ms, a gen1 one
0.4-0.8 ms) and inside the floor's in none. Collections the timed code triggers itself count.

The drivers' ``preflight`` runs before the set, untimed, as in the start pipeline (where it
comes before ``set_all_labels``): it computes what a start computes once before any label is
set (the DAC driver: QEMU's ids and groups from the user database).

ratio = vmconfine's (set + restore) / the safety floor's. Linearity: the time per file at 200
vs 50 layers and 256 vs 64 disks.

The images are on ext4 (``/var/tmp``). The instance — and so the journal, written and fsynced
before every change — is on tmpfs (``/dev/shm``, as ``/run`` of the system instance on a normal
host), and for the big cases also on ext4.

usage: python -m bench.p4_relabel [--quick] [--runs N]
"""

from __future__ import annotations

import gc
import importlib.util
import os
import stat
import sys
import time
import types
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    QEMU,
    SCRATCH_BASE,
    TMPFS_BASE,
    Options,
    Stats,
    Table,
    bench_main,
    disk_xml,
    embed_root,
    is_root,
    ratio,
    scratch,
    verdict,
)

TARGET = 2.0
VIRTD = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
Snapshot = dict[str, tuple[int, int, dict[str, bytes]]]


# ---- files, snapshots and the raw loop ----------------------------------------------------------


def snapshot(paths: list[str]) -> Snapshot:
    out: Snapshot = {}
    for p in paths:
        st = os.stat(p, follow_symlinks=False)
        out[p] = (st.st_uid, st.st_gid,
                  {n: os.getxattr(p, n, follow_symlinks=False)
                   for n in os.listxattr(p, follow_symlinks=False)})
    return out


def diff(a: Snapshot, b: Snapshot) -> list[tuple[Any, ...]]:
    """The syscalls that turn the files' state ``a`` into ``b``."""
    ops: list[tuple[Any, ...]] = []
    for p, (uid, gid, xa) in b.items():
        ouid, ogid, oxa = a[p]
        if (uid, gid) != (ouid, ogid):
            ops.append(("chown", p, uid, gid))
        for name, value in xa.items():
            if oxa.get(name) != value:
                ops.append(("set", p, name, value))
        for name in oxa:
            if name not in xa:
                ops.append(("remove", p, name))
    return ops


def settle() -> None:
    """Untimed, right before each timed part (vmconfine's, the floor's, the raw loop's alike):
    collect the young generations, so that a garbage collection triggered by what ran before
    (the setup parses the domain XML and builds the instance, the snapshots) does not land in
    the timed part; a collection the timed code's own allocations trigger is still counted."""
    gc.collect(1)


def raw(ops: list[tuple[Any, ...]]) -> float:
    """Make ``ops`` with a plain loop; return the time."""
    chown, setx, remx = os.chown, os.setxattr, os.removexattr
    t0 = time.perf_counter()
    for op in ops:
        kind = op[0]
        if kind == "chown":
            chown(op[1], op[2], op[3])
        elif kind == "set":
            setx(op[1], op[2], op[3])
        else:
            remx(op[1], op[2])
    return time.perf_counter() - t0


BATCH = 128  #: files per journal group commit in the safety floor (DAC's default batch)
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
FCAPS = "security.capability"  #: file capabilities, which the kernel clears on chown


def file_caps(fd: int) -> bytes | None:
    """The file capabilities of ``fd`` (None: it has none)."""
    try:
        return os.getxattr(fd, FCAPS)
    except OSError:
        return None


def floor(ops: list[tuple[Any, ...]], journal: Path, *, create: bool) -> float:
    """Make ``ops`` the symlink-safe, crash-safe minimum way (see the module docstring); return
    the time. ``journal`` is created when ``create`` (the set), else appended to (the
    restore, which finds the set's journal, as vmconfine's does)."""
    per_file: dict[str, list[tuple[Any, ...]]] = {}
    for op in ops:
        per_file.setdefault(op[1], []).append(op)
    files = list(per_file)
    dirs: dict[str, int] = {}
    t0 = time.perf_counter()
    jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
                  | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    for start in range(0, len(files), BATCH):
        opened: list[tuple[str, int, os.stat_result, bytes | None]] = []
        try:
            for path in files[start:start + BATCH]:
                parent, name = os.path.split(path)
                dfd = dirs.get(parent)
                if dfd is None:
                    dfd = dirs[parent] = os.open(parent,
                                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                fd = os.open(name, _OPEN, dir_fd=dfd)
                fst = os.fstat(fd)
                opened.append((path, fd, fst, None))
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    raise RuntimeError(f"{path} was replaced")
                if create and stat.S_ISREG(fst.st_mode) and any(
                        op[0] == "chown" for op in per_file[path]):
                    # the set: read what the chown will clear
                    opened[-1] = (path, fd, fst, file_caps(fd))
            # what an undo needs: the file, its inode, its owner and mode (+ capabilities)
            os.write(jfd, "".join([
                f"{path}\t{fst.st_dev}\t{fst.st_ino}\t{fst.st_uid}\t{fst.st_gid}\t"
                f"{fst.st_mode:o}\t{caps.hex() if caps else ''}\n"
                for path, _fd, fst, caps in opened]).encode())
            os.fsync(jfd)
            for path, fd, _fst, _caps in opened:
                for op in per_file[path]:
                    if op[0] == "chown":
                        os.fchown(fd, op[2], op[3])
                    elif op[0] == "set":
                        os.setxattr(fd, op[2], op[3])
                    else:
                        os.removexattr(fd, op[2])
        finally:
            for _path, fd, _fst, _caps in opened:
                os.close(fd)
    for dfd in dirs.values():
        os.close(dfd)
    os.close(jfd)
    return time.perf_counter() - t0


# ---- domains ------------------------------------------------------------------------------------


def chain_domain(d: Path, layers: int) -> tuple[str, list[str]]:
    """One disk whose backing chain (declared in the XML) has ``layers`` images in all."""
    paths = [str(d / f"chain{layers}-l{i}.img") for i in range(layers)]
    for p in paths:
        Path(p).touch()
    inner = "<backingStore/>"
    for p in reversed(paths[1:]):
        inner = (f"<backingStore type='file'><format type='raw'/><source file='{p}'/>{inner}"
                 "</backingStore>")
    return _domain(f"chain{layers}", disk_xml(paths[0], 0, inner)), paths


def disks_domain(d: Path, count: int) -> tuple[str, list[str]]:
    paths = [str(d / f"disks{count}-d{i}.img") for i in range(count)]
    for p in paths:
        Path(p).touch()
    return _domain(f"disks{count}", "".join(disk_xml(p, i) for i, p in enumerate(paths))), paths


def _domain(name: str, disks: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>"
            "<memory unit='MiB'>32</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices><emulator>{QEMU}</emulator>{disks}</devices></domain>")


# ---- drivers ------------------------------------------------------------------------------------


@dataclass
class Driver:
    """A driver under test: how to build it and its seclabel model."""

    name: str
    model: str
    make: Callable[[Any], Any]
    plugin: types.ModuleType | None


def dac_driver() -> Driver:
    import vmconfine_dac
    from vmconfine_dac.driver import DacDriver

    return Driver("DAC", "dac", DacDriver, vmconfine_dac)


def selinux_driver(d: Path) -> Driver:
    import vmconfine_selinux
    from vmconfine.plugin.hookspecs import hookimpl
    from vmconfine_selinux.backend import FakeBackend
    from vmconfine_selinux.driver import SELinuxDriver

    policy = d / "policy"
    policy.mkdir(exist_ok=True)
    dom, img = policy / "virtual_domain_context", policy / "virtual_image_context"
    dom.write_text("system_u:system_r:svirt_t:s0\nsystem_u:system_r:svirt_tcg_t:s0\n")
    img.write_text("system_u:object_r:svirt_image_t:s0\nsystem_u:object_r:virt_content_t:s0\n")
    backend = FakeBackend(str(dom), str(img), process_context=VIRTD)
    mod = types.ModuleType("bench_p4_selinux_fake")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add("selinux", lambda host: SELinuxDriver(host, backend), "fake backend",
                     settings=vmconfine_selinux.SETTINGS)

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return Driver("SELinux (fake backend)", "selinux",
                  lambda host: SELinuxDriver(host, backend), mod)


def one_sample(drv: Driver, state_base: Path, xml: str, paths: list[str]) -> dict[str, float]:
    """gen label, set all, restore all, release (fresh instance and journal); the timings and
    the raw loop's for the same calls."""
    from vmconfine.config.instance import open_instance
    from vmconfine.domain import parse_domain
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

    with scratch("p4-inst", base=state_base) as root:
        inst = open_instance(embed_root(root))
        inst.ensure_dirs()
        pm = make_plugin_manager(autoload=False,
                                 plugins=[drv.plugin] if drv.plugin is not None else [])
        host = HostContext(inst, pm, collect_drivers(pm))
        driver = drv.make(host)
        domain = parse_domain(xml)
        ctx = DomainContext(host, domain, Journal(inst.journal_path(domain.name)))
        sec = domain.seclabel(drv.model) or domain.add_seclabel(drv.model, "dynamic")
        driver.gen_label(ctx, sec)
        _ = ctx.resources
        driver.preflight(ctx)  # untimed: the pipeline runs it before set_all_labels
        before = snapshot(paths)
        settle()
        t0 = time.perf_counter()
        driver.set_all_labels(ctx)
        t1 = time.perf_counter()
        after_set = snapshot(paths)
        settle()
        t1b = time.perf_counter()  # the snapshot is not part of the restore
        driver.restore_all_labels(ctx)
        t2 = time.perf_counter()
        after_restore = snapshot(paths)
        driver.release_label(ctx, sec)
        ctx.journal.remove()
    set_ops, restore_ops = diff(before, after_set), diff(after_set, after_restore)
    leftover = diff(after_restore, before)  # what vmconfine deliberately keeps (backing)
    settle()
    raw_set = raw(set_ops)
    settle()
    raw_restore = raw(restore_ops)
    raw(leftover)  # untimed: back to the original state for the next sample
    with scratch("p4-floor", base=state_base) as jdir:
        # each timed part is preceded by a snapshot, as vmconfine's are: changes to inodes
        # changed a moment before (the raw loop's, the set's) are cheaper on ext4
        snapshot(paths)
        settle()
        floor_set = floor(set_ops, jdir / "j", create=True)
        snapshot(paths)
        settle()
        floor_restore = floor(restore_ops, jdir / "j", create=False)
    raw(leftover)
    if snapshot(paths) != before:
        raise RuntimeError("the raw loop did not bring the files back to their first state")
    return {"set": t1 - t0, "restore": t2 - t1b, "raw_set": raw_set, "raw_restore": raw_restore,
            "floor_set": floor_set, "floor_restore": floor_restore,
            "calls": float(len(set_ops) + len(restore_ops)), "kept": float(len(leftover))}


# ---- the run ------------------------------------------------------------------------------------


def run(opts: Options) -> list[Table]:
    table = Table("P4: set + restore all labels vs the same changes made the minimal safe way",
                  ["driver: case (journal on)", "files", "vmconfine set / restore",
                   "safety floor set / restore", "raw loop set / restore", "vs raw", "ratio",
                   "us per file", "target"])
    if not is_root():
        table.unavailable("DAC, SELinux", "needs root (chown, trusted.* xattrs)")
        return [table]
    cases = [("chain", 50), ("chain", 200), ("disks", 64), ("disks", 256)]
    with scratch("p4") as d:
        drivers = [dac_driver()]
        if importlib.util.find_spec("vmconfine_selinux.driver") is None:
            table.unavailable("SELinux", "not available yet: plugins/selinux is not there")
        else:
            drivers.append(selinux_driver(d))
        domains = {c: (chain_domain(d, c[1]) if c[0] == "chain" else disks_domain(d, c[1]))
                   for c in cases}
        for drv in drivers:
            per_file: dict[tuple[str, int], float] = {}
            for kind, size in cases:
                xml, paths = domains[(kind, size)]
                bases = [("tmpfs", TMPFS_BASE)] + ([("ext4", SCRATCH_BASE)]
                                                    if size in (200, 256) else [])
                for fs, base in bases:
                    # untimed: what ran before (other benchmarks, the previous case) is written
                    # back now, not during this case's samples
                    os.sync()
                    keys = ("set", "restore", "raw_set", "raw_restore", "floor_set",
                            "floor_restore")
                    stats = {k: Stats() for k in keys}
                    info: dict[str, float] = {}
                    for i in range(opts.runs + 1):
                        s = one_sample(drv, base, xml, paths)
                        if i:
                            for k in keys:
                                stats[k].add(s[k])
                        info = s
                    ours = stats["set"].median + stats["restore"].median
                    raw_total = stats["raw_set"].median + stats["raw_restore"].median
                    theirs = stats["floor_set"].median + stats["floor_restore"].median
                    us = ours / len(paths) * 1e6
                    if fs == "tmpfs":
                        per_file[(kind, size)] = us
                    what = f"{size}-layer chain" if kind == "chain" else f"{size} disks"
                    table.add(f"{drv.name}: {what} ({fs})", str(len(paths)),
                              f"{stats['set'].fmt()} / {stats['restore'].fmt()}",
                              f"{stats['floor_set'].fmt()} / {stats['floor_restore'].fmt()}",
                              f"{stats['raw_set'].fmt()} / {stats['raw_restore'].fmt()}"
                              f" ({info['calls']:.0f} calls)",
                              ratio(ours, raw_total), ratio(ours, theirs), f"{us:.0f}",
                              verdict(ours <= TARGET * theirs, f"<= {TARGET:.0f}x floor"))
            for kind, small, big in (("chain", 50, 200), ("disks", 64, 256)):
                a, b = per_file[(kind, small)], per_file[(kind, big)]
                what = "layers" if kind == "chain" else "disks"
                table.add(f"{drv.name}: linearity, {what} {big} vs {small}", "-",
                          f"{b:.0f} vs {a:.0f} us per file", "-", "-", "-",
                          ratio(b, a) + " per file", "-",
                          verdict(b <= 1.5 * a, "linear (<= 1.5x per file)"))
    table.notes += [
        f"median of {opts.runs} samples (after one uncounted), each on a fresh instance and "
        "journal; raw 0-byte images on ext4; the file systems are synced (untimed) before "
        "each case; before each timed part (vmconfine's, the floor's, the raw loop's) the "
        "young garbage-collector generations are collected, untimed",
        "safety floor: per file fstatat + openat(O_NOFOLLOW) + fstat (+ fgetxattr of the file "
        "capabilities before a chown of a regular file) + the changes on the fd + "
        f"close, directories opened once, journal created + one write and fsync per {BATCH} "
        "files (a line per file: path, inode, owner, mode, capabilities; set and restore "
        "each); each timed part after a snapshot of the files, as vmconfine's; 'vs raw' = "
        "vmconfine / the raw loop (by path, no journal)",
        "DAC never gives backing layers back (libvirt's rule: other domains may share them): "
        "those chowns are in 'raw set' but have no restore",
        "each driver's preflight (the DAC driver: QEMU's ids and groups) runs untimed before "
        "the set, as in the start pipeline",
        "SELinux: the fake backend keeps contexts in user.vmconfine.selinux; remembered "
        "originals in trusted.vmconfine.security.*",
    ]
    return [table]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, "P4 relabel", run, argv, full_runs=15, quick_runs=1)


if __name__ == "__main__":
    sys.exit(main())
