"""The namespaces driver's lines of ``host-validate`` and rows of the confinement report's
process table (what was planned, and what the kernel shows through ``/proc/PID``)."""

from __future__ import annotations

import os
from typing import Any

from vmconfine_namespaces.plan import View


def host_checks(available: tuple[bool, str], wanted: list[str], *, privileged: bool,
                explicit: bool) -> list[dict[str, str]]:
    """One line: can QEMU get the namespaces qemu.conf asks for on this host?"""
    ok, why = available
    what = ("mount namespace" if privileged else "user + mount namespace (unprivileged)")
    listed = ", ".join(f'"{n}"' for n in wanted) or "none"
    if not wanted:
        return [{"status": "PASS", "name": "namespaces",
                 "detail": "namespaces = [] in qemu.conf: QEMU shares the host's /dev", "fix": ""}]
    if ok:
        return [{"status": "PASS", "name": "namespaces",
                 "detail": f"{what} available for namespaces = [ {listed} ]", "fix": ""}]
    fix = ("enable unprivileged user namespaces (sysctl user.max_user_namespaces, "
           "kernel.unprivileged_userns_clone) or set namespaces = [] in qemu.conf"
           if not privileged else "boot a kernel with CONFIG_NAMESPACES, or set namespaces = []")
    return [{"status": "FAIL" if explicit else "WARN", "name": "namespaces",
             "detail": f"{what} unavailable: {why}", "fix": fix}]


def _listing(path: str) -> str:
    try:
        return ", ".join(sorted(os.listdir(path)))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def process_rows(view: View, pid: int | None, children: dict[str, set[str]],
                 ) -> list[dict[str, Any]]:
    """Mount namespace, /dev and (root view) / as intended and as the kernel shows them."""
    rows: list[dict[str, Any]] = []
    if pid is None:
        own = None
    else:
        try:
            own = os.readlink(f"/proc/{pid}/ns/mnt")
            ours = os.readlink("/proc/self/ns/mnt")
        except OSError as exc:
            own, ours = f"unreadable ({exc.strerror})", ""
    rows.append({"item": "mount namespace", "intended": "its own (not vmconfine's)",
                 "kernel": own, "differs": pid is not None and (not own or own == ours)})
    dirs = ["/dev"] + (["/"] if view.mode == "root" else [])
    for d in dirs:
        names = children.get(d, set())
        planned = ", ".join(sorted(n if n != "@pid" else "PID" for n in names))
        kernel = None
        differs = False
        if pid is not None:
            kernel = _listing(f"/proc/{pid}/root{d}")
            found = set(kernel.split(", ")) if not kernel.startswith("unreadable") else set()
            differs = found != {str(pid) if n == "@pid" else n for n in names}
        rows.append({"item": f"{d} in QEMU's view", "intended": planned, "kernel": kernel,
                     "differs": differs})
    if view.userns:
        rows.append({"item": "user namespace", "intended": "own, caller's ids only, no "
                     "capabilities", "kernel": None if pid is None else
                     _userns(pid), "differs": False})
    return rows


def _userns(pid: int) -> str:
    try:
        theirs = os.readlink(f"/proc/{pid}/ns/user")
        return theirs + ("" if theirs != os.readlink("/proc/self/ns/user") else " (shared!)")
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
