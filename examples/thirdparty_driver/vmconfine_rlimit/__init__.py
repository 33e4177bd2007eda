"""An example third-party vmconfine driver: QEMU runs with a lower ``RLIMIT_NOFILE``.

The plugin module registers one driver, ``rlimit``, with its own qemu.conf key
``rlimit_nofile`` (typed, with a default and a one-line doc: ``vmconfine config`` lists it,
a wrong type is a ``FILE:LINE`` error). It confines without a label (``labels=False``): it
gets no ``<seclabel>``, no ``<secmodel>`` in capabilities and no line in ``dominfo``.

Select it in qemu.conf with ``security_driver = "rlimit"`` (or next to a label-bearing driver:
``security_driver = [ "apparmor", "rlimit" ]``). The module stays light: the driver class is
imported when a stack is built, not when drivers are listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmconfine.config.keys import Setting, positive
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry

NAME = "rlimit"

#: This driver's qemu.conf keys.
SETTINGS = (
    Setting(name="rlimit_nofile", kind="uint", default=1024, check=positive,
            doc="RLIMIT_NOFILE (soft and hard) QEMU runs with: the most files it can open"),
)


def _factory(host: HostContext) -> Any:
    from vmconfine_rlimit.driver import RlimitDriver

    return RlimitDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    """Register the ``rlimit`` security driver and its qemu.conf key."""
    registry.add(NAME, _factory, "example third-party driver: QEMU's RLIMIT_NOFILE from "
                 "qemu.conf rlimit_nofile", settings=SETTINGS, labels=False)
