"""Views for the confinement report: the kernel's view of files and of the QEMU process, and
the text rendering.

* :func:`file_view`: type, owner and mode of a path, as the kernel has it;
* :func:`process_rows`: the QEMU process as intended, and (running domain) as
  ``/proc/PID/{status,attr/current,cgroup}`` shows it, each row marked when they differ: QEMU's
  ids, capabilities, no_new_privs and seccomp are the core's rows; each driver adds its own
  (its ``explain_process`` hook, else one ``"<model> label"`` row per security driver);
* :func:`render_text`: the report for a terminal.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.launch.runtime import proc_status

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.stack import Driver, Stack
    from vmconfine.report.build import Report
    from vmconfine.report.validate import Identity

CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
SECCOMP_MODES = {"0": "disabled", "1": "strict", "2": "filter"}


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def file_view(path: str) -> dict[str, Any]:
    """The kernel's view of ``path`` now (nothing is followed but symlinks)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"exists": False}
    kinds = ((stat.S_ISDIR, "dir"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
             (stat.S_ISSOCK, "sock"), (stat.S_ISFIFO, "fifo"))
    kind = next((name for test, name in kinds if test(st.st_mode)), "file")
    out: dict[str, Any] = {"exists": True, "type": kind, "owner": f"+{st.st_uid}:+{st.st_gid}",
                           "mode": f"{stat.S_IMODE(st.st_mode):04o}"}
    if kind in ("chr", "blk"):
        out["device"] = f"{kind[0]} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    real = os.path.realpath(path)
    if real != path:
        out["resolved"] = real
    return out


# ------------------------------------------------------------------------------------------------
# the process
# ------------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace").strip("\0\n ")
    except OSError:
        return None


def kernel_view(pid: int) -> dict[str, Any]:
    """What the kernel reports about ``pid`` (the keys drivers get in ``explain_process``)."""
    try:
        status = proc_status(pid)
    except OSError as exc:
        return {"error": f"cannot read /proc/{pid}/status: {exc.strerror}"}
    groups = {}
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1] or "unified"] = parts[2]
    return {
        "uid": status.get("Uid", "").split(), "gid": status.get("Gid", "").split(),
        "groups": status.get("Groups", "").split(),
        "caps": {k: status.get(k) for k in CAP_FIELDS},
        "no_new_privs": status.get("NoNewPrivs"), "seccomp": status.get("Seccomp"),
        "attr_current": _read(f"/proc/{pid}/attr/current"),
        "cgroup": groups, "exe": _read_link(f"/proc/{pid}/exe"),
    }


def _read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _row(item: str, intended: Any, kernel: Any = None, differs: bool = False) -> dict[str, Any]:
    return {"item": item, "intended": intended, "kernel": kernel, "differs": differs}


def _label_row(d: Driver, ctx: DomainContext, k: dict[str, Any] | None) -> dict[str, Any]:
    """The generic row of a security driver without ``explain_process``."""
    sec = ctx.seclabel(d.model)
    label = sec.label if sec is not None and sec.type != "none" else None
    have = None
    if k is not None and ctx.pid is not None:
        have = d.call("process_label", ctx=ctx, pid=ctx.pid) or k.get("attr_current")
    return _row(f"{d.model} label", label or "unconfined", have,
                k is not None and bool(label) and label not in (have or ""))


def process_rows(stack: Stack, ctx: DomainContext, who: Identity, pid: int | None,
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(rows, kernel view): the process as intended and, for ``pid``, as the kernel has it."""
    k = kernel_view(pid) if pid is not None else None
    live = k is not None and "error" not in k
    view = k if live else None
    ids = who.ids
    assert ids is not None
    clear = who.capabilities == "cleared"
    rows = []
    for item, want, key in (("uid", ids.uid, "uid"), ("gid", ids.gid, "gid")):
        have = " ".join(k[key]) if live else None
        rows.append(_row(item, str(want), have, live and set(k[key]) != {str(want)}))
    want_groups = " ".join(str(g) for g in ids.groups)
    have_groups = " ".join(k["groups"]) if live else None
    rows.append(_row("groups", want_groups, have_groups,
                     live and set(k["groups"]) != {str(g) for g in ids.groups}))
    caps = "none (all sets empty)" if clear else "as the caller's (not cleared)"
    have_caps = " ".join(f"{n}={v}" for n, v in k["caps"].items()) if live else None
    rows.append(_row("capabilities", caps, have_caps, live and clear and any(
        v is not None and int(v, 16) for v in k["caps"].values())))
    rows.append(_row("no_new_privs", "1", k["no_new_privs"] if live else None,
                     live and k["no_new_privs"] != "1"))
    seccomp_on = int(getattr(ctx.config, "seccomp_sandbox", -1)) != 0
    have = SECCOMP_MODES.get(k["seccomp"], k["seccomp"]) if live else None
    rows.append(_row("seccomp sandbox", "filter (-sandbox on)" if seccomp_on else "off", have,
                     live and seccomp_on and k["seccomp"] != "2"))
    for d in stack.drivers:
        if d.implements("explain_process"):
            rows += [_row(str(r["item"]), r.get("intended"), r.get("kernel"),
                          bool(r.get("differs")))
                     for r in d.call("explain_process", ctx=ctx, kernel=view) or []]
        elif d.labels and d.model != "none":
            rows.append(_label_row(d, ctx, view))
    return rows, k


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        out.append(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
                   .rstrip())
    return out


def _cell(col: dict[str, Any] | None) -> str:
    if col is None:
        return ""
    return str(col.get("cell", col.get("summary", "")))


def render_text(report: Report) -> str:
    """The report for a terminal: resources table, process table, problems, differences."""
    lines = [f"Domain '{report.name}' ({report.uuid}): "
             + (f"running, pid {report.pid}" if report.state == "running"
                else "not started (computed from the domain XML; nothing was changed)"),
             f"Instance: {report.uri}",
             "Stack: " + (" -> ".join(s["name"] for s in report.stack) or "(none)"), ""]
    names = [s["name"] for s in report.stack]
    used = [n for n in names if any(n in r.drivers for r in report.resources)]
    header = ["", "PATH", "ROLE", "ACCESS", "FILE NOW", *used]
    rows = []
    for r in report.resources:
        f = r.file
        now = (f"{f['type']} {f['owner']} {f['mode']}" if f["exists"] else "missing")
        mark = "!" if r.differences or any(
            c.get("allows") is False for c in r.drivers.values()) else ""
        access = f"{r.access}, passed as fd" if r.passed else r.access
        rows.append([mark, r.path, r.role, access, now,
                     *(_cell(r.drivers.get(n)) for n in used)])
    lines.append(f"Resources ({len(rows)}; ! = denied or differs from what was applied)")
    lines += _table(header, rows)
    lines += [f"  {n}: {report.drivers[n]['legend']}" for n in used
              if (report.drivers.get(n) or {}).get("legend")]
    lines.append("")
    running = report.state == "running"
    lines.append("Process" + (f" (kernel's view of pid {report.pid})" if running else ""))
    prow = [["!" if p["differs"] else "", p["item"], str(p["intended"]),
             *([str(p["kernel"]) if p["kernel"] is not None else ""] if running else [])]
            for p in report.process]
    lines += _table(["", "ITEM", "INTENDED", *(["KERNEL"] if running else [])], prow)
    summaries = [(n, d.get("summary")) for n, d in report.drivers.items() if d.get("summary")]
    if summaries:
        lines += ["", "Drivers"] + [f"  {n}: {s}" for n, s in summaries]
    lines += ["", f"Problems ({len(report.problems)})"]
    lines += [f"  {p.severity.upper()} {p.layer}: {p.text()}" for p in report.problems] or [
        "  none found"]
    if running:
        lines += ["", f"Differences from what vmconfine applied ({len(report.differences)})"]
        lines += [f"  ! {d}" for d in report.differences] or ["  none"]
    return "\n".join(lines) + "\n"
