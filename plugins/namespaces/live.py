"""Hotplug: make a device node appear in (or disappear from) the private /dev of a QEMU that
runs already (libvirt's ``qemuNamespaceSetupDisk`` / ``qemuNamespaceTeardownHostdev``).

The node is a bind mount of the host's node, as at start: a detached clone of it is made in
the host's view (``open_tree``), then a forked child enters QEMU's mount namespace (``setns``,
and first its user namespace when it has one) and attaches it there (``move_mount``) on an
empty file made on the view's tmpfs, with the directories on its way. Removal unmounts and
unlinks in the same way. Nothing is created outside the view's /dev tmpfs: a parent directory
on another filesystem stops the change.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vmconfine_namespaces import syscalls as sc
from vmconfine_namespaces.plan import Entry


def _in_namespace(pid: int, userns: bool, prepare: Callable[[], object],
                  act: Callable[[object], None]) -> None:
    """Run ``act(prepare())`` in a child that entered QEMU's namespaces; raise its error."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            prepared = prepare()
            if userns:
                fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                sc.setns(fd, sc.CLONE_NEWUSER)
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            sc.setns(fd, sc.CLONE_NEWNS)
            os.chdir("/")
            act(prepared)
        except BaseException as exc:
            os.write(write, str(exc).encode()[:1000] or b"failed")
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(0, message or "the child entering QEMU's namespace failed")


def _check_inside(path: str, dev: int) -> None:
    parent = os.path.dirname(path)
    if os.lstat(parent).st_dev != dev:
        raise OSError(1, f"refusing to create {path}: {parent} is not on QEMU's /dev tmpfs")


def add(pid: int, userns: bool, entries: list[Entry]) -> None:
    """Create ``entries`` (dirs, symlinks, binds, parents first) in QEMU's /dev."""
    def prepare() -> dict[str, int]:
        return {e.path: sc.open_tree(e.source) for e in entries if e.kind == "bind"}

    def act(trees: object) -> None:
        assert isinstance(trees, dict)
        dev = os.lstat("/dev").st_dev
        for e in entries:
            if os.path.lexists(e.path):
                continue
            _check_inside(e.path, dev)
            if e.kind == "dir":
                os.mkdir(e.path, 0o755)
            elif e.kind == "symlink":
                os.symlink(e.source, e.path)
            elif e.kind == "bind":
                os.close(os.open(e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
                sc.move_mount(trees[e.path], e.path)

    _in_namespace(pid, userns, prepare, act)


def remove(pid: int, userns: bool, entries: list[Entry]) -> None:
    """Remove ``entries`` from QEMU's /dev (children first); a directory still holding
    something stays."""
    def act(_: object) -> None:
        dev = os.lstat("/dev").st_dev
        for e in reversed(entries):
            if not os.path.lexists(e.path):
                continue
            if e.kind == "bind":
                sc.umount(e.path, sc.MNT_DETACH)
            if os.lstat(e.path).st_dev != dev:
                continue  # still a mount point of something else: leave it
            if e.kind == "dir":
                if not os.listdir(e.path):
                    os.rmdir(e.path)
            else:
                os.unlink(e.path)

    _in_namespace(pid, userns, lambda: None, act)
