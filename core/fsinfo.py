"""Read-only facts about the file system holding a path: does it store an xattr namespace,
and which mount is it. Shared by the drivers' report columns and host checks."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def xattr_support(path: str, name: str) -> bool | None:
    """Does the file system holding ``path`` store ``name`` xattrs? (a read-only probe on
    ``path`` or its nearest existing ancestor; None when the answer is unknown)."""
    target = path
    while not os.path.exists(target) and target not in ("/", ""):
        target = os.path.dirname(target)
    try:
        os.getxattr(target, name)
        return True
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return True
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        return None


def mountinfo() -> list[tuple[str, str, list[str]]]:
    """``(mount point, fs type, [super options])`` per line of ``/proc/self/mountinfo``."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, lfields = right.split(), left.split()
        if not fields or len(lfields) < 5:
            continue
        out.append((lfields[4], fields[0], fields[2].split(",") if len(fields) > 2 else []))
    return out


def mount_of(path: str) -> str:
    """``"MOUNTPOINT (FSTYPE)"`` of the file system holding ``path``."""
    best, fstype = "/", "?"
    real = os.path.realpath(path)
    mounts = mountinfo()
    if not mounts:
        return "its file system"
    for mp, fs, _opts in mounts:
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, fstype = mp, fs
    return f"{best} ({fstype})"


def xattr_checks(dirs: list[str], name: str, bad: str, fix: str) -> list[dict[str, str]]:
    """``host_checks`` lines: can each of ``dirs`` store ``name`` xattrs? ``bad`` is the
    status when it cannot ("FAIL" or "WARN"), with ``fix``."""
    out = []
    for d in dirs:
        label = f"xattrs {name.split('.', 1)[0]}.* in {d}"
        ok = xattr_support(d, name)
        if ok is True:
            out.append({"status": "PASS", "name": label, "detail": "supported", "fix": ""})
        elif ok is False:
            out.append({"status": bad, "name": label,
                        "detail": "not supported by its file system", "fix": fix})
        else:
            out.append({"status": "WARN", "name": label, "detail": "could not be probed",
                        "fix": ""})
    return out
