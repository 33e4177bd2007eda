"""DAC leaves no trace (modelled on libvirt's qemusecuritytest): for every corpus domain
(tests/data/argv/), with real files owned by many different uids, set_all_labels gives QEMU
every file it must open and restore_all_labels gives each back: owner, mode and xattrs exactly
as before, except what libvirt never restores (backing, readonly and shareable images: they
stay QEMU's, with mode and xattrs untouched)."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest

from tests.host.test_argv_qmp import CASES, Workspace, create_files, substitute
from tests.support import make_ctx
from tests.unit.test_dac_support import host_for, qemu_ids, scratch, snapshot
from vmconfine.domain.chain import resolve_chain
from vmconfine_dac.driver import DacDriver

pytestmark = pytest.mark.host

#: roles the DAC driver gives to QEMU (loader and device nodes are never chowned)
CHOWNED = {"disk", "backing", "kernel", "initrd", "dtb", "nvram", "chardev", "hostdev",
           "runtime_dir"}


def _watched(ctx: object, ws: Workspace) -> list[Path]:
    """Every file of the workspace plus every resource path outside it that exists."""
    paths = {p for p in ws.img.rglob("*")}
    for res in ctx.resources:  # type: ignore[attr-defined]
        if res.path and os.path.lexists(res.path) and res.role != "devnode":
            paths.add(Path(res.path))
    return sorted(paths)


def _never_restored(ctx: object) -> set[str]:
    out: set[str] = set()
    for disk in ctx.domain.disks:  # type: ignore[attr-defined]
        if disk.source is None or disk.type not in ("file", "block"):
            continue
        chain = [s.path for s in disk.chain() if s.path]
        keep = chain if (disk.readonly or disk.shareable) else chain[1:]
        out.update(os.path.realpath(p) for p in keep)
    return out


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES)
def test_leaves_no_trace(case: str) -> None:
    uid, gid = qemu_ids()
    with scratch() as root:
        ws = Workspace(root / "ws")
        os.chmod(ws.root, 0o755)
        os.chmod(ws.img, 0o755)
        try:
            text = substitute(case, ws)
            host = host_for(root)
            ctx = make_ctx(host, text)
            create_files(ctx.domain, ws)
            for disk in ctx.domain.disks:  # as the pipeline does before labelling
                if disk.source is not None and disk.type in ("file", "block"):
                    resolve_chain(disk.source)
            ctx.runtime_dir.mkdir(parents=True)
            owners = itertools.count(3001)
            for p in sorted(ws.img.rglob("*")):
                n = next(owners)
                os.chown(p, n, n + 500, follow_symlinks=False)
            watched = _watched(ctx, ws)
            before = snapshot(watched)

            drv = DacDriver(host)
            sec = ctx.domain.add_seclabel("dac", "dynamic", implicit=True)
            drv.gen_label(ctx, sec)
            drv.set_all_labels(ctx)
            for res in ctx.resources:
                if res.role not in CHOWNED or not os.path.exists(res.path):
                    continue
                if res.path == "/dev/vfio/vfio":
                    continue
                st = os.stat(res.path)
                assert (st.st_uid, st.st_gid) == (uid, gid), f"{case}: {res.role} {res.path}"
            for res in ctx.resources:
                if res.role in ("loader", "devnode") and os.path.exists(res.path):
                    assert snapshot([Path(res.path)]) == {
                        res.path: before.get(res.path, snapshot([Path(res.path)])[res.path])}

            drv.restore_all_labels(ctx)
            after = snapshot(watched)
            kept = _never_restored(ctx)
            for p in watched:
                key = str(p)
                if os.path.realpath(key) in kept:
                    assert after[key][:2] == (uid, gid), f"{case}: {key} (never restored)"
                    assert after[key][2:] == before[key][2:], f"{case}: {key}"
                else:
                    assert after[key] == before[key], f"{case}: {key} was not given back"
            chowns = {r["id"] for r in ctx.journal.records("dac", "chown")}
            restored = {r["id"] for r in ctx.journal.records("dac", "restored")}
            assert chowns == restored
            for p in watched:  # no remembered-owner record may be left anywhere
                if not stat.S_ISLNK(os.lstat(p).st_mode):
                    assert not [k for k in os.listxattr(p) if ".vmconfine." in k], p
        finally:
            ws.close()
