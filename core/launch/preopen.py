"""Pre-opened resources: vmconfine creates a domain's listening sockets and opens its chardev
files itself, and QEMU only gets the descriptors (libvirt 9's ``qemuProcessPrepareHostChardev``
with ``qemu_fd.c``; the command-line side is :mod:`vmconfine.qemu.fdpass`).

* Listening unix sockets (QMP monitors, chardevs in ``mode='bind'``, the VNC socket) are bound
  by vmconfine, ``chmod 0600`` before ``listen()`` (so nobody can connect in between), and
  stay owned by vmconfine's uid: root for a privileged instance. QEMU holds the listening
  socket; no QEMU process (every one runs as the same qemu user) can connect to the file,
  only root, the admin. libvirt chowns such a socket to the qemu user, which lets every other
  domain's QEMU connect to it. The socket-create label is set through the stack
  (``set_socket_label``) around their creation, so SELinux gives them the domain's context.
* File chardevs and every chardev ``<log file>`` are opened by vmconfine (``O_WRONLY``, created
  ``0600`` when missing; truncated unless ``append='on'``, as QEMU would) and reach QEMU through
  ``-add-fd`` as ``/dev/fdset/N``. The files keep their owner: QEMU never opens the path.
* Network interfaces backed by a tap or macvtap: created and opened by
  :mod:`vmconfine.launch.netdev`; QEMU gets the queue (and vhost-net) descriptors.
* A stale socket at a socket's path is removed first (libvirt unlinks it too); anything else
  there is refused. A missing directory is refused (vmconfine creates only the directories
  of paths it generated: a virtio channel without a path gets ``<lib_dir>/channel/target/
  domain-NAME/NAME``, see :meth:`vmconfine.config.instance.Instance.channel_dir`).

Every socket is journaled (``pipeline``/``socket``) before ``bind`` and its inode noted after,
every opened file (``pipeline``/``open``) before ``open``; :func:`remove_sockets` (from
:func:`vmconfine.launch.pipeline.teardown`, so also from crash recovery in a fresh process)
unlinks each socket that is still the one vmconfine bound. Files stay: they hold the guest's
output, as with libvirt.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmconfine.errors import LaunchError
from vmconfine.launch import netdev
from vmconfine.qemu.fdpass import CONNECTED, FDSET, LISTEN, NETFD, QMP, PassedFd

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.stack import Stack
    from vmconfine.qemu.argv import QemuCommand

#: mode of every socket vmconfine creates for QEMU: its owner only (root, or the session user)
SOCKET_MODE = 0o600
#: mode of a chardev file or log vmconfine creates
FILE_MODE = 0o600
BACKLOG = 8


@dataclass
class PreOpened:
    """The descriptors of one start, by :class:`PassedFd` name; closed after QEMU has them."""

    fds: dict[str, int] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        """Close every descriptor (QEMU holds its own copies once it runs)."""
        socket_fds = {s.fileno() for s in self.sockets}
        for s in self.sockets:
            s.close()
        for fd in self.fds.values():
            if fd not in socket_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds.clear()
        self.sockets.clear()

    def discard(self, name: str) -> None:
        """Close the descriptor ``name`` (one that is not a listening socket) now."""
        fd = self.fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def take(self, name: str) -> socket.socket | None:
        """Hand the socket ``name`` over to the caller (the VNC socket, sent over QMP)."""
        for s in self.sockets:
            if self.fds.get(name) == s.fileno():
                self.sockets.remove(s)
                del self.fds[name]
                return s
        return None


def socket_records(command: QemuCommand) -> list[tuple[str, str, dict[str, Any]]]:
    """The ``socket`` records of every listening socket :func:`open_all` will create, for a
    caller that journals them ahead with its own (``open_all(..., journaled=True)``)."""
    return [("pipeline", "socket", {"path": p.path}) for p in command.passed
            if p.kind in (LISTEN, QMP)]


def open_all(stack: Stack, ctx: DomainContext, command: QemuCommand, *,
             journaled: bool = False) -> PreOpened:
    """Create every listening socket and open every file ``command`` passes as an fd.
    ``journaled``: the sockets' records (:func:`socket_records`) are durable already.

    Raises :class:`LaunchError` with the path and the fix; what was created before the error
    is journaled, so teardown removes it."""
    _make_generated_dirs(ctx)
    out = open_passed(ctx.journal, [p for p in command.passed if p.kind == FDSET])
    sockets = [p for p in command.passed if p.kind in (LISTEN, QMP)]
    try:
        out.fds.update(netdev.open_interfaces(ctx, command.networks))
    except BaseException:
        out.close()
        raise
    if not sockets:
        return out
    try:
        stack.set("set_socket_label", ctx)
        try:
            listened = open_passed(ctx.journal, sockets, journaled=journaled)
        finally:
            stack.restore("clear_socket_label", ctx)
    except BaseException:
        out.close()
        raise
    out.fds.update(listened.fds)
    out.sockets += listened.sockets
    return out


def open_passed(journal: Journal, passed: Iterable[PassedFd], *,
                journaled: bool = False) -> PreOpened:
    """Open ``passed`` (files and listening sockets, no labels; network descriptors and
    helper channels are left out): what :func:`open_all` does for one kind; also what a caller
    that runs QEMU by itself uses (tests, benchmarks). ``journaled``: as in :func:`open_all`."""
    out = PreOpened()
    wanted = [p for p in passed if p.kind not in (NETFD, CONNECTED)]  # taps, vhost-net
    # (launch.netdev) and helper channels (launch.swtpm) are opened elsewhere
    sockets = [p for p in wanted if p.kind != FDSET]
    # every socket is checked and journaled first, with one fsync (a record of a socket
    # never bound costs teardown one lstat: its path was free, or a stale socket bind removes)
    stale = {p.path: _stale_socket(p.path, "chardev") for p in sockets}
    if sockets and not journaled:
        journal.record_many([("pipeline", "socket", {"path": p.path}) for p in sockets])
    try:
        for p in wanted:
            if p.kind == FDSET:
                out.fds[p.name] = open_file(journal, p)
            else:
                s = _bind(journal, p.path, stale[p.path])
                out.sockets.append(s)
                out.fds[p.name] = s.fileno()
    except BaseException:
        out.close()
        raise
    return out


async def hand_over_vnc(client: QMPClient, sock: socket.socket) -> None:
    """Give a QEMU started with ``-vnc none`` the VNC listening socket: ``getfd`` (the fd
    goes with the command as SCM_RIGHTS) and ``display-update`` with an ``fd`` address."""
    client.send_fd_scm(sock.fileno())
    await client.execute("getfd", {"fdname": "vnc"})
    await client.execute("display-update", {
        "type": "vnc", "addresses": [{"type": "fd", "str": "vnc"}]})


def _make_generated_dirs(ctx: DomainContext) -> None:
    """The directory of generated channel paths: vmconfine's own, ``0700`` (only reachable
    by vmconfine's uid: QEMU uses the sockets in it through their fds)."""
    if not ctx.domain.generated_paths:
        return
    d = ctx.instance.channel_dir(ctx.domain.name)
    if d.exists():
        shutil.rmtree(d)
    ctx.journal.record("pipeline", "mkdir", path=str(d))
    d.mkdir(mode=0o700, parents=True)
    os.chmod(d, 0o700)


def open_file(journal: Journal, p: PassedFd) -> int:
    """Open a chardev file or log for QEMU (write-only, ``O_APPEND`` or truncated)."""
    try:
        existed = os.path.lexists(p.path)
    except OSError:
        existed = False
    journal.record("pipeline", "open", path=p.path, existed=existed)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
             | (os.O_APPEND if p.append else os.O_TRUNC))
    try:
        fd = os.open(p.path, flags, FILE_MODE)
    except OSError as exc:
        raise LaunchError(
            f"cannot open {p.path} ({p.name}) for QEMU: {exc.strerror}; "
            f"{_fix(p.path, exc)}") from None
    os.set_blocking(fd, True)
    return fd


#: the longest unix socket path (``sun_path`` is 108 bytes with its NUL)
SUN_PATH_MAX = 107


def _stale_socket(path: str, what: str) -> os.stat_result | None:
    """What is at a socket's path: None, or a (stale) socket; anything else is refused, and
    so is a path too long for a unix socket."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise LaunchError(f"cannot create socket {path}: the path is {len(os.fsencode(path))} "
                          f"bytes long and a unix socket path holds at most {SUN_PATH_MAX}; "
                          f"give the {what} a shorter path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LaunchError(f"cannot create socket {path}: {exc.strerror}; {_fix(path, exc)}"
                          ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise LaunchError(f"cannot create socket {path}: something that is not a socket is "
                          f"there; remove it or give the {what} another path")
    return st


def listen(journal: Journal, path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode :data:`SOCKET_MODE`, journaled."""
    st = _stale_socket(path, "chardev")
    journal.record("pipeline", "socket", path=path)
    return _bind(journal, path, st)


def _bind(journal: Journal, path: str, st: os.stat_result | None) -> socket.socket:
    """:func:`listen` after its ``socket`` record (``st``: the stale socket found there)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if st is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket (libvirt unlinks it too)
        s.bind(path)
        made = os.lstat(path)
        journal.note("pipeline", "socket-inode", path=path, dev=made.st_dev, ino=made.st_ino)
        os.chmod(path, SOCKET_MODE)  # before listen(): nobody can connect before this
        s.listen(BACKLOG)
    except OSError as exc:
        s.close()
        raise LaunchError(f"cannot create socket {path}: {exc.strerror}; {_fix(path, exc)}"
                          ) from None
    return s


def clear_qemu_socket(journal: Journal, path: str) -> None:
    """Make way for a listening socket QEMU creates itself (the SPICE socket: QEMU 7.2's
    ``-spice`` takes no fd): a stale socket there is removed, anything else refused; the
    path is journaled like vmconfine's own sockets, so teardown removes it."""
    st = _stale_socket(path, "graphics")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise LaunchError(f"cannot create socket {path}: "
                          f"{_fix(path, FileNotFoundError(errno.ENOENT, 'missing'))}")
    journal.record("pipeline", "socket", path=path)
    if st is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def claim_socket(path: str) -> None:
    """Make a listening socket QEMU created itself (SPICE) vmconfine's: owner vmconfine's uid
    (root in a privileged instance), mode :data:`SOCKET_MODE`. QEMU keeps listening on its
    descriptor; no other QEMU of the same uid can connect to the file any more (as with the
    sockets vmconfine creates). The inode is checked to be a socket through an ``O_PATH``
    descriptor that does not follow a symlink, and changed through that descriptor."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"QEMU did not create the socket {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise LaunchError(f"{path} is not the socket QEMU was to create; refusing it")
        proc = f"/proc/self/fd/{fd}"
        os.chown(proc, os.geteuid(), os.getegid())
        os.chmod(proc, SOCKET_MODE)
    except OSError as exc:
        raise LaunchError(f"cannot take over the socket {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _fix(path: str, exc: OSError) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if exc.errno == errno.ENOENT:
        return f"create the directory {parent} or fix the path in the domain XML"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"vmconfine (uid {os.geteuid()}) must be able to write {parent}"
    if exc.errno == errno.ENXIO:
        return "a FIFO there has no reader; use <serial type='pipe'> for a FIFO"
    return "fix the path in the domain XML"


def remove_sockets(records: Iterable[dict], inodes: Iterable[dict]) -> list[str]:
    """Unlink every socket vmconfine bound (``socket`` records), newest first, unless another
    file has taken its path since (checked against the ``socket-inode`` note when there is
    one). Returns the problems."""
    noted = {r["path"]: (r.get("dev"), r.get("ino")) for r in inodes}
    errors = []
    for rec in reversed(list(records)):
        path = rec["path"]
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"cannot check socket {path}: {exc.strerror}")
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue
        if path in noted and noted[path] != (st.st_dev, st.st_ino):
            continue  # not ours any more
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"cannot remove socket {path}: {exc.strerror}")
    return errors
