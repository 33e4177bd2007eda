"""Views for the confinement report: the kernel's view of files and of the QEMU process, the
columns of drivers without an ``explain`` hook, and the text rendering.

* :func:`file_view`: type, owner, mode and ``security.selinux`` of a path, as the kernel has it;
* :func:`selinux_column`, :func:`apparmor_column`: what the SELinux and AppArmor drivers apply
  to a resource, computed from the domain's seclabels, the driver's ``describe`` output (the
  profile's ``.files`` rules, the files it relabelled) and the file's xattr;
* :func:`process_rows`: the QEMU process as intended, and (running domain) as
  ``/proc/PID/{status,attr/current,cgroup}`` shows it, each row marked when they differ;
* :func:`render_text`: the report for a terminal.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.launch.runtime import proc_status
from vmconfine.report.validate import QemuIds, ids_from_config

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.resources import Resource
    from vmconfine.plugin.stack import Stack
    from vmconfine.report.build import Report

CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
SECCOMP_MODES = {"0": "disabled", "1": "strict", "2": "filter"}
#: SELinux: resources the driver leaves to the policy's own labels
SELINUX_NOT_RELABELLED = frozenset({"loader", "graphics", "devnode", "socket"})
_AA_RULE = re.compile(r'^\s*(deny\s+)?"([^"]+)"\s+([a-zA-Z]+)\s*,')
_LANDLOCK_LETTERS = (("read_file", "r"), ("write_file", "w"), ("truncate", "t"),
                     ("execute", "x"), ("read_dir", "d"), ("make_", "m"), ("remove_", "u"),
                     ("ioctl_dev", "i"), ("refer", "f"))


# ------------------------------------------------------------------------------------------------
# files and identities
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
                           "mode": f"{stat.S_IMODE(st.st_mode):04o}", "selinux": None}
    if kind in ("chr", "blk"):
        out["device"] = f"{kind[0]} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    real = os.path.realpath(path)
    if real != path:
        out["resolved"] = real
    try:
        out["selinux"] = os.getxattr(path, "security.selinux").rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        pass
    return out


def qemu_ids(conn: Connection, descs: dict[str, dict[str, Any]]) -> QemuIds:
    """Who QEMU runs as: the DAC driver's view, else qemu.conf, else the caller."""
    dac = descs.get("dac") or {}
    m = re.fullmatch(r"\+?(\d+):\+?(\d+)", str(dac.get("label") or ""))
    if m:
        uid, gid = int(m.group(1)), int(m.group(2))
        groups = tuple(sorted({int(g) for g in dac.get("groups") or []} | {gid}))
        return QemuIds(uid, gid, groups, uid == 0 and dac.get("capabilities") == "kept")
    ids = ids_from_config(conn.instance)
    return ids if ids is not None else QemuIds(os.getuid(), os.getgid())


# ------------------------------------------------------------------------------------------------
# drivers without an explain hook
# ------------------------------------------------------------------------------------------------


def _context(label: str, type_: str | None = None, level: str | None = None) -> str:
    parts = label.split(":", 3)
    if len(parts) < 3:
        return label
    if type_:
        parts[2] = type_
    if level is not None:
        parts = [*parts[:3], level]
    return ":".join(parts)


def selinux_column(ctx: DomainContext, res: Resource, desc: dict[str, Any]) -> dict[str, Any]:
    """The SELinux label of ``res`` before start and while QEMU runs (libvirt's rules)."""
    view_now = file_view(res.path).get("selinux")
    sec = ctx.seclabel("selinux")
    applied = {f.get("path"): f.get("label") for f in desc.get("files") or []}
    real = os.path.realpath(res.path)
    out: dict[str, Any] = {"now": view_now}
    during: str | None = applied.get(real) or applied.get(res.path)
    dev = res.seclabel("selinux")
    image = (sec.imagelabel if sec is not None else None) or ""
    if during is None and sec is not None and sec.type != "none" and sec.relabel and image:
        if dev is not None and dev.relabel is False:
            during = None
        elif dev is not None and dev.label:
            during = dev.label
        elif res.role in SELINUX_NOT_RELABELLED or res.path == "/dev/vfio/vfio":
            during = None
        elif res.role == "disk" and res.shared:
            during = _context(image, level="s0")
        elif res.role in ("backing", "kernel", "initrd", "dtb") or (
                res.role == "disk" and res.readonly):
            during = _context(image, "virt_content_t", "s0")
        else:
            during = image
    out["during"] = during
    out["summary"] = (f"{view_now or '-'} -> {during}" if during
                      else f"{view_now or '-'} (not relabelled)")
    return out


def apparmor_rules(ctx: DomainContext, desc: dict[str, Any]) -> list[str] | None:
    """The profile's ``.files`` rules: the loaded profile's, else what the helper would write."""
    rules = desc.get("rules")
    if rules:
        return list(rules)
    cache = ctx.driver_state("report")
    if "apparmor_rules" not in cache:
        try:
            from vmconfine_aa_helper.rules import domain_rules

            cache["apparmor_rules"] = domain_rules(ctx.domain, ctx.instance).render().splitlines()
        except Exception as exc:  # the helper refuses a path, or is not installed
            cache["apparmor_rules"] = None
            cache["apparmor_error"] = str(exc)
    return cache["apparmor_rules"]


def apparmor_column(ctx: DomainContext, res: Resource, desc: dict[str, Any]) -> dict[str, Any]:
    """The per-domain profile rules that match ``res`` and whether they grant its access."""
    sec = ctx.seclabel("apparmor")
    if sec is None or sec.type == "none" or not sec.label:
        return {"summary": "unconfined"}
    lines = apparmor_rules(ctx, desc)
    if lines is None:
        err = ctx.driver_state("report").get("apparmor_error", "")
        return {"profile": sec.label, "summary": "?", "allows": None,
                "why": f"the AppArmor rules cannot be computed: {err}"}
    real = os.path.realpath(res.path)
    allow, deny, matched = set(), set(), []
    for line in lines:
        m = _AA_RULE.match(line)
        if not m:
            continue
        pattern, perms = m.group(2), m.group(3)
        hit = pattern in (real, res.path) or (
            pattern.endswith("/**") and real.startswith(pattern[:-2]))
        if hit:
            (deny if m.group(1) else allow).update(perms)
            matched.append(line.strip())
    need = {"r", "w"} if res.writable else {"r"}
    perms = "".join(ch for ch in "rwalkmix" if ch in allow)
    out: dict[str, Any] = {"profile": sec.label, "rules": matched, "perms": perms}
    if not matched:
        out.update(summary="no rule", allows=None,
                   why=f"no rule of AppArmor profile {sec.label} names {real} (only the shared "
                   "abstraction can allow it)")
    elif need - allow or need & deny:
        out.update(summary=f"DENIED ({perms or '-'})", allows=False,
                   why=f"AppArmor profile {sec.label} grants only '{perms}' on {real}; list the "
                   "file in the domain XML so the profile allows it")
    else:
        out.update(summary=perms, allows=True)
    return out


# ------------------------------------------------------------------------------------------------
# the process
# ------------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace").strip("\0\n ")
    except OSError:
        return None


def kernel_view(pid: int, cgroup_desc: dict[str, Any]) -> dict[str, Any]:
    """What the kernel reports about ``pid``."""
    try:
        status = proc_status(pid)
    except OSError as exc:
        return {"error": f"cannot read /proc/{pid}/status: {exc.strerror}"}
    cgroups = {}
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            cgroups[parts[1] or "unified"] = parts[2]
    out: dict[str, Any] = {
        "uid": status.get("Uid", "").split(), "gid": status.get("Gid", "").split(),
        "groups": status.get("Groups", "").split(),
        "caps": {k: status.get(k) for k in CAP_FIELDS},
        "no_new_privs": status.get("NoNewPrivs"), "seccomp": status.get("Seccomp"),
        "attr_current": _read(f"/proc/{pid}/attr/apparmor/current")
        or _read(f"/proc/{pid}/attr/current"),
        "cgroups": cgroups, "exe": _read_link(f"/proc/{pid}/exe"),
    }
    for ctrls, d in (cgroup_desc.get("dirs") or {}).items():
        if "devices" in ctrls.split(","):
            listed = _read(os.path.join(d, "devices.list"))
            if listed is not None:
                out["devices_list"] = listed.splitlines()
    return out


def _read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _row(item: str, intended: Any, kernel: Any = None, differs: bool = False) -> dict[str, Any]:
    return {"item": item, "intended": intended, "kernel": kernel, "differs": differs}


def process_rows(conn: Connection, stack: Stack, ctx: DomainContext,
                 descs: dict[str, dict[str, Any]], ids: QemuIds, pid: int | None,
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(rows, kernel view): the process as intended and, for ``pid``, as the kernel has it."""
    cg = descs.get("cgroups") or {}
    k = kernel_view(pid, cg) if pid is not None else None
    live = k is not None and "error" not in k
    dac = descs.get("dac") or {}
    clear = dac.get("capabilities", "cleared") == "cleared" if dac else False
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
    for d in stack.security_drivers:
        sec = ctx.seclabel(d.model)
        if d.model in ("dac", "none"):
            continue
        label = sec.label if sec is not None and sec.type != "none" else None
        if d.model == "landlock":
            rows.append(_row("landlock ruleset", label or "none",
                             "(not visible in /proc)" if live else None))
            continue
        have = k["attr_current"] if live else None
        rows.append(_row(f"{d.model} label", label or "unconfined", have,
                         live and bool(label) and label not in (have or "")))
    for ctrls, d in (cg.get("dirs") or {}).items():
        have = None
        if live:  # a controller's group, or the cgroup2 one ("0::/...") where it lives there
            found = [k["cgroups"][n] for n in [*ctrls.split(","), "unified"]
                     if n in k["cgroups"]]
            have = next((p for p in found if p != "/" and d.endswith(p)),
                        found[0] if found else "(none)")
        rows.append(_row(f"cgroup ({ctrls})", d, have, live and not (
            have not in ("/", "(none)") and d.endswith(have or "-"))))
    if cg:
        rows.append(_row("device rules", f"{cg.get('devices')}: {', '.join(cg.get('rules', []))}",
                         ", ".join(k.get("devices_list", [])) or None if live else None))
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


def landlock_letters(access: list[str]) -> str:
    """Landlock rights as letters (see the legend under the resource table)."""
    return "".join(letter for prefix, letter in _LANDLOCK_LETTERS
                   if any(a.startswith(prefix) for a in access)) or "-"


def _cell(col: dict[str, Any] | None, name: str) -> str:
    if col is None:
        return ""
    if name == "landlock" and col.get("confined") and "access" in col:
        text = landlock_letters(col["access"])
        return text if col.get("allows", True) else f"DENIED ({text})"
    return str(col.get("summary", ""))


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
        rows.append([mark, r.path, r.role, r.access, now,
                     *(_cell(r.drivers.get(n), n) for n in used)])
    lines.append(f"Resources ({len(rows)}; ! = denied or differs from what was applied)")
    lines += _table(header, rows)
    if "landlock" in used:
        lines.append("  landlock: r read_file, w write_file, t truncate, x execute, d read_dir, "
                     "m make_*, u remove_*, i ioctl_dev, f refer")
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
