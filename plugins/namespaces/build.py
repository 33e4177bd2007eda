"""Child side: make the planned view real, between fork and exec (``child_namespace``).

The view is built on a tmpfs mounted over a *staging* directory that already exists: the
domain's runtime directory, which the pipeline created (mounting over a directory creates
nothing on the host, and the mount exists only in the new mount namespace). Nothing is ever
created on the host's filesystem: before a directory, file or symlink is made in the view, its
parent must be on the view's own tmpfs (same device), else the build stops.

* mount mode: unshare the mount namespace, make every mount a slave (host mounts still
  propagate in, as in libvirt), build /dev on the staging tmpfs, then move it onto /dev.
* root mode: unshare, make every mount private, keep an ``O_PATH`` handle on the staging
  directory (its own contents are bound into the view through ``/proc/self/fd/N``), build
  the root on the staging tmpfs, ``pivot_root`` into it and detach the old root, then make
  the root tmpfs read-only.
* unprivileged instances first create a user namespace mapping only the caller's uid and gid
  (``setgroups`` denied), which allows the mounts; the driver then drops every capability
  held in that namespace (``child_capabilities``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from vmconfine_namespaces import syscalls as sc
from vmconfine_namespaces.plan import EXECUTABLE, OWN_PID, Entry, View, own_pid_path

_TMPFS_FLAGS = {"/dev": sc.MS_NOSUID | sc.MS_NOEXEC,
                "/dev/shm": sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                "/tmp": sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                "/": sc.MS_NOSUID | sc.MS_NODEV}


class ViewError(OSError):
    """The view could not be built (the message names the path)."""


def enter(view: View, staging: str, mount_options: str = "") -> None:
    """Create the namespaces and build ``view``; the calling process is inside afterwards.
    ``mount_options`` (the stack's, e.g. SELinux's ``context=``) are added to every tmpfs
    the view mounts."""
    if mount_options:
        view = replace(view, entries=[
            replace(e, options=",".join(filter(None, (e.options, mount_options))))
            if e.kind == "tmpfs" else e for e in view.entries])
    uid, gid = os.getuid(), os.getgid()
    if view.userns:
        sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        sc.write_file("/proc/self/setgroups", "deny")
        sc.write_file("/proc/self/uid_map", f"{uid} {uid} 1\n")
        sc.write_file("/proc/self/gid_map", f"{gid} {gid} 1\n")
    else:
        sc.unshare(sc.CLONE_NEWNS)
    propagation = sc.MS_PRIVATE if view.mode == "root" else sc.MS_SLAVE
    sc.mount(None, "/", None, sc.MS_REC | propagation)
    if view.mode == "root":
        _build_root(view, staging)
    else:
        _build_dev(view, staging)


def _tmpfs(entry: Entry, target: str) -> None:
    sc.mount("vmconfine", target, "tmpfs", _TMPFS_FLAGS.get(entry.path, sc.MS_NOSUID),
             entry.options)


def _build_dev(view: View, staging: str) -> None:
    dev = view.by_path("/dev")
    _tmpfs(dev, staging)
    ours = {os.lstat(staging).st_dev}
    for e in view.under("/dev"):
        if e.path != "/dev":
            _make(e, staging + e.path[len("/dev"):], ours, lambda s: s)
    sc.mount(staging, "/dev", None, sc.MS_MOVE)


def _build_root(view: View, staging: str) -> None:
    handle = os.open(staging, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    prefix = staging.rstrip("/") + "/"

    def source(path: str) -> str:  # the staging dir's own contents, from under the tmpfs
        if path == staging:
            return f"/proc/self/fd/{handle}"
        if path.startswith(prefix):
            return f"/proc/self/fd/{handle}/{path[len(prefix):]}"
        return path

    try:
        _tmpfs(view.by_path("/"), staging)
        ours = {os.lstat(staging).st_dev}
        pid = os.getpid()
        for e in view.entries:
            if e.path != "/":
                if OWN_PID in e.path or OWN_PID in e.source:
                    e = replace(e, path=own_pid_path(e.path, pid),
                                source=own_pid_path(e.source, pid))
                _make(e, staging + e.path, ours, source)
    finally:
        os.close(handle)
    os.chdir(staging)
    sc.pivot_root(".", ".")
    sc.umount(".", sc.MNT_DETACH)
    os.chdir("/")
    sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID
             | sc.MS_NODEV)


def _inside(target: str, ours: set[int]) -> None:
    """Refuse to create ``target`` unless its directory is on one of the view's own
    filesystems (the tmpfs mounts made for it)."""
    parent = os.path.dirname(target.rstrip("/")) or "/"
    st = os.lstat(parent)
    if st.st_dev not in ours:
        raise ViewError(1, f"refusing to create {target}: its directory is not on the "
                           "view's tmpfs (it would change the host)", target)


def _make(e: Entry, target: str, ours: set[int],
          source: Callable[[str], str]) -> None:
    exists = os.path.lexists(target)
    if e.kind == "dir":
        if not exists:
            _inside(target, ours)
            os.mkdir(target, 0o755)
        return
    if e.kind == "symlink":
        if not exists:
            _inside(target, ours)
            os.symlink(e.source, target)
        return
    if not exists:
        _inside(target, ours)
        if e.kind != "bind" or e.is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
    if e.kind == "tmpfs":
        _tmpfs(e, target)
        ours.add(os.lstat(target).st_dev)
    elif e.kind == "devpts":
        sc.mount("devpts", target, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, e.options)
    else:
        src = source(e.source)
        # the staging directory's own contents are bound without submounts: recursively,
        # the view's tmpfs on top of it would come along
        sc.bind(src, target, readonly=e.readonly,
                recursive=e.is_dir and not src.startswith("/proc/self/fd/"),
                nosuid=e.role != EXECUTABLE)
