"""vmconfine's built-in ``landlock`` driver: unprivileged Landlock confinement of QEMU.

Registered through the ``vmconfine`` entry-point group, like any third-party driver. See
docs/landlock.md for the ruleset model and what it restricts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.config.keys import Setting, enum
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry


#: The landlock driver's qemu.conf keys.
SETTINGS = (
    Setting(name="landlock_mode", kind="string", check=enum("enforce", "best-effort"),
            default="best-effort",
            doc='on a kernel whose Landlock ABI lacks rights vmconfine uses: "best-effort" = '
                'apply what it offers, "enforce" = refuse (no Landlock at all is always '
                "refused)"),
)


def _factory(host: HostContext) -> object:
    from vmconfine_landlock.driver import LandlockDriver

    return LandlockDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    """Register the ``landlock`` security driver."""
    registry.add(
        "landlock", _factory,
        "Landlock: unprivileged per-domain filesystem, TCP and IPC confinement (kernel >= 5.13)",
        settings=SETTINGS,
    )
