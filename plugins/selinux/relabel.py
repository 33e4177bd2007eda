"""Setting and restoring the context of one file, journaled and remembered.

Every change is recorded in the domain's journal BEFORE it is made (``driver="selinux"``):

* ``relabel``: ``n`` (sequence number), ``path`` and its ``resolved`` form, the ``label`` set,
  the ``previous`` context (None: the file had none), whether the original is ``remember``-ed
  in xattrs (and under which ``prefix``), whether to ``restore`` without a record, and the
  ``group`` (``disk:vda``...) for hot-unplug;
* ``restored``: ``n`` of a relabel record that has been undone.

:func:`restore_records` works from those records alone, so a fresh process can finish a
teardown after a crash, and running it twice changes nothing the second time.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
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
    def set_plan(self, journal: Any, plan: Plan, *, remember_on: bool, prefix: str) -> None:
        """Label ``plan.path`` with ``plan.label`` (journal first, then remember, then set)."""
        try:
            real = os.path.realpath(plan.path, strict=True)
        except OSError as exc:
            raise LabelError(
                f"unable to set security context '{plan.label}' on '{plan.path}': "
                f"{exc.strerror}; {_hint(plan.path, exc.errno or 0)}"
            ) from None
        unsupported = False
        try:
            current = self.backend.getfilecon(real)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise LabelError(f"cannot read the security context of '{real}': "
                                 f"{exc.strerror}; {_hint(real, exc.errno or 0)}") from None
            current, unsupported = None, True
        remember_on = remember_on and plan.remember and not unsupported
        n = journal.count(DRIVER, "relabel")  # the next number (O(1): no filtered copy)
        journal.record(DRIVER, "relabel", n=n, path=plan.path, resolved=real, label=plan.label,
                       previous=current, remember=remember_on, prefix=prefix,
                       restore=plan.restore_without_record, group=plan.group, role=plan.role)
        names = rem.Names.for_prefix(prefix)
        if remember_on:
            try:
                ref = rem.remember(real, names, current)
            except LabelError:
                journal.record(DRIVER, "restored", n=n)
                raise
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
            if remember_on:
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
        done = {r.get("n") for r in journal.records(DRIVER, "restored")}
        errors = []
        for rec in reversed(journal.records(DRIVER, "relabel")):
            if rec.get("n") in done or (group is not None and rec.get("group") != group):
                continue
            journal.record(DRIVER, "restored", n=rec.get("n"))
            try:
                self.restore_one(rec)
            except LabelError as exc:
                errors.append(exc.message)
        if errors:
            raise LabelError("; ".join(errors))

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
