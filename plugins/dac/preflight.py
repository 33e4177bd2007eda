"""Preflight: before anything changes, can QEMU's uid/gid/groups reach what it must open?

The seed's rule: "the parent directory permissions may still deny access. The directories
containing disk images must either have their ownership set to match the user/group
configured for QEMU, or their UNIX file permissions must have the 'execute/search' bit enabled
for 'others'". So every directory on the way to every resource (as written in the XML and as
resolved), and the instance's run/lib/cache directories, must be searchable by QEMU's ids.
Files that will not be chowned (loader, device nodes, ``relabel='no'``, dynamic_ownership = 0)
must be accessible as they are; files that will be chowned must be accessible once chowned;
files QEMU creates need a writable directory. The first problem raises with the path and the
fix. Directories and files with a POSIX ACL are not judged (mode bits do not decide there).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from vmconfine.errors import DriverError, LabelError
from vmconfine.perms import (
    QemuIds,
    R,
    W,
    X,
    access_fix,
    can_access,
    describe_mode,
    has_acl,
    search_fix,
    user_group_hint,
    with_owner,
)
from vmconfine_dac.identity import CAPNG_MISSING, Identity, have_capng
from vmconfine_dac.relabel import KEEP

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.resources import Resource
    from vmconfine_dac.relabel import Plan

#: roles whose absence is an error in the XML (others: QEMU creates them, or they are optional)
REQUIRED_ROLES = frozenset({"disk", "backing", "kernel", "initrd", "dtb", "loader", "nvram"})


class _Checker:
    def __init__(self, ident: Identity, user_hint: str) -> None:
        self.ident = ident
        self.user_hint = user_hint  # "vmconfine-qemu:vmconfine-qemu" for chown suggestions
        self.privileged = ident.uid == 0 and not ident.clear_caps
        self.ids = QemuIds(ident.uid, ident.gid, tuple(ident.groups), self.privileged)
        self.seen: set[str] = set()

    def ok(self, st: os.stat_result, want: int) -> bool:
        i = self.ident
        return can_access(st, i.uid, i.gid, i.groups, want, privileged=self.privileged)

    def who(self) -> str:
        groups = " ".join(str(g) for g in self.ident.groups) or "none"
        return f"QEMU's user {self.ident.label} (groups {groups})"

    def search_parents(self, path: str, why: str, *, suggest_chown: bool = False,
                       role: str = "") -> None:
        """Every directory from / down to ``path``'s parent must be searchable."""
        parent = os.path.dirname(os.path.normpath(path))
        chain = []
        while True:
            chain.append(parent)
            if parent == "/":
                break
            parent = os.path.dirname(parent)
        for d in reversed(chain):
            self.search_dir(d, why, suggest_chown=suggest_chown, target=path, role=role)

    def search_dir(self, d: str, why: str, *, suggest_chown: bool = False, target: str = "",
                   role: str = "") -> None:
        if d in self.seen:
            return
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return  # the missing path itself is reported by the caller
        except OSError as exc:
            raise LabelError(f"cannot check directory {d} ({why}): {exc.strerror}") from None
        self.seen.add(d)
        if not stat.S_ISDIR(st.st_mode) or self.ok(st, X) or has_acl(d):
            return
        fix = search_fix(d, self.ids, target=target, prefer_chown=suggest_chown, role=role)
        raise LabelError(
            f"{self.who()} cannot search directory {d} ({describe_mode(st)}), which it needs "
            f"for {why}; fix: {fix}"
        )


def check(ctx: DomainContext, ident: Identity, plans: list[Plan], user_hint: str) -> None:
    """Raise on the first thing QEMU's ids could not reach; change nothing."""
    if ident.clear_caps and not have_capng():
        raise DriverError(CAPNG_MISSING)
    c = _Checker(ident, user_hint)
    inst = ctx.instance
    for d in (inst.run_dir, inst.lib_dir, inst.cache_dir):
        c.search_parents(str(d / "x"), f"the instance directory {d}", suggest_chown=True)
    planned = {p.path: p for p in plans}
    runtime_dir = str(ctx.runtime_dir)
    for res in ctx.resources:
        if not res.path or _inside(res.path, runtime_dir):
            continue  # lives in the runtime dir, which vmconfine creates for QEMU
        if res.passed:
            continue  # vmconfine opens it and QEMU gets the fd: QEMU never uses the path
        _check_resource(c, res, planned.get(res.path))


def _inside(path: str, d: str) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(d) + "/")


def _check_resource(c: _Checker, res: Resource, p: Plan | None) -> None:
    path = res.path
    why = f"{res.role} {path}"
    c.search_parents(path, why, role=res.role)
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        _check_missing(c, res, p)
        return
    except OSError as exc:
        raise LabelError(f"cannot resolve {path}: {exc.strerror}") from None
    if real != os.path.normpath(path):
        c.search_parents(real, f"{why} (which resolves to {real})", role=res.role)
    if res.role == "runtime_dir" and p is not None:
        return  # chowned to QEMU's ids before it starts
    st = os.stat(real)
    want = R | W if res.access == "rw" else R
    if res.is_dir or stat.S_ISDIR(st.st_mode):
        want |= X
    if p is not None and p.uid == KEEP:  # a shared image: QEMU can use it as it is, or it
        if c.ok(st, want):                # gets the shared group with the group bits
            return
        st = with_owner(st, (st.st_uid, p.gid))
        st = os.stat_result((st.st_mode | p.mode_add, *tuple(st)[1:]))
    elif p is not None:  # judge the inode as it will be once chowned
        st = with_owner(st, (p.uid, p.gid))
    if c.ok(st, want) or has_acl(real):
        return
    what = "read and write" if want & W else "read"
    fix = access_fix(real, st, c.ids, want, chowned=p is not None, role=res.role)
    state = "once chowned " if p is not None else ""
    raise LabelError(f"{c.who()} cannot {what} {real} ({state}{describe_mode(st)}), the "
                     f"domain's {res.role}; fix: {fix}")


def _check_missing(c: _Checker, res: Resource, p: Plan | None) -> None:
    path = res.path
    if res.role == "runtime_dir":
        return  # vmconfine creates it after preflight
    if res.role == "nvram" and getattr(res.source, "nvram_template", None):
        return  # made from its template at start, before preflight (a report runs before)
    if res.role in REQUIRED_ROLES:
        raise LabelError(f"{res.role} {path} does not exist; fix the path in the domain XML")
    if res.create and not res.passed:  # QEMU creates it (a SPICE socket): in its directory
        parent = os.path.dirname(os.path.normpath(path))
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise LabelError(f"cannot create {res.role} {path}: its directory {parent}: "
                             f"{exc.strerror}; create the directory") from None
        if not (c.ok(st, W | X) or has_acl(parent)):
            raise LabelError(f"{c.who()} cannot create {res.role} {path} in {parent} "
                             f"({describe_mode(st)}); fix: give QEMU's account a directory "
                             "of its own for the socket, or leave out the socket path to use "
                             "the domain's generated one")
    # anything else missing is optional, or created by vmconfine (passed as an fd)


def user_hint(ident: Identity) -> str:
    """``user:group`` names for fix suggestions (numbers when there are no names)."""
    return user_group_hint(ident.uid, ident.gid)

