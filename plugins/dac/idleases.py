"""The persistent registry of per-domain uids (qemu.conf ``user_range``, see
:mod:`vmconfine_dac.idrange`).

A :class:`vmconfine.plugin.leases.LeaseRegistry` in the instance's ``lib_dir/dac-identity``
(kept across reboots: a defined domain keeps its uid), one lease per domain UUID, shared with
nothing but the same machinery as the SELinux driver's MCS registry. A lease lives while its
domain runs (or awaits crash recovery) or is defined; it is given back at the teardown of a
transient domain (journal-driven, so also after a crash), when a defined one is undefined
(``forget_domain``), and reclaimed from domains that are gone when the range is full.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.domain import parse_domain
from vmconfine.errors import LabelError, VmconfineError
from vmconfine.launch import runtime
from vmconfine.plugin.leases import Lease, LeaseRegistry
from vmconfine_dac.idrange import UidRange

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance

REGISTRY_DIR = "dac-identity"


class IdentityRegistry(LeaseRegistry):
    """The instance's persistent per-domain uid leases."""

    what = "DAC identity registry"

    def __init__(self, directory: Path, rng: UidRange, is_live: Any = None) -> None:
        super().__init__(directory, rng, is_live, boot=lambda: 0, durable=True)

    def full_message(self, used: int) -> str:
        return (f"qemu.conf user_range {self.range} is exhausted ({used} uids held by running "
                "or defined domains); widen user_range or undefine a domain")

    def taken_message(self, label: str) -> str:
        return (f"DAC label {label} is the own uid of another domain (DAC identity registry "
                f"{self.dir}); stop one of them")


def registry_dir(instance: Instance) -> Path:
    return Path(instance.lib_dir) / REGISTRY_DIR


def defined_uuid(instance: Instance, name: str) -> str | None:
    """The UUID of the persistent definition ``name``, if there is one."""
    path = instance.definition_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""  # unreadable: treat as defined (never take a uid from a domain by mistake)
    try:
        return parse_domain(text, source=str(path), live=False).uuid
    except VmconfineError:
        return ""


def lease_live(instance: Instance, lease: Lease) -> bool:
    """A lease is kept while its domain runs (or awaits crash recovery) or is defined."""
    if runtime.supervisor_alive(instance, lease.name) or \
            instance.journal_path(lease.name).exists():
        return True
    found = defined_uuid(instance, lease.name)
    return found is not None and found in ("", lease.owner)


def open_registry(instance: Instance, rng: UidRange) -> IdentityRegistry:
    directory = registry_dir(instance)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LabelError(f"cannot create the DAC identity registry {directory}: "
                         f"{exc.strerror}") from None
    return IdentityRegistry(directory, rng, lambda lease: lease_live(instance, lease))
