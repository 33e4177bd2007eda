"""A connection to one instance: plugins, the stack, running domains, crash recovery.

Every command opens a :class:`Connection`. Opening it finishes any teardown a crashed
vmconfine left behind (a journal whose supervisor no longer holds its lock), so the host is
never left changed for longer than it takes to run the next command.

The plugins, the stack, the domain model and the pipeline are loaded when a command first
needs them (a teardown to finish, a domain to read or start): ``vmconfine list`` of an
instance with nothing running imports none of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.config.instance import Instance, open_instance
from vmconfine.errors import NotRunningError, VmconfineError, XMLError
from vmconfine.launch import runtime
from vmconfine.launch.journal import Journal

if TYPE_CHECKING:
    import pluggy

    from vmconfine.domain import Domain
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.stack import Stack

log = logging.getLogger(__name__)


@dataclass
class RunningDomain:
    """A domain with a live supervisor, as read from its status file."""

    name: str
    domain: Domain
    id: int
    pid: int
    starttime: int | None
    taints: list[str]
    status_path: Path

    @property
    def alive(self) -> bool:
        return runtime.same_process(self.pid, self.starttime)


class Connection:
    """One instance, its plugins and its stack."""

    def __init__(self, instance: Instance, *, pm: pluggy.PluginManager | None = None,
                 recover: bool = True) -> None:
        self.instance = instance
        if pm is not None:
            self.pm = pm
        if recover:
            self.recover()

    @cached_property
    def pm(self) -> pluggy.PluginManager:
        """The plugin manager with every installed driver (made on first use)."""
        from vmconfine.plugin.registry import make_plugin_manager

        return make_plugin_manager()

    @cached_property
    def host(self) -> HostContext:
        from vmconfine.plugin.context import HostContext
        from vmconfine.plugin.registry import collect_drivers

        return HostContext(self.instance, self.pm, collect_drivers(self.pm))

    @classmethod
    def open(cls, uri: str | None = None, **kwargs: object) -> Connection:
        return cls(open_instance(uri), **kwargs)  # type: ignore[arg-type]

    @cached_property
    def stack(self) -> Stack:
        from vmconfine.plugin.stack import Stack

        return Stack.build(self.host)

    # ---- running domains ----------------------------------------------------------------------
    def read_status(self, name: str) -> RunningDomain | None:
        """The running domain from its status file, or None when it has none."""
        path = self.instance.status_path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        from vmconfine.domain import parse_domain

        try:
            domain = parse_domain(text, source=str(path))
        except XMLError as exc:
            raise VmconfineError(f"status file {path} is unreadable: {exc}") from None
        state = domain.runtime_state()
        return RunningDomain(
            name=name,
            domain=domain,
            id=int(state.get("id", 0)),
            pid=int(state.get("pid", 0)),
            starttime=int(state["starttime"]) if state.get("starttime") else None,
            taints=[t for t in state.get("taints", "").split(",") if t],
            status_path=path,
        )

    def running(self) -> list[RunningDomain]:
        out = []
        for rec in runtime.known_domains(self.instance):
            if not rec.alive:
                continue
            dom = self.read_status(rec.name)
            if dom is not None:
                out.append(dom)
        return sorted(out, key=lambda d: d.id)

    def lookup(self, name: str) -> RunningDomain:
        for dom in self.running():
            if name in (dom.name, str(dom.id), dom.domain.uuid):
                return dom
        raise NotRunningError(
            f"domain '{name}' is not running in {self.instance.uri} "
            f"(see 'vmconfine -c {self.instance.uri} list')"
        )

    # ---- crash recovery -------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish the teardown of every domain whose supervisor died; return their names.

        A running domain started to outlive its supervisor (a daemon's) is left alone: its
        daemon reconnects to it (see :meth:`awaits_reconnect`)."""
        done = []
        for rec in runtime.known_domains(self.instance):
            if rec.alive or self.awaits_reconnect(rec.name):
                continue
            lock = runtime.DomainLock(self.instance, rec.name)
            if not lock.try_acquire():
                continue  # a supervisor just started
            try:
                if not rec.journal_path.exists():
                    # a status file without journal: teardown finished but status remained
                    rec.status_path.unlink(missing_ok=True)
                    continue
                log.warning(
                    "domain %s: its vmconfine process is gone; finishing its teardown", rec.name
                )
                self.teardown_from_journal(rec.name)
                done.append(rec.name)
            finally:
                lock.release()
        self._sweep_leftovers()
        return done

    def _sweep_leftovers(self) -> None:
        """Remove destroy markers and lock files no domain owns. ``destroy`` may mark a domain
        whose teardown just finished, and a process killed between removing the journal and
        releasing its lock leaves the lock file: neither may outlive its domain (a marker
        would read as "destroyed" for the next domain of that name)."""
        inst = self.instance

        def owned(name: str) -> bool:  # a domain's: its teardown (or recovery) removes them
            return inst.journal_path(name).exists() or inst.status_path(name).exists()

        names = {p.name.rsplit(".", 1)[0] for pattern in ("*.destroy", "*.lock")
                 for p in (inst.run_dir.glob(pattern) if inst.run_dir.is_dir() else [])
                 if not p.name.startswith(".")}
        names = {n for n in names if not owned(n)}
        if not names:  # the usual case: no lock taken
            return
        # under the instance lock: a start takes its domain lock under it, so this never
        # holds a domain lock a start is about to take
        with runtime.instance_lock(inst):
            for name in sorted(names):
                if owned(name):
                    continue
                lock = runtime.DomainLock(inst, name)
                if not lock.try_acquire():
                    continue  # held: a live process owns the name
                try:
                    if not inst.journal_path(name).exists():
                        inst.destroy_marker_path(name).unlink(missing_ok=True)
                finally:
                    lock.release()  # removes the lock file

    def awaits_reconnect(self, name: str) -> bool:
        """True for a domain whose QEMU was started to outlive its supervisor, finished
        starting (its status exists) and still runs: a daemon will manage it again."""
        journal_path = self.instance.journal_path(name)
        if not journal_path.exists() or not self.instance.status_path(name).exists():
            return False
        journal = Journal(journal_path)
        begin = journal.last("pipeline", "begin") or {}
        started = journal.last("pipeline", "started")
        return bool(begin.get("outlive")) and started is not None and runtime.same_process(
            int(started["pid"]), started.get("starttime"))

    def teardown_from_journal(self, name: str) -> None:
        """Kill a leftover QEMU and undo every change the journal lists (fresh process)."""
        from vmconfine.domain import parse_domain
        from vmconfine.launch.pipeline import teardown
        from vmconfine.plugin.context import DomainContext
        from vmconfine.plugin.stack import Stack

        journal = Journal(self.instance.journal_path(name))
        xml_rec = journal.last("pipeline", "labels") or journal.last("pipeline", "begin")
        if xml_rec is None:
            journal.remove()
            self.instance.status_path(name).unlink(missing_ok=True)
            return
        domain = parse_domain(xml_rec["xml"], source=str(journal.path))
        started = journal.last("pipeline", "started") or journal.last("pipeline", "forked")
        # the plugins and the stack first: when they cannot load (a broken plugin), the
        # command fails before it changes anything, the leftover QEMU included
        ctx = DomainContext(self.host, domain, journal, recovering=True)
        generated = bool(journal.last("pipeline", "labels"))
        begin = journal.last("pipeline", "begin") or {}
        if begin.get("stack"):
            stack = Stack.for_teardown(self.host, list(begin["stack"]))
        else:
            stack = self.stack
        if started:
            runtime.kill_process(int(started["pid"]), started.get("starttime"))
            ctx.pid = int(started["pid"])
        errors = teardown(stack, ctx, labels_generated=generated)
        if errors:
            raise VmconfineError(
                f"teardown of domain '{name}' left problems: {'; '.join(errors)}; "
                f"the journal {journal.path} was kept, fix them and run any vmconfine command"
            )
