"""What the DAC driver tells the confinement report and ``host-validate``: who QEMU runs as,
whether the remembered-owner xattrs can be stored where QEMU's files are, the QEMU account,
the libcap-ng binding. Everything here only reads."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from vmconfine.errors import VmconfineError
from vmconfine.fsinfo import mount_of, xattr_checks, xattr_support
from vmconfine_dac.identity import group_id, user_id

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.resources import Resource

MODEL = "dac"
#: roles whose original owner is remembered in xattrs
REMEMBERED_ROLES = frozenset({"disk", "nvram", "kernel", "initrd", "chardev"})


def remember_xattr(config: Any) -> str:
    return f"{config.remember_owner_xattr_prefix}.{MODEL}"


def xattr_warning(ctx: DomainContext, res: Resource) -> str | None:
    """Why the owner of ``res`` cannot be remembered in xattrs (with the fix), or None."""
    cfg = ctx.config
    if not (ctx.host.privileged and cfg.remember_owner and res.role in REMEMBERED_ROLES):
        return None
    name = remember_xattr(cfg)
    if xattr_support(res.path, name) is not False:
        return None
    return (f"{res.path} is on {mount_of(res.path)}, which has no {name} xattrs: its owner "
            "is remembered in the journal only, and another domain using it is not detected; "
            "fix: keep images on a local file system, or set remember_owner = 0")


def _check(status: str, name: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"status": status, "name": name, "detail": detail, "fix": fix}


def host_checks(host: HostContext, dirs: list[str]) -> list[dict[str, str]]:
    """The QEMU account, the libcap-ng binding, remembered-owner xattrs in ``dirs``."""
    inst = host.instance
    cfg = host.config
    out = []
    if not inst.privileged:
        out.append(_check("PASS", "QEMU account", f"QEMU runs as you (uid {os.getuid()}), an "
                          "unprivileged instance"))
    else:
        for key, resolve in (("user", user_id), ("group", group_id)):
            spec = getattr(cfg, key)
            try:
                found = resolve(spec)
            except VmconfineError:
                out.append(_check("FAIL", f"QEMU {key} exists", f"{key} '{spec}' "
                                  f"({cfg.source(key)}) does not exist", "create it "
                                  "(scripts/setup.sh creates vmconfine-qemu), or set "
                                  f"{key} in {inst.config_path} to an existing one or +ID"))
            else:
                out.append(_check("PASS", f"QEMU {key} exists", f"{spec} = {found}"))
    need_capng = inst.privileged and bool(cfg.clear_emulator_capabilities)
    name = "Python binding capng"
    try:
        importlib.import_module("capng")
        out.append(_check("PASS", name, "importable"))
    except ImportError as exc:
        out.append(_check("FAIL" if need_capng else "WARN", name, f"not importable ({exc})",
                          "apt-get install python3-cap-ng (the venv needs "
                          "--system-site-packages)"))
    if inst.privileged and cfg.remember_owner:
        out += xattr_checks(dirs, remember_xattr(cfg), "WARN", "owners are remembered in the "
                            "journal only; set remember_owner = 0 or use a local file system")
    return out
