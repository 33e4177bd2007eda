"""POSIX permission checks by owner and mode bits, and the one place that decides how to fix a
denial, shared by the DAC driver's preflight, the confinement report and ``host-validate``
(none of them changes anything; POSIX ACLs are detected, not evaluated).

Fix advice never weakens the host: it never suggests a ``chown`` or ``chmod`` of a system path
(:func:`protected`: ``/etc``, ``/root``, ``/home``, ``/usr``, ``/boot``, ``/dev``, ``/proc``,
``/sys``, another service's ``/var/lib/*``...) or of a device node. For those it suggests
moving the file, an ACL for QEMU's user alone (``setfacl -m u:USER:x DIR``), group membership
(``usermod -aG GROUP USER``), or removing the ``<qemu:arg>`` that names the path.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass

#: access masks, as in access(2)
R, W, X = 4, 2, 1

#: trees whose files and directories belong to the system or to other services
PROTECTED_TREES = ("/etc", "/root", "/home", "/usr", "/boot", "/dev", "/proc", "/sys", "/bin",
                   "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/run", "/var/lib",
                   "/var/log", "/var/cache", "/var/spool", "/var/mail", "/var/run", "/snap")
#: directories that are system paths themselves, while what is below them need not be
PROTECTED_DIRS = ("/", "/var", "/srv", "/opt", "/mnt", "/media", "/tmp", "/var/tmp")
#: vmconfine's own trees inside protected ones (its instance directories)
OWN_TREES = ("/var/lib/vmconfine", "/var/cache/vmconfine", "/var/log/vmconfine",
             "/run/vmconfine", "/var/run/vmconfine")
#: where a file QEMU must reach can be moved to
IMAGE_DIR = "/var/lib/vmconfine/images"


def can_access(st: os.stat_result, uid: int, gid: int, groups: Iterable[int], want: int, *,
               privileged: bool = False) -> bool:
    """Would a process with these ids (and no capabilities unless ``privileged``) get ``want``
    (a mask of R/W/X) on an inode with this owner and mode?"""
    if privileged:
        if want & X and not stat.S_ISDIR(st.st_mode):
            return bool(st.st_mode & 0o111)
        return True
    mode = st.st_mode
    if st.st_uid == uid:
        bits = (mode >> 6) & 7
    elif st.st_gid == gid or st.st_gid in set(groups):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def has_acl(path: str) -> bool:
    """True when ``path`` carries a POSIX access ACL (mode bits alone do not decide access)."""
    try:
        os.getxattr(path, "system.posix_acl_access")
        return True
    except OSError:
        return False


def describe_mode(st: os.stat_result) -> str:
    """``+UID:+GID 0MODE`` of an inode, for messages."""
    return f"+{st.st_uid}:+{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_group_hint(uid: int, gid: int) -> str:
    """``user:group`` names for ``chown`` suggestions (numbers when there are no names)."""
    return f"{user_name(uid)}:{group_name(gid)}"


# ------------------------------------------------------------------------------------------------
# who QEMU runs as, and what the kernel's permission checks let it reach
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuIds:
    """The uid, gid and groups QEMU runs with; ``privileged`` = it keeps root's capabilities."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    privileged: bool = False

    @classmethod
    def caller(cls) -> QemuIds:
        """The calling process's ids (QEMU of an unprivileged instance runs as its caller)."""
        return cls(os.getuid(), os.getgid(), tuple(sorted({os.getgid(), *os.getgroups()})))

    @property
    def label(self) -> str:
        return f"+{self.uid}:+{self.gid}"

    def who(self) -> str:
        groups = ",".join(str(g) for g in self.groups) or "none"
        return f"QEMU's user {self.label} (groups {groups})"

    def hint(self) -> str:
        """``user:group`` names for ``chown`` suggestions (numbers when there are no names)."""
        return user_group_hint(self.uid, self.gid)

    def allows(self, st: os.stat_result, want: int) -> bool:
        """Would these ids get ``want`` (R/W/X mask) on this inode by its owner and mode?"""
        return can_access(st, self.uid, self.gid, self.groups, want, privileged=self.privileged)


def parents(path: str) -> list[str]:
    """Every directory from ``/`` down to ``path``'s parent."""
    out = []
    d = os.path.dirname(os.path.normpath(path))
    while True:
        out.append(d)
        if d == "/":
            break
        d = os.path.dirname(d)
    return list(reversed(out))


@dataclass(frozen=True)
class Denial:
    """The kernel's permission checks would refuse QEMU ``path``: what, the fix, the culprit."""

    message: str
    fix: str
    culprit: str


def denial(path: str, ids: QemuIds, want: int, *, owner: tuple[int, int] | None = None,
           role: str = "") -> Denial | None:
    """Why ``ids`` could not reach ``path`` for ``want``: a directory on the way it cannot
    search (of the path as written and as resolved), or the file's own mode (judged with
    ``owner`` when it is given that owner before QEMU starts). None when the mode bits allow
    it, the path is missing, or an ACL decides. ``role`` is the resource's role (``"other"``:
    a path only a ``<qemu:arg>`` names; for a system path the fix is then to remove it)."""
    real = os.path.realpath(path)
    seen: set[str] = set()
    for d in [*parents(path), *parents(real)]:
        if d in seen:
            continue
        seen.add(d)
        try:
            st = os.stat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and not ids.allows(st, X) and not has_acl(d):
            return Denial(f"{ids.who()} cannot search directory {d} ({describe_mode(st)}) on "
                          f"the way to {path}", search_fix(d, ids, target=path, role=role), d)
    try:
        st = os.stat(real)
    except OSError:
        return None
    if owner is not None:
        st = with_owner(st, owner)
    if ids.allows(st, want) or has_acl(real):
        return None
    what = "read and write" if want & W else "read"
    state = "once chowned, " if owner is not None else ""
    return Denial(f"{ids.who()} cannot {what} {real} ({state}{describe_mode(st)})",
                  access_fix(real, st, ids, want, chowned=owner is not None, role=role), real)


def with_owner(st: os.stat_result, owner: tuple[int, int]) -> os.stat_result:
    """``st`` as it will be once the file is given to ``owner``."""
    return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, owner[0], owner[1],
                           st.st_size, int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))


# ------------------------------------------------------------------------------------------------
# fix advice (never weakens the host)
# ------------------------------------------------------------------------------------------------


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def protected(path: str) -> bool:
    """Is ``path`` a system path (or another service's) whose owner or mode must never be
    changed for QEMU? vmconfine's own instance directories are not."""
    p = os.path.normpath(path)
    if any(_under(p, own) for own in OWN_TREES):
        return False
    return p in PROTECTED_DIRS or any(_under(p, tree) for tree in PROTECTED_TREES)


def _qemu_arg_fix(path: str) -> str:
    return (f"remove the <qemu:arg> that names {path} from the domain XML (or give the guest "
            "a copy of what it needs as a disk)")


def _move_fix(path: str) -> str:
    return (f"do not give QEMU a system file: move or copy what the guest needs out of "
            f"{os.path.dirname(path) or '/'} (e.g. to {IMAGE_DIR}) and fix the domain XML")


def search_fix(d: str, ids: QemuIds, *, target: str = "", prefer_chown: bool = False,
               role: str = "") -> str:
    """How to let ``ids`` search directory ``d`` (on the way to ``target``)."""
    user = user_name(ids.uid)
    if protected(d):
        if role == "other" and target:
            return _qemu_arg_fix(target)
        where = f" out of {d}" if target and d not in PROTECTED_DIRS else ""
        return (f"move the file{where} to a directory QEMU's user can reach (e.g. {IMAGE_DIR})"
                f", or let only that user search {d}: setfacl -m u:{user}:x {d}")
    if prefer_chown:
        return f"chown {ids.hint()} {d} (or chmod o+x {d})"
    return f"chmod o+x {d} (or chown {ids.hint()} {d})"


def access_fix(path: str, st: os.stat_result, ids: QemuIds, want: int, *,
               chowned: bool = False, role: str = "") -> str:
    """How to let ``ids`` get ``want`` on ``path`` (``st``: its inode; ``chowned``: it is
    given to QEMU's ids before start)."""
    user = user_name(ids.uid)
    rights = "rw" if want & W else "r"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        group = group_name(st.st_gid)
        if can_access(st, -1, st.st_gid, (), want) and st.st_gid != 0:
            return f"add {user} to group {group} (usermod -aG {group} {user})"
        return (f"grant QEMU's user access to the device without changing its mode: an ACL "
                f"(setfacl -m u:{user}:{rights} {path}; a udev rule makes it last), or remove "
                "the device from the domain XML")
    if protected(path):
        return _qemu_arg_fix(path) if role == "other" else _move_fix(path)
    if chowned:
        return f"chmod u+{rights} {path}"
    what = "read and write" if want & W else "read"
    return f"chown {ids.hint()} {path}, or chmod it so that user can {what} it"
