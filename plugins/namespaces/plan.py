"""What QEMU's filesystem view holds: computed in the parent, changing nothing.

A :class:`View` is an ordered list of :class:`Entry` items (parents before children), each a
path *inside* QEMU's view and how it gets there:

* ``dir``: an empty directory created in the view's tmpfs;
* ``bind``: the host path of the same name (or ``source``) bind-mounted there, read-only or
  read-write (device nodes, the emulator's files, the domain's resources); read-only binds
  keep the flags of the host's mount and add ``nosuid``, except the emulator binary itself
  (:data:`EXECUTABLE`);
* ``symlink``: a symlink with the host's target (``/dev/fd``, ``/lib64`` on merged-/usr
  hosts, ``/dev/disk/by-id/...``), whose target is then added too;
* ``tmpfs`` / ``devpts``: a fresh filesystem (``/tmp``, a private ``/dev/shm``, a new devpts
  instance).

Mode ``mount`` (libvirt's ``namespaces = ["mount"]``) plans only ``/dev``: the host's
filesystem stays visible, ``/dev`` is a private tmpfs. Mode ``root`` plans a whole root: the
emulator and its libraries/firmware/modules read-only, the domain's resources at their own
paths, its runtime and home directories, a private ``/dev`` and ``/tmp``, and of ``/proc``
only the process's own ``/proc/PID`` (with ``self`` and ``thread-self`` links to it).

Device nodes are bind mounts of the host's nodes, never copies (``mknod``): the same inode
keeps its owner, mode, ACLs and SELinux label, relabelling on the host applies inside at once,
and it works in a user namespace, where ``mknod`` is refused. Paths are walked component by
component as libvirt's ``qemuDomainCreateDeviceRecursive`` does, so symlinks on the way are
reproduced; ``..`` components are refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

#: tmpfs options of the private /dev (libvirt: "tmpfs is limited to 64kb, since we only have
#: device nodes in there and don't want to DOS the entire OS RAM usage")
DEV_TMPFS = "mode=755,size=65536"
ROOT_TMPFS = "mode=755,size=1m"
TMP_TMPFS = "mode=1777,size=64m"
SHM_TMPFS = "mode=1777,size=64m"
DEVPTS = "newinstance,ptmxmode=0666,mode=0620"
#: the symlinks every /dev has (systemd-udev / devtmpfs conventions)
STANDARD_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                  ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"))
MAX_LINKS = 40
#: QEMU's own /proc/PID in the view, and the links to it a process expects: the plan does
#: not know the pid (the child does; :func:`own_pid_path` fills it in). Links, not binds of
#: the magic links: path-based LSMs (AppArmor) then see the usual /proc/PID/... paths
OWN_PID = "@pid"
OWN_PROC = (("/proc/self", OWN_PID), ("/proc/thread-self", f"{OWN_PID}/task/{OWN_PID}"))


#: the role of the emulator binary QEMU is exec'd from. Its read-only bind is the only one
#: without ``nosuid``: the kernel asks SELinux for ``process2 nosuid_transition`` when an exec
#: from a nosuid mount changes domain (the sVirt label), which no policy grants; a setuid bit
#: or file capability on it still gains nothing (QEMU runs with no_new_privs)
EXECUTABLE = "executable"


def own_pid_path(text: str, pid: int) -> str:
    """``text`` (a view path or link target) with the placeholder for QEMU's pid filled in."""
    return text.replace(OWN_PID, str(pid))  # Linux's MAXSYMLINKS


@dataclass(frozen=True)
class Entry:
    """One thing in QEMU's view (see the module docstring)."""

    path: str
    kind: str  # "dir" | "bind" | "symlink" | "tmpfs" | "devpts"
    source: str = ""  # bind source on the host, or symlink target
    readonly: bool = True
    is_dir: bool = False  # a bound directory (recursive bind)
    role: str = ""
    options: str = ""  # tmpfs / devpts mount data

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", False) or k == "readonly"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**{k: data[k] for k in ("path", "kind", "source", "readonly", "is_dir",
                                            "role", "options") if k in data})


@dataclass
class View:
    """QEMU's planned filesystem view."""

    mode: str  # "mount" | "root"
    userns: bool = False
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "userns": self.userns,
                "entries": [e.to_json() for e in self.entries], "notes": list(self.notes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> View:
        return cls(str(data["mode"]), bool(data.get("userns")),
                   [Entry.from_json(e) for e in data.get("entries", [])],
                   list(data.get("notes", [])))

    def by_path(self, path: str) -> Entry:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(path)

    def under(self, top: str) -> list[Entry]:
        return [e for e in self.entries if e.path == top or e.path.startswith(top + "/")]

    def dev_names(self) -> set[str]:
        """Every path the private /dev holds, relative to /dev (``null``, ``net/tun``...),
        not looking into the filesystems mounted in it (pts, shm, bound directories)."""
        return {e.path[len("/dev/"):] for e in self.under("/dev") if e.path != "/dev"}

    def top_names(self) -> set[str]:
        """The names in the view's ``/`` (root mode)."""
        return {e.path.split("/")[1] for e in self.entries if e.path.count("/") >= 1
                and e.path != "/"}

    def find(self, path: str) -> Entry | None:
        """The entry that makes ``path`` exist in the view: itself or a bound directory
        above it."""
        best: Entry | None = None
        for e in self.entries:
            if e.path == path or (e.kind == "bind" and e.is_dir
                                  and path.startswith(e.path.rstrip("/") + "/")):
                if best is None or len(e.path) >= len(best.path):
                    best = e
        return best


class PlanError(ValueError):
    """A path that cannot be put into the view (``..``, a symlink loop...)."""


class Builder:
    """Collects entries, walking each path component by component on the host."""

    def __init__(self, view: View, lstat: Callable[[str], os.stat_result] = os.lstat,
                 readlink: Callable[[str], str] = os.readlink) -> None:
        self.view = view
        self.lstat = lstat
        self.readlink = readlink
        self.by_path: dict[str, Entry] = {}
        for e in view.entries:
            self.by_path[e.path] = e

    def add(self, entry: Entry) -> None:
        old = self.by_path.get(entry.path)
        if old is not None:
            if old.kind == "dir" and entry.kind == "bind" and entry.is_dir:
                # a directory made only to hold other paths turns out to be needed whole
                i = self.view.entries.index(old)
                self.view.entries[i] = self.by_path[entry.path] = entry
            elif old.kind == "bind" and entry.kind == "bind" and old.readonly and \
                    not entry.readonly:
                # the same path needed read-write by another role: widen in place
                i = self.view.entries.index(old)
                self.view.entries[i] = self.by_path[entry.path] = Entry(
                    old.path, "bind", old.source, False, old.is_dir, old.role)
            return
        self.by_path[entry.path] = entry
        self.view.entries.append(entry)

    def covered(self, path: str) -> Entry | None:
        """A bound directory above ``path`` (the path already exists in the view)."""
        parts = path.split("/")
        for i in range(len(parts) - 1, 1, -1):
            e = self.by_path.get("/".join(parts[:i]))
            if e is not None and e.kind == "bind" and e.is_dir:
                return e
        return None

    def dirs_to(self, path: str, *, top: str = "/") -> None:
        """``dir`` entries for every parent of ``path`` below ``top``."""
        parent = os.path.dirname(path)
        chain = []
        while parent not in (top, "/", "") and parent not in self.by_path \
                and self.covered(parent) is None:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(chain):
            self.add(Entry(d, "dir", role="parent"))

    def walk(self, path: str, role: str, *, readonly: bool, top: str = "/",
             missing_ok: bool = True, ttl: int = MAX_LINKS) -> bool:
        """Add ``path`` (and the symlinks on its way, and their targets) to the view.

        Only components below ``top`` are created (``/dev`` for the private /dev); symlinks
        met on the way are reproduced and followed. Returns False when the path does not
        exist on the host (and ``missing_ok``), True when it was added.
        """
        if ttl <= 0:
            raise PlanError(f"too many levels of symbolic links: {path}")
        if not path.startswith("/") or ".." in path.split("/"):
            raise PlanError(f"{path!r} is not an absolute path without '..'")
        path = os.path.normpath(path)
        if not (path == top or path.startswith(top.rstrip("/") + "/")):
            return True  # outside the planned tree: the host's view applies there
        cover = self.covered(path)
        if cover is not None and (readonly or not cover.readonly):
            return True
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            sub = "/".join(parts[:i])
            try:
                st = self.lstat(sub)
            except FileNotFoundError:
                if missing_ok:
                    return False
                raise
            if stat.S_ISLNK(st.st_mode):
                target = self.readlink(sub)
                if sub.startswith(top.rstrip("/") + "/") or top == "/":
                    self.dirs_to(sub, top=top)
                    self.add(Entry(sub, "symlink", target, role=role))
                absolute = target if target.startswith("/") else \
                    os.path.join(os.path.dirname(sub), target)
                rest = "/".join(parts[i:])
                full = os.path.normpath(os.path.join(absolute, rest) if rest else absolute)
                return self.walk(full, role, readonly=readonly, top=top,
                                 missing_ok=missing_ok, ttl=ttl - 1)
            if i == len(parts):
                self.dirs_to(sub, top=top)
                self.add(Entry(sub, "bind", sub, readonly, stat.S_ISDIR(st.st_mode), role))
        return True


# ---- the private /dev ---------------------------------------------------------------------

def dev_entries(builder: Builder, nodes: Iterable[tuple[str, str, bool]], *, root_view: bool,
                host_has: Callable[[str], bool]) -> None:
    """The private /dev: ``nodes`` are ``(path, role, required)``; missing optional ones
    (those of ``cgroup_device_acl``) are skipped, as libvirt does."""
    view = builder.view
    builder.add(Entry("/dev", "tmpfs", role="dev", options=DEV_TMPFS, readonly=False))
    want_ptmx = False
    for path, role, required in nodes:
        if path == "/dev/ptmx":
            # the kernel finds a ptmx node's devpts instance as "pts" next to the node's own
            # dentry, so a bind of the host's node does not reach a devpts mounted here;
            # libvirt's mknod is refused by the device cgroup joined before (no "m") and in
            # a user namespace: /dev/ptmx is the link to the new instance's own ptmx (below)
            want_ptmx = True
            continue
        if not builder.walk(path, role, readonly=False, top="/dev"):
            if required:
                view.notes.append(f"{path} ({role}) does not exist on the host")
    # a devpts instance of QEMU's own (its ptys only; other domains' and the host's terminals
    # are not there), whose ptmx it may open (the host's instance often has ptmxmode=000)
    builder.add(Entry("/dev/pts", "devpts", role="pts", options=DEVPTS, readonly=False))
    if want_ptmx:
        builder.add(Entry("/dev/ptmx", "symlink", "pts/ptmx", role="acl"))
    if root_view:
        builder.add(Entry("/dev/shm", "tmpfs", role="shm", options=SHM_TMPFS, readonly=False))
    else:
        # libvirt keeps the host's /dev/shm and /dev/mqueue
        for sub, role in (("/dev/shm", "shm"), ("/dev/mqueue", "mqueue")):
            if host_has(sub):
                builder.add(Entry(sub, "bind", sub, False, True, role))
    for link, target in STANDARD_LINKS:
        builder.add(Entry(link, "symlink", target, role="standard"))


# ---- the per-domain root ------------------------------------------------------------------

@dataclass(frozen=True)
class Wanted:
    """A host path the root view must hold: the resource model's view of one path."""

    path: str
    role: str
    writable: bool
    create: bool = False  # QEMU creates it (a bind socket, a missing chardev file)
    is_dir: bool = False


def root_entries(builder: Builder, *, emulator_paths: Iterable[str],
                 emulator_dirs: Iterable[str], wanted: Iterable[Wanted],
                 private_dirs: Iterable[str], exists: Callable[[str], bool],
                 executable: str = "") -> None:
    """The per-domain root (everything but /dev, which :func:`dev_entries` adds).

    ``private_dirs`` (the domain's runtime and home directories) are bound read-write;
    resources below them are covered by that. A resource QEMU must create and that does not
    exist yet makes its parent directory visible read-write (noted in the plan).
    ``executable`` (the path QEMU is exec'd from) gets a bind of its own with the role
    :data:`EXECUTABLE`: the one read-only bind made without ``nosuid``.
    """
    view = builder.view
    builder.add(Entry("/", "tmpfs", role="root", options=ROOT_TMPFS, readonly=False))
    if executable:
        builder.walk(executable, EXECUTABLE, readonly=True, missing_ok=False)
    for d in emulator_dirs:
        builder.walk(d, "emulator", readonly=True)
    for d in private_dirs:
        if not builder.walk(d, "domain_dir", readonly=False):  # made at start
            builder.dirs_to(d)
            builder.add(Entry(d, "bind", d, False, True, "domain_dir"))
    for w in wanted:
        if w.path.startswith("/dev/"):
            continue  # the private /dev's business
        norm = os.path.normpath(w.path)
        if norm in builder.by_path or builder.covered(norm) is not None:
            continue  # one of the domain's own directories (or in one), planned above
        if exists(w.path):
            builder.walk(w.path, w.role, readonly=not w.writable)
        elif w.create:
            parent = os.path.dirname(os.path.normpath(w.path))
            if builder.covered(w.path) is None:
                view.notes.append(f"{w.path} ({w.role}) does not exist yet and QEMU creates "
                                  f"it: its directory {parent} is visible read-write")
            builder.walk(parent, w.role, readonly=False)
        else:
            view.notes.append(f"{w.path} ({w.role}) does not exist on the host")
    for p in emulator_paths:
        builder.walk(p, "emulator", readonly=True, missing_ok=False)
    builder.add(Entry("/tmp", "tmpfs", role="tmp", options=TMP_TMPFS, readonly=False))
    # the process's own /proc directory only: /proc/PID of every other process (and its
    # "root" link into another domain's view) stays out of reach
    builder.add(Entry("/proc", "dir", role="proc"))
    builder.add(Entry(f"/proc/{OWN_PID}", "bind", "/proc/self", False, True, "proc"))
    for link, target in OWN_PROC:
        builder.add(Entry(link, "symlink", target, role="proc"))


def order(view: View) -> None:
    """Parents before children; a bound directory before whatever is mounted inside it."""
    view.entries.sort(key=lambda e: (e.path.rstrip("/").count("/") if e.path != "/" else -1,
                                     e.path))
