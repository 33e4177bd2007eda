"""The ``namespaces`` pipeline driver: QEMU's own mount namespace, private /dev, and an
optional per-domain root view (``namespaces`` in qemu.conf; docs/namespaces.md).

Parent, before fork: the view is planned from the domain's resources, ``cgroup_device_acl``
and the emulator's files (:mod:`.plan`); nothing on the host changes, so the journal gets one
record of the plan (``changes_host=False``) and teardown has nothing to undo. Child
(``child_namespace``, after the cgroup is joined and before the MAC exec label and the uid
switch): the namespaces are created and the view is built (:mod:`.build`); they die with
QEMU. In an unprivileged instance the child first enters a user namespace, and
``child_capabilities`` drops every capability it holds there. After exec
(``verify_process``): QEMU's mount namespace must differ from vmconfine's and every
directory the view created must hold exactly the planned entries, read from
``/proc/PID/root``; anything else stops the start (fail closed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError
from vmconfine.plugin import resources as core_resources
from vmconfine.plugin.devacl import acl_list
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.qemu import probe as emulator_probe
from vmconfine.qemu.emulator import domain_emulator, emulator_files
from vmconfine.qemu.probe import ProbeError
from vmconfine.sanitize import one_line
from vmconfine_namespaces import build, live, report, syscalls
from vmconfine_namespaces.plan import (
    Builder,
    Entry,
    PlanError,
    View,
    Wanted,
    dev_entries,
    order,
    own_pid_path,
    root_entries,
)

if TYPE_CHECKING:
    from vmconfine.domain import Disk, Hostdev
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.resources import Resource

log = logging.getLogger(__name__)

NAME = "namespaces"
LOCALTIME = "/etc/localtime"
#: view directories QEMU itself may fill (not compared after exec)
_WRITABLE = ("/tmp", "/dev/shm")


def _userns_works() -> tuple[bool, str]:
    """Can this (unprivileged) process create a user namespace? Tried in a throwaway child."""
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = 1
    if limit <= 0:
        return False, "user namespaces are disabled (user.max_user_namespaces = 0)"
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
        except OSError:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return False, ("this user may not create user namespaces (enable unprivileged user "
                       "namespaces: sysctl kernel.unprivileged_userns_clone=1 / "
                       "user.max_user_namespaces)")
    return True, ""


class NamespacesDriver:
    """libvirt's qemu_namespace.c as a driver, plus vmconfine's per-domain root view."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self._avail: tuple[bool, str] | None = None

    # ---- host -------------------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        if self._avail is None:
            if not os.path.exists("/proc/self/ns/mnt"):
                self._avail = (False, "this kernel has no mount namespaces")
            elif not self.host.privileged:
                self._avail = _userns_works()
            else:
                self._avail = (True, "")
        return self._avail

    def wanted(self) -> list[str]:
        return list(self.host.config.driver_settings("namespaces").namespaces or [])

    @hookimpl
    def probe(self, host: HostContext) -> tuple[bool, str]:
        if not self.wanted():
            return True, "not configured (namespaces = [] in qemu.conf)"
        ok, why = self.available()
        if ok:
            return True, ""
        if host.config.source("namespaces") != "default":
            # configured: stay in the stack so that starting a domain fails (preflight)
            # instead of running QEMU without the namespaces it was asked for
            return True, f"configured but unavailable, domains will not start: {why}"
        return False, why

    @hookimpl
    def enabled(self, host: HostContext) -> bool:
        if "mount" not in self.wanted():
            return False
        explicit = host.config.source("namespaces") != "default"
        ok, why = self.available()
        if not ok and not explicit:
            log.info("namespaces: not used (%s)", why)
            return False
        return True  # explicitly configured but unavailable: preflight refuses to start

    # ---- planning ---------------------------------------------------------------------------
    def view(self, ctx: DomainContext) -> View:
        """QEMU's planned view for ``ctx`` (changes nothing)."""
        wanted = self.wanted()
        root = "root" in wanted
        builder = Builder(View("root" if root else "mount", userns=not self.host.privileged))
        resources = ctx.resources
        try:
            if root:
                emulator = domain_emulator(ctx)
                try:
                    emu = emulator_files(emulator, emulator_probe.for_instance(ctx.instance))
                except ProbeError as exc:  # names the emulator already
                    raise DriverError(f"namespaces: {exc}") from None
                except OSError as exc:
                    raise DriverError(f"namespaces: cannot resolve the files of emulator "
                                      f"{one_line(emulator)}: {exc}") from None
                paths = [emulator, *emu.names, emu.executable, emu.interpreter,
                         *emu.libraries, emu.loader_cache, *emu.module_libraries]
                if os.path.exists(LOCALTIME):
                    paths.append(LOCALTIME)
                root_entries(
                    builder,
                    emulator_paths=[p for p in paths if p],
                    emulator_dirs=[*emu.data_dirs, *emu.module_dirs],
                    # a resource vmconfine opened for QEMU (Resource.passed) reaches it as an
                    # fd: its path needs no place in the view
                    wanted=[Wanted(r.path, r.role, r.writable, r.create, r.is_dir)
                            for r in resources if r.role != "devnode" and r.path
                            and not getattr(r, "passed", None)],
                    private_dirs=[str(ctx.runtime_dir),
                                  str(ctx.instance.domain_lib_dir(ctx.domain.name))],
                    exists=os.path.lexists,
                    executable=emulator,
                )
            nodes = [(p, "acl", False) for p in acl_list(ctx.config)]
            nodes += [(r.path, r.role, True) for r in resources if r.path.startswith("/dev/")]
            dev_entries(builder, nodes, root_view=root, host_has=os.path.isdir)
        except PlanError as exc:
            raise DriverError(f"namespaces: {exc}; fix the path in the domain XML or "
                              "qemu.conf") from exc
        order(builder.view)
        return builder.view

    def _state_view(self, ctx: DomainContext) -> View:
        state = ctx.driver_state(NAME)
        view = state.get("view") or state.get("explain_view")
        if view is None:
            view = state["explain_view"] = self.view(ctx)
        return view

    # ---- parent, before fork ----------------------------------------------------------------
    @hookimpl
    def preflight(self, ctx: DomainContext) -> None:
        ok, why = self.available()
        if not ok:
            names = self.wanted()
            listed = " and ".join(f'"{n}"' for n in names)
            noun = "namespace is" if len(names) == 1 else "namespaces are"
            raise DriverError(f"namespaces: the {listed} {noun} not available: {why} "
                              "(or remove it from 'namespaces' in qemu.conf)")
        view = self.view(ctx)
        if "root" not in self.wanted():
            # a private /dev only: the view depends on nothing the start makes before
            # set_all_labels (a root view names the sockets made meanwhile: planned again)
            ctx.driver_state(NAME)["preflight_view"] = view

    @hookimpl
    def set_all_labels(self, ctx: DomainContext) -> None:
        view = ctx.driver_state(NAME).pop("preflight_view", None) or self.view(ctx)
        # the view lives in QEMU's namespaces only: noted for the report, nothing to undo (so
        # no fsync of its own)
        ctx.journal.note(NAME, "view", mode=view.mode, userns=view.userns,
                           entries=len(view.entries), changes_host=False)
        state = ctx.driver_state(NAME)
        state.clear()
        state["view"] = view
        state["staging"] = str(ctx.runtime_dir)
        state["mount_options"] = ctx.mount_options
        state["cap_last"] = int(Path("/proc/sys/kernel/cap_last_cap").read_text())

    @hookimpl
    def restore_all_labels(self, ctx: DomainContext) -> None:
        """Nothing on the host was changed: the namespaces die with QEMU."""
        ctx.state.pop(NAME, None)

    # ---- the child ---------------------------------------------------------------------------
    @hookimpl
    def child_namespace(self, ctx: DomainContext) -> None:
        state = ctx.state.get(NAME)
        if not state or "view" not in state:
            raise DriverError("namespaces: no view was planned before fork (set_all_labels "
                              "did not run)")
        try:
            build.enter(state["view"], state["staging"], state.get("mount_options", ""))
        except OSError as exc:
            raise DriverError(f"namespaces: building QEMU's view failed: {exc}") from exc

    @hookimpl
    def child_capabilities(self, ctx: DomainContext) -> None:
        state = ctx.state.get(NAME) or {}
        view: View | None = state.get("view")
        if view is not None and view.userns:
            try:
                syscalls.drop_all_capabilities(state["cap_last"])
            except OSError as exc:
                raise DriverError(f"namespaces: dropping the capabilities held in the user "
                                  f"namespace failed: {exc}") from exc

    # ---- hotplug: the node follows into QEMU's /dev ---------------------------------------------
    def _plug(self, ctx: DomainContext, key: str, paths: list[str], *, add: bool) -> None:
        paths = [p for p in paths if p.startswith("/dev/")]
        if not paths or not ctx.pid:
            return
        view = self._state_view(ctx)
        plugged: dict[str, list[Entry]] = ctx.driver_state(NAME).setdefault("plugged", {})
        entries = plugged.pop(key, None)
        if entries is None:
            builder = Builder(View(view.mode, view.userns))
            try:
                for p in paths:
                    builder.walk(p, "hotplug", readonly=False, top="/dev")
            except PlanError as exc:
                raise DriverError(f"namespaces: {exc}") from exc
            order(builder.view)
            existing = {e.path for e in view.entries}
            entries = [e for e in builder.view.entries
                       if (e.path not in existing) == add or (not add and e.kind == "bind")]
        if not entries:
            return
        try:
            if add:
                ctx.journal.record(NAME, "hotplug", key=key, paths=[e.path for e in entries],
                                   changes_host=False)
                live.add(ctx.pid, view.userns, entries)
                view.entries.extend(entries)
                order(view)
                plugged[key] = entries
            else:
                live.remove(ctx.pid, view.userns, entries)
                view.entries = [e for e in view.entries if e not in entries]
        except OSError as exc:
            raise DriverError(f"namespaces: {'adding' if add else 'removing'} "
                              f"{', '.join(paths)} in QEMU's /dev failed: "
                              f"{exc.strerror or exc}") from exc

    @hookimpl
    def set_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._plug(ctx, f"disk:{disk.target}",
                   [r.path for r in core_resources.disk_resources(disk)], add=True)

    @hookimpl
    def restore_image_label(self, ctx: DomainContext, disk: Disk) -> None:
        self._plug(ctx, f"disk:{disk.target}",
                   [r.path for r in core_resources.disk_resources(disk)], add=False)

    @hookimpl
    def set_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        paths = [r.path for r in core_resources.hostdev_resources(hostdev)]
        self._plug(ctx, f"hostdev:{','.join(paths)}", paths, add=True)

    @hookimpl
    def restore_hostdev_label(self, ctx: DomainContext, hostdev: Hostdev) -> None:
        paths = [r.path for r in core_resources.hostdev_resources(hostdev)]
        self._plug(ctx, f"hostdev:{','.join(paths)}", paths, add=False)

    # ---- after exec --------------------------------------------------------------------------
    @hookimpl
    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        view = self._state_view(ctx)
        return check_process(view, pid)

    @hookimpl
    def describe(self, ctx: DomainContext) -> dict[str, Any]:
        view = self._state_view(ctx)
        out: dict[str, Any] = {"namespaces": self.wanted(), "mode": view.mode,
                               "userns": view.userns, "dev": sorted(view.dev_names()),
                               "notes": list(view.notes)}
        if view.mode == "root":
            out["binds"] = [{"path": e.path, "access": "ro" if e.readonly else "rw",
                             "role": e.role, **({"dir": True} if e.is_dir else {})}
                            for e in view.entries if e.kind == "bind"
                            and not e.path.startswith("/dev/")]
        if ctx.pid:
            try:
                out["mount_ns"] = os.readlink(f"/proc/{ctx.pid}/ns/mnt")
            except OSError as exc:
                out["mount_ns"] = f"unreadable: {exc.strerror}"
        out["summary"] = summary(view, out.get("mount_ns"))
        return out

    @hookimpl
    def explain_process(self, ctx: DomainContext, kernel: dict[str, Any] | None,
                        ) -> list[dict[str, Any]]:
        view = self._state_view(ctx)
        pid = ctx.pid if kernel is not None else None
        return report.process_rows(view, pid, expected_children(view))

    @hookimpl
    def host_checks(self, host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
        names = self.wanted()
        return report.host_checks(self.available() if names else (True, ""), names,
                                  privileged=host.privileged,
                                  explicit=host.config.source("namespaces") != "default")

    @hookimpl
    def explain(self, ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
        """Whether ``resource`` exists in QEMU's view, and how (bound read-only/read-write)."""
        view = self._state_view(ctx)
        path = os.path.normpath(resource.path) if resource.path.startswith("/") else ""
        if not path:
            return None
        if view.mode == "mount" and not path.startswith("/dev/"):
            return None  # the host's filesystem is QEMU's outside /dev
        entry = view.find(path)
        where = "QEMU's /dev" if path.startswith("/dev/") else "QEMU's root view"
        if entry is None:
            fix = ("add it to cgroup_device_acl or the domain XML" if path.startswith("/dev/")
                   else "add it to the domain XML so the view holds it")
            return {"summary": "absent", "allows": False,
                    "why": f"{path} does not exist in {where}; {fix}"}
        if entry.kind == "symlink":
            return {"summary": f"symlink -> {entry.source}"}
        if entry.kind != "bind":
            return {"summary": entry.kind}
        if resource.writable and entry.readonly:
            return {"summary": "bound ro", "allows": False,
                    "why": f"{path} is bound read-only in {where} but QEMU needs to write it"}
        access = "ro" if entry.readonly else "rw"
        return {"summary": f"bound {access}" + (f" (via {entry.path})" if entry.path != path
                                                else ""), "allows": True}


def summary(view: View, mount_ns: str | None = None) -> str:
    dev = sorted(view.dev_names())
    nodes = [n for n in dev if "/" not in n]
    ns = f" ({mount_ns})" if mount_ns else ""
    text = f"own mount namespace{ns}, private /dev: {', '.join(nodes)}"
    if view.mode == "root":
        binds = [e for e in view.entries if e.kind == "bind" and not e.path.startswith("/dev/")]
        text += (f"; per-domain root: {len(binds)} bound paths "
                 f"({sum(1 for e in binds if not e.readonly)} read-write), private /tmp")
    if view.userns:
        text += "; in a user namespace, no capabilities"
    return text


def expected_children(view: View) -> dict[str, set[str]]:
    """For every directory the view itself made (its tmpfs mounts and ``dir`` entries, not
    the ones QEMU may write), the names it must hold."""
    out: dict[str, set[str]] = {}
    for e in view.entries:
        if e.kind in ("dir", "tmpfs") and e.path not in _WRITABLE:
            out[e.path] = set()
    for e in view.entries:
        parent = os.path.dirname(e.path) if e.path != "/" else None
        if parent in out and e.path != parent:
            out[parent].add(os.path.basename(e.path))
    return out


def check_process(view: View, pid: int) -> list[str]:
    """Compare the kernel's view of ``pid`` with ``view`` (empty = as planned)."""
    problems: list[str] = []
    try:
        theirs = os.readlink(f"/proc/{pid}/ns/mnt")
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError as exc:
        return [f"cannot read the mount namespace of pid {pid}: {exc.strerror}"]
    if theirs == ours:
        return [f"QEMU (pid {pid}) runs in vmconfine's own mount namespace ({ours}), not in "
                "a private one"]
    if view.userns:
        try:
            if os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user"):
                problems.append(f"QEMU (pid {pid}) is not in a user namespace of its own")
        except OSError as exc:
            problems.append(f"cannot read the user namespace of pid {pid}: {exc.strerror}")
    base = f"/proc/{pid}/root"
    for directory, planned in sorted(expected_children(view).items()):
        names = {os.path.basename(own_pid_path(f"{directory}/{n}", pid)) for n in planned}
        if view.mode == "mount" and not directory.startswith("/dev"):
            continue
        try:
            found = set(os.listdir(base + directory))
        except OSError as exc:
            problems.append(f"cannot list {directory} of pid {pid}: {exc.strerror}")
            continue
        extra, missing = sorted(found - names), sorted(names - found)
        if extra:
            problems.append(f"{directory} in QEMU's view holds unexpected entries: "
                            f"{', '.join(extra)}")
        if missing:
            problems.append(f"{directory} in QEMU's view lacks: {', '.join(missing)}")
    return problems
