"""The ``cgroups`` pipeline driver: one cgroup per domain, and a device allow-list in force.

Parent, before fork (``set_all_labels``): plan the domain's cgroup in every hierarchy it uses
(:mod:`.placement`), create the directories, then install the device rules
(:mod:`.rules`) through the chosen backend: v1 ``devices.deny``/``devices.allow`` (:mod:`.v1`)
or a cgroup v2 BPF program (:mod:`.bpf`). Child (``child_cgroup``): join every v1 directory
(``tasks``); QEMU's process is created in the v2 one (``spawn_cgroup``).
After exec (``verify_process``): the pid's cgroups and the rules the kernel holds are read
back. Hotplug hooks add or drop one device's rules and re-apply at once. Teardown
(``restore_all_labels``) is driven by the journal only, so a fresh process can finish it.

Journal records (driver ``cgroups``), each written before the change it describes:
``placement`` (the plan), ``mkdir`` (a directory about to be created; ``leaf`` for the
domain's own), ``rules`` (the full rule set about to be applied), ``bpf-attach`` (a program
about to be attached) and ``unfiltered`` (device filtering was skipped, and why).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import ConfigError, DriverError
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_cgroups import bpf, placement, report, v1
from vmconfine_cgroups.rules import (
    DeviceRule,
    chardev_origin,
    device_rule,
    disk_origin,
    disk_rules,
    domain_rules,
    effective,
    hostdev_origin,
    hostdev_rules,
    rules_from_json,
    rules_to_json,
    v1_transition,
    without_origin,
)

if TYPE_CHECKING:
    from vmconfine.config.keys import DriverSettings
    from vmconfine.domain import Chardev, Disk, Hostdev
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

NAME = "cgroups"
BACKENDS = ("auto", "v1", "v2")
DEVICES_LABEL = {"v1": "cgroup v1", "v2": "cgroup v2 BPF"}
UNFILTERED_WARNING = "Group devices ACL is not accessible, disabling filtering"


@dataclass
class Plan:
    """Where the domain's cgroup lives and how devices are filtered."""

    rel: str
    dirs: dict[str, str] = field(default_factory=dict)  # mount point -> the domain's directory
    controllers: dict[str, list[str]] = field(default_factory=dict)  # mount -> controller names
    devices: str = "none"  # "v1" | "v2" | "none"
    devices_dir: str | None = None
    reason: str = ""  # why devices are not filtered
    own: dict[str, str] = field(default_factory=dict)  # mount -> vmconfine's own placement

    def to_json(self) -> dict[str, Any]:
        return {"rel": self.rel, "dirs": self.dirs, "controllers": self.controllers,
                "devices": self.devices, "devices_dir": self.devices_dir, "reason": self.reason,
                "own": self.own}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(str(data["rel"]), dict(data.get("dirs", {})),
                   {k: list(v) for k, v in data.get("controllers", {}).items()},
                   str(data.get("devices", "none")), data.get("devices_dir"),
                   str(data.get("reason", "")), dict(data.get("own", {})))


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def expected_tags(program: bytes) -> set[str]:
    """The kernel's program tag for ``program``: the first 8 bytes of the SHA-256 (recent
    kernels) or SHA-1 (older ones) of the instructions (there are no map fds to zero)."""
    return {hashlib.sha256(program).hexdigest()[:16], hashlib.sha1(program).hexdigest()[:16]}


class CgroupsDriver:
    """The per-domain cgroup and device allow-list (libvirt's qemu_cgroup.c)."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self._hier: placement.Hierarchies | None = None
        self._bpf_ok: tuple[bool, str, int] | None = None

    @property
    def settings(self) -> DriverSettings:
        """This driver's qemu.conf keys (``cgroup_*``)."""
        return self.host.config.driver_settings(NAME)

    # ---- host ---------------------------------------------------------------------------------
    @property
    def hier(self) -> placement.Hierarchies:
        if self._hier is None:
            self._hier = placement.detect()
        return self._hier

    def bpf_available(self) -> tuple[bool, str, int]:
        if self._bpf_ok is None:
            self._bpf_ok = bpf.available()
        return self._bpf_ok

    def _delegated_v2(self) -> str | None:
        """vmconfine's own cgroup v2 directory when this user may create groups in it."""
        h = self.hier
        if h.v2 is None:
            return None
        own = placement.join(h.v2, h.self_v2, "")
        if os.access(own, os.W_OK | os.X_OK) and os.access(Path(own, v1.PROCS), os.W_OK):
            return own
        return None

    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        if self.hier.empty:
            return False, ("no cgroup hierarchy is mounted; mount cgroup2 on /sys/fs/cgroup "
                           "(or the v1 controllers) to get per-domain cgroups")
        return True, ""

    @hookimpl
    def enabled(self, host: HostContext) -> bool:
        if self.hier.empty or host.config.driver_settings(NAME).cgroup_controllers == []:
            return False
        if host.privileged:
            return True
        return self._delegated_v2() is not None  # session: only a delegated subtree

    # ---- planning -----------------------------------------------------------------------------
    def backend_setting(self) -> str:
        value = str(self.settings.cgroup_devices_backend or "auto")
        if value not in BACKENDS:
            raise ConfigError(f"cgroup_devices_backend must be one of {', '.join(BACKENDS)}, "
                              f"not '{value}'")
        return value

    def plan(self, ctx: DomainContext) -> Plan:
        """Decide the domain's directories and device backend (changes nothing)."""
        h, cfg = self.hier, self.settings
        wanted = cfg.cgroup_controllers
        names = list(placement.AUTODETECT) if wanted is None else list(wanted)
        for n in names:
            if n not in placement.KNOWN_CONTROLLERS:
                raise ConfigError(f"Unknown cgroup controller '{n}'; fix cgroup_controllers in "
                                  f"qemu.conf (known: {', '.join(placement.KNOWN_CONTROLLERS)})")
        rel = placement.group_path(ctx.instance, ctx.domain, cfg)
        plan = Plan(rel)
        privileged = self.host.privileged
        v2_ok = h.v2 is not None and (privileged or self._delegated_v2() is not None)

        def add(mount: str, name: str, own: str) -> None:
            plan.dirs.setdefault(mount, placement.join(mount, own, rel))
            plan.own.setdefault(mount, own)
            if name not in plan.controllers.setdefault(mount, []):
                plan.controllers[mount].append(name)

        if "devices" in names:
            self._plan_devices(plan, privileged, v2_ok)
            if plan.devices == "v1":
                add(h.v1["devices"], "devices", h.self_v1.get("devices", "/"))
            elif plan.devices == "v2":
                assert h.v2 is not None
                add(h.v2, "devices", h.self_v2)
        else:
            plan.reason = "'devices' is not in cgroup_controllers"
        for n in names:
            if n == "devices" or n.startswith("name="):
                continue
            if privileged and n in h.v1:
                add(h.v1[n], n, h.self_v1.get(n, "/"))
            elif v2_ok and h.v2 is not None and placement.V2_NAMES.get(n, n) in h.v2_controllers:
                add(h.v2, n, h.self_v2)
            elif wanted is not None:
                log.warning("cgroup controller '%s' is not mounted; domain %s is not placed in it",
                            n, ctx.domain.name)
        if not plan.dirs and v2_ok and h.v2 is not None:
            add(h.v2, "unified", h.self_v2)  # placement only (delegated session)
        if not plan.dirs:
            raise DriverError(f"no usable cgroup hierarchy for domain '{ctx.domain.name}' "
                              "(check cgroup_controllers and the cgroup mounts)")
        return plan

    def _plan_devices(self, plan: Plan, privileged: bool, v2_ok: bool) -> None:
        h = self.hier
        setting = self.backend_setting()
        v1_ok = privileged and "devices" in h.v1
        bpf_ok, bpf_why, bpf_errno = (self.bpf_available() if v2_ok
                                      else (False, "no cgroup2 mount", 0))
        denied = bpf_errno in (errno.EPERM, errno.EACCES)
        if setting == "v2" and not (v2_ok and (bpf_ok or denied)):
            raise DriverError(f"cgroup_devices_backend = \"v2\" but cgroup v2 device filtering "
                              f"is not usable: {bpf_why}; use \"auto\" or \"v1\"")
        if setting == "v1" and not v1_ok:
            raise DriverError('cgroup_devices_backend = "v1" but no v1 devices controller is '
                              'mounted; mount it or use "auto"/"v2"')
        if setting == "v2" or (setting == "auto" and v2_ok and bpf_ok):
            plan.devices = "v2"
        elif v1_ok:
            plan.devices = "v1"
        elif v2_ok and denied:
            plan.devices = "v2"  # loading will fail with EPERM: libvirt's "not accessible" path
        else:
            plan.devices = "none"
            plan.reason = bpf_why if v2_ok else "no devices controller is available"
        if plan.devices == "v1":
            plan.devices_dir = placement.join(h.v1["devices"], h.self_v1.get("devices", "/"),
                                              plan.rel)
        elif plan.devices == "v2":
            assert h.v2 is not None
            plan.devices_dir = placement.join(h.v2, h.self_v2, plan.rel)

    # ---- state --------------------------------------------------------------------------------
    def _state(self, ctx: DomainContext) -> dict[str, Any]:
        """This domain's plan and rules: from memory, else rebuilt from the journal."""
        st = ctx.driver_state(NAME)
        if "plan" in st:
            return st
        rec = ctx.journal.last(NAME, "placement")
        if rec is None:
            return st
        st["plan"] = Plan.from_json(rec["plan"])
        rules_rec = ctx.journal.last(NAME, "rules")
        st["rules"] = rules_from_json(rules_rec["rules"]) if rules_rec else []
        attach = ctx.journal.last(NAME, "bpf-attach")
        st["prog_id"] = attach["prog_id"] if attach else None
        if ctx.journal.last(NAME, "unfiltered"):
            st["plan"].devices = "none"
            st["plan"].reason = ctx.journal.last(NAME, "unfiltered")["reason"]
        return st

    # ---- set up -------------------------------------------------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        ctx.driver_state(NAME)["planned"] = self.plan(ctx)  # set_all_labels uses it

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        st = ctx.driver_state(NAME)
        plan = st.pop("planned", None) or self.plan(ctx)
        st.update(plan=plan, rules=[], prog_id=None)
        for leaf in plan.dirs.values():
            self._clear_leftover(ctx, leaf)
        # group commit: the placement, every directory about to be made and the device rules
        # are journaled with one fsync before the first mkdir (a record of a directory never
        # made costs teardown one rmdir ENOENT)
        devnodes = [r.path for r in ctx.resources if r.role == "devnode"]
        rules = domain_rules(ctx.domain, self.settings, devnodes=devnodes)
        recorded: set[str] = set()
        entries: list[tuple[str, str, dict[str, Any]]] = [
            (NAME, "placement", {"plan": plan.to_json()})]
        for mount, leaf in plan.dirs.items():
            for path in placement.components(mount, plan.own[mount], plan.rel):
                if path not in recorded and not os.path.isdir(path):
                    recorded.add(path)
                    entries.append((NAME, "mkdir", {"path": path, "leaf": path == leaf}))
        entries.append((NAME, "rules", {"backend": plan.devices, "rules": rules_to_json(rules)}))
        # the v2 program is loaded first (a loaded program changes nothing on the host), so
        # its attach joins the same commit
        loaded = self._preload(plan, rules)
        if loaded is not None:
            entries.append((NAME, "bpf-attach", {"cgroup": plan.devices_dir,
                                                 "prog_id": loaded[1].id,
                                                 "tag": loaded[1].tag, "replaces": None}))
        try:
            ctx.journal.record_many(entries)
            for mount, leaf in plan.dirs.items():
                self._create(ctx, mount, plan.own[mount], plan.rel, leaf, recorded,
                             cpuset="cpuset" in plan.controllers[mount])
        except BaseException:
            if loaded is not None:
                os.close(loaded[0])
            raise
        self._apply(ctx, rules, journaled=True, loaded=loaded)

    @staticmethod
    def _preload(plan: Plan, rules: list[DeviceRule]) -> tuple[int, bpf.ProgInfo] | None:
        """The v2 device program loaded ahead of its journal record: (fd, info), or None when
        there is none or loading failed (the usual path then loads it again and reports)."""
        if plan.devices != "v2" or plan.devices_dir is None:
            return None
        try:
            fd = bpf.prog_load(bpf.assemble(rules))
        except bpf.BpfError:
            return None
        try:
            return fd, bpf.prog_info(fd)
        except bpf.BpfError:
            os.close(fd)
            return None

    @staticmethod
    def _clear_leftover(ctx: DomainContext, leaf: str) -> None:
        """A leaf group that exists already: refused while it holds processes, else removed
        (a leftover without journal: start from a clean group)."""
        if not os.path.isdir(leaf):
            return
        pids = v1.procs(leaf)
        if pids:
            raise DriverError(
                f"cgroup {leaf} already exists and holds processes "
                f"{' '.join(map(str, pids[:10]))}; is domain '{ctx.domain.name}' running "
                "elsewhere? stop it first")
        why = v1.rmdir(leaf, wait=0)
        if why:
            raise DriverError(f"cannot remove the leftover cgroup {why}; remove it by hand")

    def _create(self, ctx: DomainContext, mount: str, own: str, rel: str, leaf: str,
                recorded: set[str], *, cpuset: bool) -> None:
        comps = placement.components(mount, own, rel)
        for attempt in range(3):  # another domain's teardown may remove a shared parent
            try:
                for path in comps:
                    if not os.path.isdir(path):
                        if path not in recorded:  # gone since the batch was journaled
                            ctx.journal.record(NAME, "mkdir", path=path, leaf=path == leaf)
                            recorded.add(path)
                        try:
                            os.mkdir(path, 0o755)
                        except FileExistsError:
                            pass
                    if cpuset:
                        # also when it already existed: another domain's start may have made
                        # it an instant ago, and a cpuset group refuses tasks (ENOSPC) until
                        # its cpus/mems are filled (copy_cpuset only fills empty ones)
                        v1.copy_cpuset(path)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
            except OSError as exc:
                raise DriverError(f"cannot create cgroup {path}: {_strerror(exc)}; run as root "
                                  "with the cgroup hierarchy writable") from exc

    def _unfiltered(self, ctx: DomainContext, why: str) -> None:
        """libvirt: EPERM on the devices controller -> warn and run without filtering; refused
        when security_require_confined is set."""
        if self.host.config.security_require_confined:
            raise DriverError(
                f"Group devices ACL is not accessible ({why}); security_require_confined = 1 "
                "forbids running without device filtering: give vmconfine write access to the "
                "devices controller or set security_require_confined = 0")
        log.warning("%s (%s)", UNFILTERED_WARNING, why)
        ctx.journal.record(NAME, "unfiltered", reason=why)
        st = self._state(ctx)
        st["plan"].devices = "none"
        st["plan"].reason = why

    def _apply(self, ctx: DomainContext, new: list[DeviceRule], *,
               journaled: bool = False, loaded: tuple[int, bpf.ProgInfo] | None = None) -> None:
        """Make ``new`` the rule set in force (first install or a hotplug change).
        ``journaled``: the first install, whose ``rules`` record went into
        :meth:`set_all_labels`' group commit, with the ``bpf-attach`` of the program
        ``loaded`` (fd, taken over here) when there is one."""
        st = self._state(ctx)
        plan: Plan | None = st.get("plan")
        if plan is None or (loaded is not None and plan.devices != "v2"):
            if loaded is not None:
                os.close(loaded[0])
            return
        old: list[DeviceRule] = st.get("rules", [])
        if journaled:
            first = True
        else:
            first = not ctx.journal.records(NAME, "rules")
            ctx.journal.record(NAME, "rules", backend=plan.devices, rules=rules_to_json(new))
        st["rules"] = new
        if plan.devices == "none" or plan.devices_dir is None:
            return
        if not first and effective(old) == effective(new):
            return
        if plan.devices == "v1":
            self._apply_v1(ctx, plan.devices_dir, old, new, first=first)
        else:
            self._attach(ctx, plan.devices_dir, new, st.get("prog_id"), loaded)

    def _apply_v1(self, ctx: DomainContext, cg: str, old: list[DeviceRule],
                  new: list[DeviceRule], *, first: bool) -> None:
        if first:
            try:
                v1.deny_all(cg)
            except PermissionError as exc:
                self._unfiltered(ctx, f"{cg}/devices.deny: {_strerror(exc)}")
                return
            writes = [("allow", r.text()) for r in effective(new)]
        else:
            writes = v1_transition(old, new)
        for kind, line in writes:
            try:
                (v1.allow if kind == "allow" else v1.deny)(cg, line)
            except OSError as exc:
                raise DriverError(f"cannot write '{line}' to {cg}/devices.{kind}: "
                                  f"{_strerror(exc)}") from exc
        problems = v1.differences(cg, new)
        if problems:
            raise DriverError(f"{cg}: the kernel's device list differs from the rules: "
                              f"{'; '.join(problems)}")

    def _attach(self, ctx: DomainContext, cg: str, rules: list[DeviceRule],
                old_id: int | None, loaded: tuple[int, bpf.ProgInfo] | None = None) -> None:
        """Load and attach the program of ``rules`` (``loaded``: already loaded, its
        ``bpf-attach`` journaled)."""
        if loaded is not None:
            fd = loaded[0]
        else:
            try:
                fd = bpf.prog_load(bpf.assemble(rules))
            except bpf.BpfError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES) and old_id is None:
                    self._unfiltered(ctx, f"BPF_PROG_LOAD: {_strerror(exc)}")
                    return
                raise DriverError(
                    f"cannot load the device BPF program for {cg}: {_strerror(exc)}"
                    f"{'; verifier: ' + exc.verifier_log if exc.verifier_log else ''}"
                ) from exc
        try:
            if loaded is not None:
                info = loaded[1]
            else:
                info = bpf.prog_info(fd)
                ctx.journal.record(NAME, "bpf-attach", cgroup=cg, prog_id=info.id,
                                   tag=info.tag, replaces=old_id)
            self._attach_fd(cg, fd, old_id)
        except bpf.BpfError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES) and old_id is None:
                self._unfiltered(ctx, f"BPF_PROG_ATTACH: {_strerror(exc)}")
                return
            raise DriverError(f"cannot attach the device BPF program to {cg}: "
                              f"{_strerror(exc)}") from exc
        finally:
            os.close(fd)
        self._state(ctx)["prog_id"] = info.id
        attached = bpf.query(cg)
        if attached != [info.id]:
            raise DriverError(f"{cg}: device programs attached are {attached}, expected "
                              f"[{info.id}]")

    @staticmethod
    def _attach_fd(cg: str, fd: int, old_id: int | None) -> None:
        old_fd = None
        if old_id is not None:
            try:
                old_fd = bpf.prog_fd_by_id(old_id)
            except bpf.BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        try:
            if old_fd is None:
                bpf.attach(cg, fd)
                return
            try:
                bpf.attach(cg, fd, replace_fd=old_fd)  # atomic swap
            except bpf.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
                    raise
                bpf.attach(cg, fd)  # kernels without BPF_F_REPLACE: add, then drop the old one
                with contextlib.suppress(bpf.BpfError):
                    bpf.detach(cg, old_fd)
        finally:
            if old_fd is not None:
                os.close(old_fd)

    # ---- hotplug ------------------------------------------------------------------------------
    def _swap(self, ctx: DomainContext, origin: str, added: list[DeviceRule]) -> None:
        st = self._state(ctx)
        if st.get("plan") is None:
            return
        self._apply(ctx, without_origin(st.get("rules", []), origin) + added)

    @hookimpl
    def set_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._swap(ctx, disk_origin(disk), disk_rules(disk))

    @hookimpl
    def restore_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._swap(ctx, disk_origin(disk), [])

    @hookimpl
    def set_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self._swap(ctx, hostdev_origin(hostdev), hostdev_rules(hostdev))

    @hookimpl
    def restore_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        self._swap(ctx, hostdev_origin(hostdev), [])

    @hookimpl
    def set_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        if chardev.type == "dev" and chardev.path:
            rule = device_rule(chardev.path, "rw", chardev_origin(chardev))
            self._swap(ctx, chardev_origin(chardev), [rule] if rule else [])

    @hookimpl
    def restore_chardev_label(self, ctx: DomainContext, chardev: Chardev) -> None:
        if chardev.type == "dev":
            self._swap(ctx, chardev_origin(chardev), [])

    # ---- child and after exec -----------------------------------------------------------------
    @hookimpl
    def spawn_cgroup(self, ctx: DomainContext) -> int | None:
        """The v2 group, for QEMU's process to be created in (``CLONE_INTO_CGROUP``)."""
        plan: Plan | None = self._state(ctx).get("plan")
        leaf = plan.dirs.get(self.hier.v2) if plan is not None and self.hier.v2 else None
        if leaf is None:
            return None
        try:
            return os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DriverError(f"cannot open cgroup {leaf}: {_strerror(exc)}") from exc

    @hookimpl
    def child_cgroup(self, ctx: DomainContext) -> None:
        """Join every v1 group through its ``tasks`` file (the child has one thread: the
        same membership as ``cgroup.procs``, without the kernel's migration lock); the v2
        group is the one the process was created in (``spawn_cgroup``)."""
        plan: Plan | None = self._state(ctx).get("plan")
        if plan is None:
            return
        for mount, leaf in plan.dirs.items():
            if mount == self.hier.v2:
                continue
            try:
                v1.add_thread(leaf)
            except OSError as exc:
                raise DriverError(f"cannot move QEMU into cgroup {leaf}: {_strerror(exc)}"
                                  ) from exc

    @hookimpl
    def child_helper(self, ctx: DomainContext, helper: Helper, step: str) -> None:
        """A helper (swtpm) joins the domain's cgroup, as libvirt's
        ``qemuExtDevicesSetupCgroup`` moves it there (created in the v2 group as QEMU)."""
        if step == "child_cgroup":
            self.child_cgroup(ctx)

    @hookimpl
    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        plan: Plan | None = self._state(ctx).get("plan")
        return [] if plan is None else self._check_placement(plan, pid)

    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        st = self._state(ctx)
        plan: Plan | None = st.get("plan")
        if plan is None:
            return []
        problems = self._check_placement(plan, pid)
        rules: list[DeviceRule] = st.get("rules", [])
        if plan.devices == "v1" and plan.devices_dir:
            problems += v1.differences(plan.devices_dir, rules)
        elif plan.devices == "v2" and plan.devices_dir:
            problems += self._check_bpf(plan.devices_dir, rules, st.get("prog_id"))
        return problems

    def _check_placement(self, plan: Plan, pid: int) -> list[str]:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError as exc:
            return [f"cannot read /proc/{pid}/cgroup: {_strerror(exc)}"]
        v2_path, by_ctrl = None, {}
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[1] == "":
                v2_path = parts[2]
            for c in parts[1].split(","):
                by_ctrl[c] = parts[2]
        problems = []
        for mount, leaf in plan.dirs.items():
            want = "/" + os.path.relpath(leaf, mount)
            if mount == self.hier.v2 or plan.controllers.get(mount) == ["unified"]:
                have = v2_path
            else:
                have = next((by_ctrl[c] for c in plan.controllers.get(mount, [])
                             if c in by_ctrl), None)
            if have != want:
                problems.append(f"pid {pid} is in cgroup {have} under {mount}, expected {want}")
        return problems

    @staticmethod
    def _check_bpf(cg: str, rules: list[DeviceRule], prog_id: int | None) -> list[str]:
        try:
            attached = bpf.query(cg)
        except OSError as exc:
            return [f"BPF_PROG_QUERY {cg}: {_strerror(exc)}"]
        if prog_id is None or attached != [prog_id]:
            return [f"device programs attached to {cg} are {attached}, expected [{prog_id}]"]
        try:
            fd = bpf.prog_fd_by_id(prog_id)
            try:
                info = bpf.prog_info(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return [f"cannot read back device program {prog_id}: {_strerror(exc)}"]
        if info.tag not in expected_tags(bpf.assemble(rules)):
            return [f"device program {prog_id} on {cg} (tag {info.tag}) is not the one built "
                    "from the domain's rules"]
        return []

    def _in_force(self, ctx: DomainContext) -> tuple[Plan | None, list[DeviceRule], bool]:
        """The plan and rules in force; before start, those ``set_all_labels`` would use
        (third item True)."""
        st = self._state(ctx)
        if st.get("plan") is not None:
            return st["plan"], st.get("rules", []), False
        if ctx.pid is not None or ctx.journal.records(NAME):
            return None, [], False
        try:
            plan = self.plan(ctx)
        except (ConfigError, DriverError):
            return None, [], False
        devnodes = [r.path for r in ctx.resources if r.role == "devnode"]
        return plan, domain_rules(ctx.domain, self.settings, devnodes=devnodes), True

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        plan, rules, planned = self._in_force(ctx)
        if plan is None:
            return {}
        out: dict[str, Any] = {
            "cgroup": plan.rel,
            "dirs": {",".join(plan.controllers.get(m, [])): d for m, d in plan.dirs.items()},
            "devices": DEVICES_LABEL.get(plan.devices, f"not filtered ({plan.reason})"),
            "rules": [r.text() for r in effective(rules)],
        }
        if planned:
            out["planned"] = True
        out["summary"] = (f"cgroup {plan.rel}; devices: {out['devices']}"
                          + (f", {len(out['rules'])} rules" if plan.devices != "none" else ""))
        if plan.devices == "v2" and plan.devices_dir and os.path.isdir(plan.devices_dir):
            with contextlib.suppress(OSError):
                out["bpf_prog_ids"] = bpf.query(plan.devices_dir)
        return out

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """The device rules that decide ``resource`` (None when it is not a device node)."""
        need = "rw" if resource.writable else "r"
        dev = device_rule(resource.path, need, "")
        plan, rules, _planned = self._in_force(ctx)
        if dev is None or plan is None:
            return None
        device = f"{dev.type} {dev.major}:{dev.minor}"
        if plan.devices == "none":
            return {"device": device, "allows": True, "summary": f"{device} (not filtered)"}
        granted = "".join(r.access for r in effective(rules) if r.type in ("a", dev.type)
                          and r.major in (None, dev.major) and r.minor in (None, dev.minor))
        access = "".join(ch for ch in "rwm" if ch in granted)
        missing = "".join(ch for ch in need if ch not in granted)
        out: dict[str, Any] = {"device": device, "access": access, "allows": not missing,
                               "summary": f"{device} {'DENIED' if missing else access}"}
        if missing:
            out["why"] = (f"the cgroup device rules of domain '{ctx.domain.name}' do not allow "
                          f"'{missing}' on {resource.path} ({device}); add it to "
                          "cgroup_device_acl_extra in qemu.conf or list it in the domain XML")
        return out

    @hookimpl
    def explain_process(self, ctx: DomainContext, kernel: dict[str, Any] | None,
                        ) -> list[dict[str, Any]]:
        """The domain's cgroup per controller and its device rules (and the kernel's view)."""
        return report.process_rows(self.describe(ctx), kernel)

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        return report.host_checks(host.privileged)

    # ---- teardown -----------------------------------------------------------------------------
    @staticmethod
    def _prune_default_partition(leaf: str, seen: set[str]) -> None:
        """Remove the default layout's ``vmconfine/<segment>`` directories once empty, even
        when another domain of the instance created them (partitions the admin chose stay)."""
        parent = os.path.dirname(leaf)
        top = os.path.dirname(parent)
        if os.path.basename(top) != placement.DEFAULT_ROOT:
            return
        for path in (parent, top):
            if v1.rmdir(path, wait=0):
                return
            seen.add(path)

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        records = ctx.journal.records(NAME)
        if not records:
            return
        errors: list[str] = []
        attaches = [r for r in records if r["op"] == "bpf-attach"]
        mkdirs = [r for r in records if r["op"] == "mkdir"]
        leaves = {r["path"] for r in mkdirs if r.get("leaf")}
        busy: set[str] = set()
        for leaf in sorted(leaves):
            try:
                held = os.path.isdir(leaf) and bool(v1.procs(leaf))
            except OSError as exc:
                errors.append(f"{leaf}: {_strerror(exc)}")
                busy.add(leaf)
                continue
            if held:
                why = v1.rmdir(leaf)  # waits briefly for exiting processes
                if why:
                    errors.append(why)
                    busy.add(leaf)
        for rec in reversed(attaches):
            cg = rec["cgroup"]
            if cg in busy or not os.path.isdir(cg):
                continue  # never unfilter a group that still runs something
            try:
                bpf.detach_id(cg, int(rec["prog_id"]))
            except OSError as exc:
                errors.append(f"detaching device program {rec['prog_id']} from {cg}: "
                              f"{_strerror(exc)}")
        seen: set[str] = set()
        for rec in reversed(mkdirs):
            path = rec["path"]
            if path in seen or path in busy or any(b.startswith(path + "/") for b in busy):
                continue
            seen.add(path)
            why = v1.rmdir(path, wait=1.0 if rec.get("leaf") else 0)
            if why and rec.get("leaf"):
                errors.append(why)  # shared partition directories stay while others use them
                busy.add(path)
            elif rec.get("leaf"):
                self._prune_default_partition(path, seen)
        # the journal goes only when no group of the domain is left: one still there (whatever
        # kept it) is named, and the journal stays for the next command to finish the job
        errors += [f"{leaf} is still there" for leaf in sorted(leaves)
                   if leaf not in busy and os.path.isdir(leaf)]
        ctx.state.pop(NAME, None)
        if errors:
            raise DriverError(f"cgroup teardown incomplete: {'; '.join(errors)}; stop those "
                              "processes, then run any vmconfine command to finish")
