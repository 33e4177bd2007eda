"""The daemon's domains: persistent definitions, running domains, their state and lifecycle.

Every start goes through :func:`vmconfine.launch.pipeline.start` — the same sequence as
``run`` — with ``outlive=True``: QEMU is not killed when the daemon dies, and the daemon holds
each running domain's lifetime lock. State comes from QMP events (``STOP``, ``RESUME``,
``SHUTDOWN``) and from QEMU's exit, never assumed. When the daemon starts it reconnects to
every running domain it (or a previous daemon) started: it re-opens QMP, re-verifies the
confinement the kernel reports (fail closed: a domain whose confinement no longer matches is
reported and left unmanaged), re-reserves its labels and watches it again. A domain whose QEMU
died while no daemon ran is torn down by the connection's recovery before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from vmconfine.daemon.events import EventBus
from vmconfine.daemon.store import DefinitionStore
from vmconfine.domain import Domain, parse_domain
from vmconfine.domain.support import enforce
from vmconfine.errors import LaunchError, NotRunningError, VmconfineError
from vmconfine.launch import hotplug, hotplug_devices, media, pipeline, runtime, swtpm
from vmconfine.launch.connection import Connection, RunningDomain
from vmconfine.launch.info import domain_info_rows
from vmconfine.launch.journal import Journal
from vmconfine.launch.pipeline import Diagnose, Launched
from vmconfine.launch.process import QemuProcess, log_tail
from vmconfine.plugin.context import DomainContext
from vmconfine.qemu import qmp
from vmconfine.qemu.hotplug import parse_device

log = logging.getLogger(__name__)

DESTROY_WAIT = 30.0


class OperationError(VmconfineError):
    """A lifecycle operation that does not apply to the domain's state (HTTP 409)."""


@dataclass
class Managed:
    """A domain this daemon runs: its launch, its state from QMP, its watcher."""

    launched: Launched
    state: str = "running"  # running | paused | in shutdown
    reason: str = "booted"
    watcher: asyncio.Task[None] | None = None
    reboot: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    #: device id -> resolved when QEMU reports DEVICE_DELETED
    unplugged: dict[str, asyncio.Future[None]] = field(default_factory=dict)


class DomainManager:
    """All domains of one instance, as the daemon sees them."""

    def __init__(self, conn: Connection, events: EventBus, *,
                 diagnose: Diagnose | None = None) -> None:
        self.conn = conn
        self.events = events
        self.store = DefinitionStore(conn.instance)
        self.diagnose = diagnose
        self.managed: dict[str, Managed] = {}
        #: running domains this daemon refuses to manage, and why (confinement changed)
        self.refused: dict[str, str] = {}
        self.transient: set[str] = set()
        #: running domains undefined with --keep-tpm (a transient domain's TPM state is
        #: removed when it stops, as libvirt does, unless so kept)
        self.keep_tpm: set[str] = set()
        self._busy: set[str] = set()

    # ---- start-up ---------------------------------------------------------------------------
    async def reconnect(self) -> list[str]:
        """Manage again every running domain a daemon started; return their names."""
        done = []
        for rec in runtime.known_domains(self.conn.instance):
            if rec.alive or not self.conn.awaits_reconnect(rec.name):
                continue
            try:
                await self._reconnect_one(rec.name)
                done.append(rec.name)
            except VmconfineError as exc:
                self.refused[rec.name] = exc.message
                log.error("domain %s: not managed: %s", rec.name, exc.message)
        return done

    async def _reconnect_one(self, name: str) -> None:
        inst = self.conn.instance
        lock = runtime.DomainLock(inst, name)
        if not lock.try_acquire():
            raise VmconfineError("another process supervises it")
        try:
            status = self.conn.read_status(name)
            if status is None:
                raise VmconfineError("its status file is gone")
            journal = Journal(inst.journal_path(name))
            ctx = DomainContext(self.conn.host, status.domain, journal, pid=status.pid)
            ctx.taints.extend(status.taints)
            process = QemuProcess(status.pid, status.starttime)
            launched = Launched(ctx, None, process, status.id, lock, inst.log_path(name))
            problems = pipeline.confinement_problems(self.conn, launched)
            if problems:
                raise VmconfineError("its confinement no longer matches what was applied: "
                                     + "; ".join(problems))
            self.conn.stack.reserve_labels(ctx, status.pid)
            process.watch(asyncio.get_running_loop())
            launched.client = await qmp.connect(inst.monitor_path(name), f"vmconfined-{name}")
            reply = await launched.client.execute("query-status")
        except BaseException:
            lock.release(remove=False)
            raise
        managed = Managed(launched)
        managed.state, managed.reason = _state_of(reply)
        for what in (await hotplug.reconcile(self.conn, launched)
                     + await hotplug_devices.reconcile(self.conn, launched)
                     + await media.reconcile(self.conn, launched)):
            log.warning("domain %s: %s (interrupted hotplug)", name, what)
        self._watch(name, managed)
        log.info("domain %s: reconnected (pid %d, %s)", name, status.pid, managed.state)

    async def autostart(self) -> None:
        for name in self.store.autostart_names():
            if name in self.managed or self._foreign(name) is not None:
                continue
            try:
                await self.start(name)
            except VmconfineError as exc:
                log.error("autostart of domain %s failed: %s", name, exc.message)

    # ---- queries ----------------------------------------------------------------------------
    def _foreign(self, name: str) -> RunningDomain | None:
        """A running domain supervised by another process (``vmconfine run``)."""
        if name in self.managed:
            return None
        with contextlib.suppress(NotRunningError):
            return self.conn.lookup(name)
        return None

    def resolve(self, key: str) -> str:
        """A domain name from a name, id or UUID (running or defined)."""
        for name, m in self.managed.items():
            d = m.launched.ctx.domain
            if key in (name, str(m.launched.domain_id), d.uuid):
                return name
        for dom in self.conn.running():
            if key in (dom.name, str(dom.id), dom.domain.uuid):
                return dom.name
        defs = self.store.load_all()
        for name, d in defs.items():
            if key in (name, d.uuid):
                return name
        if key in self.refused:
            return key
        raise NotRunningError(f"Domain not found: no domain with matching name, id or uuid "
                              f"'{key}' in {self.conn.instance.uri}")

    def list(self, *, all_: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for name, m in self.managed.items():
            out.append(self._row(name, m.launched.domain_id, m.state))
            seen.add(name)
        for dom in self.conn.running():
            if dom.name not in seen:
                out.append(self._row(dom.name, dom.id, "running"))
                seen.add(dom.name)
        for name in self.refused:
            if name not in seen:
                out.append(self._row(name, None, "unmanaged"))
                seen.add(name)
        if all_:
            out += [self._row(name, None, "shut off") for name in self.store.names()
                    if name not in seen]
        return out

    def _row(self, name: str, dom_id: int | None, state: str) -> dict[str, Any]:
        return {"id": dom_id, "name": name, "state": state,
                "persistent": self.conn.instance.definition_path(name).exists(),
                "autostart": self.store.autostart(name)}

    def state(self, key: str) -> dict[str, str]:
        name = self.resolve(key)
        m = self.managed.get(name)
        if m is not None:
            return {"state": m.state, "reason": m.reason}
        if self._foreign(name) is not None:
            return {"state": "running", "reason": "unknown"}
        if name in self.refused:
            return {"state": "unmanaged", "reason": self.refused[name]}
        return {"state": "shut off", "reason": "unknown"}

    def info(self, key: str) -> list[tuple[str, str]]:
        name = self.resolve(key)
        m = self.managed.get(name)
        persistent = "yes" if self.conn.instance.definition_path(name).exists() else "no"
        autostart = "enable" if self.store.autostart(name) else "disable"
        if m is not None:
            running = self.conn.read_status(name)
            if running is not None:
                return domain_info_rows(self.conn, running, state=m.state,
                                        persistent=persistent, autostart=autostart)
        foreign = self._foreign(name)
        if foreign is not None:
            return domain_info_rows(self.conn, foreign, state="running",
                                    persistent=persistent, autostart=autostart)
        d = self.store.load(name)
        if d is None:
            raise NotRunningError(f"domain '{name}' is not running: {self.refused.get(name)}")
        return [("Id", "-"), ("Name", d.name), ("UUID", d.uuid),
                ("OS Type", d.os.type or "hvm"), ("State", "shut off"),
                ("CPU(s)", str(d.vcpus)), ("Max memory", f"{d.memory_kib} KiB"),
                ("Used memory", f"{d.current_memory_kib or d.memory_kib} KiB"),
                ("Persistent", persistent), ("Autostart", autostart)]

    def xml(self, key: str, *, inactive: bool) -> str:
        name = self.resolve(key)
        running = self.conn.read_status(name) if not inactive else None
        if running is not None and (name in self.managed or self._foreign(name)):
            return running.status_path.read_text()
        d = self.store.load(name)
        if d is None:
            running = self.conn.read_status(name)
            if running is None:
                raise NotRunningError(f"domain '{name}' has no definition")
            return running.domain.to_xml(live=False)
        return d.to_xml(live=False)

    # ---- definitions ------------------------------------------------------------------------
    def define(self, xml: str) -> str:
        domain = parse_domain(xml, source="<define>", live=False)
        enforce(domain, self.conn.instance.config.unsupported_xml)
        self.conn.stack.check_models(domain)
        self.conn.stack.verify(domain)
        pipeline.define_domain(self.conn, domain)  # machine type, Q35 PCI addresses
        for name, other in self.store.load_all().items():
            if other.uuid == domain.uuid and name != domain.name:
                raise VmconfineError(f"domain '{name}' already exists with uuid {domain.uuid}")
            if name == domain.name and other.uuid != domain.uuid:
                raise VmconfineError(f"domain '{name}' is already defined with uuid "
                                     f"{other.uuid}")
        self.store.save(domain)
        self.transient.discard(domain.name)
        self.events.emit(domain.name, "defined", "added")
        return domain.name

    def undefine(self, key: str, *, keep_tpm: bool = False) -> str:
        name = self.resolve(key)
        if not self.conn.instance.definition_path(name).exists():
            raise OperationError(f"cannot undefine transient domain '{name}'")
        domain = self.store.load(name)
        self.store.remove(name)
        if name in self.managed:
            if keep_tpm:  # its TPM state is in use: removed when it stops, unless kept
                self.keep_tpm.add(name)
        elif domain is not None and not keep_tpm:
            # virsh undefine removes the TPM emulator's state unless --keep-tpm
            swtpm.remove_state(self.conn.instance, domain)
        if name in self.managed:
            self.transient.add(name)  # libvirt: a running domain becomes transient
        elif domain is not None:
            # what drivers keep for a defined domain between runs (a per-domain uid); a
            # running one gives it back at its teardown
            for problem in self.conn.stack.forget(domain):
                log.warning("undefine %s: %s", name, problem)
        self.events.emit(name, "undefined", "removed")
        return name

    def set_autostart(self, key: str, enable: bool) -> str:
        name = self.resolve(key)
        if not self.conn.instance.definition_path(name).exists():
            raise OperationError(f"cannot set autostart for transient domain '{name}'")
        self.store.set_autostart(name, enable)
        return name

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self, key: str, *, paused: bool = False, reset_nvram: bool = False) -> str:
        name = self.resolve(key)
        domain = self.store.load(name)
        if domain is None:
            raise OperationError(f"domain '{name}' is not defined; use create for a "
                                 "transient domain")
        await self._start(domain, paused=paused, reset_nvram=reset_nvram)
        return name

    async def create(self, xml: str, *, paused: bool = False) -> str:
        domain = parse_domain(xml, source="<create>", live=False)
        enforce(domain, self.conn.instance.config.unsupported_xml)
        if self.conn.instance.definition_path(domain.name).exists():
            persistent = self.store.load(domain.name)
            if persistent is not None and persistent.uuid != domain.uuid:
                raise VmconfineError(f"domain '{domain.name}' is already defined with uuid "
                                     f"{persistent.uuid}")
        else:
            self.transient.add(domain.name)
        await self._start(domain, paused=paused)
        return domain.name

    async def _start(self, domain: Domain, *, paused: bool, reset_nvram: bool = False) -> None:
        name = domain.name
        if name in self.managed or self._foreign(name) is not None:
            raise OperationError(f"domain '{name}' is already running")
        if name in self._busy:
            raise OperationError(f"domain '{name}' is being started")
        self._busy.add(name)
        try:
            launched = await pipeline.start(self.conn, domain, paused=paused,
                                            diagnose=self.diagnose, outlive=True,
                                            reset_nvram=reset_nvram)
        finally:
            self._busy.discard(name)
        managed = Managed(launched, state="paused" if paused else "running",
                          reason="user" if paused else "booted")
        self.refused.pop(name, None)
        self._watch(name, managed)
        self.events.emit(name, "started", "booted")
        if paused:
            self.events.emit(name, "suspended", "paused")

    def _running(self, key: str) -> tuple[str, Managed]:
        name = self.resolve(key)
        m = self.managed.get(name)
        if m is None:
            if self._foreign(name) is not None:
                raise OperationError(f"domain '{name}' is supervised by its own 'vmconfine run' "
                                     "process; only destroy and qemu-monitor-command apply")
            raise OperationError(f"domain '{name}' is not running")
        return name, m

    async def _qmp(self, m: Managed, command: str) -> None:
        assert m.launched.client is not None
        try:
            await m.launched.client.execute(command)
        except Exception as exc:
            raise LaunchError(f"domain '{m.launched.name}': QMP {command} failed: {exc}") from None

    async def shutdown(self, key: str, *, timeout: float | None = None) -> str:
        name, m = self._running(key)
        await self._qmp(m, "system_powerdown")
        if timeout is not None:
            try:
                await asyncio.wait_for(m.stopped.wait(), timeout)
            except TimeoutError:
                raise OperationError(f"domain '{name}' did not shut down within {timeout:g}s "
                                     "(the guest may ignore ACPI; use destroy)") from None
        return name

    async def reboot(self, key: str) -> str:
        """ACPI power-off, then a fresh start once the guest has powered off."""
        name, m = self._running(key)
        m.reboot = True
        await self._qmp(m, "system_powerdown")
        return name

    async def reset(self, key: str) -> str:
        name, m = self._running(key)
        await self._qmp(m, "system_reset")
        return name

    async def suspend(self, key: str) -> str:
        name, m = self._running(key)
        await self._qmp(m, "stop")  # the STOP event sets the state
        return name

    async def resume(self, key: str) -> str:
        name, m = self._running(key)
        await self._qmp(m, "cont")  # the RESUME event sets the state
        return name

    async def destroy(self, key: str) -> str:
        name = self.resolve(key)
        m = self.managed.get(name)
        inst = self.conn.instance
        if m is not None:
            inst.destroy_marker_path(name).touch()
            for sig, wait in ((signal.SIGTERM, DESTROY_WAIT / 6), (signal.SIGKILL, DESTROY_WAIT)):
                if runtime.same_process(m.launched.pid, m.launched.starttime):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(m.launched.pid, sig)
                try:
                    await asyncio.wait_for(asyncio.shield(m.stopped.wait()), wait)
                    return name
                except TimeoutError:
                    continue
            raise LaunchError(f"domain '{name}': QEMU does not die after SIGKILL")
        foreign = self._foreign(name)
        if foreign is not None:
            inst.destroy_marker_path(name).touch()
            await asyncio.to_thread(runtime.kill_process, foreign.pid, foreign.starttime)
            return name
        if name in self.refused:
            await asyncio.to_thread(self._teardown_refused, name)
            return name
        raise OperationError(f"domain '{name}' is not running")

    def _teardown_refused(self, name: str) -> None:
        lock = runtime.DomainLock(self.conn.instance, name)
        if not lock.try_acquire():
            raise OperationError(f"domain '{name}' is supervised by another process")
        try:
            self.conn.teardown_from_journal(name)
        finally:
            lock.release()
        self.refused.pop(name, None)
        self.events.emit(name, "stopped", "destroyed")

    async def console_pty(self, key: str) -> tuple[str, str]:
        """The domain's first serial console pty (``/dev/pts/N``, from QMP query-chardev), as
        a path through QEMU's own root (``/proc/PID/root/dev/pts/N``): QEMU may run in a mount
        namespace with a devpts instance of its own (docs/namespaces.md)."""
        name, m = self._running(key)
        assert m.launched.client is not None
        chardevs = await m.launched.client.execute("query-chardev")
        ptys = {c["label"]: c["filename"][4:] for c in chardevs
                if str(c.get("filename", "")).startswith("pty:")}
        for label in ("charserial0", "charconsole0", *sorted(ptys)):
            if label in ptys:
                return name, f"/proc/{m.launched.pid}/root{ptys[label]}"
        raise OperationError(f"domain '{name}' has no serial console of type pty; add "
                             "<serial type='pty'> (or <console type='pty'>) to its XML")

    # ---- hotplug ----------------------------------------------------------------------------
    def _scopes(self, name: str, *, live: bool, config: bool,
                persistent: bool) -> tuple[bool, bool]:
        """virsh's --live / --config / --persistent / --current (none: the current state)."""
        running = name in self.managed
        if persistent:
            live, config = running, True
        if not live and not config:
            return running, not running
        if live and not running:
            raise OperationError(f"domain '{name}' is not running: drop --live")
        if config and not self.conn.instance.definition_path(name).exists():
            raise OperationError(f"domain '{name}' is transient: drop --config")
        return live, config

    async def attach_device(self, key: str, xml: str, *, live: bool, config: bool,
                            persistent: bool = False) -> str:
        name = self.resolve(key)
        live, config = self._scopes(name, live=live, config=config, persistent=persistent)
        el = parse_device(xml)
        if config:  # checked first, so a bad definition change attaches nothing
            definition = self.store.load(name)
            assert definition is not None
            updated = hotplug_devices.config_with_element(definition, el)
        if live:
            launched = self.managed[name].launched
            if el.tag == "disk":
                await hotplug.attach_disk(self.conn, launched, xml)
            elif el.tag == "hostdev":
                await hotplug_devices.attach_hostdev(self.conn, launched, el)
            else:
                await hotplug_devices.attach_chardev(self.conn, launched, el)
        if config:
            self.store.save(updated)
        return name

    async def detach_device(self, key: str, xml: str, *, live: bool, config: bool,
                            persistent: bool = False) -> str:
        name = self.resolve(key)
        live, config = self._scopes(name, live=live, config=config, persistent=persistent)
        el = parse_device(xml)
        if config:
            definition = self.store.load(name)
            assert definition is not None
            updated = hotplug_devices.config_without_element(definition, el)
        if live:
            m = self.managed[name]
            if el.tag == "hostdev":
                await hotplug_devices.detach_hostdev(self.conn, m.launched, el, m.unplugged)
            elif el.tag != "disk":
                await hotplug_devices.detach_chardev(self.conn, m.launched, el, m.unplugged)
            else:
                await self._detach_disk(name, m, hotplug.device_target(xml))
        if config:
            self.store.save(updated)
        return name

    async def _detach_disk(self, name: str, m: Managed, target: str) -> None:
        domain = m.launched.ctx.domain
        disk = next((d for d in domain.disks if d.target == target), None)
        if disk is None:
            raise OperationError(f"domain '{name}' has no disk {target}")
        device_id = hotplug.device_id(self.conn, domain, disk)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        m.unplugged[device_id] = future
        try:
            await hotplug.detach_disk(self.conn, m.launched, target, future)
        finally:
            m.unplugged.pop(device_id, None)

    async def change_media(self, key: str, target: str, source: str | None, action: str, *,
                           live: bool, config: bool, force: bool = False) -> str:
        """virsh's change-media; returns its line for what was done."""
        name = self.resolve(key)
        live, config = self._scopes(name, live=live, config=config, persistent=False)
        if config:
            definition = self.store.load(name)
            assert definition is not None
            updated = media.config_with_media(definition, target, source if action != "eject"
                                              else None)
        line = media.DONE.get(action, "")
        if live:
            line = await media.change_media(self.conn, self.managed[name].launched, target,
                                            source, action, force=force)
        if config:
            self.store.save(updated)
        return line

    # ---- watching ---------------------------------------------------------------------------
    def _watch(self, name: str, m: Managed) -> None:
        self.managed[name] = m
        m.watcher = asyncio.ensure_future(self._watch_one(name, m))

    async def _watch_one(self, name: str, m: Managed) -> None:
        launched = m.launched
        shutdown_reason = ""
        events = asyncio.ensure_future(self._qmp_events(name, m))
        try:
            await launched.process.exited.wait()
            for _ in range(200):  # let the reader see SHUTDOWN, which QEMU sends just before
                if events.done() or m.state == "in shutdown":
                    break
                await asyncio.sleep(0.005)
            shutdown_reason = m.reason if m.state == "in shutdown" else ""
        finally:
            events.cancel()
            if launched.client is not None:
                await qmp.disconnect(launched.client)
        destroyed = self.conn.instance.destroy_marker_path(name).exists()
        errors = pipeline.finish(self.conn, launched)
        del self.managed[name]
        m.stopped.set()
        detail = _stop_detail(destroyed, shutdown_reason, launched.process.exit_code,
                              log_tail(launched.log_path, 3))
        if errors:
            log.error("domain %s: teardown left problems: %s", name, "; ".join(errors))
        self.events.emit(name, "stopped", detail)
        restarts = m.reboot and not destroyed
        if name in self.transient:
            self.transient.discard(name)
            if name not in self.keep_tpm and not restarts:
                # libvirt: a transient domain's TPM state goes with it
                try:
                    swtpm.remove_state(self.conn.instance, launched.ctx.domain)
                except VmconfineError as exc:
                    log.error("%s", exc.message)
        if not restarts:
            self.keep_tpm.discard(name)
        if m.reboot and not destroyed:
            domain = self.store.load(name) or parse_domain(
                launched.ctx.domain.to_xml(live=False), live=False)
            try:
                await self._start(domain, paused=False)
            except VmconfineError as exc:
                log.error("domain %s: restart after reboot failed: %s", name, exc.message)

    async def _qmp_events(self, name: str, m: Managed) -> None:
        client = m.launched.client
        assert client is not None
        async for event in client.events:
            kind = event["event"]
            if kind == "STOP" and m.state != "paused":
                m.state, m.reason = "paused", "user"
                self.events.emit(name, "suspended", "paused")
            elif kind == "STOP":
                self.events.emit(name, "suspended", "paused")
            elif kind == "RESUME" and m.state == "paused":
                m.state, m.reason = "running", "unpaused"
                self.events.emit(name, "resumed", "unpaused")
            elif kind == "DEVICE_DELETED":
                device = str(event.get("data", {}).get("device", ""))
                future = m.unplugged.get(device)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == "SHUTDOWN":
                m.state = "in shutdown"
                m.reason = str(event.get("data", {}).get("reason", "shutdown"))
                if not self.conn.instance.destroy_marker_path(name).exists():
                    self.events.emit(name, "shutdown", m.reason)  # not our own destroy

    # ---- daemon exit ------------------------------------------------------------------------
    async def detach_all(self) -> None:
        """Stop watching every domain and release its lock; QEMU keeps running, and the next
        daemon reconnects to it."""
        for _name, m in list(self.managed.items()):
            if m.watcher is not None:
                m.watcher.cancel()
                with contextlib.suppress(BaseException):
                    await m.watcher
            m.launched.process.close()
            m.launched.lock.release(remove=False)
        self.managed.clear()

    def running_count(self) -> int:
        return len(self.managed)


def _state_of(reply: Any) -> tuple[str, str]:
    status = str(reply.get("status", "running")) if isinstance(reply, dict) else "running"
    if status == "running":
        return "running", "unknown"
    if status in ("paused", "prelaunch", "suspended"):
        return "paused", "user" if status == "paused" else status
    if status == "shutdown":
        return "in shutdown", "unknown"
    return "paused", status


def _stop_detail(destroyed: bool, shutdown_reason: str, code: int | None, tail: str) -> str:
    if destroyed:
        return "destroyed"
    if shutdown_reason == "guest-panic":
        return "crashed"
    if shutdown_reason in ("guest-shutdown", "host-qmp-quit", "host-signal"):
        return "shutdown"
    if code is not None and code < 0:
        return "crashed"
    if code == 0 and "terminating on signal" not in tail:
        return "shutdown"
    return "failed"
