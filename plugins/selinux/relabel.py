"""Setting and restoring the context of one file, journaled and remembered.

Every change is recorded in the domain's journal BEFORE it is made (``driver="selinux"``):

* ``relabel``: ``n`` (sequence number), ``path`` and its ``resolved`` form, the ``label`` set,
  the ``previous`` context (None: the file had none), whether the original is ``remember``-ed
  in xattrs (and under which ``prefix``, with the refcount found before, ``ref_before``),
  whether to ``restore`` without a record, and the ``group`` (``disk:vda``...) for hot-unplug;
* ``remembered``: ``n`` and the new ``ref`` once the original is remembered (a note: durable
  with the next fsync);
* ``restore``: ``n``, the refcount ``ref`` and remembered ``label`` found just before a
  restore counts the file down (durable before the count-down);
* ``restored``: ``n`` of a relabel record that has been undone (or never made: ``how``).

Group commit, as the DAC driver: files go in batches of :data:`BATCH` (a batch also ends
before a file it already holds); a batch's ``relabel`` records are written with one ``fsync``
before any of its changes, and a restore batch's ``restore`` records with one ``fsync`` before
any count-down. After a crash, a ``relabel`` record without its ``remembered`` note counted
the file only if the refcount is now ``ref_before + 1`` (else nothing was changed: remember
comes before the relabel); a ``restore`` record without its ``restored`` marker counted down
only if the refcount is no longer its ``ref`` (then only its ``label`` is put back). So
:func:`restore_records` works from the records alone, a fresh process can finish a teardown
after a crash, and running it twice changes nothing the second time.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmconfine.errors import LabelError
from vmconfine_selinux import remember as rem
from vmconfine_selinux.backend import Backend
from vmconfine_selinux.labels import Plan

log = logging.getLogger(__name__)

DRIVER = "selinux"
#: labelling is not possible on this file system: libvirt treats it as a warning
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EROFS})
NFS_TYPES = frozenset({"nfs", "nfs4"})
#: files per group commit (the DAC driver's usual batch)
BATCH = 128


def fs_type(path: str) -> str | None:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    best, best_type = "", None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _sep, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, best_type = mnt, right.split()[0]
    return best_type


def _hint(path: str, code: int) -> str:
    if fs_type(path) in NFS_TYPES:
        return ("the image is on NFS: set the virt_use_nfs boolean (setsebool -P virt_use_nfs 1) "
                "or mount the export with a context= option")
    if code == errno.ENOENT:
        return "the file does not exist; fix the path in the domain XML"
    if code in (errno.EPERM, errno.EACCES):
        return ("vmconfine may not relabel it; run vmconfine as root in a domain allowed to "
                "relabel files (e.g. virtd_t), or add <seclabel model='selinux' relabel='no'/> "
                "to the source and label it yourself")
    if code == errno.EINVAL:
        return "the loaded policy does not know this context; check the labels in the domain XML"
    return "check the file and the loaded policy"


@dataclass
class Labeller:
    """Sets and restores file contexts for one driver instance."""

    backend: Backend
    privileged: bool

    # ---- set ---------------------------------------------------------------------------------
    def set_plans(self, journal: Any, plans: list[Plan], *, remember_on: bool,
                  prefix: str) -> None:
        """Label every ``plan.path`` with ``plan.label``: per batch, the records first (one
        fsync), then per file remember and set. Every record is durable when this returns."""
        names = rem.Names.for_prefix(prefix)
        batch: list[_Set] = []
        reals: set[str] = set()
        try:
            for plan in plans:
                real = self._resolve(plan)
                if len(batch) >= BATCH or real in reals:
                    self._set_batch(journal, batch, names, prefix)
                    batch, reals = [], set()
                batch.append(self._prepare(plan, real, remember_on, names))
                reals.add(real)
            self._set_batch(journal, batch, names, prefix)
        finally:
            journal.sync()

    def set_plan(self, journal: Any, plan: Plan, *, remember_on: bool, prefix: str) -> None:
        """Label one file (:meth:`set_plans` of one)."""
        self.set_plans(journal, [plan], remember_on=remember_on, prefix=prefix)

    @staticmethod
    def _resolve(plan: Plan) -> str:
        try:
            return os.path.realpath(plan.path, strict=True)
        except OSError as exc:
            raise LabelError(
                f"unable to set security context '{plan.label}' on '{plan.path}': "
                f"{exc.strerror}; {_hint(plan.path, exc.errno or 0)}"
            ) from None

    def _prepare(self, plan: Plan, real: str, remember_on: bool, names: rem.Names) -> _Set:
        """Read what the file has now (its context, its remembered refcount)."""
        unsupported = False
        try:
            current = self.backend.getfilecon(real)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise LabelError(f"cannot read the security context of '{real}': "
                                 f"{exc.strerror}; {_hint(real, exc.errno or 0)}") from None
            current, unsupported = None, True
        item = _Set(plan, real, current, remember_on and plan.remember and not unsupported)
        if item.remember:
            try:
                seen = rem.peek(real, names)
            except OSError as exc:
                raise LabelError(f"{real}: cannot read the remembered SELinux context: "
                                 f"{exc.strerror}") from None
            item.remember = seen is not None  # None: no xattrs on this file system
            item.ref_before = seen.ref if seen is not None else None
        return item

    def _set_batch(self, journal: Any, batch: list[_Set], names: rem.Names,
                   prefix: str) -> None:
        if not batch:
            return
        base = journal.count(DRIVER, "relabel")  # the next number (O(1): no filtered copy)
        entries = []
        for i, it in enumerate(batch):
            it.n = base + i
            p = it.plan
            entries.append((DRIVER, "relabel", {
                "n": it.n, "path": p.path, "resolved": it.real, "label": p.label,
                "previous": it.current, "remember": it.remember, "prefix": prefix,
                "ref_before": it.ref_before, "restore": p.restore_without_record,
                "group": p.group, "role": p.role}))
        journal.record_many(entries)
        done = 0
        try:
            for it in batch:
                self._change(journal, it, names)
                done += 1
        except BaseException:
            # the files after the failing one were journaled but not touched: say so, so that
            # the rollback leaves them (and their remembered counts) alone
            journal.note_many([(DRIVER, "restored", {"n": it.n, "how": "not-made"})
                               for it in batch[done + 1:]])
            raise

    def _change(self, journal: Any, it: _Set, names: rem.Names) -> None:
        """Remember (when wanted) and set the context of one file whose record is durable."""
        plan, real, current, n = it.plan, it.real, it.current, it.n
        if it.remember:
            try:
                ref = rem.remember(real, names, current)
            except LabelError:
                journal.record(DRIVER, "restored", n=n)
                raise
            journal.note(DRIVER, "remembered", n=n, ref=ref)
            if ref is not None and ref > 1 and current != plan.label:
                rem.recall(real, names)
                journal.record(DRIVER, "restored", n=n)
                raise LabelError(
                    f"Setting different SELinux label on {real} which is already in use: "
                    f"another running domain uses it as '{current}', this one needs "
                    f"'{plan.label}'; stop that domain, or mark the disk <shareable/> (or "
                    "<readonly/>) in every domain that uses it"
                )
        if current == plan.label:
            return
        log.info("Setting SELinux context on '%s' to '%s'", real, plan.label)
        try:
            self.backend.setfilecon(real, plan.label)
        except OSError as exc:
            if self._tolerated(real, plan.label, exc):
                return
            if it.remember:
                rem.recall(real, names)
            journal.record(DRIVER, "restored", n=n)
            raise LabelError(
                f"unable to set security context '{plan.label}' on '{real}' (current "
                f"'{current or 'none'}'): {exc.strerror}; {_hint(real, exc.errno or 0)}"
            ) from None

    def _tolerated(self, path: str, label: str, exc: OSError) -> bool:
        """libvirt's rules: unsupported file systems only warn; other errors are fatal when
        enforcing (EPERM only for a privileged instance) and always for ENOENT."""
        code = exc.errno or 0
        if code in UNSUPPORTED:
            if fs_type(path) in NFS_TYPES:
                log.warning("Setting security context '%s' on '%s' not supported. Consider "
                            "setting virt_use_nfs", label, path)
            else:
                log.info("Setting security context '%s' on '%s' not supported", label, path)
            return True
        if code == errno.ENOENT:
            return False
        if self.backend.enforcing() and (code != errno.EPERM or self.privileged):
            return False
        log.warning("unable to set security context '%s' on '%s': %s (not enforcing; "
                    "continuing)", label, path, exc.strerror)
        return True

    # ---- restore -----------------------------------------------------------------------------
    def restore_records(self, journal: Any, group: str | None = None) -> None:
        """Undo every relabel record not undone yet (optionally of one ``group``), newest first.

        Raises one LabelError listing every failure after trying them all.
        """
        recs = journal.records(DRIVER)
        done = {r.get("n") for r in recs if r.get("op") == "restored"}
        remembered = {r.get("n") for r in recs if r.get("op") == "remembered"}
        intents = {r.get("n"): r for r in recs if r.get("op") == "restore"}
        todo: dict[Any, dict[str, Any]] = {}
        for r in recs:  # one entry per number, even if a record was read back twice
            if (r.get("op") == "relabel" and r.get("n") not in done
                    and (group is None or r.get("group") == group)):
                todo.setdefault(r.get("n"), r)
        errors: list[str] = []
        batch: list[dict[str, Any]] = []
        reals: set[str] = set()
        try:
            for rec in reversed(list(todo.values())):
                real = str(rec.get("resolved"))
                if len(batch) >= BATCH or real in reals:
                    self._restore_batch(journal, batch, remembered, intents, errors)
                    batch, reals = [], set()
                batch.append(rec)
                reals.add(real)
            self._restore_batch(journal, batch, remembered, intents, errors)
        finally:
            journal.sync()
        if errors:
            raise LabelError("; ".join(errors))

    def _restore_batch(self, journal: Any, batch: list[dict[str, Any]], remembered: set[Any],
                       intents: dict[Any, dict[str, Any]], errors: list[str]) -> None:
        """Decide per record (see the module docstring), write the batch's ``restore``
        records with one fsync, then undo each and mark it ``restored``."""
        plan: list[tuple[dict[str, Any], str, dict[str, Any] | None]] = []
        new_intents = []
        for rec in batch:
            n = rec.get("n")
            if not rec.get("remember") or not os.path.lexists(str(rec["resolved"])):
                plan.append((rec, "undo", None))
                continue
            try:
                record = rem.peek(str(rec["resolved"]), rem.Names.for_prefix(str(rec["prefix"])))
            except OSError as exc:
                errors.append(f"{rec['resolved']}: cannot read the remembered SELinux "
                              f"context: {exc.strerror}")
                plan.append((rec, "failed", None))
                continue
            now = record.ref if record is not None else None
            intent = intents.get(n)
            if intent is not None:  # an earlier restore stopped after its durable intent
                counted_down = now is not None and now != intent.get("ref")
                plan.append((rec, "finish" if counted_down else "undo", intent))
                continue
            before = rec.get("ref_before")
            counted = (n in remembered or before is None
                       or (now is not None and now == int(before) + 1))
            if not counted:  # stopped before remembering: nothing was changed
                plan.append((rec, "not-made", None))
                continue
            if record is not None and record.ref > 0:
                new_intents.append((DRIVER, "restore", {"n": n, "ref": record.ref,
                                                        "label": record.label}))
            plan.append((rec, "undo", None))
        journal.record_many(new_intents)
        markers = []
        try:
            for rec, how, intent in plan:
                try:
                    if how == "undo":
                        self.restore_one(rec)
                    elif how == "finish" and intent is not None:
                        self._finish(rec, intent)
                except LabelError as exc:
                    errors.append(exc.message)
                markers.append((DRIVER, "restored", {"n": rec.get("n"), "how": how}))
        finally:
            journal.note_many(markers)

    def _finish(self, rec: dict[str, Any], intent: dict[str, Any]) -> None:
        """The count-down of an interrupted restore happened: put the remembered label back
        when this domain was the last user (its ``restore`` record says what it was)."""
        real = str(rec["resolved"])
        if int(intent.get("ref") or 0) == 1 and os.path.lexists(real):
            label = intent.get("label")
            self._put(real, str(label) if label else None)

    def restore_one(self, rec: dict[str, Any]) -> None:
        """Undo one relabel record: remembered context, else policy default, else previous."""
        real = str(rec["resolved"])
        if not os.path.lexists(real):
            log.info("%s is gone; nothing to restore", real)
            return
        if rec.get("remember"):
            result = rem.recall(real, rem.Names.for_prefix(str(rec["prefix"])))
            if result.in_use:
                log.info("%s is still used by %d other domain(s); leaving its label",
                         real, result.remaining)
                return
            if result.found:
                self._put(real, result.label)
                return
        if not rec.get("restore", True):
            log.info("not restoring the label of shared/read-only image %s (other domains may "
                     "still use it)", real)
            return
        try:
            mode = os.stat(real, follow_symlinks=False).st_mode
            target = self.backend.default_context(real, mode)
        except OSError as exc:
            log.warning("cannot look up the default SELinux label of %s: %s", real, exc)
            target = None
        if target is None:
            previous = rec.get("previous")
            log.info("no policy default label for %s; restoring its previous label %s",
                     real, previous)
            target = previous
        self._put(real, target)

    def _put(self, path: str, label: str | None) -> None:
        try:
            current = self.backend.getfilecon(path)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return
            current = None
        if current == label:
            return
        log.info("Restoring SELinux context on '%s' to '%s'", path, label)
        try:
            if label is None:
                self.backend.removefilecon(path)
            else:
                self.backend.setfilecon(path, label)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return
            raise LabelError(
                f"unable to restore security context '{label or 'none'}' on '{path}' "
                f"(current '{current or 'none'}'): {exc.strerror}; "
                f"{_hint(path, exc.errno or 0)}"
            ) from None


@dataclass(slots=True)
class _Set:
    """One file of a set batch: its plan, resolved path and what was read from it."""

    plan: Plan
    real: str
    current: str | None
    remember: bool
    ref_before: int | None = None
    n: int = field(default=0)
