"""Chown the domain's resources to QEMU's ids, and give them back: libvirt's DAC rules.

:func:`plan` maps :class:`vmconfine.plugin.resources.Resource` roles to owners and flags:

======================  =======  ========  ===============================================
role                    chown    restore   remember (xattr refcount)
======================  =======  ========  ===============================================
disk (top image)        yes      unless readonly or shareable (then never restored)
backing                 yes      never     never
kernel, initrd, dtb     yes      yes       yes
nvram                   yes      yes       yes
chardev (pipe, dev,     yes      yes       yes
connecting unix)
hostdev                 yes      yes       yes; /dev/vfio/N no (restored from the journal);
                                           /dev/vfio/vfio is world-accessible: untouched
runtime_dir             yes      yes       (directories cannot be remembered)
loader, devnode, other  no       —         —
passed as fd            no       —         — (bind sockets, file chardevs, chardev logs,
                                           the VNC socket: vmconfine opens them and QEMU
                                           only gets the descriptor; they stay root's)
======================  =======  ========  ===============================================

A chown makes the kernel drop the file's capabilities (``security.capability``) and set-id
bits: the capabilities are remembered with the owner (journal and xattr record) and both are
given back with it, unless the inode changed after the chown (its ctime, noted right after,
differs: QEMU wrote to it, and a write drops them too).

With a per-domain uid (qemu.conf ``user_range``, :mod:`vmconfine_dac.idrange`), the images
several domains may use at once — backing layers, ``<readonly/>`` and ``<shareable/>`` disks,
kernel, initrd, dtb — are not given to one domain's uid: when QEMU cannot already read them
(write: ``<shareable/>``), they keep their owner and get ``shared_group`` with group read
(read-write for ``<shareable/>``), never restored (as libvirt never restores such images);
world access is never added. Everything else is the domain's own uid:gid, as above.

``relabel='no'`` on the domain's DAC seclabel or on a device source skips it; a device
``<seclabel model='dac'><label>`` sets the owner (backing layers inherit the top image's).
Images get the domain's ``imagelabel``; chardevs, hostdevs and the runtime dir the process
label (libvirt's GetImageIds / GetIds).

:func:`apply` journals every change before making it (``dac``/``chown`` records) and
:func:`restore` undoes them from the journal alone, in reverse order, idempotently.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import resource
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from vmconfine.domain.devices import find_device_seclabel
from vmconfine.errors import LabelError, VmconfineError
from vmconfine.launch.journal import rows_to_records
from vmconfine_dac import owners
from vmconfine_dac.fsops import (
    DirCache,
    FileHandle,
    R,
    Resolved,
    SwappedError,
    W,
    can_access,
)
from vmconfine_dac.identity import Identity, format_label, parse_label

if TYPE_CHECKING:
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

DRIVER = "dac"
IMAGE_ROLES = frozenset({"disk", "backing", "kernel", "initrd", "dtb", "nvram"})
#: with a per-domain uid: images other domains may use too (plus readonly/shareable disks)
SHARED_ROLES = frozenset({"backing", "kernel", "initrd", "dtb"})
#: "keep the owner" in a plan (fchown's -1)
KEEP = -1
SKIPPED_ROLES = frozenset({"loader", "devnode", "graphics"})
#: chown errors that mean "this file system will not let root change owners" (NFS root squash,
#: read-only mounts, file systems without owners)
SOFT_CHOWN_ERRNOS = frozenset({errno.EPERM, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP,
                               errno.EINVAL})
#: the VFIO container node is 0666 and shared by every VM: never chowned
VFIO_CONTAINER = "/dev/vfio/vfio"
#: the roles whose paths are chowned (others are skipped, or passed as fds)
CHOWNED_ROLES = IMAGE_ROLES | {"chardev", "hostdev", "runtime_dir"}


class Plan(NamedTuple):
    """One ownership change to make (a tuple: cheap to make for every layer of a chain)."""

    path: str
    role: str
    device: str
    uid: int
    gid: int
    restore: bool
    remember: bool
    access: int
    create: bool = False  #: QEMU may create it (a missing path is not an error)
    #: group bits to add (a shared image with a per-domain uid: the file keeps its owner,
    #: ``uid`` is -1, and nothing changes when QEMU can already use it)
    mode_add: int = 0


def device_tag(res: Resource) -> str:
    """Which device a resource belongs to (per-device restore selects on it)."""
    if res.disk is not None:
        return f"disk:{res.disk.target}"
    return f"{res.role}:{res.path}"


def _dac_label(res: Resource) -> Any:
    """The resource's DAC device seclabel; backing layers fall back to the top image's."""
    found = find_device_seclabel(res.seclabels, DRIVER) if res.seclabels else None
    if found is None and res.role == "backing" and res.disk is not None:
        top = res.disk.source  # the chain's first layer (not chain(): O(layers) per layer)
        if top is not None and top.seclabels:
            found = find_device_seclabel(top.seclabels, DRIVER)
    return found


def plan(ctx: DomainContext, resources: Iterable[Resource], ident: Identity) -> list[Plan]:
    """The chowns ``set_all_labels`` will make for ``resources`` (empty when relabelling is
    off: dynamic_ownership = 0 or the domain's DAC seclabel has relabel='no')."""
    if not ctx.config.driver_settings(DRIVER).dynamic_ownership:
        return []
    sec = ctx.seclabel(DRIVER)
    if sec is not None and not sec.relabel:
        return []
    image_ids = (ident.uid, ident.gid)
    if sec is not None and sec.imagelabel:
        image_ids = parse_label(sec.imagelabel)
    out: list[Plan] = []
    for res in resources:
        p = _plan_one(res, ident, image_ids)
        if p is not None:
            out.append(p)
    return out


def _plan_one(res: Resource, ident: Identity, image_ids: tuple[int, int]) -> Plan | None:
    role = res.role
    if role in SKIPPED_ROLES or not res.path:
        return None
    if res.passed:
        return None  # vmconfine opens it and passes the fd: QEMU never opens the path
    if role not in CHOWNED_ROLES:
        log.debug("dac: resource role %s (%s) is not relabelled", role, res.path)
        return None
    if role == "hostdev" and res.path == VFIO_CONTAINER:
        return None
    dev = _dac_label(res)
    if dev is not None and not dev.relabel:
        log.debug("dac: %s has relabel='no'", res.path)
        return None
    if dev is not None and dev.label:
        uid, gid = parse_label(dev.label)
    elif ident.shared_gid is not None and (role in SHARED_ROLES or (
            role == "disk" and (res.readonly or res.shared))):
        shared_rw = role == "disk" and res.shared and res.access == "rw"
        return Plan(res.path, role, device_tag(res), KEEP, ident.shared_gid, False, False,
                    R | W if shared_rw else R, mode_add=0o060 if shared_rw else 0o040)
    elif role in IMAGE_ROLES:
        uid, gid = image_ids
    else:
        uid, gid = ident.uid, ident.gid
    if role == "disk":
        restore = remember = not (res.readonly or res.shared)
    elif role == "backing":
        restore = remember = False
    elif role == "hostdev" and res.path.startswith("/dev/vfio/"):
        restore, remember = True, False
    else:
        restore = remember = True
    access = R | W if res.access == "rw" else R
    return Plan(res.path, role, device_tag(res), uid, gid, restore, remember, access,
                res.create)


# ------------------------------------------------------------------------------------------------
# set
# ------------------------------------------------------------------------------------------------


def apply(ctx: DomainContext, plans: list[Plan], ident: Identity) -> list[str]:
    """Make every planned change, journaling each first; return the paths changed.

    Files go in batches of up to :data:`BATCH` (a batch also ends before a file it already
    holds): every file of the batch is resolved and opened (directories once, through a
    :class:`DirCache`), the metadata locks are taken in inode order, owners and remembered
    records are read under them, the batch's records are written with ONE fsync, and only then
    are the changes made. When this returns, every record it wrote is durable.
    """
    config = ctx.config
    prefix = config.remember_owner_xattr_prefix
    names = owners.Names.for_prefix(prefix)
    remember_on = bool(config.remember_owner)
    journal = ctx.journal
    changed: list[str] = []
    batch: list[_Item] = []
    inodes: set[tuple[int, int]] = set()
    with DirCache() as dirs:
        try:
            for p in plans:
                if len(batch) >= BATCH:
                    _run_batch(journal, batch, ident, names, prefix)
                    _close(batch, changed)
                    inodes.clear()
                want = remember_on and p.remember
                try:
                    res, handle = dirs.open(p.path, want)  # not locked yet
                except OSError as exc:
                    _open_failed(p, exc)  # raises, unless QEMU creates the file itself
                    continue
                key = (res.dev, res.ino)
                if key in inodes:
                    # the batch holds this file already: it goes first; this handle's check
                    # stat predates that batch's change, so the file is read again
                    try:
                        _run_batch(journal, batch, ident, names, prefix)
                        _close(batch, changed)
                    except BaseException:
                        handle.close()
                        raise
                    inodes.clear()
                    handle.opened_stat = None
                batch.append(_Item(p, res, handle, want))
                inodes.add(key)
            _run_batch(journal, batch, ident, names, prefix)
        except BaseException:
            _close(batch)
            with contextlib.suppress(OSError):
                journal.sync()
            raise
        _close(batch, changed)
    journal.sync()
    return changed


def _batch_size() -> int:
    """Files per batch: their records share one write + fsync (group commit) and their
    handles (one fd each, two for devices and sockets) are open together, so the size follows
    the fd limit: 128 for the usual 1024, never more than 256 or fewer than 16."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(16, min(256, soft // 8))


BATCH = _batch_size()


@dataclass(slots=True)
class _Item:
    """One file of a batch: its plan, resolved path and handle, and what was read from it."""

    plan: Plan
    res: Resolved
    handle: FileHandle
    want_remember: bool
    rid: str = ""
    st: os.stat_result | None = None
    seen: owners.Record | None = None  #: the remembered-owner record, read under the lock
    remember: bool = False
    fcaps: bytes | None = None  #: the file's capabilities, which the chown clears
    skip: bool = False  #: a shared image QEMU can use as it is: no record, no change


def _close(batch: list[_Item], changed: list[str] | None = None) -> None:
    """Close the batch's handles (and add its paths to ``changed``); empty it."""
    try:
        if changed is not None:
            changed.extend([it.res.resolved for it in batch])
        for it in batch:
            it.handle.close()
    except BaseException:
        for it in batch:
            with contextlib.suppress(OSError):
                it.handle.close()  # idempotent: the ones the error left open
        raise
    finally:
        batch.clear()


def _open_failed(p: Plan, exc: OSError) -> None:
    """Resolving or opening the plan's file raised ``exc``: a clear error, except for a
    missing file QEMU creates itself (then nothing to do: returns)."""
    if isinstance(exc, FileNotFoundError):
        if p.create:
            log.debug("dac: %s does not exist yet; QEMU creates it", p.path)
            return
        raise LabelError(f"cannot give {p.path} to QEMU: no such file or directory; fix "
                         "the path in the domain XML") from None
    raise LabelError(f"cannot resolve or open {p.path}: {exc.strerror}") from None


class _RecordIds:
    """Journal record ids: a random 64-bit prefix per process plus a counter (unique within a
    journal, across processes and restarts, like one ``urandom`` per record was, without a
    system call per file). A forked child draws a new prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix, self.count = os.urandom(8).hex(), itertools.count()

    def many(self, n: int) -> list[str]:
        """``n`` new ids (a batch's)."""
        prefix, count = self.prefix, self.count
        return [f"{prefix}{next(count):x}" for _ in range(n)]


_record_id = _RecordIds()

def orig_path(rec: dict[str, Any]) -> str:
    """A ``chown`` record's path as the domain XML names it (``orig``; null: the resolved
    ``path`` itself)."""
    return rec.get("orig") or rec["path"]  # type: ignore[no-any-return]


#: the fields of a ``chown`` record that differ from file to file, in the order of
#: :func:`_run_batch`'s rows; the others (:data:`CHOWN_SAME`) are the plan's, shared by a run of
#: files (a backing chain: all its layers) and written once per group line
CHOWN_FIELDS = ("id", "path", "orig", "dev", "ino", "uid", "gid", "mode", "fcaps")
CHOWN_SAME = ("role", "device", "new_uid", "new_gid", "remember", "restore", "prefix",
              "ref_before", "mode_add")


def _run_batch(journal: Journal, batch: list[_Item], ident: Identity, names: owners.Names,
               prefix: str) -> None:
    """Lock, read, journal (one fsync), then change every file of ``batch``."""
    if not batch:
        return
    # a fixed order: two vmconfine processes labelling the same files never wait in a cycle
    for it in sorted((it for it in batch if it.want_remember),
                     key=lambda it: (it.res.dev, it.res.ino)):
        it.handle.lock()
    groups: list[tuple[dict[str, Any], list[list[Any]]]] = []
    rows: list[list[Any]] = []
    shape: tuple[Any, ...] = ()
    new_id = iter(_record_id.many(len(batch))).__next__  # one per file (a skipped one's unused)
    for it in batch:
        h, p, res = it.handle, it.plan, it.res
        # a file that is locked is read again under its lock; else the stat of its check will do
        st = it.st = h.stat() if it.want_remember or h.opened_stat is None else h.opened_stat
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode
        if p.uid == KEEP:
            if can_access(st, ident.uid, ident.gid, ident.groups, p.access):
                it.skip = True  # a shared image QEMU can already use: left as it is
                continue
            it.plan = p = p._replace(uid=uid)
        # the names first: a file without a record (the usual case) costs no failing getxattr
        listed = owners.list_names(h) if it.want_remember and h.locked else None
        seen = it.seen = owners.peek(h, names, listed) if listed is not None else None
        # no record read (not wanted, no lock, no xattrs here): the journal alone keeps the owner
        remember = it.remember = seen is not None
        fcaps = None
        if (uid != p.uid or gid != p.gid) and stat.S_ISREG(mode):
            fcaps = it.fcaps = owners.file_caps(h, listed)
        same = (p.role, p.device, p.uid, p.gid, remember, p.restore,
                prefix if remember else None, seen.ref if seen is not None else None,
                p.mode_add or None)
        if same != shape:
            shape, rows = same, []
            groups.append((dict(zip(CHOWN_SAME, same, strict=True)), rows))
        rid = it.rid = new_id()
        # ``orig``: the path as the XML names it, null when it is the resolved one (the usual
        # case: a chain's layers are named by their real paths)
        rows.append([rid, res.resolved, res.path if res.path != res.resolved else None,
                     res.dev, res.ino, uid, gid, mode & 0o7777, fcaps.hex() if fcaps else None])
    journal.record_groups(DRIVER, "chown", CHOWN_FIELDS, groups)
    done = 0
    info = log.isEnabledFor(logging.INFO)
    try:
        # each file's record is durable: remember its owner (when wanted), then chown it (the
        # common case — a layer of a chain, a file whose owner is not remembered — without a
        # call of its own)
        for it in batch:
            if not it.skip:
                if it.remember:
                    _remember(journal, it, names)
                st, p = it.st, it.plan
                assert st is not None
                if p.mode_add:
                    _add_group_access(it.handle, it.res, st, p)
                elif st.st_uid != p.uid or st.st_gid != p.gid:
                    if info:
                        log.info("dac: setting owner of %s to %s", it.res.resolved,
                                 format_label(p.uid, p.gid))
                    try:
                        it.handle.chown(p.uid, p.gid)
                    except OSError as exc:
                        _chown_failed(journal, it.rid, it.res, st, p, ident, exc)
                    else:
                        if it.fcaps or st.st_mode & 0o6000:
                            _note_labelled(journal, it)
            done += 1
    except BaseException:
        # the files after the failing one were journaled but not touched: say so, so that the
        # rollback leaves them (and their remembered counts) alone
        rest = [it for it in batch[done + 1:] if not it.skip]
        with contextlib.suppress(OSError):
            journal.note_rows(DRIVER, "restored", ("id",), [[it.rid] for it in rest],
                              same={"how": "not-made"})
        raise


def _remember(journal: Journal, it: _Item, names: owners.Names) -> None:
    """Count this domain as a user of the file (its record is durable) and note it; refuse a
    file another running domain uses with another owner."""
    h, p, res, st = it.handle, it.plan, it.res, it.st
    assert st is not None
    ref = owners.remember(h, names, st.st_uid, st.st_gid, it.seen, it.fcaps)
    journal.note(DRIVER, "remembered", id=it.rid, ref=ref)
    if ref is not None and ref > 1 and (st.st_uid, st.st_gid) != (p.uid, p.gid):
        journal.record(DRIVER, "restore", id=it.rid, ref=ref, label=None)
        owners.recall(h, names)  # give our count back; the owner stays the other's
        journal.record(DRIVER, "restored", id=it.rid, how="refused")
        raise LabelError(
            f"Setting different DAC user or group on {res.resolved} which is already in "
            f"use (owned by {format_label(st.st_uid, st.st_gid)} for another running "
            f"domain, this one asks for {format_label(p.uid, p.gid)}); give both domains "
            "the same owner or stop the other one"
        )


def _note_labelled(journal: Journal, it: _Item) -> None:
    """The chown cleared privileges of the file (capabilities, set-id bits) that restore gives
    back only if nothing changed the inode after this moment (a write by QEMU clears them too,
    and must not get them back): note its ctime now."""
    journal.note(DRIVER, "labelled", id=it.rid, ctime=it.handle.stat().st_ctime_ns)


def _add_group_access(h: FileHandle, res: Resolved, st: os.stat_result, p: Plan) -> None:
    """A shared image: its owner stays, its group becomes the shared group with the bits of
    ``p.mode_add`` (never world access). Kept after the domain stops, like libvirt's
    readonly/shared/backing images."""
    log.info("dac: giving %s to the shared group %d (g+%s)", res.resolved, p.gid,
             "rw" if p.mode_add & 0o020 else "r")
    try:
        if st.st_gid != p.gid:
            h.chown(-1, p.gid)
        mode = stat.S_IMODE(h.stat().st_mode)
        if mode & p.mode_add != p.mode_add:
            h.chmod(mode | p.mode_add)
    except OSError as exc:
        raise LabelError(f"cannot give {res.resolved} to the shared group +{p.gid} (group "
                         f"{'read-write' if p.mode_add & 0o020 else 'read'}): "
                         f"{exc.strerror}; make it readable by that group yourself") from None


def _chown_failed(journal: Journal, rid: str, res: Resolved, st: os.stat_result, p: Plan,
                  ident: Identity, exc: OSError) -> None:
    """NFS-style refusals are fine when QEMU can use the file as it is; else fail clearly."""
    want = "read and write" if p.access & W else "read"
    target = format_label(p.uid, p.gid)
    if exc.errno in SOFT_CHOWN_ERRNOS:
        if can_access(st, ident.uid, ident.gid, ident.groups, p.access):
            log.warning("dac: cannot set owner of %s to %s (%s); QEMU's user %s can already "
                        "%s it, continuing", res.resolved, target, exc.strerror,
                        ident.label, want)
            journal.record(DRIVER, "chown_skipped", id=rid, errno=exc.errno)
            return
        raise LabelError(
            f"cannot set owner of {res.resolved} to {target} ({exc.strerror}, e.g. NFS root "
            f"squash or a read-only mount) and QEMU's user {ident.label} cannot {want} it as "
            f"it is (owner +{st.st_uid}:+{st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}); "
            f"fix: make it {want}able by {ident.label} on the file server"
        ) from None
    raise LabelError(f"unable to set user and group to '{target}' on '{res.resolved}': "
                     f"{exc.strerror}") from None


# ------------------------------------------------------------------------------------------------
# restore (journal-driven)
# ------------------------------------------------------------------------------------------------


_Groups = list[tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]]
#: ``restored`` markers to write: outcome ("kept", "xattr", ...) → one ``[id]`` row per record
_Markers = dict[str, list[list[str]]]


def restore(journal: Journal, select: Callable[[dict[str, Any]], bool] | None = None,
            ) -> list[str]:
    """Undo the journaled chowns (those ``select`` accepts), newest first. Idempotent: each
    undone record gets a ``restored`` record. Returns the problems (all records are tried).

    Batched like :func:`apply`: the ``restore`` records that must precede the remembered-count
    decrements of a batch are written with one fsync; the ``restored`` markers of a batch are
    written together after its changes (durable when this returns).
    """
    by_op = journal.groups_by_op(DRIVER, ("chown", "remembered", "labelled", "restore",
                                          "restored"))
    done = _ids(by_op["restored"])
    remembered = {r["id"]: r for r in _records(by_op["remembered"])}
    intents = {r["id"]: r for r in _records(by_op["restore"])}
    labelled = {r["id"]: r["ctime"] for r in _records(by_op["labelled"])}
    todo: dict[str, dict[str, Any]] = {}
    kept: dict[str, None] = {}  # ids of chowns that are never undone (in order, once each)
    for same, keys, rows in by_op["chown"]:
        if select is None and same.get("restore") is False and keys[:1] == ("id",):
            # a whole group never undone (the layers of a backing chain): no record dicts
            kept.update(dict.fromkeys([row[0] for row in rows if row[0] not in done]))
            continue
        for r in rows_to_records(same, keys, rows):
            # one entry per id, even if a record was read back twice
            if r["id"] not in done and (select is None or select(r)):
                if r["restore"]:
                    todo.setdefault(r["id"], r)
                else:
                    kept[r["id"]] = None
    problems: list[str] = []
    # shared, readonly and backing images (other domains may still use them): marked with the
    # first batch's markers
    markers: _Markers = {"kept": [[rid] for rid in kept]} if kept else {}
    batch: list[dict[str, Any]] = []
    inodes: set[tuple[Any, Any]] = set()
    with DirCache() as dirs:
        for rec in reversed(list(todo.values())):
            key = (rec.get("dev"), rec.get("ino"))
            if len(batch) >= BATCH or key in inodes:
                _restore_batch(journal, dirs, batch, remembered, intents, labelled, problems,
                               markers)
                batch, inodes, markers = [], set(), {}
            batch.append(rec)
            inodes.add(key)
        _restore_batch(journal, dirs, batch, remembered, intents, labelled, problems, markers)
    journal.sync()
    return problems


def _records(groups: _Groups) -> list[dict[str, Any]]:
    """The records of ``groups`` (as :meth:`Journal.groups` returns them)."""
    return [rec for same, keys, rows in groups for rec in rows_to_records(same, keys, rows)]


def _ids(groups: _Groups) -> set[str]:
    """The ``id`` of every record of ``groups``, without a record dict per row."""
    out: set[str] = set()
    for same, keys, rows in groups:
        if "id" in keys:
            i = keys.index("id")
            out.update(row[i] for row in rows)
        elif "id" in same:
            out.add(same["id"])
    return out


@dataclass(slots=True)
class _Undo:
    """One file of a restore batch: its chown record, handle and what to do with it."""

    rec: dict[str, Any]
    handle: FileHandle
    #: after deciding: "in-use", an owner from the xattrs, None (the journal's), or
    #: ``owners.Record`` (recall it: count down, under a durable ``restore`` record)
    found: Any = None
    failed: bool = False
    #: the inode's ctime noted right after the chown (``labelled``), if any
    labelled: int | None = None


def _restore_batch(journal: Journal, dirs: DirCache, batch: list[dict[str, Any]],
                   remembered: dict[str, dict[str, Any]], intents: dict[str, dict[str, Any]],
                   labelled: dict[str, int], problems: list[str],
                   markers: _Markers) -> None:
    """Undo ``batch``; its ``restored`` markers are added to ``markers`` (which may hold
    others already) and all written together at the end (the journal keeps the list)."""
    if not batch and not markers:
        return
    items: list[_Undo] = []

    def mark(rid: str, how: str) -> None:
        found = markers.get(how)
        if found is None:
            markers[how] = [[rid]]
        else:
            found.append([rid])

    def failed(it: _Undo, exc: Exception) -> None:
        it.failed = True
        if isinstance(exc, VmconfineError):
            problems.append(exc.message)
        else:
            problems.append(f"restoring the owner of {it.rec['path']} failed: {exc}")

    try:
        for rec in batch:
            h = _open_for_restore(rec, dirs, mark, problems)
            if h is not None:
                items.append(_Undo(rec, h, labelled=labelled.get(rec["id"])))
        for it in sorted(items, key=lambda it: (it.rec["dev"], it.rec["ino"])):
            try:
                it.handle.lock()
            except VmconfineError as exc:
                failed(it, exc)
        for it in items:
            if not it.failed and it.rec["remember"]:
                rid = it.rec["id"]
                try:
                    it.found = _decide(it.handle, it.rec, remembered.get(rid), intents.get(rid))
                except (VmconfineError, OSError) as exc:
                    failed(it, exc)
        journal.record_rows(DRIVER, "restore", ("id", "ref", "label"),
                            [[it.rec["id"], it.found.ref, it.found.label] for it in items
                             if not it.failed and isinstance(it.found, owners.Record)])
        for it in items:
            if not it.failed:
                try:
                    mark(it.rec["id"], _undo(it))
                except (VmconfineError, OSError) as exc:
                    failed(it, exc)
    finally:
        for it in items:
            it.handle.close()
        # one group line per outcome ("kept", "xattr", "journal", ...), all in one write
        journal.note_groups(DRIVER, "restored", ("id",),
                            [({"how": how}, rows) for how, rows in markers.items()])


def _open_for_restore(rec: dict[str, Any], dirs: DirCache, mark: Callable[[str, str], None],
                      problems: list[str]) -> FileHandle | None:
    """The handle of a record's file (None: nothing to do, marked, or a problem noted)."""
    res = Resolved(orig_path(rec), rec["path"], rec["dev"], rec["ino"])
    try:
        return FileHandle.open(res, want_lock=bool(rec["remember"]), dirs=dirs, lock=False)
    except FileNotFoundError:
        mark(rec["id"], "gone")
    except (SwappedError, NotADirectoryError) as exc:
        log.warning("dac: not restoring the owner of %s: %s", rec["path"], exc)
        mark(rec["id"], "replaced")
    except VmconfineError as exc:
        problems.append(exc.message)
    except OSError as exc:
        problems.append(f"restoring the owner of {rec['path']} failed: {exc}")
    return None


def _decide(h: FileHandle, rec: dict[str, Any], remembered: dict[str, Any] | None,
            intent: dict[str, Any] | None) -> Any:
    """How to count this domain's use of the file down: "in-use", an owner, None (use the
    journal's), or the current ``owners.Record`` to recall."""
    names = owners.Names.for_prefix(rec["prefix"])
    if intent is not None:
        # an earlier restore recorded its intent and stopped: did its decrement happen?
        now = owners.peek_ref(h, names)
        before = int(intent.get("ref") or 0)
        if now is not None and before > 0 and now == before - 1:
            if now > 0:
                return "in-use"
            return owners.parse_record(intent["label"]) if intent.get("label") else None
    if remembered is not None:
        counted = remembered.get("ref") is not None
    else:  # stopped between the chown record and the remembered marker
        now = owners.peek_ref(h, names)
        counted = (now is not None and rec.get("ref_before") is not None
                   and now == rec["ref_before"] + 1)
    if not counted:
        return None
    return owners.read(h, names)


def _undo(it: _Undo) -> str:
    """Give one file back (its ``restore`` record, if any, is durable); return the how."""
    h, rec = it.handle, it.rec
    # was the inode changed since the chown (a write, utimes, chmod)? read before the recall
    untouched = it.labelled is not None and h.stat().st_ctime_ns == it.labelled
    target: tuple[int, int] = (rec["uid"], rec["gid"])
    fcaps = bytes.fromhex(rec["fcaps"]) if rec.get("fcaps") else None
    how = "journal"
    if rec["remember"]:
        found = it.found
        if isinstance(found, owners.Record):
            result = owners.recall(h, owners.Names.for_prefix(rec["prefix"]), seen=found)
            found = "in-use" if result.in_use else (
                (*result.owner, result.fcaps) if result.owner else None)
        if found == "in-use":
            return "in-use"
        if isinstance(found, tuple):
            (*owner, fcaps), how = found, "xattr"
            target = (owner[0], owner[1])
    _give_back(h, rec, target, fcaps if untouched else None, untouched)
    if fcaps and not untouched:
        log.warning("dac: not giving the file capabilities back to %s: it changed while the "
                    "domain ran (a write clears them, as the kernel does)", rec["path"])
    return how


def _give_back(h: FileHandle, rec: dict[str, Any], target: tuple[int, int],
               fcaps: bytes | None = None, untouched: bool = False) -> None:
    """Restore the owner, then what the chown cleared (file capabilities, set-id bits) when
    the inode was not changed since (``untouched``)."""
    st = h.stat()
    now = (st.st_uid, st.st_gid)
    ours = (rec["new_uid"], rec["new_gid"])
    if now != target:
        if now != ours:
            log.warning("dac: owner of %s changed to %s while the domain ran; leaving it "
                        "(it was %s before)", rec["path"], format_label(*now),
                        format_label(*target))
            return
        log.info("dac: restoring owner of %s to %s", rec["path"], format_label(*target))
        try:
            h.chown(*target)
        except OSError as exc:
            if exc.errno in SOFT_CHOWN_ERRNOS:
                log.warning("dac: cannot restore owner of %s to %s: %s", rec["path"],
                            format_label(*target), exc.strerror)
                return
            raise LabelError(f"cannot restore owner of {rec['path']} to "
                             f"{format_label(*target)}: {exc.strerror}") from None
        st = h.stat()
    mode = rec.get("mode")
    if mode is None or (st.st_uid, st.st_gid) != (rec["uid"], rec["gid"]):
        return
    if fcaps and owners.file_caps(h) != fcaps:
        log.info("dac: restoring the file capabilities of %s", rec["path"])
        try:
            h.setxattr(owners.FCAPS, fcaps)
        except OSError as exc:
            raise LabelError(f"cannot restore the file capabilities of {rec['path']}: "
                             f"{exc.strerror}") from None
    cur = stat.S_IMODE(st.st_mode)
    # chown cleared set-id bits: put them back, and nothing else
    if untouched and cur != mode and (cur ^ mode) & ~0o6000 == 0:
        h.chmod(mode)
