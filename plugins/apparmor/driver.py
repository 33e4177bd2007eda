"""The AppArmor security driver (libvirt's security_apparmor.c, as vmconfine hooks).

Each confined domain gets its own profile ``<apparmor_profile_prefix><uuid>``, written, loaded,
regenerated and deleted only by the ``vmconfine-aa-helper`` executable, which this driver runs
with the domain XML on stdin. The forked child changes to the profile before it execs QEMU
(``aa_change_profile``), and the kernel's view of the QEMU process is checked afterwards.

A start whose rules are unchanged since a previous one (a restart) does not compile: the driver
generates the rules in-process with the helper's own code, and when their compiled policy is
in the instance's cache it runs the helper with ``--cached KEY`` (no XML); see
:mod:`vmconfine_aa_helper.cache`. The helper runs in an isolated interpreter
(:mod:`vmconfine_aa_helper.launch`).

Label types as libvirt: ``dynamic`` (default) = a generated per-domain profile; ``static`` = an
already loaded profile named by ``<label>`` (vmconfine neither writes nor removes it);
``none`` = unconfined.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import LabelError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_apparmor import kernel, report

if TYPE_CHECKING:
    from lxml import etree

    from vmconfine.domain import Chardev, Disk, Domain, Hostdev, SecLabel
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

NAME = "apparmor"
HELPER = "vmconfine-aa-helper"
PARSER = "/sbin/apparmor_parser"
PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE = "TEMPLATE.qemu"
HELPER_ENV = {"PATH": "/sbin:/usr/sbin:/usr/bin:/bin", "LC_ALL": "C"}
CACHE_SUBDIR = "apparmor"
#: the helper AppArmor confines, and its child profile's name (vmconfine_aa_helper.swtpm.CHILD)
SWTPM = "swtpm"


def helper_command() -> list[str]:
    """How to run vmconfine-aa-helper: an isolated interpreter that imports only the helper's
    packages (:mod:`vmconfine_aa_helper.launch`), else the console script next to this Python
    or on PATH, else ``python -m``."""
    try:
        from vmconfine_aa_helper.launch import command
    except ImportError:
        command = None  # type: ignore[assignment]
    isolated = command() if command is not None else None
    if isolated:
        return isolated
    beside = Path(sys.executable).parent / HELPER
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(HELPER)
    if found:
        return [found]
    return [sys.executable, "-m", "vmconfine_aa_helper"]


def _check_label(pid: int, expected: str, *, enforce: bool) -> list[str]:
    """The differences between ``pid``'s AppArmor label and ``expected`` (in enforce mode)."""
    try:
        raw = kernel.process_label(pid)
    except OSError as exc:
        return [f"cannot read the AppArmor label of pid {pid}: {exc.strerror or exc}"]
    name, mode = kernel.split_label(raw)
    if name != expected:
        return [f"pid {pid} runs under AppArmor profile '{name}', expected '{expected}'"]
    if enforce and mode != "enforce":
        return [f"pid {pid} runs under AppArmor profile '{name}' in mode '{mode}', "
                "expected 'enforce'"]
    return []


class AppArmorDriver:
    """Driver object (one per host context); its methods are vmconfine hook implementations.

    ``helper_extra`` is appended to every helper command line; tests set it to
    ``["--compile-only"]`` (or a ``--parser``) on hosts whose kernel has no AppArmor.
    """

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self.helper_extra: list[str] = []

    # ---- identity ------------------------------------------------------------------------
    @hookimpl
    def model(self) -> str:
        return NAME

    @hookimpl
    def doi(self) -> str:
        return "0"

    @property
    def profile_dir(self) -> Path:
        return Path(self.host.config.driver_settings(NAME).apparmor_profile_dir)

    @property
    def prefix(self) -> str:
        return self.host.config.driver_settings(NAME).apparmor_profile_prefix

    def profile_name(self, domain: Domain) -> str:
        return f"{self.prefix}{domain.uuid}"

    # ---- probe ---------------------------------------------------------------------------
    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        ok, why = kernel.enabled()
        if not ok:
            return False, why
        if not host.privileged:
            return False, ("loading AppArmor profiles needs root; use qemu:///system or run "
                           "the embed instance as root")
        template = Path(host.config.driver_settings(NAME).apparmor_profile_dir) / TEMPLATE
        if not template.is_file() and not (PACKAGE_DIR / TEMPLATE).is_file():
            return False, f"template '{template}' does not exist; reinstall vmconfine"
        if not os.access(PARSER, os.X_OK):
            return False, f"{PARSER} is missing; install the apparmor package"
        try:
            kernel.load_binding()
        except kernel.AppArmorUnavailable as exc:
            return False, str(exc)
        return True, ""

    # ---- validation and labels -----------------------------------------------------------
    @hookimpl
    def verify(self, domain: Domain, seclabel: SecLabel | None) -> None:
        if seclabel is None:
            return
        if seclabel.type == "dynamic" and seclabel.baselabel is not None:
            raise LabelError("Cannot set a base label with AppArmor; remove <baselabel> from "
                             "the apparmor <seclabel>")
        if seclabel.type == "static":
            label = seclabel.label or ""
            loaded = kernel.loaded_profiles()
            if loaded is not None and label not in loaded:
                raise LabelError(f"Invalid security label '{label}': no AppArmor profile of "
                                 "that name is loaded; load it with apparmor_parser -r first")

    @hookimpl
    def plan_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        """The profile name a dynamic label gets, without writing or loading the profile."""
        if seclabel.type != "dynamic":
            return
        if seclabel.baselabel is not None:
            raise LabelError("Cannot set a base label with AppArmor; remove <baselabel> from "
                             "the apparmor <seclabel>")
        if seclabel.label:
            raise LabelError(f"security label already defined for VM '{ctx.domain.name}': "
                             f"'{seclabel.label}'; remove <label> from the dynamic seclabel")
        name = self.profile_name(ctx.domain)
        seclabel.label = name
        seclabel.imagelabel = name

    @hookimpl
    def gen_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        if seclabel.type != "dynamic":
            return
        self.plan_label(ctx, seclabel)
        name = seclabel.label or self.profile_name(ctx.domain)
        ctx.journal.record(NAME, "profile", name=name, dir=str(self.profile_dir),
                           prefix=self.prefix, uri=ctx.instance.uri)
        exists = (self.profile_dir / name).is_file()
        key = None if exists else self._cached_key(ctx, name)
        if key is not None:
            # restart with unchanged content: load the compiled policy, no XML, no compile
            try:
                self._helper(ctx, "-c", name, extra=["--cached", key],
                             failure="cannot load cached AppArmor policy")
                return
            except LabelError as exc:
                log.debug("%s; generating the profile instead", exc)
                exists = (self.profile_dir / name).is_file()
        self._helper(ctx, "-r" if exists else "-c", name, xml=self._xml(ctx),
                     failure="cannot load AppArmor profile")

    @hookimpl
    def reserve_label(self, ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
        return None  # libvirt: nothing to reserve, the profile name is the UUID's

    @hookimpl
    def release_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        return None  # the profile itself goes in restore_all_labels (journal-driven)

    # ---- host resources ------------------------------------------------------------------
    def _managed(self, ctx: DomainContext) -> str | None:
        """The profile name when this domain's profile is vmconfine's (dynamic label)."""
        sec = ctx.seclabel(NAME)
        if sec is None or sec.type != "dynamic" or not sec.relabel or not sec.label:
            return None
        return sec.label

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        kernel.load_binding()  # find libapparmor now, not in the forked child
        name = self._managed(ctx)
        if name is None or not (self.profile_dir / name).is_file():
            return
        if self._rules_current(ctx, name):
            return
        self._reload(ctx, name)

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        done = {r.get("name") for r in ctx.journal.records(NAME, "profile_deleted")}
        errors = []
        for rec in ctx.journal.records(NAME, "profile"):
            name = rec.get("name")
            if not name or name in done:
                continue
            try:
                self._helper(ctx, "-D", name, profile_dir=rec.get("dir"),
                             prefix=rec.get("prefix"), failure="cannot remove AppArmor profile")
            except LabelError as exc:
                errors.append(str(exc))
                continue
            ctx.journal.record(NAME, "profile_deleted", name=name)
            done.add(name)
        if errors:
            raise LabelError("; ".join(errors))

    @hookimpl
    def set_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._hotplug(ctx, disk.element, add=True)

    @hookimpl
    def restore_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._hotplug(ctx, disk.element, add=False)

    @hookimpl
    def set_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self._hotplug(ctx, hostdev.element, add=True)

    @hookimpl
    def restore_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self._hotplug(ctx, hostdev.element, add=False)

    @hookimpl
    def set_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        self._hotplug(ctx, chardev.element, add=True)

    @hookimpl
    def restore_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        self._hotplug(ctx, chardev.element, add=False)

    # ---- child and after exec ------------------------------------------------------------
    @hookimpl
    def child_exec_label(self, ctx: DomainContext) -> None:
        sec = ctx.seclabel(NAME)
        if sec is None or sec.type == "none" or not sec.label:
            return
        try:
            kernel.change_profile(sec.label)
        except (OSError, kernel.AppArmorUnavailable) as exc:
            raise LabelError(f"cannot change to AppArmor profile '{sec.label}': {exc}") from exc

    # ---- helper processes (swtpm) ---------------------------------------------------------
    def _helper_profile(self, ctx: DomainContext, helper: Helper) -> str | None:
        """``<domain profile>//swtpm`` for swtpm (the child profile the aa-helper writes into
        the domain's profile, :mod:`vmconfine_aa_helper.swtpm`); None when AppArmor does not
        confine this helper (an unconfined domain, swtpm_setup: see docs/tpm.md)."""
        sec = ctx.seclabel(NAME)
        if sec is None or sec.type == "none" or not sec.label or helper.name != SWTPM:
            return None
        return f"{sec.label}//{SWTPM}"

    @hookimpl
    def set_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        return None  # swtpm's rules are a child profile of the domain's (loaded by gen_label)

    @hookimpl
    def restore_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        return None  # the child profile goes with the domain's profile

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        if step != "child_exec_label":
            return
        name = self._helper_profile(ctx, helper)
        if name is None:
            return
        try:
            kernel.change_onexec(name)
        except (OSError, kernel.AppArmorUnavailable) as exc:
            raise LabelError(f"cannot make {helper.name} enter AppArmor profile '{name}' at "
                             f"exec: {exc}") from exc

    @hookimpl
    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        name = self._helper_profile(ctx, helper)
        if name is None:
            return []
        return _check_label(pid, name, enforce=True)

    @hookimpl
    def process_label(self, ctx: DomainContext, pid: int) -> str | None:
        try:
            return kernel.process_label(pid)
        except OSError:
            return None

    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        sec = ctx.seclabel(NAME)
        if sec is None or sec.type == "none" or not sec.label:
            return []
        return _check_label(pid, sec.label, enforce=sec.type == "dynamic")

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        sec = ctx.seclabel(NAME)
        if sec is None or not sec.label:
            return {"label": None}
        out: dict[str, Any] = {"label": sec.label, "type": sec.type}
        if sec.type == "dynamic":
            profile = self.profile_dir / sec.label
            out["profile"] = str(profile)
            try:
                text = Path(f"{profile}.files").read_text()
            except OSError:
                text = ""
            out["rules"] = [ln.strip() for ln in report.qemu_rules(text.splitlines())
                            if ln.strip() and not ln.lstrip().startswith("#")]
        return out

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """The profile rules that match ``resource`` and whether they grant its access."""
        return report.column(ctx, resource, self.describe(ctx))

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        return report.host_checks(wanted)

    # ---- helpers -------------------------------------------------------------------------
    def _xml(self, ctx: DomainContext, *, add: etree._Element | None = None,
             drop: etree._Element | None = None) -> str:
        """The live domain XML for the helper, with a device added or left out (hotplug)."""
        xml = ctx.domain.to_xml(live=True)
        if add is None and drop is None:
            return xml
        import copy

        from lxml import etree

        root = etree.fromstring(xml)
        own_tree = ctx.domain.root.getroottree()
        el = add if add is not None else drop
        assert el is not None
        inside = el.getroottree().getroot() is ctx.domain.root
        if drop is not None and inside:
            for found in root.getroottree().xpath(own_tree.getpath(drop)):
                found.getparent().remove(found)
        if add is not None and not inside:
            devices = root.find("devices")
            if devices is None:
                devices = etree.SubElement(root, "devices")
            devices.append(copy.deepcopy(add))
        return etree.tostring(root, encoding="unicode")

    def _hotplug(self, ctx: DomainContext, element: etree._Element | None, *, add: bool) -> None:
        """Regenerate the profile for a device being added (or removed) — libvirt's
        reload_profile, from the XML instead of an appended path."""
        name = self._managed(ctx)
        if name is None or not (self.profile_dir / name).is_file():
            return
        if element is None:
            xml = self._xml(ctx)
        else:
            xml = self._xml(ctx, add=element) if add else self._xml(ctx, drop=element)
        self._helper(ctx, "-r", name, xml=xml, failure="cannot update AppArmor profile")

    def _reload(self, ctx: DomainContext, name: str) -> None:
        self._helper(ctx, "-r", name, xml=self._xml(ctx),
                     failure="cannot update AppArmor profile")

    def _rules_current(self, ctx: DomainContext, name: str) -> bool:
        """True when ``<name>.files`` already holds what the helper would generate now."""
        try:
            from vmconfine_aa_helper.paths import Refusal
            from vmconfine_aa_helper.rules import domain_rules

            expected = domain_rules(ctx.domain, ctx.instance).render()
        except (ImportError, Refusal):
            return False  # let the helper decide (and report)
        try:
            return (self.profile_dir / f"{name}.files").read_text() == expected
        except OSError:
            return False

    def cache_dir(self, ctx: DomainContext) -> Path:
        """The instance's compiled-policy cache (written by the helper only)."""
        return Path(ctx.instance.cache_dir) / CACHE_SUBDIR

    def _parser_path(self) -> str:
        extra = self.helper_extra
        for i, arg in enumerate(extra):
            if arg == "--parser" and i + 1 < len(extra):
                return extra[i + 1]
            if arg.startswith("--parser="):
                return arg.split("=", 1)[1]
        return PARSER

    def _cached_key(self, ctx: DomainContext, name: str) -> str | None:
        """The policy key when this domain's compiled policy is in the cache, else None.

        The rules are generated here with the helper's own code and checks (the same
        ``domain_rules`` and path checks the helper runs on the XML); any refusal or problem
        returns None and the helper then generates (and reports) from the XML as usual.
        """
        try:
            from vmconfine.domain.chain import resolve_chain
            from vmconfine.errors import VmconfineError
            from vmconfine_aa_helper import files as pf
            from vmconfine_aa_helper.cache import Cache, policy_key
            from vmconfine_aa_helper.paths import Refusal, check_text, resolve
            from vmconfine_aa_helper.rules import check_domain_name, domain_rules
        except ImportError:
            return None
        domain = ctx.domain
        try:
            check_domain_name(domain.name)
            for disk in domain.disks:
                if disk.source is not None and disk.type in ("file", "block") and \
                        disk.source.path:
                    resolve_chain(disk.source)
            files_text = domain_rules(domain, ctx.instance).render()
            pdir = resolve(str(self.profile_dir))
            check_text(pdir, "profile directory")
            files_path = os.path.join(pdir, f"{name}.files")
            profile_text = pf.profile_from_template(pf.template_path(pdir), name, files_path)
            key = policy_key(profile_text, files_text, files_path, pf.include_dirs(pdir),
                             self._parser_path())
        except (Refusal, VmconfineError, OSError) as exc:
            log.debug("AppArmor policy cache not consulted for %s: %s", name, exc)
            return None
        if key is None or not Cache(str(self.cache_dir(ctx))).has(name, key):
            return None
        return key

    def _helper(self, ctx: DomainContext, cmd: str, name: str, *, xml: str | None = None,
                profile_dir: str | None = None, prefix: str | None = None,
                extra: list[str] | None = None, failure: str) -> None:
        launcher = helper_command()
        argv = [*launcher, cmd, "-u", name,
                "-P", profile_dir or str(self.profile_dir),
                "--prefix", prefix or self.prefix, *self.helper_extra, *(extra or [])]
        if cmd in ("-c", "-r"):
            argv += ["--uri", ctx.instance.uri, "--cache-dir", str(self.cache_dir(ctx))]
        log.debug("running %s %s", HELPER, " ".join(argv[len(launcher):]))
        try:
            proc = subprocess.run(argv, input=(xml or "").encode(), capture_output=True,
                                  env=HELPER_ENV, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabelError(f"{failure} '{name}': running {HELPER} failed: {exc}") from exc
        stderr = proc.stderr.decode(errors="replace")
        for line in stderr.splitlines():
            if ": warning: " in line:
                log.warning("%s", line)
        if proc.returncode != 0:
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            reason = reason.split(": error: ", 1)[-1]
            raise LabelError(f"{failure} '{name}': {reason}")
