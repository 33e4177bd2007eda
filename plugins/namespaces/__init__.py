"""vmconfine's built-in ``namespaces`` pipeline driver: QEMU in a mount namespace of its own
with a private /dev (libvirt's ``namespaces = ["mount"]``), and optionally a per-domain root
view holding only what the domain needs (``namespaces = ["mount", "root"]``).

See docs/namespaces.md. Registered through the ``vmconfine`` entry-point group like any
third-party plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry


def _factory(host: HostContext) -> object:
    from vmconfine_namespaces.driver import NamespacesDriver

    return NamespacesDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    registry.add(
        "namespaces", _factory,
        "QEMU's own mount namespace: private /dev, optional per-domain root view "
        "(qemu.conf namespaces)",
        kind="pipeline",
    )
