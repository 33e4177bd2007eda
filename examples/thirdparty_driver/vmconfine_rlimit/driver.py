"""The ``rlimit`` driver: set ``RLIMIT_NOFILE`` in the forked child, verify it after exec.

* ``preflight`` (parent, changes nothing): a limit above vmconfine's own hard limit is refused
  (the child sets it after the capabilities are dropped, when it can only lower limits).
* ``child_confine`` (child, just before exec, after no_new_privs): ``setrlimit`` soft = hard =
  ``rlimit_nofile``. Lowering a hard limit cannot be undone by QEMU without
  CAP_SYS_RESOURCE, which the DAC driver dropped.
* ``verify_process`` (parent, after exec, before the guest CPUs run): read
  ``/proc/PID/limits``; any difference, or a file that cannot be read, is reported, and the
  pipeline kills QEMU (fail closed).

Nothing on the host changes, so there is nothing to journal or restore.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_rlimit import NAME

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext, HostContext

#: the /proc/PID/limits row of RLIMIT_NOFILE
LIMITS_ROW = "Max open files"


def read_nofile(pid: int) -> tuple[str, str]:
    """(soft, hard) RLIMIT_NOFILE of ``pid`` as /proc/PID/limits shows them."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith(LIMITS_ROW):
                soft, hard = line[len(LIMITS_ROW):].split()[:2]
                return soft, hard
    raise OSError(f"/proc/{pid}/limits has no '{LIMITS_ROW}' row")


class RlimitDriver:
    """QEMU runs with ``RLIMIT_NOFILE = rlimit_nofile`` (soft and hard)."""

    def __init__(self, host: HostContext) -> None:
        self.host = host

    def limit(self, ctx: DomainContext | None = None) -> int:
        config = ctx.config if ctx is not None else self.host.config
        return int(config.driver_settings(NAME).rlimit_nofile)

    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        return True, ""

    @hookimpl
    def model(self) -> str:
        return NAME

    @hookimpl
    def doi(self) -> str:
        return "0"

    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        want = self.limit(ctx)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and want > hard:
            where = ctx.config.source("rlimit_nofile")
            raise DriverError(f"rlimit: rlimit_nofile = {want} ({where}) is above this "
                              f"hard limit {hard} of vmconfine itself; lower it to at most "
                              f"{hard}")

    @hookimpl
    def child_confine(self, ctx: DomainContext) -> None:
        want = self.limit(ctx)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))

    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        want = str(self.limit(ctx))
        try:
            soft, hard = read_nofile(pid)
        except OSError as exc:
            return [f"cannot read the limits of QEMU (pid {pid}): {exc}"]
        if (soft, hard) != (want, want):
            return [f"RLIMIT_NOFILE is {soft}/{hard} (soft/hard), expected {want}/{want}"]
        return []

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        want = self.limit(ctx)
        return {"summary": f"RLIMIT_NOFILE {want}", "nofile": want,
                "source": ctx.config.source("rlimit_nofile")}
