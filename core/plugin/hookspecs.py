"""The driver contract: every hook a vmconfine driver may implement, grouped by pipeline stage.

A *plugin module* (found through the ``vmconfine`` entry-point group, or registered by a test)
implements :func:`vmconfine_register_drivers` and adds one or more drivers to the registry. A
*driver* is an object whose methods are pluggy hook implementations of the per-driver hooks
below (decorate them with :data:`hookimpl` of this module). The stack calls each driver's
hooks explicitly, in configured order, through pluggy (so hook tracing and signature
validation apply); it never relies on pluggy's LIFO ordering.

Conventions for every per-driver hook:

* ``ctx`` is a :class:`vmconfine.plugin.context.DomainContext`: the domain model
  (``ctx.domain``), the instance and its config (``ctx.host``, ``ctx.config``), the journal
  (``ctx.journal``), the resources QEMU will open (``ctx.resources``, each with a
  :class:`~vmconfine.plugin.resources.Role`), the driver's own seclabel
  (``ctx.seclabel(model)``), the QEMU command once the argv is built (``ctx.command``, a
  :class:`~vmconfine.qemu.argv.QemuCommand`, from ``preflight`` on), and after fork the QEMU
  pid (``ctx.pid``).
* A driver reads its own qemu.conf keys, declared with ``registry.add(..., settings=[...])``,
  as ``ctx.config.driver_settings(NAME)`` (typed, with their ``FILE:LINE`` sources); core keys
  (``user``, ``security_require_confined``, ...) are attributes of ``ctx.config``.
* Failures raise :class:`vmconfine.errors.VmconfineError` subclasses (one clear line). Returning
  normally means success. Any other exception escaping a hook (an ``OSError``, a bug) becomes
  a :class:`~vmconfine.errors.DriverError` naming the driver and the hook. A driver that does
  not implement a hook is treated as succeeding, as libvirt's manager does for optional hooks.
* The contract is checked when a plugin module is loaded and when a driver object is built: a
  method marked ``@hookimpl`` whose name is no hook (``child_confined``), a method named like a
  hook without the marker, or a signature pluggy refuses is an error naming the plugin or
  driver, the method and the fix.
* *Set-type* hooks (``set_*``) run in stack order; when one raises, the stack runs the matching
  *restore-type* hook of the failing driver and every earlier one, in reverse order, then
  re-raises. Restore-type hooks run on every driver even when some fail; every failure is
  reported. Each restore runs once per context: the teardown after a failed set does not
  repeat the restores the rollback already ran (it reports their failures again).
* Anything a driver changes on the host must be recorded in ``ctx.journal`` BEFORE the change,
  so that a teardown after a crash of vmconfine (``restore_all_labels`` called from a fresh process
  with a context rebuilt from the journal) can undo exactly what was done.
* Hooks marked "child" run in the forked child between fork and exec: they must not touch
  in-memory parent state, must not start threads, and must raise on failure (the pipeline reports
  the message to the parent and exits the child).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vmconfine.domain import Chardev, Disk, Domain, Hostdev, SecLabel
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.registry import DriverRegistry
    from vmconfine.plugin.resources import Resource

PROJECT = "vmconfine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Stage 0: registration (plugin modules; broadcast to every plugin)
# --------------------------------------------------------------------------------------------


@hookspec
def vmconfine_register_drivers(registry: DriverRegistry) -> None:
    """Register this plugin's drivers.

    When: once, when the plugin manager is built (every command). Runs in the parent.
    Gets: the registry. Call ``registry.add(name, factory, description, kind=..., settings=...,
    labels=...)`` per driver: ``factory(host: HostContext) -> driver object``; ``kind`` is
    ``"security"`` (selectable in ``security_driver``; DAC is ``"security"`` too, appended by
    the stack rule) or ``"pipeline"`` (always considered, e.g. cgroups; its ``enabled`` hook
    decides per instance); ``settings`` are the driver's own qemu.conf keys
    (:class:`vmconfine.config.keys.Setting`: name, kind, default, doc, optional check), known
    before any stack is built; ``labels=False`` marks a security driver that confines without
    a label (no ``<seclabel>``, ``<secmodel>`` or ``dominfo`` line; ``gen_label``, ``verify``
    and ``process_label`` are not called for it).
    Returns: nothing.
    """


# --------------------------------------------------------------------------------------------
# Stage 1: host probe and identity (per driver)
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def probe(host: HostContext) -> tuple[bool, str]:
    """Can this driver work on this host?

    When: building the stack, and for ``vmconfine drivers`` / ``host-validate``. Parent.
    Returns: ``(True, "")`` when available, else ``(False, "why; which package or setting fixes
    it")``. Must be cheap and change nothing.
    """


@hookspec(firstresult=True)
def enabled(host: HostContext) -> bool:
    """Pipeline drivers only: take part for this instance and config?

    When: building the stack (after probe). Parent. Returns True to be appended to the stack.
    """


@hookspec(firstresult=True)
def model() -> str:
    """The security model name shown in capabilities, live XML and ``dominfo`` (e.g. "dac")."""


@hookspec(firstresult=True)
def doi() -> str:
    """The domain of interpretation shown in capabilities (libvirt's drivers all use "0")."""


@hookspec(firstresult=True)
def base_label(virt_type: str) -> str | None:
    """The ``<baselabel type=virt_type>`` for capabilities ("qemu" or "kvm"), or None."""


@hookspec(firstresult=True)
def qemu_identity(host: HostContext, ctx: DomainContext | None) -> dict[str, Any] | None:
    """Who QEMU runs as when this driver decides it (uid/gid switch drivers).

    When: the confinement report and ``host-validate`` (parent; changes nothing). ``ctx`` is
    the domain's context (its seclabel may pick the ids), or None for the instance's default.
    Returns ``{"uid": int, "gid": int, "groups": [int, ...], "capabilities": "cleared" |
    "kept"}`` (optionally ``"layer"``: how messages name the kernel's permission checks under
    these ids, default the driver's name), or None when this driver does not decide QEMU's ids
    (then QEMU runs as the caller, with the caller's capabilities). Raise when the configured
    account does not exist. The first driver in stack order that answers decides; the report
    files problems of the kernel's permission checks under its name.
    """


@hookspec
def host_checks(host: HostContext, wanted: bool, dirs: list[str]) -> list[dict[str, str]]:
    """This driver's lines of ``vmconfine host-validate``: can it work on this host?

    When: ``host-validate``, for every installed driver (in the stack or not). Parent; must
    change nothing (probe xattrs with reads). ``wanted`` is True when qemu.conf's
    ``security_driver`` names this driver (a missing feature is then a FAIL, else a WARN);
    ``dirs`` are the directories whose file systems should support what the driver stores
    there (the instance's run and lib directories, and any image directories given).
    Returns ``[{"status": "PASS" | "WARN" | "FAIL", "name": ..., "detail": ..., "fix": ...}]``
    (``fix`` may be empty). The generic checks (emulators, ``/dev/kvm``, instance
    directories, the stack) are the core's.
    """


# --------------------------------------------------------------------------------------------
# Stage 2: domain validation and label allocation (per driver, parent)
# --------------------------------------------------------------------------------------------


@hookspec
def verify(domain: Domain, seclabel: SecLabel | None) -> None:
    """Validate the domain's ``<seclabel>`` for this model (e.g. a static context is valid).

    When: before anything is generated or changed. Raise on an invalid label.
    """


@hookspec
def gen_label(ctx: DomainContext, seclabel: SecLabel) -> None:
    """Allocate this domain's label and store it in ``seclabel`` (label / imagelabel).

    When: at start, after validation, before the argv is built. ``seclabel`` is this model's
    seclabel (implicit dynamic ones are added by the stack per ``security_default_confined``).
    Type ``none`` labels are not passed here. Allocation must be unique across all vmconfine
    processes of the instance (a driver with a pool keeps it on disk, locked).
    """


@hookspec
def plan_label(ctx: DomainContext, seclabel: SecLabel) -> None:
    """Fill ``seclabel`` with the label :func:`gen_label` WOULD generate, changing nothing.

    When: ``vmconfine confinement FILE.xml`` (a dry run), in place of ``gen_label``, with the
    same stack policy (implicit dynamic labels, ``security_require_confined``). Parent.
    Validate as ``gen_label`` does and raise the same errors, but write, load, lock or reserve
    nothing on the host; the label is never released. A driver whose ``gen_label`` changes
    the host beyond a label pool of its own (e.g. writes and loads a policy) must implement
    this hook; without it the report calls ``gen_label`` and then ``release_label``.
    """


@hookspec
def reserve_label(ctx: DomainContext, seclabel: SecLabel, pid: int) -> None:
    """Mark a running domain's label as in use (reconnect / adoption). Raise if taken.

    When: the daemon reconnecting to a running domain (``Stack.reserve_labels``).
    """


@hookspec
def release_label(ctx: DomainContext, seclabel: SecLabel) -> None:
    """Give the domain's label back (teardown). Restore-type: must not fail on repeat."""


@hookspec
def forget_domain(host: HostContext, domain: Domain) -> None:
    """The domain's persistent definition is gone (``undefine``) and it does not run: give
    back what the driver keeps for a defined domain between its runs (the DAC driver's
    per-domain uid). Restore-type: must not fail on repeat. Parent (the daemon).
    """


# --------------------------------------------------------------------------------------------
# Stage 3: host resources (per driver, parent; set-type with rollback / restore-type)
# --------------------------------------------------------------------------------------------


@hookspec
def preflight(ctx: DomainContext) -> None:
    """Check, changing nothing, that the domain can start confined by this driver.

    When: after the argv is built, before ``set_all_labels``. Parent. Raise with the exact path
    and the fix (e.g. a parent directory the QEMU user cannot search: ``chmod o+x DIR``).
    """


@hookspec
def set_all_labels(ctx: DomainContext) -> None:
    """Label / allow every resource of the domain (``ctx.resources``) before QEMU starts.

    Set-type. When: after preflight and after the pre-opened resources exist (sockets bound,
    chardev files opened: :mod:`vmconfine.launch.preopen`), before fork. Journal each change
    before making it. A resource with ``passed`` set reaches QEMU only as a descriptor: grant
    nothing that QEMU would need to open its path (owner, directory access, Landlock rules),
    but do cover what the kernel checks on the use of a descriptor (an SELinux file label, an
    AppArmor file rule: inherited files are revalidated at exec).
    """


@hookspec
def restore_all_labels(ctx: DomainContext) -> None:
    """Undo ``set_all_labels`` using the journal (``ctx.journal.records(driver)``).

    Restore-type. When: teardown on every exit path, rollback, and crash recovery from a fresh
    process. Must be idempotent and must only undo what the journal says was done.
    """


@hookspec
def set_image_label(ctx: DomainContext, disk: Disk) -> None:
    """Label one disk and its whole backing chain (hotplug). Set-type.

    When: disk hotplug (``vmconfine.launch.hotplug``) and a new removable medium
    (``vmconfine.launch.media``), before QEMU gets the image. For a medium change the old
    medium is restored first, and ``ctx.domain`` already holds the new medium.
    """


@hookspec
def restore_image_label(ctx: DomainContext, disk: Disk) -> None:
    """Undo ``set_image_label`` for one disk (hot-unplug). Restore-type.

    When: disk hot-unplug, an ejected medium (``ctx.domain`` then has the drive empty), and
    a failed hotplug's rollback (``vmconfine.launch.hotplug``, ``vmconfine.launch.media``).
    """


@hookspec
def set_hostdev_label(ctx: DomainContext, hostdev: Hostdev) -> None:
    """Label / allow one host device's nodes (hotplug). Set-type.

    When: USB hostdev hotplug (``vmconfine.launch.hotplug_devices``), before vmconfine opens
    the node and passes it to QEMU; ``ctx.pid`` is the running QEMU (the node may have to
    appear in its private /dev).
    """


@hookspec
def restore_hostdev_label(ctx: DomainContext, hostdev: Hostdev) -> None:
    """Undo ``set_hostdev_label``. Restore-type.

    When: USB hostdev hot-unplug and a failed attach's rollback.
    """


@hookspec
def set_chardev_label(ctx: DomainContext, chardev: Chardev) -> None:
    """Label one character device source (file, pipe, unix socket, device). Set-type.

    When: hotplug of a chardev (start-up labels every chardev through ``set_all_labels``;
    the resources of one chardev are :func:`vmconfine.plugin.resources.chardev_resources`,
    with ``passed`` set for what vmconfine opens and hands over as a descriptor). A
    hotplugged unix socket exists already (vmconfine made it, under ``set_socket_label``)
    and reaches QEMU through ``getfd`` (``vmconfine.launch.hotplug_devices``).
    """


@hookspec
def restore_chardev_label(ctx: DomainContext, chardev: Chardev) -> None:
    """Undo ``set_chardev_label``. Restore-type.

    When: chardev hot-unplug and a failed attach's rollback.
    """


@hookspec
def set_socket_label(ctx: DomainContext) -> None:
    """Set the socket-create label for sockets vmconfine creates for the domain.

    Set-type. When: just before the parent creates the domain's listening sockets — the QMP
    monitors, every chardev in ``mode='bind'`` and the VNC socket, all of which QEMU gets as
    descriptors (:mod:`vmconfine.launch.preopen`) — and cleared right after. The socket
    files stay owned by vmconfine (mode 0600): no driver needs to chown them.
    """


@hookspec
def clear_socket_label(ctx: DomainContext) -> None:
    """Clear the socket-create label again. Restore-type."""


@hookspec
def mount_options(ctx: DomainContext) -> str | None:
    """Extra mount options for the filesystems made for QEMU alone (libvirt's
    ``virSecurityManagerGetMountOptions``): every driver's answer (comma-separated options,
    None for none) is joined into ``ctx.mount_options``, which a driver that mounts a fresh
    filesystem for QEMU (the namespaces driver's tmpfs: the private /dev, the root view's
    ``/``, ``/tmp``, ``/dev/shm``) adds to its own options. SELinux answers
    ``context="<imagelabel>"``, so those inodes carry the domain's image label instead of the
    policy's default tmpfs type. When: in the parent, after the labels are generated and
    before ``preflight``; changes nothing.
    """


# --------------------------------------------------------------------------------------------
# Stage 4: the forked child, in this order (per driver, CHILD, before exec)
# --------------------------------------------------------------------------------------------


@hookspec
def spawn_cgroup(ctx: DomainContext) -> int | None:
    """Parent, just before QEMU's (or a helper's) process is forked: an open descriptor
    (``O_DIRECTORY``) of the cgroup v2 group the process is to be *created* in, or None.

    The pipeline creates the process in it (``clone3`` with ``CLONE_INTO_CGROUP``,
    :mod:`vmconfine.launch.respawn`) instead of moving it there: a move takes the kernel's
    migration lock, whose first writer waits for an RCU grace period. Where the kernel or the
    process cannot (a parent with other threads), the child enters it before ``child_cgroup``
    runs. The pipeline closes the descriptor; ``child_cgroup`` must not join that group again.
    """


@hookspec
def child_cgroup(ctx: DomainContext) -> None:
    """Child: move the current process (the future QEMU) into the domain's cgroup(s) (those
    ``spawn_cgroup`` did not name).

    Runs first, while the child still has all privileges. The child has a single thread, so
    joining a cgroup v1 group through its ``tasks`` file moves the whole process, without the
    migration lock a write of ``cgroup.procs`` takes.
    """


@hookspec
def child_namespace(ctx: DomainContext) -> None:
    """Child: put the future QEMU into the namespaces it will run in (e.g. a mount namespace
    with a private /dev, or a per-domain root it pivots into).

    Runs after ``child_cgroup`` (the cgroup is joined from the host's view) and before
    ``child_exec_label``, while the child still has every privilege (mounts need
    CAP_SYS_ADMIN; an unprivileged instance may create a user namespace for them). Whatever
    runs after it sees the new view: later child hooks must not import modules or load
    libraries they did not load in the parent, and may find only the paths QEMU is given.
    Nothing created here may outlive the process (a mount namespace dies with its last
    member); anything created on the host's filesystem must be journaled by the parent.
    """


@hookspec
def child_exec_label(ctx: DomainContext) -> None:
    """Child: set the MAC label QEMU will run under (SELinux setexeccon, AppArmor change_profile).

    Runs after ``child_namespace`` and before the identity switch.
    """


@hookspec
def child_identity(ctx: DomainContext) -> None:
    """Child: switch supplementary groups, gid and uid (DAC). Runs after ``child_exec_label``."""


@hookspec
def child_capabilities(ctx: DomainContext) -> None:
    """Child: drop capabilities (effective, permitted, inheritable, bounding, ambient).

    Runs after ``child_identity``. The pipeline then sets no_new_privs itself.
    """


@hookspec
def child_confine(ctx: DomainContext) -> None:
    """Child: last-moment confinement after no_new_privs (Landlock ``restrict_self``).

    Runs immediately before exec; nothing else in the child opens files after it.
    """


# --------------------------------------------------------------------------------------------
# Helper processes (the TPM emulator): files, the forked child, after exec
# --------------------------------------------------------------------------------------------


@hookspec
def set_helper_label(ctx: DomainContext, helper: Helper) -> None:
    """Label / allow the files of a helper process (libvirt's ``SetTPMLabels``). Set-type.

    When: before the helper (``swtpm_setup``, ``swtpm``; :class:`vmconfine.plugin.helper.
    Helper`) is forked, after QEMU's ``set_all_labels``. ``helper.owned`` are directories
    whose whole tree belongs to the helper's account (its persistent state: give it to that
    account, and do not give it back); ``helper.paths`` what it opens by name. Journal each
    change before making it.
    """


@hookspec
def restore_helper_label(ctx: DomainContext, helper: Helper) -> None:
    """Undo ``set_helper_label`` (libvirt's ``RestoreTPMLabels``). Restore-type.

    When: teardown, after the helper was stopped, and crash recovery (the helper rebuilt from
    the journal).
    """


@hookspec
def child_helper(ctx: DomainContext, helper: Helper, step: str) -> None:
    """Child: confine a helper process between fork and exec (libvirt's
    ``SetChildProcessLabel``).

    Called once per driver for every ``step`` of QEMU's child sequence, in the same order
    (``child_cgroup``, ``child_namespace``, ``child_exec_label``, ``child_identity``,
    ``child_capabilities``, then no_new_privs, ``child_confine``): do at each step what the
    step of the same name does for QEMU, for ``helper`` (its account, its paths; the helper
    is created in the ``spawn_cgroup`` group as QEMU is). A
    label-bearing security driver without this hook makes a domain with a helper refuse to
    start (fail closed); other drivers without it apply nothing to helpers.
    """


@hookspec(firstresult=True)
def verify_helper(ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
    """Compare what the kernel reports for the helper's ``pid`` with what this driver asked
    for (as :func:`verify_process` does for QEMU). Returns the differences (empty: confined
    as asked); any makes the start fail closed.
    """


# --------------------------------------------------------------------------------------------
# Stage 5: after exec (per driver, parent)
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def process_label(ctx: DomainContext, pid: int) -> str | None:
    """The label the kernel reports for ``pid`` under this model (for ``dominfo``), or None."""


@hookspec(firstresult=True)
def verify_process(ctx: DomainContext, pid: int) -> list[str]:
    """Compare what the kernel reports for ``pid`` with what this driver asked for.

    When: after the QMP handshake, before the guest CPUs run. Returns a list of differences
    (empty = confined as asked). A non-empty list makes the pipeline kill QEMU, tear down and
    fail with the differences (fail closed).
    """


@hookspec(firstresult=True)
def describe(ctx: DomainContext) -> dict[str, Any]:
    """What this driver applies, for live XML, ``dominfo`` and the confinement report.

    Returns a JSON-serialisable dict (e.g. ``{"label": ..., "rules": [...]}``).
    """


@hookspec(firstresult=True)
def explain(ctx: DomainContext, resource: Resource) -> dict[str, Any] | None:
    """What this driver applies to one resource, for the confinement report and for the
    diagnosis of a path QEMU could not open. Changes nothing; parent.

    When: ``vmconfine confinement`` (before start, with labels generated on a throwaway
    context, or for a running domain with its journal), and when QEMU exits at start with
    EACCES/EPERM on a path (then ``resource`` may be a path the domain model does not list,
    role ``"other"``). Returns a JSON-serialisable dict, or None when the driver has nothing
    to say about this resource. Keys the report understands (all optional):
    ``summary`` (one short cell of text), ``cell`` (the terminal table's text when it differs
    from ``summary``), ``before`` / ``during`` (a label or owner before start and while QEMU
    runs), ``allows`` (False = this driver would deny the access the resource needs; None
    with ``why`` = a warning), ``why`` (one line: what denies it; ``"...; fix: ..."`` gives
    the fix), ``owner`` (``[uid, gid]`` the driver gives the file before QEMU starts: the
    kernel's permission checks are judged with it), ``difference`` (running domain only: one
    line when what the file has now differs from what the driver applied at start).
    """


@hookspec(firstresult=True)
def explain_process(ctx: DomainContext, kernel: dict[str, Any] | None) -> list[dict[str, Any]]:
    """This driver's rows of the report's process table. Changes nothing; parent.

    When: ``vmconfine confinement``. ``kernel`` is the core's view of the running QEMU (keys
    ``uid``, ``gid``, ``groups``, ``caps``, ``no_new_privs``, ``seccomp``, ``attr_current``,
    ``cgroup`` (controller or ``"unified"`` -> path, from ``/proc/PID/cgroup``), ``exe``), or
    None before start.
    Returns rows ``{"item", "intended", "kernel", "differs"}`` (``kernel`` None before
    start); ``[]`` for none. A security driver without this hook gets one row,
    ``"<model> label"``: its seclabel's label against its ``process_label`` (else the
    kernel's ``attr/current``). A driver's ``describe`` may add ``legend`` (one line printed
    under the resource table, e.g. what the letters of its cells mean).
    """


#: Every hook name of the contract (a driver method with one of these names must be marked
#: ``@hookimpl``; a marked method must have one of these names).
HOOK_NAMES: frozenset[str] = frozenset(
    name for name, fn in list(globals().items())
    if callable(fn) and hasattr(fn, f"{PROJECT}_spec")
)
