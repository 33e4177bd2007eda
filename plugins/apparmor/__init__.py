"""vmconfine's built-in AppArmor driver: one profile per domain, made by vmconfine-aa-helper.

This package also ships the data the helper uses: ``TEMPLATE.qemu`` (the per-domain profile
template) and ``abstractions/vmconfine-qemu`` (what every QEMU may use). See docs/apparmor.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.config.keys import Setting, absolute, pattern
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry


#: The apparmor driver's qemu.conf keys.
SETTINGS = (
    Setting(name="apparmor_profile_dir", kind="string", check=absolute,
            default="/etc/apparmor.d/vmconfine",
            doc="where vmconfine-aa-helper writes per-domain AppArmor profiles"),
    Setting(name="apparmor_profile_prefix", kind="string",
            check=pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "vmconfine-"), default="vmconfine-",
            doc='prefix of per-domain AppArmor profile names (libvirt uses "libvirt-")'),
)


def _factory(host: HostContext) -> object:
    from vmconfine_apparmor.driver import AppArmorDriver

    return AppArmorDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    """Register the ``apparmor`` security driver."""
    registry.add("apparmor", _factory,
                 "AppArmor: a per-domain profile written and loaded by vmconfine-aa-helper",
                 settings=SETTINGS, autodetect=20)  # after SELinux, as in libvirt
