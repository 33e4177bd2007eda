"""The built-in ``none`` security driver: confines nothing, every hook succeeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.plugin.context import HostContext
from vmconfine.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.helper import Helper


class NopDriver:
    """libvirt's nop driver: model "none", DOI "0", always available."""

    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        return True, ""

    @hookimpl
    def model(self) -> str:
        return "none"

    @hookimpl
    def doi(self) -> str:
        return "0"

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        """Helper processes are not confined either (libvirt's nop ``SetChildProcessLabel``)."""


@hookimpl
def vmconfine_register_drivers(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("none", lambda host: NopDriver(), "no confinement (libvirt's nop driver)")
