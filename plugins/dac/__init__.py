"""vmconfine's built-in DAC driver: QEMU runs as qemu.conf ``user``/``group``, its files are
given to those ids while it runs and handed back afterwards, and it loses every capability.

Modules: :mod:`.driver` (the hook implementations), :mod:`.identity` (ids, groups, the
switch, capabilities, /proc checks), :mod:`.idrange` and :mod:`.idleases` (per-domain uids
from ``user_range`` and their registry), :mod:`.relabel` (chown rules and journal-driven
restore),
:mod:`.owners` (remembered-owner xattrs), :mod:`.fsops` (fd-based file operations),
:mod:`.preflight` (can QEMU's ids reach its files).
"""

from __future__ import annotations

from typing import Any

from vmconfine.config.keys import Setting
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_dac.idrange import check_range

__all__ = ["SETTINGS", "vmconfine_register_drivers"]

#: The DAC driver's qemu.conf keys (``user``, ``group`` and ``remember_owner`` are
#: instance-wide: core and other drivers use them too).
SETTINGS = (
    Setting(name="dynamic_ownership", kind="bool", default=True, unprivileged=False,
            privileged_only=True,
            doc="chown QEMU's files to user/group while it runs and give them back after "
                "(libvirt's default: 1; always 0 in an unprivileged instance)"),
    Setting(name="user_range", kind="string", default="", check=check_range,
            privileged_only=True, unset='""',
            doc="per-domain identity (beyond libvirt): \"LOW-HIGH\" ids from which each "
                "domain gets a uid and primary gid of its own (no account or group may use "
                "them; needs shared_group); unset: every QEMU runs as user/group"),
    Setting(name="shared_group", kind="string", default="", privileged_only=True, unset='""',
            doc="with user_range: every QEMU's supplementary group; images several domains "
                "use (backing, readonly, shareable disks, kernels) get it with group "
                "read (shareable: read-write), never world access"),
)


def _factory(host: Any) -> Any:
    # imported when the stack is built, not when drivers are listed (CLI start-up)
    from vmconfine_dac.driver import DacDriver

    return DacDriver(host)


@hookimpl
def vmconfine_register_drivers(registry: Any) -> None:
    """Register the ``dac`` driver (the stack appends it for privileged instances)."""
    registry.add("dac", _factory, "POSIX DAC: run QEMU as qemu.conf user/group, chown its "
                 "files and give them back, drop capabilities", settings=SETTINGS,
                 implicit=True)
