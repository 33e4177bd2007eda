"""The DAC driver object: libvirt's ``security_dac.c`` as vmconfine hook implementations.

It runs QEMU as qemu.conf ``user``/``group`` with that user's supplementary groups, gives
QEMU's files to those ids while it runs and back afterwards (journal + remembered-owner
xattrs), drops every capability, and reads the kernel's view back. It is only in the stack of
privileged instances (the stack rule), so it may assume root.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vmconfine.errors import ConfigError, DriverError, LabelError
from vmconfine.plugin import resources as core_resources
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_dac import preflight as preflight_mod
from vmconfine_dac import relabel, report
from vmconfine_dac.identity import (
    CAPNG_MISSING,
    Identity,
    config_ids,
    drop_capabilities,
    format_label,
    group_id,
    have_capng,
    parse_label,
    read_status,
    supplementary_groups,
    switch_identity,
    user_id,
    verify_status,
)

if TYPE_CHECKING:
    from vmconfine.domain import Chardev, Disk, Domain, Hostdev, SecLabel
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

MODEL = "dac"


def identity(ctx: DomainContext) -> Identity:
    """QEMU's ids for this domain, computed once in the parent and kept in ``ctx.state``.

    The process label is the DAC seclabel's ``<label>`` when there is one, else qemu.conf
    ``user``/``group``; groups are that uid's groups from the user database.
    """
    state = ctx.driver_state(MODEL)
    ident = state.get("identity")
    if ident is None:
        sec = ctx.seclabel(MODEL)
        if sec is not None and sec.type != "none" and sec.label:
            uid, gid = parse_label(sec.label)
        else:
            uid, gid = config_ids(ctx.config)
        ident = Identity(uid, gid, supplementary_groups(uid, gid),
                         clear_caps=bool(ctx.config.clear_emulator_capabilities))
        state["identity"] = ident
    if ident.high_privileges:
        ctx.taint("high-privileges")
    return ident


def helper_identity(ctx: DomainContext, helper: Helper) -> Identity:
    """A helper's ids (its qemu.conf account, that user's groups), every capability dropped
    (libvirt's ``virCommandClearCaps`` for swtpm); computed in the parent."""
    helpers = ctx.driver_state(MODEL).setdefault("helpers", {})
    ident = helpers.get(helper.name)
    if ident is None:
        uid = user_id(helper.user, f"qemu.conf user of {helper.name}")
        gid = group_id(helper.group, f"qemu.conf group of {helper.name}")
        ident = helpers[helper.name] = Identity(uid, gid, supplementary_groups(uid, gid))
    return ident


def chown_tree(top: str, uid: int, gid: int) -> None:
    """Give ``top`` and everything under it to ``uid:gid`` without following symlinks (a link
    the helper made is changed itself, never its target; nothing with several hard links)."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue
            if not os.path.isdir(name) and not os.path.islink(name) and st.st_nlink > 1:
                raise LabelError(f"dac: {name} has {st.st_nlink} hard links; remove them "
                                 "before the TPM state is given to its account")
            os.chown(name, uid, gid, follow_symlinks=False)


def _child_identity(ctx: DomainContext) -> Identity:
    ident = ctx.state.get(MODEL, {}).get("identity")
    if ident is None:
        raise DriverError("QEMU's DAC identity was not computed before fork (preflight did "
                          "not run); this is a vmconfine bug")
    return ident


class DacDriver:
    """One instance of the DAC driver (see the module docstring)."""

    def __init__(self, host: HostContext) -> None:
        self.host = host

    # ---- probe and identity ----------------------------------------------------------------
    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        if host.config.clear_emulator_capabilities and not have_capng():
            return False, CAPNG_MISSING
        return True, ""

    @hookimpl
    def model(self) -> str:
        return MODEL

    @hookimpl
    def doi(self) -> str:
        return "0"

    @hookimpl
    def base_label(self, virt_type: str) -> str | None:
        try:
            return format_label(*config_ids(self.host.config))
        except ConfigError as exc:
            log.warning("dac: no base label: %s", exc)
            return None

    # ---- validation and labels --------------------------------------------------------------
    @hookimpl
    def verify(self, domain: Domain, seclabel: SecLabel | None) -> None:
        if seclabel is not None and seclabel.type == "static" and seclabel.label:
            parse_label(seclabel.label)
        for disk in domain.disks:
            for src in disk.chain():
                self._verify_device_labels(src.seclabels)
        for chardev in domain.chardevs:
            self._verify_device_labels(chardev.seclabels)

    @staticmethod
    def _verify_device_labels(labels: list[Any]) -> None:
        for sl in labels:
            if sl.model in (MODEL, None) and sl.label:
                parse_label(sl.label)

    @hookimpl
    def gen_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        """libvirt's virSecurityDACGenLabel."""
        if seclabel.imagelabel:
            raise LabelError("security image label already defined for VM")
        if seclabel.model and seclabel.model != MODEL:
            raise LabelError(f"security label model {seclabel.model} is not supported with "
                             "dac")
        if seclabel.type == "static":
            if not seclabel.label:
                raise LabelError(f"missing label for static security driver in domain "
                                 f"{ctx.domain.name}")
            parse_label(seclabel.label)
        elif seclabel.type == "dynamic":
            seclabel.label = format_label(*config_ids(ctx.config))
        else:
            return
        if seclabel.relabel and not seclabel.imagelabel:
            seclabel.imagelabel = seclabel.label
        ctx.driver_state(MODEL).pop("identity", None)  # the label decides the ids
        identity(ctx)

    @hookimpl
    def reserve_label(self, ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
        return None  # DAC labels are not unique per domain (libvirt: no-op)

    @hookimpl
    def release_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        return None

    # ---- host resources --------------------------------------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        ident = identity(ctx)
        plans = relabel.plan(ctx, ctx.resources, ident)
        preflight_mod.check(ctx, ident, plans, preflight_mod.user_hint(ident))

    def _set(self, ctx: DomainContext, resources: list[Resource]) -> None:
        ident = identity(ctx)
        plans = relabel.plan(ctx, resources, ident)
        changed = relabel.apply(ctx, plans, ident)
        ctx.driver_state(MODEL).setdefault("owned", []).extend(changed)

    @staticmethod
    def _restore(ctx: DomainContext, select: Any = None) -> None:
        problems = relabel.restore(ctx.journal, select)
        if problems:
            raise LabelError("; ".join(problems))

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        self._set(ctx, ctx.resources)

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        self._restore(ctx)

    @hookimpl
    def set_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._set(ctx, core_resources.disk_resources(disk))

    @hookimpl
    def restore_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        tag = f"disk:{disk.target}"
        self._restore(ctx, lambda rec: rec.get("device") == tag)

    @hookimpl
    def set_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self._set(ctx, core_resources.hostdev_resources(hostdev))

    @hookimpl
    def restore_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        paths = {r.path for r in core_resources.hostdev_resources(hostdev)}
        self._restore(ctx, lambda rec: rec.get("role") == "hostdev" and rec["orig"] in paths)

    @hookimpl
    def set_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        self._set(ctx, chardev_resources(ctx, chardev))

    @hookimpl
    def restore_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        paths = {r.path for r in chardev_resources(ctx, chardev)}
        if chardev.path:
            paths |= {chardev.path, f"{chardev.path}.in", f"{chardev.path}.out"}
        self._restore(ctx, lambda rec: rec.get("role") == "chardev" and rec["orig"] in paths)

    # ---- the child -------------------------------------------------------------------------
    @hookimpl
    def child_identity(self, ctx: DomainContext) -> None:
        switch_identity(_child_identity(ctx))

    @hookimpl
    def child_capabilities(self, ctx: DomainContext) -> None:
        if _child_identity(ctx).clear_caps:
            drop_capabilities()

    # ---- helper processes (swtpm) ------------------------------------------------------------
    @hookimpl
    def set_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        """The helper's state belongs to its account (qemu.conf ``swtpm_user``/
        ``swtpm_group``; libvirt's ``qemuTPMCreateEmulatorStorage`` + ``virFileChownFiles``):
        given to it, and kept so across stops (it is the helper's, not the admin's)."""
        ident = helper_identity(ctx, helper)
        for top in helper.owned:
            ctx.journal.record(MODEL, "helper-owned", path=top, uid=ident.uid, gid=ident.gid)
            chown_tree(top, ident.uid, ident.gid)

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        ident = ctx.state.get(MODEL, {}).get("helpers", {}).get(helper.name)
        if ident is None:
            raise DriverError(f"the DAC identity of {helper.name} was not computed before "
                              "fork; this is a vmconfine bug")
        if step == "child_identity":
            switch_identity(ident)
        elif step == "child_capabilities":
            drop_capabilities()

    @hookimpl
    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        try:
            status = read_status(pid)
        except OSError as exc:
            return [f"cannot read /proc/{pid}/status: {exc.strerror}"]
        return verify_status(status, helper_identity(ctx, helper))

    # ---- after exec --------------------------------------------------------------------------
    @hookimpl
    def process_label(self, ctx: DomainContext, pid: int) -> str | None:
        try:
            status = read_status(pid)
        except OSError:
            return None
        uid = status.get("Uid", "").split()
        gid = status.get("Gid", "").split()
        if len(uid) < 2 or len(gid) < 2:
            return None
        return f"+{uid[1]}:+{gid[1]}"

    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        try:
            status = read_status(pid)
        except OSError as exc:
            return [f"cannot read /proc/{pid}/status: {exc.strerror}"]
        return verify_status(status, identity(ctx))

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """The owner ``resource`` has before start and while QEMU runs (confinement report)."""
        ident = identity(ctx)
        plans = relabel.plan(ctx, [resource], ident)
        out: dict[str, Any] = {"runs_as": ident.label}
        rec = _chown_record(ctx, resource.path)
        if rec is not None:
            out["before"] = format_label(rec["uid"], rec["gid"])
        else:
            try:
                st = os.stat(resource.path)
                out["before"] = format_label(st.st_uid, st.st_gid)
            except OSError:
                out["before"] = None
        before = out["before"] or "missing"
        if not plans:
            note = "passed as fd" if resource.passed else "not chowned"
            out.update(action="none", during=None, summary=f"{before} ({note})")
            return out
        p = plans[0]
        during = format_label(p.uid, p.gid)
        out.update(action="chown", during=during, owner=[p.uid, p.gid], restore=p.restore,
                   remember=p.remember and bool(ctx.config.remember_owner),
                   summary=f"{before} -> {during}" + ("" if p.restore else " (kept)"))
        if ctx.pid is not None:
            try:
                st = os.stat(resource.path)
            except OSError:
                st = None
            now = format_label(st.st_uid, st.st_gid) if st is not None else None
            if now is not None and now != during:
                out["difference"] = f"owned by {now} now, {during} was applied at start"
        warning = report.xattr_warning(ctx, resource)
        if warning is not None:
            out.update(allows=None, why=warning)
        return out

    @hookimpl
    def qemu_identity(self, host: HostContext, ctx: DomainContext | None) -> dict[str, Any]:
        if ctx is not None:
            ident = identity(ctx)
        else:
            uid, gid = config_ids(host.config)
            ident = Identity(uid, gid, supplementary_groups(uid, gid),
                             clear_caps=bool(host.config.clear_emulator_capabilities))
        return {"uid": ident.uid, "gid": ident.gid, "groups": sorted({*ident.groups, ident.gid}),
                "capabilities": "cleared" if ident.clear_caps else "kept", "layer": "DAC"}

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        return report.host_checks(host, dirs)

    @hookimpl
    def explain_process(self, ctx: DomainContext, kernel: dict[str, Any] | None,
                        ) -> list[dict[str, Any]]:
        return []  # QEMU's ids: the core's rows, from qemu_identity

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        ident = identity(ctx)
        sec = ctx.seclabel(MODEL)
        owned = sorted({r["path"] for r in ctx.journal.records(MODEL, "chown")})
        return {
            "label": ident.label,
            "imagelabel": sec.imagelabel if sec is not None else None,
            "groups": list(ident.groups),
            "capabilities": "cleared" if ident.clear_caps else "kept",
            "dynamic_ownership": bool(ctx.config.driver_settings(MODEL).dynamic_ownership),
            "remember_owner": bool(ctx.config.remember_owner),
            "owned": owned,
        }


def _chown_record(ctx: DomainContext, path: str) -> dict[str, Any] | None:
    """The journal's chown record of ``path`` that is still in force, if any."""
    recs = ctx.journal.records(MODEL)
    done = {r.get("id") for r in recs if r["op"] == "restored"}
    real = os.path.realpath(path)
    found = None
    for r in recs:
        if r["op"] != "chown" or r.get("id") in done:
            continue
        if path == r.get("orig") or real in (r.get("path"), r.get("orig")):
            found = r
    return found


def chardev_resources(ctx: DomainContext, chardev: Chardev) -> list[Resource]:
    """The resources of one chardev (which need not be in the domain yet: hotplug)."""
    return core_resources.chardev_resources([chardev])
