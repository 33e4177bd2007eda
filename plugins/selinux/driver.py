"""The SELinux security driver: basic confinement and sVirt MCS labelling.

Modes (qemu.conf ``selinux_mode``):

* ``svirt`` (default): every dynamic domain gets its own pair of categories from the
  instance's label registry (:mod:`vmconfine_selinux.mcs`); QEMU runs as the policy's domain
  context (the TCG context for ``type='qemu'``) at that level, and its images carry the image
  context at the same level, so one QEMU cannot open another's images.
* ``basic`` (also used when the policy has no MCS ranges): every QEMU runs as the domain
  context and every image gets the image context; QEMU is confined from the host, not from
  other QEMUs.

The label rules per resource are in :mod:`vmconfine_selinux.labels`, the journaled file
operations in :mod:`vmconfine_selinux.relabel`. libselinux is reached through a backend
(:mod:`vmconfine_selinux.backend`) so tests can drive every rule without an SELinux kernel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError, LabelError, VmconfineError
from vmconfine.launch import runtime, swtpm
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_selinux import labels, report, transition
from vmconfine_selinux.backend import Backend, RealBackend
from vmconfine_selinux.contexts import Context, PolicyContexts, load_policy_contexts, new_context
from vmconfine_selinux.mcs import LabelRegistry, Lease, ensure_dir, parse_process_range
from vmconfine_selinux.relabel import DRIVER, Labeller

if TYPE_CHECKING:
    from vmconfine.domain import Chardev, Disk, Domain, Hostdev, SecLabel
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

MODEL = "selinux"
DOI = "0"
REGISTRY_DIR = "selinux-mcs"
#: the helper SELinux confines (the TPM emulator)
SWTPM = "swtpm"


def registry_dir(inst: Any) -> Path:
    """Where the instance's MCS registry lives: ``run_dir/selinux-mcs``."""
    return Path(inst.run_dir) / REGISTRY_DIR


class SELinuxDriver:
    """libvirt's SELinux driver as a vmconfine driver object (hooks: vmconfine.plugin.hookspecs)."""

    def __init__(self, host: HostContext | None, backend: Backend | None = None) -> None:
        self.host = host
        self.backend: Backend = backend if backend is not None else RealBackend()
        self._contexts: PolicyContexts | None = None
        self._registry: LabelRegistry | None = None
        self._warned_basic = False
        self.labeller = Labeller(self.backend, bool(host and host.privileged))

    # ---- helpers -----------------------------------------------------------------------------
    def contexts(self) -> PolicyContexts:
        """The policy's virtualization contexts (read once; DriverError when unreadable)."""
        if self._contexts is None:
            self._contexts = load_policy_contexts(self.backend.domain_context_path(),
                                                  self.backend.image_context_path())
        return self._contexts

    def mode(self, ctx: DomainContext | None = None) -> str:
        """``svirt`` or ``basic`` for this instance and policy."""
        host = ctx.host if ctx is not None else self.host
        wanted = (host.config.driver_settings(MODEL).selinux_mode if host is not None
                  else "svirt")
        if wanted == "svirt" and not (self.backend.mcs_enabled() and self.contexts().has_mcs):
            if not self._warned_basic:
                self._warned_basic = True
                log.warning("selinux_mode is svirt but the SELinux policy has no MCS ranges; "
                            "using the basic model (one label for every domain)")
            return "basic"
        return wanted

    def own_context(self) -> str:
        try:
            return self.backend.getcon()
        except OSError as exc:
            raise LabelError(f"Unable to get current process SELinux context: {exc.strerror}; "
                             "is SELinux enabled?") from None

    def registry(self, ctx: DomainContext) -> LabelRegistry:
        """The instance's MCS registry (created on first use) in its run directory: the
        contents are per boot, like the status files and journals its leases are checked
        against. A registry an earlier vmconfine kept in ``lib_dir`` is taken over once."""
        if self._registry is None:
            inst = ctx.instance
            rng = parse_process_range(self.own_context())
            directory = registry_dir(inst)
            ensure_dir(directory)

            def is_live(lease: Lease) -> bool:
                return (runtime.supervisor_alive(inst, lease.name)
                        or inst.journal_path(lease.name).exists())

            self._registry = LabelRegistry(directory, rng, is_live)
            legacy = Path(inst.lib_dir) / REGISTRY_DIR
            if legacy.is_dir():
                self._registry.import_legacy(legacy)
        return self._registry

    @staticmethod
    def _sec(ctx: DomainContext) -> SecLabel | None:
        return ctx.seclabel(MODEL)

    @staticmethod
    def _process_label(ctx: DomainContext) -> str | None:
        sec = ctx.seclabel(MODEL)
        if sec is None or sec.type == "none":
            return None
        return sec.label

    def _remember(self, ctx: DomainContext) -> tuple[bool, str]:
        cfg = ctx.config
        return bool(cfg.remember_owner), str(cfg.remember_owner_xattr_prefix)

    def _apply(self, ctx: DomainContext, plans: list[labels.Plan]) -> None:
        on, prefix = self._remember(ctx)
        self.labeller.set_plans(ctx.journal, plans, remember_on=on, prefix=prefix)

    def _warn_or_raise(self, what: str, exc: OSError) -> None:
        if self.backend.enforcing():
            raise LabelError(f"{what}: {exc.strerror}; check that the policy allows vmconfine's "
                             "domain to use this context") from None
        log.warning("%s: %s (not enforcing; continuing)", what, exc.strerror)

    # ---- stage 1: identity -------------------------------------------------------------------
    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        ok, why = self.backend.available()
        if not ok:
            return False, why
        try:
            self.contexts()
        except DriverError as exc:
            return False, exc.message
        return True, ""

    @hookimpl
    def model(self) -> str:
        return MODEL

    @hookimpl
    def doi(self) -> str:
        return DOI

    @hookimpl
    def base_label(self, virt_type: str) -> str | None:
        if virt_type not in ("kvm", "qemu"):
            return None
        try:
            return self.contexts().process_base(virt_type)
        except DriverError:
            return None

    # ---- stage 2: validation and labels ------------------------------------------------------
    @hookimpl
    def verify(self, domain: Domain, seclabel: SecLabel | None) -> None:
        if seclabel is None:
            return
        if seclabel.model and seclabel.model != MODEL:
            raise LabelError(f"security label driver mismatch: '{seclabel.model}' model "
                             f"configured for domain, but hypervisor driver is '{MODEL}'.")
        if seclabel.type == "static" and seclabel.label:
            ok = True
            try:
                Context.parse(seclabel.label)
            except ValueError:
                ok = False
            if not ok or not self.backend.check_context(seclabel.label):
                raise LabelError(f"Invalid security label {seclabel.label}; give a context "
                                 "the loaded policy knows (user:role:type:level)")

    @hookimpl
    def gen_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        if seclabel.model and seclabel.model != MODEL:
            raise LabelError(f"security label model {seclabel.model} is not supported with "
                             "selinux")
        if seclabel.type == "dynamic" and seclabel.label:
            raise LabelError("security label already defined for VM")
        if seclabel.imagelabel:
            raise LabelError("security image label already defined for VM")
        contexts = self.contexts()
        mode = self.mode(ctx)
        domain = ctx.domain
        if seclabel.type == "static":
            assert seclabel.label is not None
            try:
                level = Context.parse(seclabel.label).range
            except ValueError as exc:
                raise LabelError(f"Invalid security label {seclabel.label}: {exc}") from None
            if mode == "basic" or level is None:
                image = contexts.file
            else:
                image = new_context(contexts.file, self.own_context(), level, is_object=True)
        elif mode == "basic":
            seclabel.label = seclabel.baselabel or contexts.process_base(domain.virt_type)
            image = contexts.file
        else:
            own = self.own_context()
            level = self.registry(ctx).allocate(domain.uuid, domain.name)
            try:
                ctx.journal.record(DRIVER, "mcs", level=level, owner=domain.uuid)
                base = seclabel.baselabel or contexts.process_base(domain.virt_type)
                seclabel.label = new_context(base, own, level, is_object=False)
                image = new_context(contexts.file, own, level, is_object=True)
            except (ValueError, VmconfineError, OSError) as exc:
                self.registry(ctx).release(domain.uuid, level)
                seclabel.label = None
                if isinstance(exc, ValueError):
                    raise LabelError(f"cannot build the domain label: {exc}") from None
                raise
        seclabel.imagelabel = image
        if seclabel.model is None:
            seclabel.model = MODEL
        log.debug("selinux label=%s imagelabel=%s", seclabel.label, seclabel.imagelabel)

    @hookimpl
    def reserve_label(self, ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
        if seclabel.type != "dynamic" or self.mode(ctx) == "basic":
            return
        try:
            con = self.backend.getpidcon(pid)
        except OSError as exc:
            raise LabelError(f"unable to get PID {pid} security context: {exc.strerror}; "
                             "is the process still running?") from None
        try:
            level = Context.parse(con).range
        except ValueError:
            level = None
        if level is None:
            raise LabelError(f"PID {pid} runs as '{con}', which has no MCS level to reserve")
        self.registry(ctx).reserve(ctx.domain.uuid, ctx.domain.name, level, con)

    @hookimpl
    def release_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        if seclabel.type == "dynamic":
            level = None
            if seclabel.label:
                try:
                    level = Context.parse(seclabel.label).range
                except ValueError:
                    level = None
            if level is None:
                rec = ctx.journal.last(DRIVER, "mcs")
                level = rec.get("level") if rec else None
            inst = ctx.instance
            if (self._registry is not None or registry_dir(inst).is_dir()
                    or (Path(inst.lib_dir) / REGISTRY_DIR).is_dir()):
                self.registry(ctx).release(ctx.domain.uuid, level)
            seclabel.label = None
        seclabel.imagelabel = None

    # ---- stage 3: host resources -------------------------------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        plans = labels.plan_all(ctx.resources, self._sec(ctx), self.contexts())
        for plan in plans:
            if not os.path.lexists(plan.path):
                raise LabelError(f"{plan.path} ({plan.role}) does not exist, so it cannot get "
                                 f"the SELinux label '{plan.label}'; fix the path in the domain "
                                 "XML or create the file")
        self._check_exec(ctx)

    def _check_exec(self, ctx: DomainContext) -> None:
        """Ask the policy whether QEMU can enter its label (vmconfine_selinux.transition);
        refuse to start when enforcing, warn otherwise."""
        label = self._process_label(ctx)
        if label is None:
            return
        from vmconfine.qemu.argv import find_emulator

        try:
            emulator = find_emulator(ctx.domain, ctx.config)
        except VmconfineError:
            return  # the pipeline reports a missing emulator itself
        own = self.own_context()
        self._refuse("QEMU", label, transition.check_exec(self.backend, own, label, emulator,
                                                          ctx.domain.virt_type))
        try:
            pair = swtpm.helpers(ctx)
        except VmconfineError:
            return  # the pipeline reports a missing swtpm itself
        for helper in pair or ():
            if self._helper_label(ctx, helper) is not None:
                self._refuse(helper.name, label, transition.check_helper_exec(
                    self.backend, own, label, helper.executable, helper.name))

    def _refuse(self, who: str, label: str, problems: list[transition.Problem]) -> None:
        """Refuse to start when enforcing (one line naming every fix), warn otherwise."""
        if not problems:
            return
        text = "; also ".join(p.message for p in problems)
        if self.backend.enforcing():
            raise LabelError(f"{who} cannot start as '{label}': {text}")
        log.warning("%s would be refused '%s' in enforcing mode: %s", who, label, text)

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        sec = self._sec(ctx)
        if sec is None or not sec.relabel:
            return
        self._apply(ctx, labels.plan_all(ctx.resources, sec, self.contexts()))

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        self.labeller.restore_records(ctx.journal)

    @hookimpl
    def set_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        sec = self._sec(ctx)
        self._apply(ctx, labels.plan_all(labels.disk_resources(disk), sec, self.contexts()))

    @hookimpl
    def restore_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self.labeller.restore_records(ctx.journal, group=f"disk:{disk.target}")

    @hookimpl
    def set_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        sec = self._sec(ctx)
        self._apply(ctx, labels.plan_all(labels.hostdev_resources(hostdev), sec,
                                         self.contexts()))

    @hookimpl
    def restore_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self.labeller.restore_records(ctx.journal, group=labels.hostdev_group(hostdev))

    @hookimpl
    def set_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        sec = self._sec(ctx)
        self._apply(ctx, labels.plan_all(labels.chardev_resources(chardev), sec,
                                         self.contexts()))

    @hookimpl
    def restore_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        self.labeller.restore_records(ctx.journal, group=f"chardev:{chardev.path}")

    @hookimpl
    def set_socket_label(self, ctx: DomainContext) -> None:
        label = self._process_label(ctx)
        if label is None:
            return
        try:
            self.backend.setsockcreatecon(label)
        except OSError as exc:
            self._warn_or_raise(f"unable to set socket security context '{label}'", exc)

    @hookimpl
    def clear_socket_label(self, ctx: DomainContext) -> None:
        if self._process_label(ctx) is None:
            return
        try:
            self.backend.setsockcreatecon(None)
        except OSError as exc:
            self._warn_or_raise("unable to clear socket security context", exc)

    @hookimpl
    def mount_options(self, ctx: DomainContext) -> str | None:
        """libvirt's ``virSecuritySELinuxGetSecurityMountOptions``: a filesystem mounted for
        QEMU alone (its private /dev, its root view's tmpfs) carries the image label, which
        the sVirt domain may use and no other MCS pair may."""
        sec = self._sec(ctx)
        if sec is None or sec.type == "none" or not sec.imagelabel:
            return None
        return f'context="{sec.imagelabel}"'

    # ---- stage 4: the child ------------------------------------------------------------------
    @hookimpl
    def child_exec_label(self, ctx: DomainContext) -> None:
        self._set_exec(self._process_label(ctx), "the QEMU process")

    def _set_exec(self, label: str | None, who: str) -> None:
        """Child: ``setexeccon(label)``, the context ``who`` gets at its exec."""
        if label is None:
            return
        try:
            self.backend.setexeccon(label)
        except OSError as exc:
            self._warn_or_raise(f"unable to set security context '{label}' for {who} "
                                "(setexeccon)", exc)

    # ---- helper processes (swtpm) -------------------------------------------------------------
    def _helper_label(self, ctx: DomainContext, helper: Helper) -> str | None:
        """The domain's process label for swtpm (libvirt's SetChildProcessLabel); None when
        SELinux does not confine this helper (swtpm_setup: as libvirt, it runs in
        vmconfine's own domain)."""
        return self._process_label(ctx) if helper.name == SWTPM else None

    @hookimpl
    def set_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        """swtpm's state tree gets the domain's image label (libvirt's SetTPMLabels), so only
        this domain's swtpm (its MCS pair) can use it."""
        sec = self._sec(ctx)
        if helper.name != SWTPM or sec is None or sec.type == "none" or not sec.relabel or \
                not sec.imagelabel:
            return
        plans = [labels.Plan(path, sec.imagelabel, "tpm", f"helper:{helper.name}")
                 for path in labels.tree_paths(helper.owned)]
        self._apply(ctx, plans)

    @hookimpl
    def restore_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        self.labeller.restore_records(ctx.journal, group=f"helper:{helper.name}")

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        if step == "child_exec_label":
            self._set_exec(self._helper_label(ctx, helper), helper.name)

    @hookimpl
    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        expected = self._helper_label(ctx, helper)
        if expected is None:
            return []
        return self._compare(pid, expected, helper.name, (
            f"the {helper.executable} binary must be an entry point of the domain's type; "
            "docs/tpm.md"))

    def _compare(self, pid: int, expected: str, who: str, hint: str) -> list[str]:
        """The difference between ``pid``'s context and ``expected`` (empty: none)."""
        try:
            current = self.backend.getpidcon(pid)
        except OSError as exc:
            return [f"cannot read /proc/{pid}/attr/current: {exc.strerror}; {who} should run "
                    f"as '{expected}'"]
        if current != expected:
            return [f"{who} (pid {pid}) runs as '{current}', requested '{expected}'; the policy "
                    f"did not allow the transition ({hint})"]
        return []

    # ---- stage 5: after exec -----------------------------------------------------------------
    @hookimpl
    def process_label(self, ctx: DomainContext, pid: int) -> str | None:
        try:
            return self.backend.getpidcon(pid)
        except OSError:
            return None

    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        expected = self._process_label(ctx)
        if expected is None:
            return []
        return self._compare(pid, expected, "QEMU", (
            "check that the emulator binary is labelled qemu_exec_t and that vmconfine's "
            "domain may transition to the label"))

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """The context ``resource`` has now and while QEMU runs (confinement report)."""
        return report.column(self, ctx, resource, self.describe(ctx))

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        return report.host_checks(wanted, dirs)

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        sec = self._sec(ctx)
        files = {}
        done = {r.get("n") for r in ctx.journal.records(DRIVER, "restored")}
        for rec in ctx.journal.records(DRIVER, "relabel"):
            if rec.get("n") not in done:
                files[str(rec.get("path"))] = rec.get("label")
        out: dict[str, Any] = {
            "model": MODEL,
            "type": sec.type if sec is not None else None,
            "label": sec.label if sec is not None else None,
            "imagelabel": sec.imagelabel if sec is not None else None,
            "files": [{"path": p, "label": lbl} for p, lbl in files.items()],
        }
        try:
            out["mode"] = self.mode(ctx)
        except DriverError:
            out["mode"] = None
        return out
