"""Display ports held instance-wide while a domain runs: libvirt's port allocator.

libvirt (``virportallocator.c``) keeps one bitmap of the 65536 TCP ports in its daemon. At
start a SPICE autoport (its port and TLS port) and a VNC autoport on TCP take the first port of
``remote_display_port_min``..``remote_display_port_max`` whose bit is clear and that can be bound
on every IPv4 and IPv6 address; ports a display names itself are marked too
(``qemuProcessGraphicsReservePorts``: a fixed port another running domain holds fails the start).
Bits are cleared when the domain stops. Probing alone is not enough: QEMU binds the port only
after it has been started, so two domains starting at the same time would both find the same
port free.

vmconfine has no daemon every start goes through (each ``vmconfine run`` is its own process), so
the bitmap is a :class:`vmconfine.plugin.leases.LeaseRegistry` (the locked registry of the SELinux
MCS levels and the DAC uids) in the instance's run directory, ``run_dir/display-ports``: per boot
(no port is held across a reboot), shared by every vmconfine process of the instance under its
``flock``, each candidate probed under that lock. A lease is one port of one display of one
domain: its owner is ``<uuid>-<role number>``, its name the domain's. Each port's owner is
journaled (``pipeline``/``port``) before the lease is taken, and :func:`release` gives back the
journaled ports at teardown, so a start killed with SIGKILL at any step has its ports freed by
the next command's crash recovery. Leases whose domain has no journal any more are reclaimed when
the range runs out.

Like libvirt's (one bitmap per daemon), the allocator is per instance: the system instance, a
session and an embed root each keep their own, and between them only the bind probe keeps
ports apart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmconfine.errors import LabelError, LaunchError
from vmconfine.plugin.leases import Lease, LeaseRegistry
from vmconfine.qemu.argv_display import (
    allocate_spice_ports,
    allocate_vnc_port,
    display_port_range,
    fixed_display_ports,
    no_free_port,
    port_is_free,
)

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain
    from vmconfine.launch.journal import Journal

log = logging.getLogger(__name__)

#: a display port's role → the number that makes its lease owner (``<uuid>-000N``)
ROLES = {"vnc": 1, "spice": 2, "spice-tls": 3, "vnc-websocket": 4}
REGISTRY_DIR = "display-ports"
PORTS = 65536


class TcpPorts:
    """Every TCP port, numbered as itself (a :class:`vmconfine.plugin.leases.LeaseRange`)."""

    capacity = PORTS
    key = "tcp"

    @staticmethod
    def value(number: int) -> str:
        return str(number)

    @staticmethod
    def number(value: str) -> int | None:
        return int(value) if value.isdigit() and int(value) < PORTS else None


class PortRegistry(LeaseRegistry):
    """The instance's display ports (see the module docstring)."""

    what = "display port registry"

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance.run_dir / REGISTRY_DIR, TcpPorts(), self._live)
        self.instance = instance

    def _live(self, lease: Lease) -> bool:
        """A port is held while its domain has a journal (running, or awaiting recovery)."""
        return self.instance.journal_path(lease.name).exists()

    def full_message(self, used: int) -> str:
        return f"every TCP port is held by a domain ({used} in use)"

    def taken_message(self, label: str) -> str:
        return f"{label} is already in use by another domain"


def owner(uuid: str, role: str) -> str:
    """The lease owner of ``role``'s port of domain ``uuid``."""
    return f"{uuid}-{ROLES[role]:04x}"


def reserve(instance: Instance, journal: Journal, domain: Domain) -> None:
    """At start, before the command line is built: mark the ports the displays name, and take
    the first free port of the display range for each autoport (SPICE port and TLS port, VNC),
    written into the domain (the live XML shows them). Each lease is journaled first."""
    config = instance.config
    registry = PortRegistry(instance)

    def record(role: str) -> str:
        key = owner(domain.uuid, role)
        journal.record("pipeline", "port", owner=key, role=role)
        return key

    def acquire(role: str) -> int:
        ports = display_port_range(config)
        key = record(role)
        value = registry.allocate_first(key, domain.name, ports, port_is_free)
        if value is None:
            raise no_free_port(ports)
        log.debug("domain %s: %s port %s", domain.name, role, value)
        return int(value)

    try:
        for role, port in fixed_display_ports(domain, config):
            registry.reserve(record(role), domain.name, str(port), f"{role} port {port}")
        allocate_spice_ports(domain, config, acquire)
        allocate_vnc_port(domain, config, acquire)
    except LabelError as exc:
        raise LaunchError(f"domain '{domain.name}': {exc.message}; give the display another "
                          "port or autoport='yes'") from None
    finally:
        registry.close()


def release(instance: Instance, journal: Journal) -> list[str]:
    """Give back every port the journal says the domain took (idempotent); return problems."""
    owners = [rec["owner"] for rec in journal.records("pipeline", "port")]
    if not owners:
        return []
    registry = PortRegistry(instance)
    try:
        for key in owners:
            registry.release(key)
    except (OSError, LabelError) as exc:
        return [f"releasing display ports {', '.join(owners)} failed: {exc}"]
    finally:
        registry.close()
    return []
