"""P1: start → QMP ready with every label set, and destroy + teardown; vs libvirt and the floor.

Domains: TCG, 128 MiB, 1 and 8 virtio raw disks (the first boots a guest that prints a line and
halts), an embed instance as root with ``security_driver = "none"``, so the stack is
``none, dac, cgroups, namespaces`` (QEMU runs as vmconfine-qemu, its files are chowned and
given back, a per-domain cgroup with a device whitelist, a mount namespace with its own /dev)
— libvirt's default security on a host without an LSM: DAC + cgroups + namespaces.

Measured, alternating every run:

- **floor**: the same QEMU command line spawned bare (root, no labels, no cgroup) with
  ``posix_spawn`` → ``qmp_capabilities`` → ``cont`` answered, with the same QMP client;
- **floor + cgroup move**: the same, but forked, the child writing itself into
  ``cgroup.procs`` of every hierarchy before exec (a move to where it already is: the kernel
  still takes its cgroup migration lock and waits for an RCU grace period); the child reports
  how long those writes took. This is the cost of joining groups by ``cgroup.procs``, as
  libvirt does; vmconfine (and the safety floor) no longer pay it: QEMU's process is created
  in its v2 group and joins the v1 groups through ``tasks`` (docs/cgroups.md);
- **safety floor** (:mod:`bench.p1_floor`): the same host changes as vmconfine's start for
  this domain and stack, made the minimal safe way in plain Python (one durable journal record,
  fd-based symlink-safe DAC changes with remembered owners, the cgroups with the device
  program, the child's cgroup move, mount namespace, ids, capabilities, no_new_privs, exec,
  QMP, the verification of the kernel's view, ``cont``), then SIGTERM and its undo; the child
  reports when it reached each of its steps;
- **vmconfine API** (in-process): ``supervisor.run_domain(on_ready=...)`` — fork,
  child confinement, exec, QMP handshake, verification of the kernel's view, status XML,
  ``cont``; destroy = SIGTERM to QEMU in ``on_ready`` → ``supervise`` returns after teardown
  (labels given back, cgroup removed, runtime dirs and journal gone);
- **vmconfine CLI**: ``vmconfine run`` until it prints "started"; ``vmconfine destroy``;
- **libvirt**: ``virsh start`` / ``virsh destroy`` of the same XML (defined once), private
  libvirtd under a subreaper (see :mod:`bench.libvirt_peer`).

usage: python -m bench.p1_start [--quick] [--runs N]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import p1_floor
from bench.common import (
    VMCONFINE,
    Options,
    Stats,
    Table,
    bench_main,
    domain_xml,
    embed_root,
    is_root,
    make_disks,
    now,
    ratio,
    scratch,
    verdict,
)
from bench.libvirt_peer import LibvirtPeer, PeerUnavailable

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection
    from vmconfine.launch.pipeline import Launched

OVERHEAD_TARGET = 0.025
START_TARGET = 0.5
TITLE = "P1: start -> QMP ready (labels set) and destroy + teardown"


@dataclass
class Case:
    """One domain (1 or 8 disks) and its samples."""

    name: str
    disks: int
    xml_path: Path
    xml: str
    floor: Stats = field(default_factory=Stats)
    floor_moved: Stats = field(default_factory=Stats)
    migration: Stats = field(default_factory=Stats)
    floor_qemu: Stats = field(default_factory=Stats)
    floor_work: Stats = field(default_factory=Stats)
    safety: Stats = field(default_factory=Stats)
    safety_qemu: Stats = field(default_factory=Stats)
    safety_work: Stats = field(default_factory=Stats)
    safety_destroy: Stats = field(default_factory=Stats)
    safety_steps: dict[str, Stats] = field(default_factory=dict)
    phases: dict[str, Stats] = field(default_factory=dict)
    api_start: Stats = field(default_factory=Stats)
    api_work: Stats = field(default_factory=Stats)
    api_destroy: Stats = field(default_factory=Stats)
    cli_start: Stats = field(default_factory=Stats)
    cli_destroy: Stats = field(default_factory=Stats)
    lv_start: Stats = field(default_factory=Stats)
    lv_destroy: Stats = field(default_factory=Stats)


# ---- floor --------------------------------------------------------------------------------------


def cgroup_procs_files() -> list[str]:
    """``cgroup.procs`` of this process's own cgroup in every mounted hierarchy (v1 and v2)."""
    from vmconfine_cgroups import placement

    h = placement.detect()
    files = {os.path.join(placement.join(mount, h.self_v1.get(ctrl, "/"), ""), "cgroup.procs")
             for ctrl, mount in h.v1.items()}
    if h.v2 is not None:
        files.add(os.path.join(placement.join(h.v2, h.self_v2, ""), "cgroup.procs"))
    return sorted(files)


def _spawn_moved(argv: list[str], env: dict[str, str], procs: list[str]) -> tuple[int, float]:
    """fork; the child writes itself into ``procs`` (where it already is: the kernel still
    takes its cgroup migration lock, as a move by ``cgroup.procs`` does), reports how long that
    took, and execs ``argv``. Returns (pid, seconds the child spent in the writes)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls until exec
        try:
            os.close(rfd)
            t0 = now()
            for path in procs:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                os.write(fd, b"0")
                os.close(fd)
            os.write(wfd, repr(now() - t0).encode())
            os.close(wfd)
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        took = float(f.read() or b"nan")
    return pid, took


async def _floor_async(argv: list[str], env: dict[str, str], paths: list[str],
                       procs: list[str] | None) -> tuple[float, float, int, float]:
    from vmconfine.qemu import qmp
    t0 = now()
    moved = 0.0
    if procs is None:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ])
    else:
        pid, moved = _spawn_moved(argv, env, procs)
    client = await qmp.connect(paths[0], "bench-floor")
    ready = now() - t0
    await client.execute("cont")
    elapsed = now() - t0
    await qmp.disconnect(client)
    return elapsed, ready, pid, moved


def floor_once(conn: Connection, case: Case, tmp: Path,
               procs: list[str] | None = None) -> tuple[float, float, float]:
    """Spawn the domain's own QEMU command line bare; return (spawn → QMP ready + cont,
    spawn → QMP answers, the child's cgroup writes). With ``procs``: forked, the child moved
    through the kernel's cgroup migration (see :func:`_spawn_moved`) before exec, as the
    pipeline's child is."""
    from vmconfine.domain import parse_domain
    from vmconfine.launch.pipeline import command_paths, prepare_domain
    from vmconfine.qemu.argv import build_command

    domain = parse_domain(case.xml)
    prepare_domain(conn, domain)
    command = build_command(domain, conn.instance.config,
                            command_paths(conn, domain, symbolic=False))
    socks, paths, files, fds = [], [], [], {}
    for i, passed in enumerate(command.inherited):
        if passed.kind != "listen":  # a chardev file or log: any writable file will do
            fd = os.open(tmp / f"floor-{i}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.set_inheritable(fd, True)
            files.append(fd)
            fds[passed.name] = fd
            continue
        path = str(tmp / f"floor-{i}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(8)
        s.set_inheritable(True)
        socks.append(s)
        paths.append(path)
        fds[passed.name] = s.fileno()
    argv = command.argv(fds=fds)
    try:
        elapsed, ready, pid, moved = asyncio.run(_floor_async(argv, dict(command.env), paths,
                                                              procs))
    finally:
        for s in socks:
            s.close()
        for fd in files:
            os.close(fd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return elapsed, ready, moved


QEMU_STEP = p1_floor.STEPS.index("QEMU start-up until QMP answers")


def safety_once(plan: p1_floor.Plan, case: Case | None,
                views: dict[str, dict[str, object]]) -> None:
    """One start + stop of the safety floor; with ``case``, its samples are kept, else (an
    uncounted round) QEMU's view as the kernel shows it goes to ``views``."""
    started = p1_floor.start(plan)  # undoes what it made when it fails
    try:
        if case is None:
            views[plan.name] = p1_floor.kernel_view(started.pid)
    finally:
        t1 = now()
        p1_floor.stop(started)
        done = now()
    if case is None:
        return
    case.safety.add(started.steps[-1])
    qemu = started.steps[QEMU_STEP] - started.steps[QEMU_STEP - 1]
    case.safety_qemu.add(qemu)
    case.safety_work.add(started.steps[-1] - qemu)
    case.safety_destroy.add(done - t1)
    prev = 0.0
    for step, at in zip(p1_floor.STEPS, started.steps, strict=True):
        case.safety_steps.setdefault(step, Stats()).add(at - prev)
        prev = at
    for step, took in zip(p1_floor.CHILD_STEPS, started.child, strict=True):
        case.safety_steps.setdefault(f"  child: {step}", Stats()).add(took)


# ---- vmconfine ----------------------------------------------------------------------------------


#: the pipeline's checkpoints, in order (see vmconfine.launch.pipeline.STEPS), then on_ready
PHASES = ("begin", "labels", "preflight", "sockets", "set-labels", "forked", "qmp", "verified",
          "running", "ready")
PHASE_TEXT = {
    "begin": "prepare, checks, ids, journal begin",
    "labels": "generate labels",
    "preflight": "build argv, preflight",
    "sockets": "runtime dirs, pre-opened sockets and chardev files",
    "set-labels": "set all labels (DAC, cgroup + device rules)",
    "forked": "fork, child: cgroup move, ids, caps, exec",
    "qmp": "QEMU start-up until QMP answers",
    "verified": "verify the kernel's view of QEMU",
    "running": "status XML, cont",
    "ready": "on_ready callback",
}


@contextlib.contextmanager
def phase_marks(marks: dict[str, float]) -> Iterator[None]:
    """Record when the pipeline passes each checkpoint (the crash-test pause points)."""
    from vmconfine.launch import pipeline
    real = pipeline.checkpoint

    def mark(step: str) -> None:
        marks[step] = now()
        real(step)

    pipeline.checkpoint = mark  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline.checkpoint = real  # type: ignore[assignment]


def api_once(conn: Connection, case: Case, phases: dict[str, Stats] | None = None,
             probe: dict[str, object] | None = None) -> tuple[float, float, float]:
    """(start → ready, destroy → teardown done, QEMU's own start-up: exec → QMP answers)
    through the in-process API. With ``probe`` (an uncounted round): QEMU's /dev and its
    cgroups as the kernel shows them, to compare with the safety floor's."""
    from vmconfine.domain import parse_domain
    from vmconfine.launch.supervisor import run_domain

    domain = parse_domain(case.xml)
    marks: dict[str, float] = {}

    def on_ready(launched: Launched) -> None:
        marks["ready"] = now()
        if probe is not None:
            probe.update(p1_floor.kernel_view(launched.pid))
        os.kill(launched.pid, signal.SIGTERM)

    with phase_marks(marks):
        t0 = now()
        run_domain(conn, domain, on_ready=on_ready, shutdown_timeout=5)
        done = now()
    if phases is not None:
        prev = t0
        for step in PHASES:
            if step in marks:
                phases.setdefault(step, Stats()).add(marks[step] - prev)
                prev = marks[step]
    return marks["ready"] - t0, done - marks["ready"], marks["qmp"] - marks["forked"]


def cli_once(uri: str, case: Case) -> tuple[float, float]:
    """(``vmconfine run`` → "started" printed, ``vmconfine destroy`` wall time)."""
    t0 = now()
    proc = subprocess.Popen([VMCONFINE, "-c", uri, "run", str(case.xml_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    started = None
    try:
        for line in proc.stdout:
            if "started" in line:
                started = now() - t0
                break
        if started is None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"vmconfine run did not start {case.name}: {err.strip()}")
        t1 = now()
        out = subprocess.run([VMCONFINE, "-c", uri, "destroy", case.name], capture_output=True,
                             text=True, timeout=60, check=False)
        destroyed = now() - t1
        if out.returncode != 0:
            raise RuntimeError(f"vmconfine destroy {case.name}: {out.stderr.strip()}")
        proc.communicate(timeout=60)
        return started, destroyed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def whole_process(argv: list[str]) -> float:
    t0 = now()
    subprocess.run(argv, capture_output=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
    return now() - t0


def check_restored(paths: list[Path]) -> list[str]:
    """Every image back to root:root, without remembered-owner xattrs."""
    problems = []
    for p in paths:
        st = os.stat(p)
        if (st.st_uid, st.st_gid) != (0, 0):
            problems.append(f"{p} owned by {st.st_uid}:{st.st_gid}")
        left = [x for x in os.listxattr(p) if x.startswith("trusted.vmconfine")]
        if left:
            problems.append(f"{p} still has {left}")
    return problems


# ---- the run ------------------------------------------------------------------------------------


def run(opts: Options) -> list[Table]:
    table = Table(f"{TITLE} (median [min-max], n per cell below)",
                  ["measurement", "vmconfine", "peer", "ratio", "target"])
    if not is_root():
        table.unavailable("all", "needs root (QEMU runs as vmconfine-qemu, files are chowned)")
        return [table]
    from vmconfine.launch.connection import Connection

    with scratch("p1") as d:
        uri = embed_root(d / "instance")
        images: list[Path] = []
        cases = []
        for n in (1, 8):
            name = f"bench{n}"
            disks = make_disks(d, name, n)
            images += disks
            xml = domain_xml(name, disks, memory_mib=128)
            path = d / f"{name}.xml"
            path.write_text(xml)
            cases.append(Case(name, n, path, xml))
        conn = Connection.open(uri)
        stack = ", ".join(conn.stack.names())
        safety_error = None
        views: dict[str, dict[str, object]] = {c.name: {} for c in cases}
        floor_views: dict[str, dict[str, object]] = {}
        try:
            plans = {c.name: p1_floor.plan(conn, c.name, c.xml, d / "floor") for c in cases}
        except (RuntimeError, OSError) as exc:  # e.g. no cgroup2 mount: reported, not run
            plans, safety_error = {}, str(exc)
        peer_error = None
        failures: list[str] = []
        with contextlib.ExitStack() as stack_cm:
            peer: LibvirtPeer | None = None
            try:
                peer = stack_cm.enter_context(LibvirtPeer())
                for c in cases:
                    peer.define(c.xml_path, c.name)
            except PeerUnavailable as exc:
                peer_error, peer = str(exc), None
            cli_cost, virsh_cost = Stats(), Stats()
            procs = cgroup_procs_files()
            for i in range(opts.runs + 1):  # the first round warms caches and is not counted
                keep = i > 0
                for c in cases:
                    f, f_ready, _ = floor_once(conn, c, d)
                    fm, _, mig = floor_once(conn, c, d, procs)
                    if c.name in plans:
                        try:
                            safety_once(plans[c.name], c if keep else None, floor_views)
                        except (RuntimeError, OSError) as exc:  # undone; reported
                            safety_error = f"safety floor: {exc}"
                            plans.clear()
                    a_start, a_destroy, a_qemu = api_once(conn, c, c.phases if keep else None,
                                                          None if keep else views[c.name])
                    try:
                        cl_start, cl_destroy = cli_once(uri, c)
                    except RuntimeError as exc:  # reported, the other measurements go on
                        failures.append(str(exc))
                        cl_start = cl_destroy = None
                    if keep:
                        c.floor.add(f)
                        c.floor_qemu.add(f_ready)
                        c.floor_work.add(f - f_ready)
                        c.floor_moved.add(fm)
                        c.migration.add(mig)
                        c.api_start.add(a_start)
                        c.api_work.add(a_start - a_qemu)
                        c.api_destroy.add(a_destroy)
                        if cl_start is not None and cl_destroy is not None:
                            c.cli_start.add(cl_start)
                            c.cli_destroy.add(cl_destroy)
                    if peer is not None:
                        try:
                            s = peer.timed_virsh("start", c.name)
                            x = peer.timed_virsh("destroy", c.name)
                        except PeerUnavailable as exc:
                            peer_error, peer = str(exc), None
                        else:
                            if keep:
                                c.lv_start.add(s)
                                c.lv_destroy.add(x)
                c_cost = whole_process([VMCONFINE, "-c", uri, "list"])
                v_cost = (whole_process(["/usr/bin/virsh", "-q", "-c", peer.uri, "list"])
                          if peer is not None else None)
                if keep:
                    cli_cost.add(c_cost)
                    if v_cost is not None:
                        virsh_cost.add(v_cost)
        leftovers = check_restored(images)
    for c in cases:
        disks = f"{c.disks} disk{'s' if c.disks > 1 else ''}"
        lv_start = c.lv_start.median if c.lv_start.n else None
        lv_destroy = c.lv_destroy.median if c.lv_destroy.n else None
        peer_s = c.lv_start.fmt() if c.lv_start.n else f"libvirt n/a ({peer_error})"
        table.add(f"start -> QMP ready, {disks}: API vs virsh start", c.api_start.fmt(),
                  peer_s, ratio(c.api_start.median, lv_start),
                  verdict(None if lv_start is None else c.api_start.median
                          <= START_TARGET * lv_start, f"<= {START_TARGET}x libvirt"))
        table.add(f"start, {disks}: CLI 'vmconfine run' until 'started' vs virsh start",
                  c.cli_start.fmt(), c.lv_start.fmt() if c.lv_start.n else "n/a",
                  ratio(c.cli_start.median, lv_start), "report")
        table.add(f"floor, {disks}: same QEMU argv bare, spawn -> QMP caps + cont",
                  c.floor.fmt(), "-", ratio(c.api_start.median, c.floor.median) + " (API/floor)",
                  "-")
        overhead = c.api_start.median - c.floor.median
        table.add(f"pipeline overhead over the floor, {disks} (API - floor)",
                  f"{overhead * 1e3:.1f} ms", f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(overhead, OVERHEAD_TARGET) + " (of budget)",
                  verdict(overhead <= OVERHEAD_TARGET, "<= 25 ms"))
        table.add(f"floor + cgroup move, {disks}: the same, forked, child written into "
                  "cgroup.procs before exec", c.floor_moved.fmt(), "-",
                  ratio(c.api_start.median, c.floor_moved.median) + " (API/floor)", "-")
        table.add(f"  of which the kernel's cgroup migration wait, {disks}",
                  c.migration.fmt(), "-", "n/a", "report")
        over_moved = c.api_start.median - c.floor_moved.median
        table.add(f"pipeline overhead over floor + cgroup move, {disks}",
                  f"{over_moved * 1e3:.1f} ms", f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(over_moved, OVERHEAD_TARGET) + " (of budget)", "report")
        table.add(f"safety floor, {disks}: the same host changes made the minimal safe way "
                  "(bench/p1_floor.py)", c.safety.fmt(), "-",
                  ratio(c.api_start.median, c.safety.median) + " (API/safety floor)", "-")
        floor_over = c.safety.median - c.floor.median
        table.add(f"safety floor's overhead over the floor, {disks} (safety floor - floor)",
                  _ms(floor_over), f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(floor_over, OVERHEAD_TARGET) + " (of budget)",
                  "n/a" if not c.safety.n else "<= 25 ms: possible"
                  if floor_over <= OVERHEAD_TARGET else "> 25 ms: target impossible here")
        table.add(f"  QEMU's own start-up, {disks}: exec -> QMP answers, safety floor vs floor",
                  c.safety_qemu.fmt(), c.floor_qemu.fmt(),
                  ratio(c.safety_qemu.median, c.floor_qemu.median), "report")
        work = c.safety_work.median - c.floor_work.median
        table.add(f"  safety floor's own work over the floor's, {disks} (each: start - QEMU's "
                  "start-up)", _ms(work), f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(work, OVERHEAD_TARGET) + " (of budget)", "report")
        over_safety = c.api_start.median - c.safety.median
        table.add(f"pipeline overhead over the safety floor, {disks} (API - safety floor)",
                  _ms(over_safety), f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(over_safety, OVERHEAD_TARGET) + " (of budget)", "report")
        api_work = c.api_work.median - c.safety_work.median
        table.add(f"  pipeline's own work over the safety floor's, {disks} (each: start - "
                  "QEMU's start-up)", _ms(api_work),
                  f"{OVERHEAD_TARGET * 1e3:.0f} ms budget",
                  ratio(api_work, OVERHEAD_TARGET) + " (of budget)", "report")
        table.add(f"destroy + teardown, {disks}: API vs virsh destroy", c.api_destroy.fmt(),
                  c.lv_destroy.fmt() if c.lv_destroy.n else "n/a",
                  ratio(c.api_destroy.median, lv_destroy), "report")
        table.add(f"destroy + undo, {disks}: safety floor (SIGTERM, wait, undo)",
                  c.safety_destroy.fmt(), "-",
                  ratio(c.api_destroy.median, c.safety_destroy.median)
                  + " (API/safety floor)", "report")
        table.add(f"destroy, {disks}: CLI 'vmconfine destroy' vs virsh destroy",
                  c.cli_destroy.fmt(), c.lv_destroy.fmt() if c.lv_destroy.n else "n/a",
                  ratio(c.cli_destroy.median, lv_destroy), "report")
    table.add("CLI start-up: 'vmconfine list' vs 'virsh list' (whole process)", cli_cost.fmt(),
              virsh_cost.fmt() if virsh_cost.n else "n/a",
              ratio(cli_cost.median, virsh_cost.median if virsh_cost.n else None), "report")
    table.notes += [
        f"n = {opts.runs} per cell (after one uncounted warm-up round); runs alternate "
        "floor / floor + cgroup move / safety floor / API / CLI / libvirt",
        f"vmconfine stack: {stack}; libvirt: default qemu.conf (DAC + cgroups, no LSM)",
        "CLI start-up cost = Python start-up + imports + opening the connection; the CLI rows "
        "include it, the API rows do not",
        "files after all runs: " + ("every image back to root:root, no remembered-owner xattrs"
                                    if not leftovers else "; ".join(leftovers)),
    ]
    if peer_error:
        table.notes.append(f"libvirt peer: {peer_error}")
    for c in cases:
        if c.name in plans:
            ours, theirs = floor_views.get(c.name, {}), views[c.name]
            differ = sorted(k for k in theirs if theirs[k] != ours.get(k))
            table.notes.append(
                f"{c.name}: QEMU's /dev, ids, capabilities, cgroups and device program under "
                "the safety floor " + ("= under vmconfine" if not differ
                                   else f"differ from vmconfine's: {', '.join(differ)}"))
    if safety_error:
        table.notes.append(f"safety floor not measured: {safety_error}")
    if failures:
        table.notes.append(f"CLI failures ({len(failures)}, not counted): {failures[0]}")
    return [table, phase_table(cases), safety_table(cases)]


def phase_table(cases: list[Case]) -> Table:
    """Where the API's start time goes (medians per pipeline step)."""
    table = Table("P1 (detail): API start, median per pipeline step",
                  ["step", *[f"{c.disks} disk(s)" for c in cases], "ratio"])
    for step in PHASES:
        cells = [c.phases[step].fmt() if step in c.phases else "-" for c in cases]
        share = [c.phases[step].median / c.api_start.median for c in cases if step in c.phases]
        table.add(f"{step}: {PHASE_TEXT[step]}", *cells,
                  f"{max(share):.2f} of total" if share else "n/a")
    table.notes.append("ratio = the step's share of the whole API start (largest of the "
                       "columns); 'qmp' is mostly QEMU's own start-up (the floor)")
    return table


def _ms(seconds: float) -> str:
    """``12.3 ms``; ``n/a`` for a difference without samples (NaN)."""
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.1f} ms"


def safety_table(cases: list[Case]) -> Table:
    """Where the safety floor's start time goes (medians per step)."""
    table = Table("P1 (detail): safety floor start, median per step",
                  ["step", *[f"{c.disks} disk(s)" for c in cases], "ratio"])
    steps = list(cases[0].safety_steps) if cases and cases[0].safety_steps else []
    for step in steps:
        cells = [c.safety_steps[step].fmt() if step in c.safety_steps else "-" for c in cases]
        share = [c.safety_steps[step].median / c.safety.median for c in cases
                 if step in c.safety_steps and c.safety.n]
        table.add(step, *cells, f"{max(share):.2f} of total" if share else "n/a")
    if not steps:
        table.add("no sample", *["-" for _ in cases], "n/a")
    table.notes.append("the child's steps are its own timestamps (CLOCK_MONOTONIC), written to "
                       "the parent just before exec; they make up 'log, fork -> exec'")
    return table


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, "P1 start latency", run, argv, full_runs=10, quick_runs=2)


if __name__ == "__main__":
    sys.exit(main())
