"""``cgroup_device_acl``: the device nodes every QEMU of the instance may use.

One list for the drivers that act on it: the cgroups driver allows these devices, the
namespaces driver puts those that exist into QEMU's private /dev. libvirt's
``qemuDomainPopulateDevices`` reads the same setting (``cfg->cgroupDeviceACL``, else
``defaultDeviceACL``).
"""

from __future__ import annotations

from typing import Any

#: libvirt's current ``defaultDeviceACL`` (qemu_cgroup.c), used when qemu.conf has no
#: ``cgroup_device_acl``.
DEFAULT_DEVICE_ACL = (
    "/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/ptmx",
    "/dev/kvm",
)


def acl_list(config: Any) -> list[str]:
    """``cgroup_device_acl`` (or the default list) followed by ``cgroup_device_acl_extra``."""
    base = getattr(config, "cgroup_device_acl", None)
    paths = list(DEFAULT_DEVICE_ACL if base is None else base)
    for extra in getattr(config, "cgroup_device_acl_extra", None) or []:
        if extra not in paths:
            paths.append(extra)
    return paths
