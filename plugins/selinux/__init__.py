"""vmconfine's built-in selinux driver: basic confinement and sVirt MCS labelling.

Registered through the ``vmconfine`` entry-point group like any third-party driver. The
driver is :class:`vmconfine_selinux.driver.SELinuxDriver`; ``docs/selinux.md`` describes it.
"""

from __future__ import annotations

from typing import Any

from vmconfine.config.keys import Setting, enum
from vmconfine.plugin.hookspecs import hookimpl

#: The selinux driver's qemu.conf keys.
SETTINGS = (
    Setting(name="selinux_mode", kind="string", check=enum("svirt", "basic"), default="svirt",
            doc='"svirt" = per-domain MCS categories; "basic" = one shared label, no '
                "categories"),
)


def _factory(host: Any) -> Any:
    # imported when the stack is built, not when drivers are listed (CLI start-up)
    from vmconfine_selinux.driver import SELinuxDriver

    return SELinuxDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: Any) -> None:
    """Add the ``selinux`` security driver (libselinux through python3-selinux)."""
    registry.add("selinux", _factory,
                 "SELinux: sVirt MCS labels per domain (libvirt's selinux driver)",
                 settings=SETTINGS, autodetect=10)  # libvirt tries SELinux first
