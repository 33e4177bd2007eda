"""Host resources QEMU gets as file descriptors instead of paths (libvirt 9's ``qemu_fd.c``).

vmconfine creates every listening unix socket of a domain (QMP monitors, chardevs in
``mode='bind'``, the VNC socket) and opens every file chardev and chardev log itself, so QEMU
needs no access to the directories they live in, and a socket file can stay root-only: QEMU
holds the listening socket, nobody else of its uid can connect to the file.

An option value of the command line is a tuple of *parts*: plain text and :class:`PassedFd`
placeholders. :func:`render` writes it two ways:

* symbolic (``domxml-to-native``, the log's first line without fds): every placeholder as the
  path QEMU would open itself (``path=P``, ``P``, ``unix:P``), so the printed line also runs by
  hand, exactly as libvirt's ``domxml-to-native`` shows paths;
* at start, with the descriptor numbers: ``fd=N`` for a listening socket, ``/dev/fdset/S``
  plus a ``-add-fd set=S,fd=N,opaque=NAME`` before the option for an opened file, and ``none``
  for the VNC display, whose socket is handed over QMP after the handshake (QEMU 7.2's ``-vnc``
  takes no fd: ``getfd`` + ``display-update`` with an ``fd`` address do).

Network back ends (:mod:`vmconfine.qemu.netdev`) pass plain descriptors (:data:`NETFD`: the
tap queues and vhost-net, ``fds=N:M``): their option value is an :class:`Alt`, which has its
own symbolic text (``ifname=vnet%d,script=no,downscript=no``) because a tap fd has no path
QEMU could open instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: a listening unix socket QEMU inherits: ``fd=N``
LISTEN = "listen"
#: a file vmconfine opened: ``-add-fd`` and ``/dev/fdset/S``
FDSET = "fdset"
#: a listening socket handed to QEMU over QMP (``getfd``) after the handshake: VNC
QMP = "qmp"
#: one end of a connected socket pair whose other end a helper process holds (the TPM
#: emulator's control channel): ``fd=N``; symbolically the socket path a helper would listen
#: on (libvirt's)
CONNECTED = "connected"
#: a descriptor QEMU inherits and takes by number (a tap queue, vhost-net): ``N``
NETFD = "netfd"


@dataclass(frozen=True)
class PassedFd:
    """One host resource vmconfine opens and hands to QEMU.

    ``name`` is libvirt's fd name (``charmonitor``, ``charserial0-source``,
    ``charserial0-log``, ``vnc``); ``append``: an ``fdset`` file is opened ``O_APPEND``
    (else truncated, as QEMU would).
    """

    kind: str
    path: str
    name: str
    append: bool = False

    @property
    def inherited(self) -> bool:
        """QEMU inherits it at exec (every kind but :data:`QMP`)."""
        return self.kind != QMP


@dataclass(frozen=True)
class Alt:
    """Parts with their own symbolic text: ``parts`` rendered with descriptors at start,
    ``symbolic`` for ``domxml-to-native``."""

    symbolic: str
    parts: tuple[str | PassedFd, ...]


Part = str | PassedFd | Alt


def flatten(parts: Sequence[Part]) -> list[str | PassedFd]:
    """The plain parts of ``parts`` (an :class:`Alt`'s descriptor side expanded)."""
    out: list[str | PassedFd] = []
    for p in parts:
        out.extend(p.parts if isinstance(p, Alt) else (p,))
    return out


def passed_fds(parts: Sequence[Part]) -> list[PassedFd]:
    """Every placeholder of ``parts``, in order."""
    return [p for p in flatten(parts) if isinstance(p, PassedFd)]


def escape_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def symbolic_part(p: PassedFd) -> str:
    if p.kind in (LISTEN, CONNECTED):
        return f"path={escape_opt(p.path)}"
    if p.kind == QMP:
        return f"unix:{escape_opt(p.path)}"
    return escape_opt(p.path)  # FDSET (NETFD parts sit in an Alt with its own text)


def render(parts: Sequence[Part], fds: Mapping[str, int] | None,
           fdsets: Mapping[str, int]) -> str:
    """One option value: symbolic when ``fds`` is None, else with descriptors."""
    out = []
    for p in parts:
        if isinstance(p, Alt):
            out.append(p.symbolic if fds is None else render(p.parts, fds, fdsets))
        elif isinstance(p, str):
            out.append(p)
        elif fds is None:
            out.append(symbolic_part(p))
        elif p.kind in (LISTEN, CONNECTED):
            out.append(f"fd={int(fds[p.name])}")
        elif p.kind == FDSET:
            out.append(f"/dev/fdset/{fdsets[p.name]}")
        elif p.kind == NETFD:
            out.append(str(int(fds[p.name])))
        else:
            out.append("none")
    return "".join(out)


def add_fd_args(parts: Sequence[Part], fds: Mapping[str, int],
                fdsets: Mapping[str, int]) -> list[str]:
    """The ``-add-fd`` options the fdset placeholders of one option value need."""
    out = []
    for p in flatten(parts):
        if isinstance(p, PassedFd) and p.kind == FDSET:
            out += ["-add-fd", f"set={fdsets[p.name]},fd={int(fds[p.name])},"
                               f"opaque={escape_opt(p.name)}"]
    return out
