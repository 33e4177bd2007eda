"""The confinement report: what confines QEMU, per resource and for the process.

:func:`build_report` lists every resource QEMU will use (from the same resource model the
drivers and the argv use) with, per stacked driver, what that driver applies to it (its
``explain`` hook), then the QEMU process as vmconfine intends it (the drivers'
``explain_process`` rows). For a running domain it adds the kernel's view
(``/proc/PID/status``, ``attr/current``, ``/proc/PID/cgroup``, and what each driver's
``explain`` reads back from the files) and marks where it differs from the intent.

Building a report changes nothing on the host: for a domain XML the labels are planned on
the parsed copy with an in-memory journal (drivers with a ``plan_label`` hook only name the
label; the others generate it and it is released again). Problems that would stop a start or
weaken confinement are listed with their fix: the start's own checks
(:func:`vmconfine.launch.pipeline.prepare_domain`, :mod:`vmconfine.launch.checks`), every
driver's ``preflight``, what each driver's ``explain`` says it denies, and the kernel's
permission checks for QEMU's ids (:mod:`vmconfine.perms`). The same reasoning explains why
QEMU could not open a path at start (:func:`open_failure_hint`). Text rendering:
:mod:`vmconfine.report.render`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import VmconfineError
from vmconfine.launch import checks, netdev
from vmconfine.launch.journal import Journal
from vmconfine.launch.pipeline import command_paths, core_checks, prepare_domain
from vmconfine.perms import QemuIds, denial
from vmconfine.plugin.context import DomainContext
from vmconfine.plugin.resources import Resource, Role, hostdev_resources
from vmconfine.plugin.stack import Driver, Stack
from vmconfine.qemu.argv import build_command
from vmconfine.report.render import file_view, process_rows
from vmconfine.report.validate import Identity, qemu_ids

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection, RunningDomain

log = logging.getLogger(__name__)

#: roles whose absence means the domain cannot start
REQUIRED_ROLES = frozenset({"disk", "backing", "kernel", "initrd", "dtb", "loader", "nvram"})


@dataclass
class Problem:
    """Something that stops the start or weakens confinement, and how to fix it."""

    severity: str  # "error" | "warning"
    layer: str  # a driver name, "stack", "domain", "device", or "permissions" (the kernel's
    # permission checks when no driver decides QEMU's ids)
    message: str
    fix: str = ""
    path: str | None = None

    def text(self) -> str:
        return f"{self.message}; fix: {self.fix}" if self.fix else self.message


@dataclass
class ResourceRow:
    """One resource: the file as it is now, and what each driver applies to it."""

    path: str
    role: str
    access: str
    file: dict[str, Any]
    drivers: dict[str, dict[str, Any]] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    #: vmconfine opens it and QEMU gets the fd ("listen" | "fdset" | "qmp"), or None
    passed: str | None = None


@dataclass
class Report:
    """The whole report (``to_json`` is what ``--json`` prints)."""

    name: str
    uuid: str
    state: str  # "defined" (a domain XML, before start) | "running"
    uri: str
    pid: int | None
    stack: list[dict[str, Any]]
    resources: list[ResourceRow]
    process: list[dict[str, Any]]
    kernel: dict[str, Any] | None
    drivers: dict[str, dict[str, Any]]
    problems: list[Problem] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": {"name": self.name, "uuid": self.uuid, "state": self.state,
                       "pid": self.pid},
            "uri": self.uri,
            "stack": self.stack,
            "resources": [asdict(r) for r in self.resources],
            "process": self.process,
            "kernel": self.kernel,
            "drivers": self.drivers,
            "problems": [asdict(p) for p in self.problems],
            "differences": self.differences,
        }


class MemoryJournal(Journal):
    """A journal that keeps records in memory and never touches the disk (dry runs)."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/vmconfine-report.journal"))
        self._records = []

    def record(self, driver: str, op: str, **data: Any) -> None:
        assert self._records is not None
        self._records.append({"driver": driver, "op": op, **data})

    def close(self) -> None:
        return None

    def remove(self) -> None:
        self._records = []


class _Problems:
    """Collects problems, skipping one whose path an earlier problem already names."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, severity: str, layer: str, message: str, fix: str = "",
            path: str | None = None) -> None:
        if path and any(path in p.message for p in self.items):
            return
        if any(p.message == message for p in self.items):
            return
        self.items.append(Problem(severity, layer, message, fix, path))

    def from_error(self, layer: str, exc: VmconfineError) -> None:
        self.add_text("error", layer, exc.message)

    def add_text(self, severity: str, layer: str, text: str, path: str | None = None) -> None:
        """A problem from one line ``"message[; fix: fix]"``."""
        message, _, fix = text.partition("; fix: ")
        self.add(severity, layer, message, fix, path)


# ------------------------------------------------------------------------------------------------
# the stack, labels and the context
# ------------------------------------------------------------------------------------------------


def report_stack(conn: Connection, problems: _Problems) -> Stack:
    """The instance's stack; when it cannot be built, the drivers that work, and a problem."""
    try:
        return conn.stack
    except VmconfineError as exc:
        failure = exc.message
    cfg = conn.instance.config
    if cfg.security_require_confined:
        failure += " (security_require_confined = 1: no domain can start)"
    problems.add("error", "stack", failure, "install or enable the driver, or change "
                 f"security_driver in {conn.instance.config_path}")
    return Stack.fallback(conn.host)


def _dry_run(conn: Connection, stack: Stack, ctx: DomainContext,
             problems: _Problems) -> Stack | None:
    """What a start does before QEMU runs, changing nothing: the start's checks, then labels
    planned on ``ctx.domain`` (a parsed copy) and the command built. Returns the stack whose
    labels must be released afterwards, or None when label generation failed."""
    domain = ctx.domain
    for step in (lambda: prepare_domain(conn, domain, stack),
                 lambda: checks.check_not_running(conn, domain)):
        try:
            step()
        except VmconfineError as exc:
            problems.from_error("domain", exc)
    try:
        stack.gen_labels(ctx, plan=True)
    except VmconfineError as exc:
        problems.from_error("stack", exc)
        return None
    try:
        command = build_command(domain, conn.instance.config,
                                command_paths(conn, domain, symbolic=True), symbolic=True)
        ctx.command = command
        checks.check_emulator(command.emulator)
        netdev.check_devices(command.networks)
    except VmconfineError as exc:
        problems.from_error("domain", exc)
    return stack.generating()


def _identity(stack: Stack, ctx: DomainContext, problems: _Problems) -> Identity:
    """Who QEMU runs as; the caller when the deciding driver cannot resolve its account."""
    who = qemu_ids(stack, ctx)
    if who.ids is None:
        problems.add("error", who.layer, who.error)
        return Identity(QemuIds.caller())
    return who


# ------------------------------------------------------------------------------------------------
# building the report
# ------------------------------------------------------------------------------------------------


def build_report(conn: Connection, domain: Domain | None = None, *,
                 running: RunningDomain | None = None) -> Report:
    """The report for ``domain`` (a domain XML, before start) or for ``running``."""
    problems = _Problems()
    stack = report_stack(conn, problems)
    release: Stack | None = None
    if running is not None:
        ctx = DomainContext(conn.host, running.domain,
                            Journal(conn.instance.journal_path(running.name)), pid=running.pid)
    else:
        assert domain is not None
        ctx = DomainContext(conn.host, domain, MemoryJournal())
        release = _dry_run(conn, stack, ctx, problems)
    try:
        return _build(conn, stack, ctx, running, problems)
    finally:
        if release is not None:
            for err in release.release_labels(ctx):
                log.warning("releasing a label generated for the report: %s", err)


def _build(conn: Connection, stack: Stack, ctx: DomainContext, running: RunningDomain | None,
           problems: _Problems) -> Report:
    domain = ctx.domain
    descs: dict[str, dict[str, Any]] = {}
    for d in stack.drivers:
        try:
            descs[d.name] = d.call("describe", ctx=ctx) or {}
        except VmconfineError as exc:
            descs[d.name] = {"error": exc.message}
            problems.from_error(d.name, exc)
    if running is None:
        for d in stack.drivers:
            try:
                d.call("preflight", ctx=ctx)
            except VmconfineError as exc:
                problems.from_error(d.name, exc)
            except OSError as exc:
                problems.add("error", d.name, f"preflight failed: {exc}")
    who = _identity(stack, ctx, problems)
    rows = [_resource_row(stack, ctx, res, who, problems, running is not None)
            for res in ctx.resources]
    _hostdev_problems(ctx, problems)
    _stack_problems(stack, descs, problems)
    differences: list[str] = []
    pid = running.pid if running is not None else None
    process, kernel = process_rows(stack, ctx, who, pid)
    if running is not None:
        differences += [f"pipeline: {p}" for p in core_checks(running.pid)]
        differences += stack.verify_process(ctx, running.pid)
        for row in rows:
            differences += [f"{row.path}: {d}" for d in row.differences]
        differences += [f"process {r['item']}: kernel says {r['kernel']}, intended "
                        f"{r['intended']}" for r in process if r.get("differs")
                        and not any(r["item"].lower() in d.lower() for d in differences)]
    stack_info = []
    for d in stack.drivers:
        ok, why = d.probe()
        stack_info.append({"name": d.name, "kind": d.kind, "model": d.model,
                           "available": ok, "note": why})
    return Report(name=domain.name, uuid=domain.uuid,
                  state="running" if running is not None else "defined",
                  uri=conn.instance.uri, pid=running.pid if running is not None else None,
                  stack=stack_info, resources=rows, process=process, kernel=kernel,
                  drivers=descs, problems=problems.items, differences=differences)


def explain_resource(driver: Driver, ctx: DomainContext, res: Resource) -> dict[str, Any] | None:
    """What ``driver`` applies to ``res`` (its ``explain`` hook; errors become the cell)."""
    try:
        return driver.call("explain", ctx=ctx, resource=res)
    except VmconfineError as exc:
        return {"summary": "error", "why": exc.message}
    except OSError as exc:
        return {"summary": "error", "why": f"{res.path}: {exc.strerror or exc}"}


def _owner(col: dict[str, Any]) -> tuple[int, int] | None:
    owner = col.get("owner")
    if isinstance(owner, (list, tuple)) and len(owner) == 2:
        return int(owner[0]), int(owner[1])
    return None


def _resource_row(stack: Stack, ctx: DomainContext, res: Resource, who: Identity,
                  problems: _Problems, running: bool) -> ResourceRow:
    view = file_view(res.path)
    row = ResourceRow(res.path, res.role, res.access, view, passed=res.passed)
    owner_during: tuple[int, int] | None = None
    for d in stack.drivers:
        col = explain_resource(d, ctx, res)
        if col is None:
            continue
        row.drivers[d.name] = col
        if col.get("allows") is False:
            problems.add_text("error", d.name, col.get("why") or f"{d.name} denies {res.path}",
                              path=res.path)
        elif col.get("allows") is None and col.get("why"):
            problems.add_text("warning", d.name, col["why"], path=res.path)
        owner_during = _owner(col) or owner_during
        if running and col.get("difference"):
            row.differences.append(f"{d.name}: {col['difference']}")
    _file_problems(res, view, who, owner_during, problems, running)
    if running and not view["exists"] and not res.create:
        row.differences.append("no longer exists")
    return row


def _file_problems(res: Resource, view: dict[str, Any], who: Identity,
                   owner_during: tuple[int, int] | None, problems: _Problems,
                   running: bool) -> None:
    path = res.path
    if not view["exists"]:
        if res.role == "nvram" and getattr(res.source, "nvram_template", None):
            return  # `run` makes it from its template before anything is labelled
        if res.role in REQUIRED_ROLES:
            problems.add("error", "domain", f"{res.role} {path} does not exist",
                         "fix the path in the domain XML", path)
        elif res.role == "devnode":
            sev = "error" if path == "/dev/kvm" else "warning"
            fix = ("load the kvm module (modprobe kvm) or use <domain type='qemu'>"
                   if path == "/dev/kvm" else f"create the device node {path}")
            problems.add(sev, "device", f"device node {path} is missing", fix, path)
        elif res.role == "hostdev":
            problems.add("error", "device", f"host device node {path} is missing",
                         "plug the device in or remove the <hostdev>", path)
        return
    if res.role == "runtime_dir" and not running:
        return  # vmconfine creates it for QEMU at start
    if res.passed:
        return  # vmconfine opens it and QEMU gets the fd: QEMU's ids need no access
    assert who.ids is not None
    want = 4 | (2 if res.writable else 0) | (1 if view.get("type") == "dir" else 0)
    found = denial(path, who.ids, want, owner=owner_during, role=res.role)
    if found is not None:
        problems.add("error", who.layer, found.message, found.fix, found.culprit)


def _hostdev_problems(ctx: DomainContext, problems: _Problems) -> None:
    for hd in ctx.domain.hostdevs:
        if not hostdev_resources(hd):
            problems.add("error", "device", f"<hostdev type='{hd.type}'> is not present on "
                         "this host (no device node found)",
                         "plug the device in, bind it to vfio-pci, or remove the <hostdev>")


def _stack_problems(stack: Stack, descs: dict[str, dict[str, Any]],
                    problems: _Problems) -> None:
    for d in stack.security_drivers:
        desc = descs.get(d.name, {})
        if desc.get("confined") is False and stack.require_confined:
            problems.add("error", d.name, f"{d.name} does not confine this domain "
                         f"({desc.get('reason', 'unavailable')}) while "
                         "security_require_confined = 1", f"make {d.name} available on this "
                         "host or set security_require_confined = 0")
        ok, why = d.probe()
        if ok and why:
            problems.add("warning", d.name, why)


# ------------------------------------------------------------------------------------------------
# QEMU could not open a path
# ------------------------------------------------------------------------------------------------

_DENIED = r"(Permission denied|Operation not permitted)"
_OPEN_RE = re.compile(r"'(/[^']+)'[^'|\n]*?:\s*" + _DENIED)
_KVM_RE = re.compile(r"Could not access KVM kernel module:\s*" + _DENIED)


def denied_paths(log_text: str) -> list[tuple[str, str]]:
    """(path, error text) for each path QEMU's log says it was refused."""
    found: dict[str, str] = {}
    for m in _OPEN_RE.finditer(log_text):
        found.setdefault(m.group(1), m.group(2))
    for m in _KVM_RE.finditer(log_text):
        found.setdefault("/dev/kvm", m.group(1))
    return list(found.items())


def open_failure_hint(conn: Connection, ctx: DomainContext, log_text: str) -> str:
    """``"; <diagnosis>"`` naming each path QEMU's log says it could not open and the layer(s)
    that deny it (the kernel's permission checks for QEMU's ids, and every driver whose
    ``explain`` says it denies the path), or ``""``.
    Never raises: it only adds to an error that is already being reported."""
    try:
        paths = denied_paths(log_text)
        if not paths:
            return ""
        return "; " + "; ".join(diagnose_path(conn, ctx, p, err) for p, err in paths)
    except Exception as exc:  # a diagnosis must never hide the original error
        log.debug("diagnosing QEMU's open failure failed: %s", exc)
        return ""


def diagnose_path(conn: Connection, ctx: DomainContext, path: str, error: str) -> str:
    """One line: which layers deny QEMU ``path`` and how to fix each."""
    stack = conn.stack
    res = next((r for r in ctx.resources if r.path == path), None)
    if res is None:
        res = Resource(path, Role.OTHER, "rw" if _writable_guess(path) else "ro")
    who = qemu_ids(stack, ctx)
    ids = who.ids or QemuIds.caller()
    reasons: list[str] = []
    owner: tuple[int, int] | None = None
    for d in stack.drivers:
        col = explain_resource(d, ctx, res)
        if not col:
            continue
        if res.role != "other":
            owner = _owner(col) or owner
        if col.get("allows") is False:
            reasons.append(f"{d.name}: {col.get('why') or 'denied'}")
    want = 4 | (2 if res.writable else 0)
    found = denial(path, ids, want, owner=owner, role=res.role)
    if found is not None:
        reasons.insert(0, f"{who.layer_text}: {found.message}; fix: {found.fix}")
    checked = ", ".join([who.layer_text, *(d.name for d in stack.drivers
                                           if d.name != who.driver)])
    if not reasons:
        return (f"QEMU could not open {path} ({error}), but none of the layers vmconfine "
                f"checks ({checked.rstrip(', ')}) denies it; look for an LSM denial in the "
                "kernel log (dmesg)")
    return f"QEMU could not open {path} ({error}): denied by " + "; ".join(reasons)


def _writable_guess(path: str) -> bool:
    """QEMU opens images read-write unless told otherwise; device nodes too."""
    return not path.startswith(("/usr/", "/boot/"))
