"""Contexts handed to drivers: the host (instance, config, plugins) and one domain's launch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.config.hugepages import hugepage_dir
from vmconfine.config.settings import QemuConfig, load_config
from vmconfine.domain.display import spice_tls_port
from vmconfine.plugin.resources import Resource, domain_resources

if TYPE_CHECKING:
    import pluggy

    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain, SecLabel
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.registry import DriverRegistry
    from vmconfine.qemu.argv import QemuCommand


@dataclass
class HostContext:
    """What every driver may know about the host side: instance, config, plugins."""

    instance: Instance
    pm: pluggy.PluginManager
    registry: DriverRegistry

    def __post_init__(self) -> None:
        # the installed drivers' qemu.conf keys are known before anything reads qemu.conf
        self.instance.declare_drivers(self.registry.settings())

    @property
    def config(self) -> QemuConfig:
        return self.instance.config

    @property
    def privileged(self) -> bool:
        return self.instance.privileged

    def with_config_file(self, path: Path) -> HostContext:
        """This host with the qemu.conf at ``path`` instead of the instance's (for ``config
        FILE``); a missing file is an error, not all defaults."""
        inst = self.instance
        config = load_config(path, privileged=inst.privileged, caller_uid=inst.caller_uid,
                             caller_gid=inst.caller_gid, drivers=self.registry.settings(),
                             missing_ok=False)
        config.warn_unknown()
        return HostContext(dataclasses.replace(inst, config_path=path, _config=config),
                           self.pm, self.registry)


@dataclass
class DomainContext:
    """One domain's launch (or teardown): passed to every per-domain hook.

    ``state`` is a per-driver scratch dict (``ctx.state[name]``, :meth:`driver_state`)
    computed in the parent and read by the same driver's child hooks after fork. Anything that
    must survive a crash of vmconfine goes to ``journal`` instead.

    ``command`` is the QEMU command the pipeline will exec (:class:`~vmconfine.qemu.argv.
    QemuCommand`: ``emulator``, ``argv()``, ``env``), set once the argv is built (after label
    generation, before ``preflight``); None before that, during a teardown from the journal,
    and for contexts built without a launch. ``confinement`` sets it with symbolic per-start
    values.
    """

    host: HostContext
    domain: Domain
    journal: Journal
    pid: int | None = None
    command: QemuCommand | None = None
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    recovering: bool = False
    taints: list[str] = field(default_factory=list)
    #: the stack's ``mount_options`` (set by the pipeline once labels are generated): extra
    #: options for filesystems mounted for QEMU alone
    mount_options: str = ""
    #: the stack's record of restore-type calls made for this context (each runs once) and
    #: their failures; drivers do not use it
    restored: dict[tuple[Any, ...], tuple[str | None, Any, dict[str, Any]]] = field(
        default_factory=dict, repr=False)

    @property
    def instance(self) -> Instance:
        return self.host.instance

    @property
    def config(self) -> QemuConfig:
        return self.host.config

    @cached_property
    def resources(self) -> list[Resource]:
        """Every host path QEMU will open, from the same model the argv is built from.

        The domain's runtime directory is not one of them: it holds only the sockets vmconfine
        creates for QEMU (monitors, an automatic VNC socket), which QEMU gets as fds, so it
        stays vmconfine's own (root's, 0750, in a privileged instance) and no QEMU can unlink
        or replace a socket in it. QEMU's HOME is.
        """
        tls = spice_tls_port(self.domain.graphics) and self.config.spice_tls
        return domain_resources(self.domain, None,
                                self.host.instance.domain_lib_dir(self.domain.name),
                                hugepage_dir(self.domain, self.config),
                                self.config.spice_tls_x509_cert_dir if tls else None)

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
