"""POSIX permission checks by owner and mode bits, shared by the DAC driver's preflight and
``host-validate`` (neither changes anything; POSIX ACLs are detected, not evaluated)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable

#: access masks, as in access(2)
R, W, X = 4, 2, 1


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


def user_group_hint(uid: int, gid: int) -> str:
    """``user:group`` names for ``chown`` suggestions (numbers when there are no names)."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"
