"""vmconfine's built-in ``namespaces`` pipeline driver: QEMU in a mount namespace of its own
with a private /dev (libvirt's ``namespaces = ["mount"]``), and optionally a per-domain root
view holding only what the domain needs (``namespaces = ["mount", "root"]``).

See docs/namespaces.md. Registered through the ``vmconfine`` entry-point group like any
third-party plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmconfine.config.keys import Setting, error
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import DriverRegistry


#: The namespaces ``namespaces`` may list: libvirt's "mount" and vmconfine's "root".
NAMESPACES = ("mount", "root")


def check_namespaces(key: str, value: Any, where: str, privileged: bool) -> Any:
    """libvirt knows "mount"; vmconfine adds "root" (a per-domain filesystem view, see
    docs/namespaces.md), which needs "mount". Unprivileged instances may use both: the
    driver makes them in a user namespace."""
    for name in value:
        if name not in NAMESPACES:
            raise error(where, f'Unknown namespace: {name} (known: "mount", "root")')
    if "root" in value and "mount" not in value:
        raise error(where, 'the "root" namespace view needs "mount" (write namespaces = '
                           '[ "mount", "root" ])')
    return list(dict.fromkeys(value))


#: The driver's qemu.conf key (libvirt's, with vmconfine's "root" added).
SETTINGS = (
    Setting(name="namespaces", kind="strlist", default=["mount"], unprivileged=[],
            check=check_namespaces,
            doc='"mount" = QEMU\'s own mount namespace with a private /dev (libvirt; the '
                'default of privileged instances when available); "root" (with "mount") = '
                "a per-domain root view, also in a session through a user namespace"),
)


def _factory(host: HostContext) -> object:
    from vmconfine_namespaces.driver import NamespacesDriver

    return NamespacesDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    registry.add(
        "namespaces", _factory,
        "QEMU's own mount namespace: private /dev, optional per-domain root view "
        "(qemu.conf namespaces)",
        kind="pipeline", settings=SETTINGS,
    )
