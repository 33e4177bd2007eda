"""vmconfine's built-in ``cgroups`` pipeline driver: a cgroup per domain and a device
allow-list the kernel enforces (cgroup v1 ``devices`` controller or a cgroup v2 BPF program).

See docs/cgroups.md. Registered through the ``vmconfine`` entry-point group like any
third-party plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry
    from vmconfine_cgroups.driver import CgroupsDriver


def _factory(host: HostContext) -> CgroupsDriver:
    from vmconfine_cgroups.driver import CgroupsDriver

    return CgroupsDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    registry.add(
        "cgroups",
        _factory,
        "per-domain cgroup and device allow-list (cgroup v1 devices or v2 BPF)",
        kind="pipeline",
    )
