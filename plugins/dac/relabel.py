"""Chown the domain's resources to QEMU's ids, and give them back: libvirt's DAC rules.

:func:`plan` maps :class:`vmconfine.resources.Resource` roles to owners and flags:

======================  =======  ========  ===============================================
role                    chown    restore   remember (xattr refcount)
======================  =======  ========  ===============================================
disk (top image)        yes      unless readonly or shareable (then never restored)
backing                 yes      never     never
kernel, initrd, dtb     yes      yes       yes
nvram                   yes      yes       yes
chardev (file, pipe,    yes      yes       yes (a missing file/bind socket is left for
unix, dev)                                 QEMU to create)
hostdev                 yes      yes       yes; /dev/vfio/N no (restored from the journal);
                                           /dev/vfio/vfio is world-accessible: untouched
runtime_dir             yes      yes       (directories cannot be remembered)
loader, devnode, other  no       —         —
======================  =======  ========  ===============================================

``relabel='no'`` on the domain's DAC seclabel or on a device source skips it; a device
``<seclabel model='dac'><label>`` sets the owner (backing layers inherit the top image's).
Images get the domain's ``imagelabel``; chardevs, hostdevs and the runtime dir the process
label (libvirt's GetImageIds / GetIds).

:func:`apply` journals every change before making it (``dac``/``chown`` records) and
:func:`restore` undoes them from the journal alone, in reverse order, idempotently.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmconfine.domain_devices import find_device_seclabel
from vmconfine.errors import LabelError, VmconfineError
from vmconfine_dac import owners
from vmconfine_dac.fsops import FileHandle, R, Resolved, SwappedError, W, can_access, resolve
from vmconfine_dac.identity import Identity, format_label, parse_label

if TYPE_CHECKING:
    from vmconfine.context import DomainContext
    from vmconfine.journal import Journal
    from vmconfine.resources import Resource

log = logging.getLogger(__name__)

DRIVER = "dac"
IMAGE_ROLES = frozenset({"disk", "backing", "kernel", "initrd", "dtb", "nvram"})
SKIPPED_ROLES = frozenset({"loader", "devnode", "graphics"})
#: chown errors that mean "this file system will not let root change owners" (NFS root squash,
#: read-only mounts, file systems without owners)
SOFT_CHOWN_ERRNOS = frozenset({errno.EPERM, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP,
                               errno.EINVAL})
#: the VFIO container node is 0666 and shared by every VM: never chowned
VFIO_CONTAINER = "/dev/vfio/vfio"


@dataclass(frozen=True)
class Plan:
    """One ownership change to make."""

    path: str
    role: str
    device: str
    uid: int
    gid: int
    restore: bool
    remember: bool
    access: int
    create: bool = False  #: QEMU may create it (a missing path is not an error)
    make: bool = False  #: vmconfine creates it when missing (file chardevs, as libvirt)


def device_tag(res: Resource) -> str:
    """Which device a resource belongs to (per-device restore selects on it)."""
    if res.disk is not None:
        return f"disk:{res.disk.target}"
    return f"{res.role}:{res.path}"


def _dac_label(res: Resource) -> Any:
    """The resource's DAC device seclabel; backing layers fall back to the top image's."""
    found = find_device_seclabel(list(res.seclabels), DRIVER)
    if found is None and res.role == "backing" and res.disk is not None:
        top = res.disk.source  # the chain's first layer (not chain(): O(layers) per layer)
        if top is not None:
            found = find_device_seclabel(list(top.seclabels), DRIVER)
    return found


def plan(ctx: DomainContext, resources: Iterable[Resource], ident: Identity) -> list[Plan]:
    """The chowns ``set_all_labels`` will make for ``resources`` (empty when relabelling is
    off: dynamic_ownership = 0 or the domain's DAC seclabel has relabel='no')."""
    config = ctx.config
    if not config.dynamic_ownership:
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
    if role not in IMAGE_ROLES | {"chardev", "hostdev", "runtime_dir"}:
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
    make = role == "chardev" and getattr(res.source, "type", None) == "file"
    return Plan(res.path, role, device_tag(res), uid, gid, restore, remember, access,
                res.create, make)


# ------------------------------------------------------------------------------------------------
# set
# ------------------------------------------------------------------------------------------------


def apply(ctx: DomainContext, plans: list[Plan], ident: Identity) -> list[str]:
    """Make every planned change, journaling each first; return the paths changed."""
    config = ctx.config
    prefix = config.remember_owner_xattr_prefix
    names = owners.Names.for_prefix(prefix)
    changed: list[str] = []
    for p in plans:
        if p.make:
            _make_file(ctx.journal, p.path)
        try:
            res = resolve(p.path)
        except FileNotFoundError:
            if p.create:
                log.debug("dac: %s does not exist yet; QEMU creates it", p.path)
                continue
            raise LabelError(f"cannot give {p.path} to QEMU: no such file or directory; fix "
                             "the path in the domain XML") from None
        except OSError as exc:
            raise LabelError(f"cannot resolve {p.path}: {exc.strerror}") from None
        want_remember = bool(config.remember_owner) and p.remember
        with FileHandle.open(res, want_lock=want_remember) as h:
            _apply_one(ctx.journal, h, res, p, ident, names, prefix,
                       want_remember and h.locked)
        changed.append(res.resolved)
    return changed


def _make_file(journal: Journal, path: str) -> None:
    """Create a missing file chardev as root, 0600, so it can be given to QEMU (libvirt's
    qemuPrepareChardevDevice); it stays after the domain stops (it holds the output)."""
    if os.path.lexists(path):
        return
    journal.record(DRIVER, "create", path=path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise LabelError(f"cannot create chardev file {path}: {exc.strerror}; create it or "
                         "fix its directory") from None
    os.close(fd)


def _apply_one(journal: Journal, h: FileHandle, res: Resolved, p: Plan, ident: Identity,
               names: owners.Names, prefix: str, remember: bool) -> None:
    st = h.stat()
    ref_before = owners.peek_ref(h, names) if remember else None
    if remember and ref_before is None:
        remember = False  # no xattrs here: the journal alone keeps the owner
    rid = uuid.uuid4().hex[:16]
    journal.record(
        DRIVER, "chown", id=rid, path=res.resolved, orig=res.path, role=p.role,
        device=p.device, dev=res.dev, ino=res.ino, uid=st.st_uid, gid=st.st_gid,
        mode=stat.S_IMODE(st.st_mode), new_uid=p.uid, new_gid=p.gid, remember=remember,
        restore=p.restore, prefix=prefix if remember else None, ref_before=ref_before,
    )
    if remember:
        ref = owners.remember(h, names, st.st_uid, st.st_gid)
        journal.record(DRIVER, "remembered", id=rid, ref=ref)
        if ref is not None and ref > 1 and (st.st_uid, st.st_gid) != (p.uid, p.gid):
            journal.record(DRIVER, "restore", id=rid, ref=ref, label=None)
            owners.recall(h, names)  # give our count back; the owner stays the other's
            journal.record(DRIVER, "restored", id=rid, how="refused")
            raise LabelError(
                f"Setting different DAC user or group on {res.resolved} which is already in "
                f"use (owned by {format_label(st.st_uid, st.st_gid)} for another running "
                f"domain, this one asks for {format_label(p.uid, p.gid)}); give both domains "
                "the same owner or stop the other one"
            )
    if (st.st_uid, st.st_gid) == (p.uid, p.gid):
        return
    log.info("dac: setting owner of %s to %s", res.resolved, format_label(p.uid, p.gid))
    try:
        h.chown(p.uid, p.gid)
    except OSError as exc:
        _chown_failed(journal, rid, res, st, p, ident, exc)


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


def restore(journal: Journal, select: Callable[[dict[str, Any]], bool] | None = None,
            ) -> list[str]:
    """Undo the journaled chowns (those ``select`` accepts), newest first. Idempotent: each
    undone record gets a ``restored`` record. Returns the problems (all records are tried)."""
    recs = journal.records(DRIVER)
    done = {r["id"] for r in recs if r["op"] == "restored"}
    remembered = {r["id"]: r for r in recs if r["op"] == "remembered"}
    intents = {r["id"]: r for r in recs if r["op"] == "restore"}
    todo: dict[str, dict[str, Any]] = {}
    for r in recs:  # one entry per id, even if a record was read back twice
        if r["op"] == "chown" and r["id"] not in done and (select is None or select(r)):
            todo.setdefault(r["id"], r)
    problems: list[str] = []
    for rec in reversed(list(todo.values())):
        try:
            _restore_one(journal, rec, remembered.get(rec["id"]), intents.get(rec["id"]))
        except VmconfineError as exc:
            problems.append(exc.message)
        except OSError as exc:
            problems.append(f"restoring the owner of {rec['path']} failed: {exc}")
    return problems


def _restore_one(journal: Journal, rec: dict[str, Any], remembered: dict[str, Any] | None,
                 intent: dict[str, Any] | None) -> None:
    rid = rec["id"]
    if not rec["restore"]:
        # shared, readonly and backing images: other domains may still use them (libvirt)
        journal.record(DRIVER, "restored", id=rid, how="kept")
        return
    res = Resolved(rec["orig"], rec["path"], rec["dev"], rec["ino"])
    try:
        h = FileHandle.open(res, want_lock=bool(rec["remember"]))
    except FileNotFoundError:
        journal.record(DRIVER, "restored", id=rid, how="gone")
        return
    except (SwappedError, NotADirectoryError) as exc:
        log.warning("dac: not restoring the owner of %s: %s", rec["path"], exc)
        journal.record(DRIVER, "restored", id=rid, how="replaced")
        return
    with h:
        target: tuple[int, int] = (rec["uid"], rec["gid"])
        how = "journal"
        if rec["remember"]:
            found = _recall(journal, h, rec, remembered, intent)
            if found == "in-use":
                journal.record(DRIVER, "restored", id=rid, how="in-use")
                return
            if isinstance(found, tuple):
                target, how = found, "xattr"
        _give_back(h, rec, target)
    journal.record(DRIVER, "restored", id=rid, how=how)


def _recall(journal: Journal, h: FileHandle, rec: dict[str, Any],
            remembered: dict[str, Any] | None, intent: dict[str, Any] | None,
            ) -> tuple[int, int] | str | None:
    """Count this domain's use of the file down; the owner to restore, "in-use", or None."""
    names = owners.Names.for_prefix(rec["prefix"])
    if intent is not None:
        # an earlier restore recorded its intent and stopped: did its decrement happen?
        now = owners.peek_ref(h, names)
        before = int(intent.get("ref") or 0)
        if now is not None and before > 0 and now == before - 1:
            if now > 0:
                return "in-use"
            return owners.parse_owner(intent["label"]) if intent.get("label") else None
    if remembered is not None:
        counted = remembered.get("ref") is not None
    else:  # stopped between the chown record and the remembered marker
        now = owners.peek_ref(h, names)
        counted = (now is not None and rec.get("ref_before") is not None
                   and now == rec["ref_before"] + 1)
    if not counted:
        return None
    current = owners.read(h, names)
    journal.record(DRIVER, "restore", id=rec["id"], ref=current.ref, label=current.label)
    result = owners.recall(h, names)
    if result.in_use:
        return "in-use"
    return result.owner


def _give_back(h: FileHandle, rec: dict[str, Any], target: tuple[int, int]) -> None:
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
    cur = stat.S_IMODE(st.st_mode)
    # chown cleared set-id bits: put them back, and nothing else
    if cur != mode and (cur ^ mode) & ~0o6000 == 0:
        h.chmod(mode)
