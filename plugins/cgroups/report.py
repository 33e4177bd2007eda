"""What the cgroups driver tells the confinement report and ``host-validate``: the domain's
cgroups and device rules as intended and as the kernel has them, and the host's cgroup
hierarchies and device filtering. Everything here only reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmconfine.fsinfo import mountinfo

V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio",
                            "net_cls", "net_prio", "perf_event", "pids", "hugetlb", "rdma",
                            "misc"})


def _row(item: str, intended: Any, kernel: Any = None, differs: bool = False) -> dict[str, Any]:
    return {"item": item, "intended": intended, "kernel": kernel, "differs": differs}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace").strip("\0\n ")
    except OSError:
        return None


def process_rows(desc: dict[str, Any], kernel: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per controller directory, and the device rules (with the v1 ``devices.list``
    the kernel has, for a running domain)."""
    live = kernel is not None and "error" not in kernel
    rows = []
    for ctrls, d in (desc.get("dirs") or {}).items():
        have = None
        if live:  # a controller's group, or the cgroup2 one ("0::/...") where it lives there
            groups = kernel.get("cgroup") or {}
            found = [groups[n] for n in [*ctrls.split(","), "unified"] if n in groups]
            have = next((p for p in found if p != "/" and d.endswith(p)),
                        found[0] if found else "(none)")
        rows.append(_row(f"cgroup ({ctrls})", d, have, live and not (
            have not in ("/", "(none)") and d.endswith(have or "-"))))
    if desc:
        listed: list[str] = []
        if live:
            for ctrls, d in (desc.get("dirs") or {}).items():
                if "devices" in ctrls.split(","):
                    text = _read(os.path.join(d, "devices.list"))
                    listed = text.splitlines() if text is not None else listed
        rows.append(_row("device rules",
                         f"{desc.get('devices')}: {', '.join(desc.get('rules', []))}",
                         ", ".join(listed) or None if live else None))
    return rows


def _check(status: str, name: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"status": status, "name": name, "detail": detail, "fix": fix}


def _mounts() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2 = None
    for mp, fstype, opts in mountinfo():
        if fstype == "cgroup2" and v2 is None:
            v2 = mp
        elif fstype == "cgroup":
            for opt in opts:
                if opt in V1_CONTROLLERS or opt.startswith("name="):
                    v1.setdefault(opt, mp)
    return v1, v2


def host_checks(privileged: bool) -> list[dict[str, str]]:
    """The mounted hierarchies and how devices can be filtered."""
    v1, v2 = _mounts()
    if not v1 and v2 is None:
        return [_check("WARN", "cgroup hierarchies", "no cgroup file system is mounted: "
                       "domains get no cgroup and no device filtering",
                       "mount cgroup2 on /sys/fs/cgroup")]
    kinds = []
    if v1:
        kinds.append(f"v1 ({', '.join(sorted(v1))})")
    if v2:
        try:
            ctrls = Path(v2, "cgroup.controllers").read_text().split()
        except OSError:
            ctrls = []
        kinds.append(f"v2 at {v2} ({', '.join(ctrls) or 'no controllers'})")
    out = [_check("PASS", "cgroup hierarchies", "; ".join(kinds))]
    name = "cgroup device filtering"
    if not privileged:
        out.append(_check("WARN", name, "unprivileged instance: devices are not filtered "
                          "(needs root)"))
    elif v2 is not None:
        out.append(_check("PASS", name, f"cgroup v2 BPF device programs on {v2}"
                          + (f" (v1 devices controller at {v1['devices']} also mounted)"
                             if "devices" in v1 else "")))
    elif "devices" in v1:
        out.append(_check("PASS", name, f"cgroup v1 devices controller at {v1['devices']}"))
    else:
        out.append(_check("WARN", name, "no devices controller and no cgroup2 mount",
                          "mount cgroup2 or the v1 devices controller"))
    return out
