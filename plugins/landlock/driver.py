"""The ``landlock`` security driver: unprivileged filesystem, TCP and IPC confinement of QEMU.

Landlock changes nothing on the host: the parent computes the ruleset (``set_all_labels``,
kept in ``ctx.state["landlock"]`` and recorded in the journal for the record), and the forked
child enforces it with ``landlock_restrict_self`` right before exec (``child_confine``, after
the pipeline set no_new_privs and after the uid switch and capability drop). Restore is a
no-op. Works in system, session and embed instances, alone or stacked.

What can be verified after exec (``verify_process``): Landlock has no /proc view of a
process's domain, so the driver checks that QEMU runs with NoNewPrivs 1, that its executable
is the emulator the ruleset allows, and that the child reported — through a close-on-exec
status pipe — that ``landlock_restrict_self`` succeeded with the expected ruleset and that a
read outside the ruleset was denied after it (a self-test). It cannot read back the rules
the kernel holds for the pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError, LabelError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.qemu import probe as emulator_probe
from vmconfine.qemu.emulator import domain_emulator, emulator_files
from vmconfine.qemu.probe import ProbeError
from vmconfine.sanitize import one_line
from vmconfine_landlock import syscalls
from vmconfine_landlock.ruleset import Ruleset, apply_ruleset, derive_ruleset, helper_ruleset

if TYPE_CHECKING:
    from vmconfine.domain import Domain, SecLabel
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

NAME = "landlock"
MODES = ("enforce", "best-effort")
LABEL_RE = re.compile(r"^landlock:abi[0-9]+:[0-9a-f]{12}$")
_REPORT_MAX = 4096


#: Landlock rights as letters in the report's resource table
LETTERS = (("read_file", "r"), ("write_file", "w"), ("truncate", "t"), ("execute", "x"),
           ("read_dir", "d"), ("make_", "m"), ("remove_", "u"), ("ioctl_dev", "i"),
           ("refer", "f"))
LEGEND = ("r read_file, w write_file, t truncate, x execute, d read_dir, m make_*, "
          "u remove_*, i ioctl_dev, f refer")


def access_letters(access: list[str]) -> str:
    """Landlock rights as letters (see :data:`LEGEND`)."""
    return "".join(letter for prefix, letter in LETTERS
                   if any(a.startswith(prefix) for a in access)) or "-"


def _mode(host: HostContext) -> str:
    mode = host.config.driver_settings(NAME).landlock_mode
    if mode not in MODES:
        raise DriverError(f"landlock_mode = {mode!r} in qemu.conf is not valid; use "
                          f"\"enforce\" or \"best-effort\"")
    return mode


def _missing_features(abi: int) -> list[str]:
    out = []
    if abi < 2:
        out.append("refer")
    if abi < 3:
        out.append("truncate")
    if abi < 4:
        out.append("TCP bind/connect")
    if abi < 5:
        out.append("ioctl_dev")
    if abi < 6:
        out.append("signal/abstract-socket scoping")
    if abi < 7:
        out.append("audit logging")
    return out


class LandlockDriver:
    """libvirt has no Landlock driver; this one follows the same hook contract."""

    def __init__(self, host: HostContext) -> None:
        self.host = host

    # ---- identity and probe -------------------------------------------------------------
    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        mode = _mode(host)
        abi, why = syscalls.probe_abi()
        if abi == 0:
            # no Landlock at all: unavailable in every mode, so a configured "landlock" never
            # silently runs QEMU unconfined (best effort covers older ABIs only)
            return False, f"{why} (landlock_mode = \"{mode}\")"
        missing = _missing_features(min(abi, syscalls.MAX_KNOWN_ABI))
        if missing:
            if mode == "enforce":
                return False, (f"ABI {abi}: this kernel cannot restrict {', '.join(missing)} "
                               "(landlock_mode = \"enforce\"; use \"best-effort\" to accept that)")
            return True, (f"ABI {abi}, best effort: this kernel cannot restrict "
                          f"{', '.join(missing)} (newer kernels can)")
        return True, ""

    @hookimpl
    def model(self) -> str:
        return NAME

    @hookimpl
    def doi(self) -> str:
        return "0"

    # ---- labels ---------------------------------------------------------------------------
    @hookimpl
    def verify(self, domain: Domain, seclabel: SecLabel | None) -> None:
        if seclabel is None or seclabel.type != "static":
            return
        if not seclabel.label or not LABEL_RE.match(seclabel.label):
            raise LabelError(
                f"landlock static label {seclabel.label!r} is not a ruleset digest "
                "(landlock:abiN:<12 hex digits>); use type='dynamic' or copy the label "
                "from 'vmconfine dominfo'"
            )

    def ruleset(self, ctx: DomainContext) -> tuple[Ruleset | None, str]:
        """The ruleset the kernel will enforce for ``ctx``, or (None, reason) when Landlock
        is unavailable (best-effort mode only; enforce mode raises)."""
        abi, why = syscalls.probe_abi()
        if abi == 0:
            if _mode(self.host) == "enforce":
                raise DriverError(f"landlock: {why}")
            return None, why
        emulator = domain_emulator(ctx)
        try:
            emu = emulator_files(emulator, emulator_probe.for_instance(ctx.instance))
        except ProbeError as exc:  # names the emulator already
            raise DriverError(f"landlock: {exc.message}") from None
        except OSError as exc:
            raise DriverError(f"landlock: cannot resolve the files of emulator "
                              f"{one_line(emulator)}: {exc}") from None
        home = str(ctx.instance.domain_lib_dir(ctx.domain.name))
        full = derive_ruleset(ctx.domain, ctx.resources, emu, home_dir=home)
        return full.for_abi(abi), ""

    @hookimpl
    def gen_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        rs, why = self.ruleset(ctx)
        if seclabel.type == "dynamic":
            seclabel.label = rs.label if rs is not None else "landlock:unavailable"
        if rs is None:
            log.warning("landlock (best-effort): %s", why)

    @hookimpl
    def reserve_label(self, ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
        """Rulesets are per process: nothing to reserve."""

    @hookimpl
    def release_label(self, ctx: DomainContext, seclabel: SecLabel) -> None:
        """Nothing was allocated."""

    # ---- host resources (nothing on the host changes) -------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        if self._confined(ctx):
            self.ruleset(ctx)  # the emulator and its libraries resolve

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        state = ctx.driver_state(NAME)
        self._close_status(state)
        if not self._confined(ctx):
            state.clear()
            state["disabled"] = "the domain has no landlock seclabel (or type='none')"
            return
        rs, why = self.ruleset(ctx)
        sec = ctx.seclabel(NAME)
        if rs is not None and sec is not None:
            if sec.type == "static" and sec.label != rs.label:
                raise LabelError(
                    f"landlock: the domain pins ruleset {sec.label} but its ruleset is now "
                    f"{rs.label}; review 'vmconfine dominfo' and update the static label"
                )
            sec.label = rs.label
        ctx.journal.record(NAME, "ruleset", label=rs.label if rs else None,
                           abi=rs.abi if rs else 0, rules=len(rs.path_rules) if rs else 0,
                           reason=why, changes_host=False)
        state.clear()
        state["ruleset"] = rs
        state["reason"] = why
        state["mode"] = _mode(self.host)
        state["status_fds"] = os.pipe2(os.O_CLOEXEC)

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        """Landlock changed nothing on the host; only close the status pipe."""
        self._close_status(ctx.state.get(NAME, {}))

    # ---- forked child ---------------------------------------------------------------------
    @hookimpl
    def child_confine(self, ctx: DomainContext) -> None:
        state = ctx.state.get(NAME)
        if state is None:
            raise DriverError("landlock: no ruleset was computed before fork (set_all_labels "
                              "did not run)")
        if "disabled" in state:
            return
        rs: Ruleset | None = state["ruleset"]
        if rs is None:
            report: dict[str, Any] = {"applied": False, "reason": state["reason"]}
        else:
            report = apply_ruleset(rs)
        fds = state.get("status_fds")
        if fds:
            data = json.dumps(report).encode()[:_REPORT_MAX]
            os.write(fds[1], data)

    # ---- helper processes (swtpm) ---------------------------------------------------------
    @hookimpl
    def set_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        """Nothing changes on the host: the helper's ruleset (its program, the system trees
        it reads, its own state) is computed here for its child."""
        if not self._confined(ctx):
            return
        abi, why = syscalls.probe_abi()
        if abi == 0 and _mode(self.host) == "enforce":
            raise DriverError(f"landlock: {why}")
        helpers = ctx.driver_state(NAME).setdefault("helpers", {})
        old = helpers.pop(helper.name, None)
        if old is not None:
            self._close_status(old)
        helpers[helper.name] = {
            "ruleset": helper_ruleset(helper).for_abi(abi) if abi else None,
            "reason": why, "status_fds": os.pipe2(os.O_CLOEXEC)}

    @hookimpl
    def restore_helper_label(self, ctx: DomainContext, helper: Helper) -> None:
        """Only the status pipe to close."""
        state = ctx.state.get(NAME, {}).get("helpers", {}).pop(helper.name, None)
        if state is not None:
            self._close_status(state)

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        if step != "child_confine" or not self._confined(ctx):
            return
        state = ctx.state.get(NAME, {}).get("helpers", {}).get(helper.name)
        if state is None:
            raise DriverError(f"landlock: no ruleset was computed for {helper.name} before "
                              "fork (set_helper_label did not run)")
        rs: Ruleset | None = state["ruleset"]
        report = apply_ruleset(rs) if rs is not None else {"applied": False,
                                                           "reason": state["reason"]}
        os.write(state["status_fds"][1], json.dumps(report).encode()[:_REPORT_MAX])

    @hookimpl
    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        state = ctx.state.get(NAME, {}).get("helpers", {}).get(helper.name)
        if state is None or not self._confined(ctx):
            return []
        state.pop("report", None)
        report = self._read_report(state)
        rs: Ruleset | None = state["ruleset"]
        if rs is None:
            return []
        if report is None or not report.get("applied") or report.get("label") != rs.label:
            return [f"{helper.name} did not apply ruleset {rs.label}: {report}"]
        return []

    # ---- after exec -----------------------------------------------------------------------
    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        state = ctx.state.get(NAME)
        if state is None or "disabled" in state:
            return []
        report = self._read_report(state)
        rs: Ruleset | None = state.get("ruleset")
        if rs is None:
            return []  # best-effort without Landlock: nothing was asked of the kernel
        problems = []
        nnp = _status_field(pid, "NoNewPrivs")
        if nnp != "1":
            problems.append(f"NoNewPrivs of pid {pid} is {nnp!r}, expected '1'")
        try:
            exe = os.path.realpath(f"/proc/{pid}/exe")
            allowed = rs.rule_for(exe)
            if allowed is None or "execute" not in allowed.access:
                problems.append(f"pid {pid} runs {exe}, which the ruleset does not allow "
                                "to be executed")
        except OSError as exc:
            problems.append(f"cannot read /proc/{pid}/exe: {exc}")
        if report is None:
            problems.append("the child did not report that landlock_restrict_self succeeded")
        else:
            if not report.get("applied"):
                problems.append(f"the ruleset was not applied: {report.get('reason')}")
            elif report.get("label") != rs.label:
                problems.append(f"the child applied ruleset {report.get('label')}, expected "
                                f"{rs.label}")
            elif report.get("selftest") not in ("denied", "skipped"):
                problems.append(f"self-test after restrict_self: {report.get('selftest')}")
        return problems

    @hookimpl
    def process_label(self, ctx: DomainContext, pid: int) -> str | None:
        """Landlock has no per-process view: the label vmconfine applied (None if none)."""
        sec = ctx.seclabel(NAME)
        state = ctx.state.get(NAME, {})
        if "report" in state and not state["report"].get("applied"):
            return None
        return sec.label if sec is not None and sec.type != "none" else None

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        state = ctx.state.get(NAME, {})
        mode = _mode(self.host)
        kernel_abi, why = syscalls.probe_abi()
        out: dict[str, Any] = {"model": NAME, "mode": mode, "kernel_abi": kernel_abi}
        if "disabled" in state or not self._confined(ctx):
            out["confined"] = False
            out["reason"] = state.get("disabled", "the domain has no landlock seclabel")
            return out
        rs = state.get("ruleset") if "ruleset" in state else self.ruleset(ctx)[0]
        if rs is None:
            out.update(confined=False, reason=state.get("reason") or why)
            return out
        out.update(confined=True, label=rs.label, digest=rs.digest(), abi=rs.abi,
                   errata=syscalls.errata())
        out.update(rs.to_dict())
        out["rules"] = [
            {"path": r.path, "access": sorted(r.access), "dir": r.is_dir,
             "roles": list(r.roles), **({"optional": True} if r.optional else {})}
            for r in rs.path_rules
        ]
        del out["path_rules"]
        out["network"] = {
            "handled": sorted(rs.handled_net),
            "ports": [{"port": n.port, "access": sorted(n.access), "roles": list(n.roles)}
                      for n in rs.net_rules],
        }
        del out["net_rules"], out["handled_net"]
        if "report" in state:
            out["child_report"] = state["report"]
        sec = ctx.seclabel(NAME)
        if "ruleset" not in state and sec is not None and sec.label and sec.label != rs.label:
            out["notes"] = [*out["notes"], f"the ruleset computed now ({rs.label}) differs from "
                            f"the one applied at start ({sec.label}): its files changed"]
        out["summary"] = summary(rs, mode)
        out["legend"] = LEGEND
        return out

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """The Landlock access QEMU gets on ``resource`` (rules on the path and on every
        directory above it add up), and whether that covers what the resource needs."""
        if not self._confined(ctx):
            return {"confined": False, "summary": "not confined"}
        state = ctx.driver_state(NAME)
        rs = state.get("ruleset") if "ruleset" in state else state.get("explain_ruleset")
        if rs is None and "explain_ruleset" not in state:
            rs = state["explain_ruleset"] = self.ruleset(ctx)[0]
        if rs is None:
            return {"confined": False, "summary": "no Landlock in this kernel"}
        if resource.passed:
            return {"confined": True, "access": [], "rules": [], "allows": True,
                    "summary": "passed as fd (no rule needed)"}
        real = os.path.realpath(resource.path)
        access: set[str] = set()
        rules = []
        for r in rs.path_rules:
            if r.path == real or (r.is_dir and real.startswith(r.path.rstrip("/") + "/")):
                access |= r.access
                rules.append(r.path)
        need = _needed_access(resource, real)
        missing = sorted((need & rs.handled_fs) - access)
        letters = access_letters(sorted(access))
        out: dict[str, Any] = {"confined": True, "access": sorted(access), "rules": rules,
                               "allows": not missing,
                               "cell": f"DENIED ({letters})" if missing else letters}
        if missing:
            out["why"] = (f"the Landlock ruleset {rs.label} does not grant {', '.join(missing)} "
                          f"on {real}; add the path to the domain XML so the ruleset covers it")
            out["summary"] = f"DENIED (no {','.join(missing)})"
        else:
            out["summary"] = ",".join(sorted(access)) if access else "-"
        return out

    @hookimpl
    def explain_process(self, ctx: DomainContext, kernel: dict[str, Any] | None,
                        ) -> list[dict[str, Any]]:
        """Landlock has no per-process view in /proc: the ruleset vmconfine applies."""
        sec = ctx.seclabel(NAME)
        label = sec.label if sec is not None and sec.type != "none" else None
        return [{"item": "landlock ruleset", "intended": label or "none",
                 "kernel": "(not visible in /proc)" if kernel is not None else None,
                 "differs": False}]

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        abi, why = syscalls.probe_abi()
        if abi > 0:
            return [{"status": "PASS", "name": "Landlock", "detail": f"ABI {abi}", "fix": ""}]
        try:
            enforce = _mode(host) == "enforce"
        except DriverError:
            enforce = False  # config --check reports the invalid value
        status = "FAIL" if wanted and enforce else "WARN"
        return [{"status": status, "name": "Landlock", "detail": f"not available ({why})",
                 "fix": "boot a kernel with Landlock in CONFIG_LSM (lsm=...,landlock)"}]

    # ---- helpers --------------------------------------------------------------------------
    def _confined(self, ctx: DomainContext) -> bool:
        sec = ctx.seclabel(NAME)
        return sec is not None and sec.type != "none"

    @staticmethod
    def _close_status(state: dict[str, Any]) -> None:
        fds = state.pop("status_fds", None)
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _read_report(self, state: dict[str, Any]) -> dict[str, Any] | None:
        if "report" in state:
            return state["report"]
        fds = state.get("status_fds")
        if not fds:
            return None
        try:
            os.set_blocking(fds[0], False)
            data = os.read(fds[0], _REPORT_MAX)
        except BlockingIOError:
            data = b""
        finally:
            self._close_status(state)
        try:
            report = json.loads(data) if data else None
        except json.JSONDecodeError:
            report = {"applied": False, "reason": f"unreadable child report {data[:80]!r}"}
        if report is not None:
            state["report"] = report
        return report


def _tcp_summary(rs: Ruleset, right: str, verb: str) -> str:
    if right not in rs.handled_net:
        return f"{verb} unrestricted"
    ports = [str(n.port) for n in rs.net_rules if right in n.access]
    return f"{verb} only on {','.join(ports)}" if ports else f"{verb} denied"


def summary(rs: Ruleset, mode: str) -> str:
    """One line for ``run`` and ``dominfo``."""
    parts = [f"{rs.label} ({mode}), {len(rs.path_rules)} path rules"]
    if rs.abi >= 4:
        parts.append(f"TCP {_tcp_summary(rs, 'bind_tcp', 'bind')}, "
                     f"{_tcp_summary(rs, 'connect_tcp', 'connect')}")
    if rs.scoped:
        parts.append(f"scoped: {', '.join(sorted(rs.scoped))}")
    return "; ".join(parts)


def _needed_access(resource: Resource, real: str) -> set[str]:
    """The Landlock rights opening ``resource`` as its role says takes (a socket QEMU binds
    itself, the SPICE socket: making it)."""
    if resource.create and not resource.is_dir and not os.path.lexists(real):
        return {"make_sock"}
    if resource.is_dir or os.path.isdir(real):
        return {"read_dir"} | ({"make_reg"} if resource.writable else set())
    return {"read_file"} | ({"write_file"} if resource.writable else set())


def _status_field(pid: int, name: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None
