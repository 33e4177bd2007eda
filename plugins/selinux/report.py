"""What the SELinux driver tells the confinement report and ``host-validate``.

:func:`column`: the context a resource has now and the one it gets while QEMU runs (the
journal's record for a running domain, else :func:`vmconfine_selinux.labels.plan_resource`,
the rules ``set_all_labels`` applies), and whether its file system stores per-file labels.
:func:`host_checks`: the kernel, the policy's virtualization contexts, the ``selinux``
binding and ``security.*`` xattrs in the instance directories. Both change nothing.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError
from vmconfine.fsinfo import mount_of, xattr_checks, xattr_support
from vmconfine_selinux import labels

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.resources import Resource
    from vmconfine_selinux.driver import SELinuxDriver

MODEL = "selinux"
XATTR = "security.selinux"
SELINUX_FS = Path("/sys/fs/selinux")


def column(driver: SELinuxDriver, ctx: DomainContext, res: Resource,
           desc: dict[str, Any]) -> dict[str, Any]:
    """The SELinux label of ``res`` before start and while QEMU runs."""
    try:
        now = driver.backend.getfilecon(res.path)
    except OSError:
        now = None
    sec = ctx.seclabel(MODEL)
    applied = {f.get("path"): f.get("label") for f in desc.get("files") or []}
    real = os.path.realpath(res.path)
    during: str | None = applied.get(real) or applied.get(res.path)
    if during is None:
        try:
            plan = labels.plan_resource(res, sec, driver.contexts())
        except DriverError:
            plan = None
        during = plan.label if plan is not None else None
    out: dict[str, Any] = {"now": now, "during": during,
                           "summary": f"{now or '-'} -> {during}" if during
                           else f"{now or '-'} (not relabelled)"}
    exists = os.path.lexists(res.path)
    if ctx.pid is not None and exists and during is not None and now != during:
        out["difference"] = f"labelled {now} now, {during} was applied at start"
    if (sec is not None and sec.type != "none" and sec.relabel
            and xattr_support(res.path, XATTR) is False):
        out.update(allows=False, why=f"{res.path} is on {mount_of(res.path)}, which has no "
                   "per-file SELinux labels; fix: mount it with context=\"<the image "
                   "context>\" or use the virt_use_nfs / virt_use_fusefs boolean")
    return out


def _check(status: str, name: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"status": status, "name": name, "detail": detail, "fix": fix}


def host_checks(wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
    """The kernel, the policy contexts, the binding and xattrs; FAIL when ``wanted``."""
    bad = "FAIL" if wanted else "WARN"
    out = _kernel_checks(wanted, bad)
    name = "Python binding selinux"
    try:
        importlib.import_module("selinux")
        out.append(_check("PASS", name, "importable"))
    except ImportError as exc:
        out.append(_check(bad, name, f"not importable ({exc})", "apt-get install "
                          "python3-selinux (the venv needs --system-site-packages)"))
    out += xattr_checks(dirs, XATTR, bad, "mount it with context=... for SELinux")
    return out


def _kernel_checks(wanted: bool, bad: str) -> list[dict[str, str]]:
    enforce = SELINUX_FS / "enforce"
    if not enforce.exists():
        return [_check(bad, "SELinux", "not enabled in this kernel (the selinux driver is "
                       "unavailable)", "boot with security=selinux" if wanted else "")]
    try:
        mode = "enforcing" if enforce.read_text().strip() == "1" else "permissive"
    except OSError as exc:
        mode = f"unknown ({exc.strerror})"
    out = [_check("PASS", "SELinux", mode)]
    try:
        selinux = importlib.import_module("selinux")
        paths = [selinux.selinux_virtual_domain_context_path(),
                 selinux.selinux_virtual_image_context_path()]
    except (ImportError, AttributeError, OSError):
        return [*out, _check(bad, "SELinux policy contexts", "cannot read (no selinux binding)",
                             "apt-get install python3-selinux")]
    missing = [p for p in paths if not os.access(p, os.R_OK)]
    if missing:
        out.append(_check(bad, "SELinux policy contexts", f"missing: {', '.join(missing)}",
                          "install a policy with virtualization contexts "
                          "(selinux-policy-default)"))
    else:
        first = Path(paths[0]).read_text().split()
        out.append(_check("PASS", "SELinux policy contexts", first[0] if first else paths[0]))
    return out
