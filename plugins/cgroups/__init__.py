"""vmconfine's built-in ``cgroups`` pipeline driver: a cgroup per domain and a device
allow-list the kernel enforces (cgroup v1 ``devices`` controller or a cgroup v2 BPF program).

See docs/cgroups.md. Registered through the ``vmconfine`` entry-point group like any
third-party plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmconfine.config.keys import Setting, absolute, enum, error
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry
    from vmconfine_cgroups.driver import CgroupsDriver


#: libvirt's cgroup controller names (``virCgroupController``).
CGROUP_CONTROLLERS = (
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "net_cls",
    "perf_event", "name=systemd", "pids",
)


def _controllers(key: str, value: Any, where: str, privileged: bool) -> Any:
    for name in value:
        if name not in CGROUP_CONTROLLERS:
            raise error(where, f"Unknown cgroup controller '{name}' (known: "
                               f"{', '.join(CGROUP_CONTROLLERS)})")
    return value


def _partition(key: str, value: Any, where: str, privileged: bool) -> Any:
    if not value.startswith("/"):
        raise error(where, f"Resource partition '{value}' must start with '/'")
    if ".." in value.split("/"):
        raise error(where, f"Resource partition '{value}' must not contain '..'")
    return value


#: The cgroups driver's qemu.conf keys (libvirt's, then vmconfine's).
SETTINGS = (
    Setting(name="cgroup_controllers", kind="strlist", check=_controllers, unset="autodetect",
            default=None,
            doc="cgroup controllers to use ([] = no cgroups; unset = every one available)"),
    Setting(name="cgroup_device_acl", kind="strlist", check=absolute,
            unset="built-in device list", default=None,
            doc="device nodes every domain may use (unset = the built-in list)"),
    Setting(name="cgroup_device_acl_extra", kind="strlist", check=absolute, default=[],
            doc="device paths allowed in addition to cgroup_device_acl (or the built-in list)"),
    Setting(name="cgroup_partition", kind="string", check=_partition, default="/machine",
            doc="cgroup partition for domains whose XML has no <resource><partition>"),
    Setting(name="cgroup_devices_backend", kind="string", check=enum("auto", "v1", "v2"),
            default="auto",
            doc='device filter: "auto" (cgroup v2 BPF when available, else v1), "v1" or '
                '"v2"'),
)


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
        settings=SETTINGS,
    )
