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
from vmconfine_dac import idleases, relabel, report
from vmconfine_dac import preflight as preflight_mod
from vmconfine_dac.identity import (
    CAPNG_MISSING,
    Identity,
    config_ids,
    drop_capabilities,
    format_label,
    group_id,
    have_capng,
    parse_label,
    process_ids,
    read_status,
    supplementary_groups,
    switch_identity,
    user_id,
    verify_status,
)
from vmconfine_dac.idrange import RangeConfig, UidRange, kvm_group, parse_range, range_config

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
    ``user``/``group``; groups are that uid's groups from the user database. A uid of
    qemu.conf ``user_range`` (the domain's own) gets its own gid and ``shared_group`` (and
    /dev/kvm's group for a KVM domain) instead: it has no entry in the user database.
    """
    state = ctx.driver_state(MODEL)
    ident = state.get("identity")
    if ident is None:
        sec = ctx.seclabel(MODEL)
        if sec is not None and sec.type != "none" and sec.label:
            uid, gid = parse_label(sec.label)
        else:
            uid, gid = config_ids(ctx.config)
        clear = bool(ctx.config.clear_emulator_capabilities)
        rc = range_config(ctx.config)
        if rc is not None and uid in rc.range:
            groups = {gid, rc.shared_gid}
            kvm = kvm_group(ctx.domain.virt_type)
            if kvm is not None:
                groups.add(kvm)
            ident = Identity(uid, gid, tuple(sorted(groups)), clear_caps=clear,
                             shared_gid=rc.shared_gid)
        else:
            ident = Identity(uid, gid, supplementary_groups(uid, gid), clear_caps=clear)
        state["identity"] = ident
    if ident.high_privileges:
        ctx.taint("high-privileges")
    return ident


def _plans(ctx: DomainContext, resources: list[Resource], ident: Identity,
           ) -> list[relabel.Plan]:
    """:func:`relabel.plan` of ``resources``, made once per start: ``set_all_labels`` reuses
    the plan ``preflight`` checked when it is for the same resource list (the domain's, not
    changed since: the same list object and length) and the same identity. The plan depends
    on nothing else that can change in between (qemu.conf is read once, the seclabels are
    generated before preflight, and no file is looked at)."""
    state = ctx.driver_state(MODEL)
    cached = state.get("plan")
    if (cached is not None and cached[0] is resources and cached[1] == len(resources)
            and cached[2] is ident):
        return cached[3]  # type: ignore[no-any-return]
    plans = relabel.plan(ctx, resources, ident)
    if resources is ctx.resources:  # the domain's own list (hotplug plans are not kept)
        state["plan"] = (resources, len(resources), ident, plans)
    return plans


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
        self._registries: dict[UidRange, idleases.IdentityRegistry] = {}

    def registry(self, rng: UidRange) -> idleases.IdentityRegistry:
        """The instance's per-domain uid registry for ``rng`` (opened once)."""
        reg = self._registries.get(rng)
        if reg is None:
            reg = self._registries[rng] = idleases.open_registry(self.host.instance, rng)
        return reg

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
        """libvirt's virSecurityDACGenLabel; with ``user_range``, a uid of the domain's own."""
        self._gen(ctx, seclabel, plan=False)

    @hookimpl
    def plan_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        """The report's dry run: a domain's uid from ``user_range`` is its lease, if it has
        one; else the range's first id stands for the one a start will allocate."""
        self._gen(ctx, seclabel, plan=True)

    def _gen(self, ctx: DomainContext, seclabel: SecLabel, *, plan: bool) -> None:
        if seclabel.imagelabel:
            raise LabelError("security image label already defined for VM")
        if not self._label(ctx, seclabel, plan=plan):
            return
        if seclabel.relabel and not seclabel.imagelabel:
            seclabel.imagelabel = seclabel.label
        ctx.driver_state(MODEL).pop("identity", None)  # the label decides the ids
        identity(ctx)

    def _label(self, ctx: DomainContext, seclabel: SecLabel, *, plan: bool) -> bool:
        """Fill ``seclabel.label`` (libvirt's virSecurityDACGenLabel; a dynamic label with
        ``user_range`` is the domain's own uid). False for a label type without one."""
        if seclabel.model and seclabel.model != MODEL:
            raise LabelError(f"security label model {seclabel.model} is not supported with "
                             "dac")
        rc = range_config(ctx.config)
        if seclabel.type == "static":
            if not seclabel.label:
                raise LabelError(f"missing label for static security driver in domain "
                                 f"{ctx.domain.name}")
            uid, _gid = parse_label(seclabel.label)
            if rc is not None and uid in rc.range:
                raise LabelError(f"static DAC label {seclabel.label} of domain "
                                 f"{ctx.domain.name} is inside qemu.conf user_range "
                                 f"{rc.range}, whose ids are allocated per domain: use a "
                                 "dynamic label or an id outside the range")
        elif seclabel.type == "dynamic":
            if rc is None:
                seclabel.label = format_label(*config_ids(ctx.config))
            elif plan:
                uid = self._planned_uid(ctx, rc)
                seclabel.label = format_label(uid, uid)
            else:
                uid = self._allocate(ctx, rc)
                seclabel.label = format_label(uid, uid)
        else:
            return False
        return True

    def _planned_uid(self, ctx: DomainContext, rc: RangeConfig) -> int:
        state = ctx.driver_state(MODEL)
        if idleases.registry_dir(ctx.instance).is_dir():
            lease = self.registry(rc.range).lookup(ctx.domain.uuid)
            if lease is not None and lease.value.isdigit() and int(lease.value) in rc.range:
                state["lease"] = "held"
                return int(lease.value)
        state["lease"] = "planned"
        return rc.range.low

    def _allocate(self, ctx: DomainContext, rc: RangeConfig) -> int:
        """The domain's own uid: its lease (a defined domain keeps it), else a free one.
        Journaled first, so a crash at any point is undone by the next command."""
        domain = ctx.domain
        ctx.journal.record(MODEL, "identity", owner=domain.uuid, name=domain.name,
                           range=str(rc.range))
        uid = int(self.registry(rc.range).allocate(domain.uuid, domain.name, keep=True))
        ctx.journal.note(MODEL, "identity-allocated", uid=uid)
        ctx.driver_state(MODEL)["lease"] = "held"
        return uid

    def _release_identity(self, ctx: DomainContext) -> None:
        """Teardown (journal-driven): give the domain's uid back unless the domain is
        defined (it keeps its uid between runs). Idempotent."""
        journal = ctx.journal
        if not journal.count(MODEL, "identity"):
            return  # no uid of its own (the common case: no filtered copy of the journal)
        rec = None
        for r in journal.records(MODEL):
            if r["op"] == "identity":
                rec = r
            elif r["op"] == "identity-released":
                rec = None
        if rec is None:
            return
        owner, name = str(rec["owner"]), str(rec["name"])
        kept = idleases.defined_uuid(ctx.instance, name) in ("", owner)
        if not kept:
            try:
                rng = UidRange(*parse_range(str(rec["range"])))
            except ValueError as exc:
                raise LabelError(f"journal {journal.path}: bad identity record: {exc}") from None
            self.registry(rng).release(owner)
        journal.note(MODEL, "identity-released", owner=owner, kept=kept)

    @hookimpl
    def forget_domain(self, host: HostContext, domain: Domain) -> None:
        rc = range_config(host.config)
        if rc is None or not idleases.registry_dir(host.instance).is_dir():
            return
        if idleases.defined_uuid(host.instance, domain.name) in ("", domain.uuid):
            return  # defined again meanwhile
        self.registry(rc.range).release(domain.uuid)

    @hookimpl
    def reserve_label(self, ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
        """libvirt: a no-op (DAC labels are not unique per domain). A uid of ``user_range``
        is: the running domain's lease is checked (and taken again if it was lost)."""
        rc = range_config(ctx.config)
        if rc is None or seclabel.type != "dynamic" or not seclabel.label:
            return
        uid, _gid = parse_label(seclabel.label)
        if uid in rc.range:
            self.registry(rc.range).reserve(ctx.domain.uuid, ctx.domain.name, str(uid),
                                            seclabel.label)

    @hookimpl
    def release_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        return None

    # ---- host resources --------------------------------------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        ident = identity(ctx)
        plans = _plans(ctx, ctx.resources, ident)
        preflight_mod.check(ctx, ident, plans, preflight_mod.user_hint(ident))

    def _set(self, ctx: DomainContext, resources: list[Resource]) -> None:
        ident = identity(ctx)
        plans = _plans(ctx, resources, ident)
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
        self._restore(ctx)  # raises while files may still be the uid's: it stays leased
        self._release_identity(ctx)

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
        self._restore(ctx, lambda rec: (rec.get("role") == "hostdev"
                                        and relabel.orig_path(rec) in paths))

    @hookimpl
    def set_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        self._set(ctx, chardev_resources(ctx, chardev))

    @hookimpl
    def restore_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        paths = {r.path for r in chardev_resources(ctx, chardev)}
        if chardev.path:
            paths |= {chardev.path, f"{chardev.path}.in", f"{chardev.path}.out"}
        self._restore(ctx, lambda rec: (rec.get("role") == "chardev"
                                        and relabel.orig_path(rec) in paths))

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
        ident = identity(ctx)
        problems = verify_status(status, ident)
        if problems and ident.shared_gid is not None:
            problems = [f"{p} (the domain's own identity from user_range)" for p in problems]
        return problems

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
        if p.uid == relabel.KEEP:  # a shared image (per-domain uids)
            bits = "rw" if p.mode_add & 0o020 else "r"
            out.update(action="shared-group", during=f"owner:+{p.gid} g+{bits}",
                       restore=False, remember=False,
                       summary=f"{before} -> group +{p.gid} g+{bits}, unless QEMU can "
                               "already use it (shared image; kept)")
            return out
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
        out = {"uid": ident.uid, "gid": ident.gid, "groups": sorted({*ident.groups, ident.gid}),
               "capabilities": "cleared" if ident.clear_caps else "kept", "layer": "DAC"}
        if ident.shared_gid is not None:
            out["identity"] = "own (user_range)"
        return out

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        return report.host_checks(host, dirs)

    @hookimpl
    def explain_process(self, ctx: DomainContext, kernel: dict[str, Any] | None,
                        ) -> list[dict[str, Any]]:
        """QEMU's ids are the core's rows (from ``qemu_identity``); with ``user_range`` one
        row says whose they are."""
        ident = identity(ctx)
        if ident.shared_gid is None:
            return []
        intended = identity_summary(ctx, ident)
        row: dict[str, Any] = {"item": "identity", "intended": intended, "kernel": None}
        if ctx.pid is not None:
            try:
                uids, gids, groups = process_ids(read_status(ctx.pid))
            except OSError as exc:
                row["kernel"] = f"unreadable: {exc.strerror}"
                row["differs"] = True
                return [row]
            row["kernel"] = (f"uid {' '.join(map(str, uids))}, gid {' '.join(map(str, gids))}, "
                             f"groups {','.join(map(str, groups))}")
            row["differs"] = bool(verify_status(read_status(ctx.pid), ident))
        return [row]

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        ident = identity(ctx)
        sec = ctx.seclabel(MODEL)
        owned = sorted({r["path"] for r in ctx.journal.records(MODEL, "chown")})
        return {
            "summary": identity_summary(ctx, ident),
            "uid": ident.uid,
            "gid": ident.gid,
            "own_identity": ident.shared_gid is not None,
            "shared_gid": ident.shared_gid,
            "label": ident.label,
            "imagelabel": sec.imagelabel if sec is not None else None,
            "groups": list(ident.groups),
            "capabilities": "cleared" if ident.clear_caps else "kept",
            "dynamic_ownership": bool(ctx.config.driver_settings(MODEL).dynamic_ownership),
            "remember_owner": bool(ctx.config.remember_owner),
            "owned": owned,
        }


def identity_summary(ctx: DomainContext, ident: Identity) -> str:
    """One line: who QEMU runs as, and whose ids those are (``dominfo``, ``confinement``)."""
    groups = ",".join(str(g) for g in sorted({*ident.groups, ident.gid}))
    ids = f"uid {ident.uid}, gid {ident.gid}, groups {groups}"
    if ident.shared_gid is None:
        return f"{ids} (qemu.conf user/group, shared by every domain)"
    rc = range_config(ctx.config)
    where = f" from user_range {rc.range}" if rc is not None else ""
    lease = ctx.driver_state(MODEL).get("lease")
    note = "; allocated at start" if lease == "planned" else ""
    return (f"{ids} (the domain's own{where}; shared group {ident.shared_gid}{note})")


def _chown_record(ctx: DomainContext, path: str) -> dict[str, Any] | None:
    """The journal's chown record of ``path`` that is still in force, if any."""
    recs = ctx.journal.records(MODEL)
    done = {r.get("id") for r in recs if r["op"] == "restored"}
    real = os.path.realpath(path)
    found = None
    for r in recs:
        if r["op"] != "chown" or r.get("id") in done:
            continue
        if path == relabel.orig_path(r) or real in (r.get("path"), relabel.orig_path(r)):
            found = r
    return found


def chardev_resources(ctx: DomainContext, chardev: Chardev) -> list[Resource]:
    """The resources of one chardev (which need not be in the domain yet: hotplug)."""
    return core_resources.chardev_resources([chardev])
