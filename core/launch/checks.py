"""The checks a start makes before QEMU runs that do not belong to a driver: the domain is
not running or starting already (by name or UUID), every non-removable disk has a
``<source>``, the emulator can be executed, the network devices interfaces need exist
(:func:`vmconfine.launch.netdev.check_devices`).

:func:`vmconfine.launch.pipeline.start` runs them (the running check under the instance
lock), and the confinement report runs the same functions, so ``confinement FILE.xml`` finds
what ``run`` would stop at. Each raises one clear error; none changes anything.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from vmconfine.errors import LaunchError, XMLError
from vmconfine.launch import runtime
from vmconfine.launch.journal import Journal

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection

#: disk devices that may be empty (no medium)
REMOVABLE = frozenset({"cdrom", "floppy"})


def starting(conn: Connection) -> list[tuple[str, str]]:
    """(name, uuid) of domains whose supervisor is alive but that have no status yet."""
    out = []
    for rec in runtime.known_domains(conn.instance):
        if not rec.alive or rec.status_path.exists() or not rec.journal_path.exists():
            continue
        begin = Journal(rec.journal_path).last("pipeline", "begin")
        if begin and begin.get("uuid"):
            out.append((rec.name, str(begin["uuid"])))
    return out


def check_not_running(conn: Connection, domain: Domain) -> None:
    """No running or starting domain has this name or UUID (run it under the instance lock
    when the start follows)."""
    for other in conn.running():
        if other.name == domain.name:
            raise LaunchError(f"domain '{domain.name}' is already running (id {other.id})")
        if other.domain.uuid == domain.uuid:
            raise LaunchError(
                f"domain '{domain.name}' has the same UUID {domain.uuid} as running "
                f"domain '{other.name}'; give it another <uuid>"
            )
    for name, uuid in starting(conn):
        if name == domain.name:
            raise LaunchError(f"domain '{domain.name}' is being started by another process")
        if uuid == domain.uuid:
            raise LaunchError(
                f"domain '{domain.name}' has the same UUID {domain.uuid} as domain "
                f"'{name}', which is starting; give it another <uuid>"
            )


def check_sources(domain: Domain) -> None:
    """Every disk except an empty cdrom or floppy names its source (QEMU would stop with
    "No drive specified")."""
    for disk in domain.disks:
        local = disk.type in ("file", "block")
        empty = disk.source is None or (local and not disk.source.path)
        if empty and disk.device not in REMOVABLE:
            raise XMLError(f"disk '{disk.target}' has no <source>: only a cdrom or floppy may "
                           "be empty; add <source file='...'/> (or dev=, for a block device)")


def check_emulator(path: str) -> None:
    """The emulator is an executable file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise LaunchError(f"Cannot check QEMU binary {path}: {exc.strerror}; fix <emulator> "
                          "in the domain XML, or install QEMU") from None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise LaunchError(f"QEMU binary {path} is not an executable file; fix <emulator> in "
                          "the domain XML")
