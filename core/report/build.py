"""The confinement report: what confines QEMU, per resource and for the process.

:func:`build_report` lists every resource QEMU will use (from the same resource model the
drivers and the argv use) with, per stacked driver, what that driver applies to it (its
``explain`` hook; for drivers without one, a view computed from their ``describe`` output and
the seclabels), then the QEMU process as vmconfine intends it. For a running domain it adds the
kernel's view (``/proc/PID/status``, ``attr/current``, ``/proc/PID/cgroup``, owners and
``security.selinux`` xattrs of the files) and marks where it differs from the intent.

Building a report changes nothing on the host: for a domain XML the labels are generated on
the parsed copy with an in-memory journal and released again, and the AppArmor profile is
named, never written. Problems that would stop a start or weaken confinement are listed with
their fix. The same reasoning explains why QEMU could not open a path at start
(:func:`open_failure_hint`). Text rendering: :mod:`vmconfine.report.render`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.domain.chain import resolve_chain
from vmconfine.errors import VmconfineError
from vmconfine.launch.journal import Journal
from vmconfine.launch.pipeline import command_paths, core_checks
from vmconfine.plugin.context import DomainContext
from vmconfine.plugin.resources import Resource, hostdev_resources
from vmconfine.plugin.stack import Stack
from vmconfine.qemu.argv import build_command
from vmconfine.report.render import (
    apparmor_column,
    file_view,
    process_rows,
    qemu_ids,
    selinux_column,
)
from vmconfine.report.validate import QemuIds, dac_denial, xattr_support

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection, RunningDomain
    from vmconfine.plugin.stack import Driver

log = logging.getLogger(__name__)

#: security models whose ``gen_label`` writes to the host (AppArmor loads a profile): the
#: report names their label instead of generating it
HOST_WRITING_GEN = frozenset({"apparmor"})
#: roles whose absence means the domain cannot start
REQUIRED_ROLES = frozenset({"disk", "backing", "kernel", "initrd", "dtb", "loader", "nvram"})


@dataclass
class Problem:
    """Something that stops the start or weakens confinement, and how to fix it."""

    severity: str  # "error" | "warning"
    layer: str  # a driver name, "dac" (kernel permissions), "stack", "device", "xattr"
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
        message, _, fix = exc.message.partition("; fix: ")
        self.add("error", layer, message, fix)


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


def _dry_labels(conn: Connection, stack: Stack, ctx: DomainContext,
                problems: _Problems) -> Stack | None:
    """Validate and generate labels on ``ctx.domain`` (a parsed copy); return the stack whose
    labels must be released afterwards, or None when generation failed."""
    domain = ctx.domain
    try:
        _prepare(stack, domain)
    except VmconfineError as exc:
        problems.from_error("domain", exc)
    gen = Stack(stack.host, [d for d in stack.drivers if d.model not in HOST_WRITING_GEN],
                default_confined=stack.default_confined, require_confined=stack.require_confined)
    for d in stack.security_drivers:
        if d.model in HOST_WRITING_GEN:
            _name_apparmor_label(ctx, d, stack.default_confined)
            sec = domain.seclabel(d.model)
            if sec is not None and sec.type == "none" and stack.require_confined:
                problems.add("error", "stack", "Unconfined guests are not allowed on this host "
                             f"(<seclabel model='{d.model}' type='none'>)",
                             "remove the seclabel or set security_require_confined = 0")
    try:
        gen.gen_labels(ctx)
    except VmconfineError as exc:
        problems.from_error("stack", exc)
        return None
    try:
        paths = command_paths(conn, domain, symbolic=True)
        ctx.state["pipeline"] = {"command": build_command(domain, conn.instance.config, paths,
                                                          symbolic=True)}
    except VmconfineError as exc:
        problems.from_error("domain", exc)
    return gen


def _prepare(stack: Stack, domain: Domain) -> None:
    if stack.security_drivers:
        stack.check_models(domain)
    stack.verify(domain)
    for disk in domain.disks:
        if disk.source is not None and disk.type in ("file", "block"):
            resolve_chain(disk.source)


def _name_apparmor_label(ctx: DomainContext, driver: Driver, default_confined: bool) -> None:
    """The profile name an AppArmor dynamic label gets at start (its gen_label would write and
    load the profile, which a report must not do)."""
    sec = ctx.domain.seclabel(driver.model)
    if sec is None:
        if not default_confined:
            return
        sec = ctx.domain.add_seclabel(driver.model, "dynamic", implicit=True)
    if sec.type == "dynamic" and not sec.label:
        name = f"{ctx.config.apparmor_profile_prefix}{ctx.domain.uuid}"
        sec.label = sec.imagelabel = name


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
        release = _dry_labels(conn, stack, ctx, problems)
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
    ids = qemu_ids(conn, descs)
    rows = [_resource_row(stack, ctx, res, descs, ids, problems, running is not None)
            for res in ctx.resources]
    _hostdev_problems(ctx, problems)
    _stack_problems(stack, descs, problems)
    differences: list[str] = []
    pid = running.pid if running is not None else None
    process, kernel = process_rows(conn, stack, ctx, descs, ids, pid)
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


def explain_resource(driver: Driver, ctx: DomainContext, res: Resource,
                     desc: dict[str, Any]) -> dict[str, Any] | None:
    """What ``driver`` applies to ``res``: its ``explain`` hook, else a computed view."""
    try:
        if driver.implements("explain"):
            return driver.call("explain", ctx=ctx, resource=res)
        if driver.model == "selinux":
            return selinux_column(ctx, res, desc)
        if driver.model == "apparmor":
            return apparmor_column(ctx, res, desc)
    except VmconfineError as exc:
        return {"summary": "error", "why": exc.message}
    except OSError as exc:
        return {"summary": "error", "why": f"{res.path}: {exc.strerror or exc}"}
    return None


def _resource_row(stack: Stack, ctx: DomainContext, res: Resource,
                  descs: dict[str, dict[str, Any]], ids: QemuIds, problems: _Problems,
                  running: bool) -> ResourceRow:
    view = file_view(res.path)
    row = ResourceRow(res.path, res.role, res.access, view)
    owner_during: tuple[int, int] | None = None
    for d in stack.drivers:
        col = explain_resource(d, ctx, res, descs.get(d.name, {}))
        if col is None:
            continue
        row.drivers[d.name] = col
        if col.get("allows") is False:
            problems.add("error", d.name, col.get("why") or f"{d.name} denies {res.path}",
                         path=res.path)
        elif col.get("allows") is None and col.get("why"):
            problems.add("warning", d.name, col["why"], path=res.path)
        during = col.get("during")
        if d.model == "dac" and isinstance(during, str):
            owner_during = _parse_ids(during)
        if running and view["exists"] and isinstance(during, str):
            now = view.get("owner") if d.model == "dac" else view.get("selinux")
            if d.model in ("dac", "selinux") and now != during:
                what = "owned by" if d.model == "dac" else "labelled"
                row.differences.append(f"{d.name}: {what} {now} now, {during} was applied "
                                       "at start")
    _file_problems(ctx, res, view, ids, owner_during, problems, running)
    if running and not view["exists"] and not res.create:
        row.differences.append("no longer exists")
    return row


def _parse_ids(label: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\+?(\d+):\+?(\d+)", label)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _file_problems(ctx: DomainContext, res: Resource, view: dict[str, Any], ids: QemuIds,
                   owner_during: tuple[int, int] | None, problems: _Problems,
                   running: bool) -> None:
    path = res.path
    if not view["exists"]:
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
    want = 4 | (2 if res.writable else 0) | (1 if view.get("type") == "dir" else 0)
    denial = dac_denial(path, ids, want, owner=owner_during)
    if denial is not None:
        message, fix, where = denial
        problems.add("error", "dac", message, fix, where)
    _xattr_problems(ctx, res, problems)


def _xattr_problems(ctx: DomainContext, res: Resource, problems: _Problems) -> None:
    cfg = ctx.config
    names = []
    if ctx.host.privileged and cfg.remember_owner and res.role in ("disk", "nvram", "kernel",
                                                                   "initrd", "chardev"):
        names.append((f"{cfg.remember_owner_xattr_prefix}.dac", "warning", "dac"))
    sec = ctx.seclabel("selinux")
    if sec is not None and sec.type != "none" and sec.relabel:
        names.append(("security.selinux", "error", "selinux"))
    for name, severity, layer in names:
        if xattr_support(res.path, name) is not False:
            continue
        fs = _mount_of(res.path)
        if layer == "selinux":
            problems.add(severity, layer, f"{res.path} is on {fs}, which has no per-file "
                         "SELinux labels", "mount it with context=\"<the image context>\" or "
                         "use the virt_use_nfs / virt_use_fusefs boolean", res.path)
        else:
            problems.add(severity, "xattr", f"{res.path} is on {fs}, which has no {name} "
                         "xattrs: its owner is remembered in the journal only, and another "
                         "domain using it is not detected", "keep images on a local file "
                         "system, or set remember_owner = 0", res.path)


def _mount_of(path: str) -> str:
    """``"MOUNTPOINT (FSTYPE)"`` of the file system holding ``path``."""
    best, fstype = "/", "?"
    real = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "its file system"
    for line in lines:
        left, _, right = line.partition(" - ")
        mp = left.split()[4] if len(left.split()) > 4 else ""
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, fstype = mp, right.split()[0] if right else "?"
    return f"{best} ({fstype})"


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
    that deny it (DAC, AppArmor rules, Landlock rules, cgroup device rules), or ``""``.
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
        res = Resource(path, "other", "rw" if _writable_guess(path) else "ro")
    descs = {d.name: (d.call("describe", ctx=ctx) or {}) for d in stack.drivers}
    ids = qemu_ids(conn, descs)
    reasons: list[str] = []
    owner: tuple[int, int] | None = None
    for d in stack.drivers:
        col = explain_resource(d, ctx, res, descs.get(d.name, {}))
        if not col:
            continue
        if d.model == "dac" and isinstance(col.get("during"), str) and res.role != "other":
            owner = _parse_ids(col["during"])
        if col.get("allows") is False:
            reasons.append(f"{d.name}: {col.get('why') or 'denied'}")
    want = 4 | (2 if res.writable else 0)
    denial = dac_denial(path, ids, want, owner=owner)
    if denial is not None:
        reasons.insert(0, f"DAC: {denial[0]}; fix: {denial[1]}")
    checked = "DAC, " + ", ".join(d.name for d in stack.drivers if d.model != "dac")
    if not reasons:
        return (f"QEMU could not open {path} ({error}), but none of the layers vmconfine "
                f"checks ({checked.rstrip(', ')}) denies it; look for an LSM denial in the "
                "kernel log (dmesg)")
    return f"QEMU could not open {path} ({error}): denied by " + "; ".join(reasons)


def _writable_guess(path: str) -> bool:
    """QEMU opens images read-write unless told otherwise; device nodes too."""
    return not path.startswith(("/usr/", "/boot/"))
