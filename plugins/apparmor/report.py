"""What the AppArmor driver tells the confinement report and ``host-validate``.

:func:`column`: the per-domain profile's ``.files`` rules that match a resource (the loaded
profile's, else what ``vmconfine-aa-helper`` would write for the domain XML, computed with the
helper's own code) and whether they grant the access the resource needs. :func:`host_checks`:
the kernel, securityfs, ``apparmor_parser`` and the ``LibAppArmor`` binding. Both change
nothing.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine_apparmor import kernel

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.resources import Resource

NAME = "apparmor"
PARSER = "/sbin/apparmor_parser"
_RULE = re.compile(r'^\s*(deny\s+)?"([^"]+)"\s+([a-zA-Z]+)\s*,')


def qemu_rules(lines: list[str]) -> list[str]:
    """The lines of a ``.files`` text that are QEMU's: without child profiles (``profile
    swtpm { ... }``, the TPM emulator's rules, which QEMU does not get)."""
    out: list[str] = []
    depth = 0
    for line in lines:
        text = line.strip()
        if text.startswith("profile ") and text.endswith("{"):
            depth += 1
        elif depth and text == "}":
            depth -= 1
        elif not depth:
            out.append(line)
    return out


def rules(ctx: DomainContext, desc: dict[str, Any]) -> list[str] | None:
    """The profile's ``.files`` rules: the loaded profile's, else what the helper would write
    (None when the helper refuses the domain or is not installed)."""
    found = desc.get("rules")
    if found:
        return list(found)
    cache = ctx.driver_state(NAME)
    if "report_rules" not in cache:
        try:
            from vmconfine_aa_helper.rules import domain_rules

            cache["report_rules"] = qemu_rules(
                domain_rules(ctx.domain, ctx.instance).render().splitlines())
        except Exception as exc:  # the helper refuses a path, or is not installed
            cache["report_rules"] = None
            cache["report_rules_error"] = str(exc)
    return cache["report_rules"]


def column(ctx: DomainContext, res: Resource, desc: dict[str, Any]) -> dict[str, Any]:
    """The per-domain profile rules that match ``res`` and whether they grant its access."""
    sec = ctx.seclabel(NAME)
    if sec is None or sec.type == "none" or not sec.label:
        return {"summary": "unconfined"}
    lines = rules(ctx, desc)
    if lines is None:
        err = ctx.driver_state(NAME).get("report_rules_error", "")
        return {"profile": sec.label, "summary": "?", "allows": None,
                "why": f"the AppArmor rules cannot be computed: {err}"}
    real = os.path.realpath(res.path)
    allow, deny, matched = set(), set(), []
    for line in lines:
        m = _RULE.match(line)
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


def _check(status: str, name: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"status": status, "name": name, "detail": detail, "fix": fix}


def host_checks(wanted: bool) -> list[dict[str, str]]:
    """The kernel and user space AppArmor needs; FAIL when ``wanted``, else WARN."""
    bad = "FAIL" if wanted else "WARN"
    out = [_kernel_check(wanted, bad)]
    name = "Python binding LibAppArmor"
    try:
        importlib.import_module("LibAppArmor")
        out.append(_check("PASS", name, "importable"))
    except ImportError as exc:
        out.append(_check("WARN", name, f"not importable ({exc})", "apt-get install "
                          "python3-libapparmor (the venv needs --system-site-packages)"))
    return out


def _kernel_check(wanted: bool, bad: str) -> dict[str, str]:
    try:
        on = kernel.ENABLED_PARAM.read_text().strip() == "Y"
    except OSError:
        on = False
    if not on:
        return _check(bad, "AppArmor", "not enabled in this kernel (the apparmor driver is "
                      "unavailable)", "boot with apparmor=1 security=apparmor" if wanted else "")
    try:
        count = len(Path(kernel.PROFILES).read_text().splitlines())
    except OSError as exc:
        return _check(bad, "AppArmor", f"enabled, but {kernel.PROFILES} is unreadable "
                      f"({exc.strerror})", "mount -t securityfs securityfs /sys/kernel/security")
    if not os.access(PARSER, os.X_OK):
        return _check(bad, "AppArmor", "apparmor_parser is missing", "apt-get install apparmor")
    return _check("PASS", "AppArmor", f"enabled, {count} profiles loaded")
