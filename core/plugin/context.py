"""Contexts handed to drivers: the host (instance, config, plugins) and one domain's launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.config.hugepages import hugepage_dir
from vmconfine.plugin.resources import Resource, domain_resources

if TYPE_CHECKING:
    import pluggy

    from vmconfine.config.instance import Instance
    from vmconfine.config.settings import QemuConfig
    from vmconfine.domain import Domain, SecLabel
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.registry import DriverRegistry


@dataclass
class HostContext:
    """What every driver may know about the host side: instance, config, plugins."""

    instance: Instance
    pm: pluggy.PluginManager
    registry: DriverRegistry

    @property
    def config(self) -> QemuConfig:
        return self.instance.config

    @property
    def privileged(self) -> bool:
        return self.instance.privileged


@dataclass
class DomainContext:
    """One domain's launch (or teardown): passed to every per-domain hook.

    ``state`` is a per-driver scratch dict (``ctx.state["landlock"]``) computed in the parent
    and read by the same driver's child hooks after fork. Anything that must survive a crash of
    vmconfine goes to ``journal`` instead.
    """

    host: HostContext
    domain: Domain
    journal: Journal
    pid: int | None = None
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    recovering: bool = False
    taints: list[str] = field(default_factory=list)

    @property
    def instance(self) -> Instance:
        return self.host.instance

    @property
    def config(self) -> QemuConfig:
        return self.host.instance.config

    @cached_property
    def resources(self) -> list[Resource]:
        """Every host path QEMU will open, from the same model the argv is built from."""
        return domain_resources(self.domain, self.runtime_dir,
                                self.host.instance.domain_lib_dir(self.domain.name),
                                hugepage_dir(self.domain, self.config))

    @property
    def runtime_dir(self) -> Path:
        return self.host.instance.domain_run_dir(self.domain.name)

    def seclabel(self, model: str) -> SecLabel | None:
        return self.domain.seclabel(model)

    def driver_state(self, name: str) -> dict[str, Any]:
        return self.state.setdefault(name, {})

    def taint(self, flag: str) -> None:
        """Mark the domain tainted (libvirt's flags: custom-argv, custom-monitor,
        high-privileges, external-launch, ...); shown in live XML and ``dominfo``."""
        if flag not in self.taints:
            self.taints.append(flag)
