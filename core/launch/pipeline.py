"""The launch pipeline: the one start and stop sequence every driver hooks into.

:func:`start` reads top to bottom as libvirt's ``qemuProcessStart``:

1. *init* — firmware auto-selection, validate the domain against the stack (seclabel
   models, each driver's ``verify``) and resolve backing chains; reserve the name, UUID and
   id under the instance lock and journal ``begin``;
2. *prepare domain* — reserve the display ports (:mod:`~.ports`), generate labels
   (``gen_label``), build the command line;
3. *prepare host* — the NVRAM made from its template, ``preflight``, runtime directories,
   the pre-opened resources
   (:mod:`~.preopen`: every listening socket — QMP monitors, chardevs in ``mode='bind'``, the
   VNC socket — created with ``set_socket_label`` around it, every chardev file and log
   opened; QEMU gets them as fds), ``set_all_labels`` (one transaction: a failure rolls back
   every driver that ran);
4. *launch* — fork; the child runs the child hooks and execs QEMU (:mod:`~.child`);
5. *connect monitor* — the QMP handshake, raced against QEMU exiting; the VNC socket is
   handed over it (``getfd`` + ``display-update``: QEMU 7.2's ``-vnc`` takes no fd);
6. *verify* — what the kernel reports for the pid against what every driver asked for, and
   no_new_privs (beyond libvirt: fail closed);
7. *finish start-up* — start the guest CPUs unless paused, writing the live status XML while
   QEMU answers `cont`.

A failure at any step undoes everything done so far (:func:`teardown`, driven by the journal)
before the error is raised; a failure after QEMU was spawned carries QEMU's last log lines and,
through the caller's ``diagnose`` callback, which layer denied a path QEMU could not open.

stop (any cause): kill QEMU if needed → restore all labels → release labels and display
ports → remove the sockets and network devices vmconfine made, runtime dir, status and
journal. Each host change
is journaled before it is made, so :meth:`vmconfine.launch.connection.Connection.recover` can
finish a teardown after a crash.
Waiting for a started domain is :mod:`vmconfine.launch.supervisor`'s job.

``VMCONFINE_PAUSE_AT=STEP`` stops the pipeline at STEP (it prints ``paused at STEP`` on stderr and
sleeps) so tests can SIGKILL vmconfine at every step. Steps: see :data:`STEPS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPError

from vmconfine.config.hugepages import hugepage_dir
from vmconfine.config.networks import resolve_interfaces
from vmconfine.domain.chain import resolve_chain
from vmconfine.domain.chardev import fill_channel_paths, record_pty
from vmconfine.errors import LaunchError, VmconfineError
from vmconfine.launch import checks, child, netdev, ports, preopen, runtime, swtpm
from vmconfine.launch.journal import Journal
from vmconfine.launch.preopen import PreOpened
from vmconfine.launch.process import QemuProcess, log_tail
from vmconfine.plugin.context import DomainContext
from vmconfine.qemu import firmware, probe, qmp
from vmconfine.qemu.argv import (
    CommandPaths,
    QemuCommand,
    build_command,
    default_machine,
    find_emulator,
    guest_arch,
)
from vmconfine.qemu.argv_display import (
    allocate_spice_ports,
    fill_spice_socket,
    spice_graphics,
    spice_password,
)
from vmconfine.qemu.machines import machines

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from vmconfine.domain import Domain
    from vmconfine.launch.connection import Connection
    from vmconfine.plugin.stack import Stack

log = logging.getLogger(__name__)

STEPS = ("begin", "labels", "preflight", "sockets", "set-labels", "forked", "qmp", "verified",
         "running")
#: a step only domains with a helper process reach (swtpm started, QEMU not yet forked)
HELPER_STEP = "helpers"
PAUSE_ENV = "VMCONFINE_PAUSE_AT"

#: ``diagnose(ctx, log_tail) -> "; why"``: explains a start failure from QEMU's log (which
#: layer denied a path); given by the caller, so the launch layer needs no report code
Diagnose = Callable[[DomainContext, str], str]


def checkpoint(step: str) -> None:
    """Pause here when VMCONFINE_PAUSE_AT names this step (for crash tests)."""
    if os.environ.get(PAUSE_ENV) == step:
        sys.stderr.write(f"vmconfine: paused at {step}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


@dataclass
class Launched:
    """A started domain, supervised by this process."""

    ctx: DomainContext
    command: QemuCommand | None  #: None for a domain reconnected to after a restart
    process: QemuProcess
    domain_id: int
    lock: runtime.DomainLock
    log_path: Path
    preopened: PreOpened = field(default_factory=PreOpened)
    client: QMPClient | None = None
    #: the pseudo-terminals QEMU allocated, by device alias (``serial0``: ``/dev/pts/3``)
    ptys: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.ctx.domain.name

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def starttime(self) -> int | None:
        return self.process.starttime


def command_paths(conn: Connection, domain: Domain, *, symbolic: bool) -> CommandPaths:
    inst = conn.instance
    return CommandPaths(
        monitor_socket=str(inst.monitor_path(domain.name)),
        home_dir=str(inst.domain_lib_dir(domain.name)),
        runtime_dir=str(inst.domain_run_dir(domain.name)),
        user=_qemu_user_name(conn),
        path_env="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        user_monitor_socket=str(inst.user_monitor_path(domain.name)),
        hugepage_dir=hugepage_dir(domain, inst.config),
    )


def _qemu_user_name(conn: Connection) -> str:
    import pwd

    if not conn.instance.privileged:
        try:
            return pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            return str(os.getuid())
    user = conn.instance.config.user
    if user.startswith("+"):
        with contextlib.suppress(KeyError, ValueError):
            return pwd.getpwuid(int(user[1:])).pw_name
        return user[1:]
    return user


def canonicalise_machine(conn: Connection, domain: Domain, *, strict: bool = True) -> None:
    """``<type machine>`` as libvirt records it: an alias (``pc``, ``q35``) or no machine
    becomes the emulator's versioned type (:mod:`vmconfine.qemu.machines`), in the model and
    the tree (so the live and the defined XML carry it). ``strict=False`` (an XML only
    printed, ``domxml-to-native``): an emulator that cannot be asked leaves the name as it is,
    with a warning."""
    try:
        emulator = find_emulator(domain, conn.instance.config)
        if not os.path.exists(emulator):  # libvirt's message for a missing binary (the
            checks.check_emulator(emulator)  # probe says what is wrong with one that exists)
        known = machines(emulator, probe.for_instance(conn.instance))
    except (VmconfineError, OSError) as exc:
        if strict:
            raise
        log.warning("machine type %s not canonicalised: %s", domain.os.machine or "(default)",
                    exc)
        return
    name = known.canonical(domain.os.machine or default_machine(domain))
    type_el = domain.root.find("os/type")
    if name is None or type_el is None or name == domain.os.machine:
        return
    domain.os.machine = name
    type_el.set("machine", name)


def prepare_domain(conn: Connection, domain: Domain, stack: Stack | None = None, *,
                   symbolic: bool = False) -> None:
    """Validation that changes nothing on the host: disk sources, seclabel models, driver
    checks (of ``stack``, default the instance's), backing chains, network definitions
    (``type='network'`` → its bridge); a virtio channel's unix socket without a path gets one
    generated (libvirt's ``qemuDomainPrepareChannel``), shown in the live XML. ``symbolic``
    (``domxml-to-native``): images need not exist, and SPICE ports are probed, not reserved
    (a start reserves its display ports after it is journaled: :mod:`~.ports`)."""
    if not domain.generated_paths:
        domain.generated_paths = fill_channel_paths(
            domain.chardevs, str(conn.instance.channel_dir(domain.name)))
        fill_spice_socket(domain, str(conn.instance.domain_lib_dir(domain.name)),
                          conn.instance.config.spice_auto_unix_socket)
    if symbolic:
        allocate_spice_ports(domain, conn.instance.config)
    resolve_interfaces(conn.instance, domain)
    canonicalise_machine(conn, domain, strict=not symbolic)
    select_firmware(conn, domain)  # after: the configured <os> it keeps has the canonical type
    stack = stack if stack is not None else conn.stack
    stack.check_models(domain)
    stack.verify(domain)
    for disk in domain.disks:
        if disk.source is not None and disk.type in ("file", "block"):
            resolve_chain(disk.source, missing_ok=symbolic)
    checks.check_sources(domain)


def define_domain(conn: Connection, domain: Domain) -> None:
    """What libvirt fills into a definition: the canonical machine type and, on Q35, the PCI
    addresses and root ports (:mod:`vmconfine.qemu.pci`, written into the tree). A domain whose
    command line cannot be built yet (an image or a hugetlbfs mount missing...) is defined
    without addresses, with a warning: each start assigns the same ones again."""
    canonicalise_machine(conn, domain)
    if not domain.generated_paths:  # dropped again from the inactive XML
        domain.generated_paths = fill_channel_paths(
            domain.chardevs, str(conn.instance.channel_dir(domain.name)))
    try:
        for disk in domain.disks:
            if disk.source is not None and disk.type in ("file", "block"):
                resolve_chain(disk.source, missing_ok=True)
        build_command(domain, conn.instance.config,
                      command_paths(conn, domain, symbolic=True), symbolic=True)
    except VmconfineError as exc:
        log.warning("domain %s defined without PCI addresses: %s", domain.name, exc)


def select_firmware(conn: Connection, domain: Domain) -> None:
    """Firmware auto-selection (:mod:`vmconfine.qemu.firmware`): the loader and NVRAM the
    descriptors give are filled into the domain (the live XML shows them)."""
    machine = domain.os.machine or default_machine(domain)
    if machine is None:
        return  # build_command refuses the domain with its own message
    firmware.check_secure_boot(domain, machine)
    os_ = domain.os
    nvram_exists = bool(os_.nvram) and os.path.exists(str(os_.nvram))
    inst = conn.instance
    nvram = firmware.nvram_file(inst.nvram_dir, domain.name)
    if firmware.needs_selection(domain, nvram_exists):
        emulator = find_emulator(domain, inst.config)
        resolved = machines(emulator, probe.for_instance(inst)).canonical(machine) or machine
        descriptors = firmware.load(firmware.search_dirs(inst.privileged))
        firmware.fill(domain, descriptors, resolved, guest_arch(domain), nvram)
    loader = domain.os.loader
    if loader is not None and loader.type == "pflash" and loader.readonly and \
            not domain.os.nvram:
        domain.fill_nvram(nvram)  # libvirt's default NVRAM of a read-only pflash loader


def prepare_nvram(domain: Domain, *, reset: bool = False) -> None:
    """The domain's NVRAM file from its template (never over an existing one unless
    ``reset``); an NVRAM that does not exist and has no template is refused."""
    os_ = domain.os
    if not os_.nvram or os_.loader is None or os_.loader.type != "pflash":
        return
    if os_.nvram_template:
        if firmware.create_nvram(os_.nvram, os_.nvram_template, reset=reset):
            log.info("domain %s: NVRAM %s created from %s", domain.name, os_.nvram,
                     os_.nvram_template)
    elif not os.path.exists(os_.nvram):
        raise firmware.FirmwareError(
            f"NVRAM {os_.nvram} does not exist and no template is known; give <nvram "
            "template='...'> or use <os firmware='efi'>")


def native_command(conn: Connection, domain: Domain) -> QemuCommand:
    """What ``domxml-to-native`` prints: the argv ``run`` would execute, per-start values
    shown symbolically."""
    prepare_domain(conn, domain, symbolic=True)
    return build_command(domain, conn.instance.config, command_paths(conn, domain, symbolic=True),
                         symbolic=True)




# ------------------------------------------------------------------------------------------------
# start
# ------------------------------------------------------------------------------------------------


async def start(conn: Connection, domain: Domain, *, paused: bool = False,
                diagnose: Diagnose | None = None, outlive: bool = False,
                reset_nvram: bool = False) -> Launched:
    """Start ``domain`` confined; return once QEMU's confinement is verified and its status
    written (and its CPUs run unless ``paused``). On any failure everything done so far is
    undone before raising. ``outlive``: QEMU keeps running if this process dies (the daemon,
    which reconnects to it); otherwise it is killed with this process (``run``).
    ``reset_nvram``: make the NVRAM again from its template (virsh start --reset-nvram)."""
    inst = conn.instance
    inst.ensure_dirs()
    stack = conn.stack
    # 1. init
    prepare_domain(conn, domain)
    lock, journal, domain_id = _begin(conn, domain, outlive=outlive)
    ctx = DomainContext(conn.host, domain, journal)
    if domain.qemu_args or domain.qemu_env:
        ctx.taint("custom-argv")
        log.warning("domain %s is tainted: custom-argv (custom configuration parameters "
                    "specified)", domain.name)
    labels_generated = False
    launched: Launched | None = None
    try:
        checkpoint("begin")
        # 2. prepare domain
        ports.reserve(inst, journal, domain)  # before the ruleset and argv that name them
        stack.gen_labels(ctx)
        labels_generated = True
        # the labels are made (a note: durable with the next record, which precedes the first
        # host change that uses them; a crash of vmconfine leaves it in the page cache)
        journal.note("pipeline", "labels", xml=domain.to_xml(live=True))
        checkpoint("labels")
        command = build_command(domain, inst.config, command_paths(conn, domain, symbolic=False))
        checks.check_emulator(command.emulator)
        swtpm.check(stack, ctx)
        ctx.command = command
        ctx.state["pipeline"] = {}
        ctx.mount_options = stack.mount_options(ctx)
        # 3. prepare host
        prepare_nvram(domain, reset=reset_nvram)
        stack.preflight(ctx)
        checkpoint("preflight")
        # the listening sockets are journaled with the directories (one fsync)
        _make_runtime_dirs(ctx, preopen.socket_records(command))
        spice = spice_graphics(domain)
        if spice is not None and spice.socket and not spice.socket_generated:
            preopen.clear_qemu_socket(journal, spice.socket)
        preopened = preopen.open_all(stack, ctx, command, journaled=True)
        checkpoint("sockets")
        try:
            # a driver's closing sync is paid by the next driver's record (or at the end)
            with journal.deferred_syncs():
                stack.set("set_all_labels", ctx)
            checkpoint("set-labels")
            # external devices before QEMU, as qemuExtDevicesStart: the TPM emulator
            await swtpm.start(stack, ctx, preopened.fds, outlive=outlive)
        except BaseException:
            preopened.close()
            raise
        checkpoint(HELPER_STEP)
        # 4. launch
        log_path = inst.log_path(domain.name)
        try:
            pid = child.spawn(stack, ctx, command, preopened.fds, log_path, outlive=outlive)
        except BaseException:
            preopened.close()
            raise
        # swtpm ends (--terminate) when QEMU, the only other holder, closes the channel
        preopened.discard(swtpm.TPM_CHARDEV)
        # the parent keeps its copies until teardown: a QEMU that dies during start-up then
        # leaves the monitor listening, so the handshake waits instead of being reset
        process = QemuProcess(pid, ctx.state["pipeline"]["starttime"])
        # QEMU has exec'd (a note: "forked", written before the exec, names the same process)
        journal.note("pipeline", "started", pid=pid, starttime=process.starttime)
        launched = Launched(ctx, command, process, domain_id, lock, log_path, preopened)
        process.watch(asyncio.get_running_loop())
        checkpoint("forked")
        # 5. connect monitor
        launched.client = await _connect_monitor(conn, launched)
        vnc = preopened.take("vnc")
        if vnc is not None:
            await _hand_over_vnc(launched.client, launched, vnc)
        if spice is not None and spice.socket:
            preopen.claim_socket(spice.socket)
        await _set_spice_password(launched.client, launched, inst.config)
        await _record_ptys(launched.client, launched)
        checkpoint("qmp")
        # 6. verify
        _verify(conn, launched)
        checkpoint("verified")
        # 7. finish start-up
        if paused:
            write_status(conn, launched)
        else:
            await _cont_writing_status(conn, launched)
        checkpoint("running")
        return launched
    except BaseException as exc:
        tail = ""
        if launched is not None and not isinstance(exc, (KeyboardInterrupt,
                                                         asyncio.CancelledError)) \
                and await _exited_during_start(launched, exc):
            exc = LaunchError(exited_message(launched))  # whichever step noticed it first
        if launched is not None and isinstance(exc, LaunchError) and \
                "not confined" not in exc.message:
            launched.process.kill()
            tail = log_tail(launched.log_path)
            if diagnose is not None:
                tail += diagnose(ctx, tail)
        errors = await _abort(stack, ctx, launched, labels_generated=labels_generated)
        lock.release()
        if errors:
            log.error("teardown after failed start left problems: %s", "; ".join(errors))
        if tail:
            assert isinstance(exc, LaunchError)
            raise LaunchError(f"{exc.message}; QEMU log: {tail}") from None
        if isinstance(exc, VmconfineError):
            raise exc from None
        if isinstance(exc, (QMPError, EOFError)):  # the library's own, QEMU still running
            raise LaunchError(f"domain '{domain.name}': QMP failed during start-up: "
                              f"{qmp.describe(exc)}") from None
        if isinstance(exc, OSError):
            raise LaunchError(f"starting domain '{domain.name}' failed: {exc}") from exc
        raise


def _begin(conn: Connection, domain: Domain, *,
           outlive: bool) -> tuple[runtime.DomainLock, Journal, int]:
    """Under the instance lock: refuse a second domain with this name or UUID, take the
    domain's lifetime lock, pick its id and journal ``begin`` (with the stack that will make
    the changes, so recovery undoes them with the same drivers)."""
    inst = conn.instance
    lock = runtime.DomainLock(inst, domain.name)
    journal = Journal(inst.journal_path(domain.name))
    with runtime.instance_lock(inst):
        checks.check_not_running(conn, domain)
        if not lock.try_acquire():
            raise LaunchError(f"domain '{domain.name}' is being started by another process")
        domain_id = runtime.next_domain_id(inst)
        inst.destroy_marker_path(domain.name).unlink(missing_ok=True)  # a stale one
        try:
            # written under the instance lock, so a concurrent start sees this UUID; a note:
            # no change is made until the next record, whose fsync covers it (the fsync that
            # commits the new file is started at once, in the background)
            journal.note("pipeline", "begin", xml=domain.to_xml(), supervisor=os.getpid(),
                         id=domain_id, uuid=domain.uuid, stack=conn.stack.names(),
                         outlive=outlive)
        except BaseException:
            lock.release()
            raise
    journal.sync_ahead()
    return lock, journal, domain_id


def _make_runtime_dirs(ctx: DomainContext,
                       also: list[tuple[str, str, dict[str, Any]]]) -> None:
    """The domain's run and lib directories (and its hugepage one), journaled together with
    ``also`` (records of changes that follow)."""
    inst = ctx.instance
    huge = hugepage_dir(ctx.domain, inst.config)
    if huge is not None:  # <mount>/vmconfine stays, as libvirt's <mount>/libvirt/qemu
        os.makedirs(os.path.dirname(huge), mode=0o755, exist_ok=True)
    dirs = (inst.domain_run_dir(ctx.domain.name), inst.domain_lib_dir(ctx.domain.name),
            *([Path(huge)] if huge else []))
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)
    ctx.journal.record_many([("pipeline", "mkdir", {"path": str(d)}) for d in dirs] + also)
    for d in dirs:
        d.mkdir(mode=0o750, parents=True)


async def _hand_over_vnc(client: QMPClient, launched: Launched, sock: socket.socket) -> None:
    """Give QEMU the VNC listening socket vmconfine created (``-vnc none`` at exec)."""
    try:
        await preopen.hand_over_vnc(client, sock)
    except Exception as exc:
        raise LaunchError(f"domain '{launched.name}': handing the VNC socket to QEMU failed: "
                          f"{exc}") from None
    finally:
        sock.close()


async def _set_spice_password(client: QMPClient, launched: Launched, config: Any) -> None:
    """The SPICE ticket, over the root-only monitor (never on QEMU's command line): until it
    is set, ticketing is on without a password and no client gets in (libvirt 9's
    qemuProcessInitPasswords)."""
    password = spice_password(launched.ctx.domain, config)
    if password is None:
        return
    try:
        await client.execute("set_password", {"protocol": "spice", "password": password,
                                               "connected": "keep"})
    except Exception as exc:
        raise LaunchError(f"domain '{launched.name}': setting the SPICE password failed: "
                          f"{exc}") from None


async def _record_ptys(client: QMPClient, launched: Launched) -> None:
    """The terminals QEMU allocated for ``pty`` chardevs (``query-chardev``), into the live
    XML (``<source path>``, a console's ``tty``) as libvirt does, and into
    :attr:`Launched.ptys` (``run`` prints them)."""
    command = launched.command
    ptys = {label: dev for label, dev in (command.chardevs if command else {}).items()
            if dev.type == "pty"}
    if not ptys:
        return
    domain = launched.ctx.domain
    found = {str(info.get("label")): str(info.get("filename", ""))
             for info in await client.execute("query-chardev")}
    for label, dev in ptys.items():  # in command-line order
        filename = found.get(label, "")
        if not filename.startswith("pty:"):
            continue
        path = host_pty_path(launched.pid, filename.removeprefix("pty:"))
        domain.generated_paths += record_pty(domain.chardevs, dev, path)
        launched.ptys[label.removeprefix("char")] = path


def host_pty_path(pid: int, path: str) -> str:
    """A terminal QEMU names (``/dev/pts/N``) as the host reaches it: through QEMU's own root
    (``/proc/PID/root/dev/pts/N``) when QEMU has a devpts instance of its own (the namespaces
    driver gives it one), else as it is. Never the host's ``/dev/pts/N``, which would be
    someone else's terminal."""
    try:
        private = os.stat(f"/proc/{pid}/root/dev/pts").st_dev != os.stat("/dev/pts").st_dev
    except OSError:  # cannot look: its own mount namespace means its own view of /dev
        try:
            private = os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        except OSError:
            private = True
    return f"/proc/{pid}/root{path}" if private else path


async def _connect_monitor(conn: Connection, launched: Launched) -> QMPClient:
    """QMP handshake, or a clear error as soon as QEMU exits instead of answering."""
    process = launched.process
    connect = asyncio.ensure_future(qmp.connect(
        conn.instance.monitor_path(launched.name), f"vmconfine-{launched.name}",
        qmp.start_timeout()))
    exited = asyncio.ensure_future(process.exited.wait())
    try:
        await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if connect.done():
        return connect.result()  # raises LaunchError when the handshake failed
    # QEMU is gone, but a connection may wait in the listening socket's backlog, which this
    # process still holds: closing it resets that connection, so the library ends its
    # handshake with its own error (cancelling it mid-handshake makes it log a traceback)
    launched.preopened.close()
    done, _ = await asyncio.wait({connect}, timeout=5)
    if not done:
        connect.cancel()
    with contextlib.suppress(BaseException):  # bounded: a library that ignores the cancel
        client = await asyncio.wait_for(connect, 5)
        await qmp.disconnect(client)
    raise LaunchError(exited_message(launched))


def exited_message(launched: Launched) -> str:
    """The one start failure a user should see when QEMU exits before it is up."""
    code = launched.process.exit_code
    how = (f"killed by signal {-code}" if code is not None and code < 0
           else f"exit status {code}")
    return f"domain '{launched.name}': QEMU exited during start-up ({how})"


#: what the QMP library and the connection under it raise when QEMU goes away
_CONNECTION_ERRORS = (QMPError, EOFError, ConnectionError, LaunchError)


async def _exited_during_start(launched: Launched, exc: BaseException) -> bool:
    """Did QEMU exit (the real cause of ``exc``)? A QMP error gives it a moment to be reaped."""
    if launched.process.exited.is_set():
        return True
    if not isinstance(exc, _CONNECTION_ERRORS):
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(launched.process.exited.wait(), 2)
    return launched.process.exited.is_set()


def confinement_problems(conn: Connection, launched: Launched) -> list[str]:
    """How the kernel's view of QEMU differs from what every driver asked (empty: none)."""
    return core_checks(launched.pid) + conn.stack.verify_process(launched.ctx, launched.pid)


def _verify(conn: Connection, launched: Launched) -> None:
    """Fail closed: QEMU must be confined exactly as every driver asked."""
    problems = confinement_problems(conn, launched)
    if problems:
        raise LaunchError(
            f"domain '{launched.name}': QEMU is not confined as asked, killed it: "
            + "; ".join(problems)
        )


async def _cont_writing_status(conn: Connection, launched: Launched) -> None:
    """``cont`` sent, the status written while QEMU answers it; both done when this returns
    (nothing reads the status before the start returns: ``list`` and a restarted daemon only
    see a domain whose start is unfinished, before and after ``cont`` alike). A status that
    cannot be written fails the start, which kills QEMU."""
    assert launched.client is not None
    cont = asyncio.ensure_future(launched.client.execute("cont"))
    for _ in range(3):  # the library's writer task sends the request
        await asyncio.sleep(0)
    try:
        write_status(conn, launched)
    except BaseException:
        cont.cancel()
        with contextlib.suppress(BaseException):
            await cont
        raise
    await cont


def write_status(conn: Connection, launched: Launched) -> None:
    """The live status XML: what ``list``, ``dominfo`` and ``dumpxml`` read."""
    state = {
        "id": str(launched.domain_id),
        "pid": str(launched.pid),
        "starttime": str(launched.starttime or ""),
        "supervisor": str(os.getpid()),
        "taints": ",".join(launched.ctx.taints),
        "generated": list(launched.ctx.domain.generated_paths),
        "configos": launched.ctx.domain.config_os,
        "smmfilled": "yes" if launched.ctx.domain.smm_filled else None,
    }
    xml = launched.ctx.domain.to_xml(live=True, extra={"id": launched.domain_id, "state": state})
    with runtime.instance_lock(conn.instance):
        runtime.write_atomic(conn.instance.status_path(launched.name), xml, durable=False)


# ------------------------------------------------------------------------------------------------
# verification and teardown
# ------------------------------------------------------------------------------------------------


def core_checks(pid: int) -> list[str]:
    """What the pipeline itself guarantees: no_new_privs is set on QEMU."""
    try:
        nnp = runtime.proc_status(pid).get("NoNewPrivs")
    except OSError as exc:
        return [f"cannot read /proc/{pid}/status: {exc}"]
    if nnp is None:
        return ["NoNewPrivs missing from /proc/PID/status"]
    return [] if nnp == "1" else ["NoNewPrivs is 0, expected 1"]


def teardown(stack: Stack, ctx: DomainContext, *, labels_generated: bool = True) -> list[str]:
    """Undo everything the journal lists; return the problems (the journal is kept if any)."""
    errors = swtpm.stop_helpers(stack, ctx)  # after QEMU, before the labels they share
    errors += stack.restore("restore_all_labels", ctx)
    if labels_generated:
        errors += stack.release_labels(ctx)
    errors += ports.release(ctx.instance, ctx.journal)
    errors += preopen.remove_sockets(ctx.journal.records("pipeline", "socket"),
                                     ctx.journal.records("pipeline", "socket-inode"))
    errors += netdev.remove_devices(ctx.journal)
    for rec in reversed(ctx.journal.records("pipeline", "mkdir")):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(rec["path"])
    ctx.instance.status_path(ctx.domain.name).unlink(missing_ok=True)
    ctx.instance.qmp_lock_path(ctx.domain.name).unlink(missing_ok=True)
    # before the journal goes: a crash up to here is finished by the next recovery
    ctx.instance.destroy_marker_path(ctx.domain.name).unlink(missing_ok=True)
    if not errors:
        ctx.journal.remove()
    else:
        ctx.journal.close()
    return errors


async def _abort(stack: Stack, ctx: DomainContext, launched: Launched | None, *,
                 labels_generated: bool) -> list[str]:
    """Undo a start that failed at any step: QEMU killed, monitor closed, host given back."""
    if launched is not None:
        if launched.client is not None:
            await qmp.disconnect(launched.client)
        launched.process.kill()
        launched.process.close()
        launched.preopened.close()
    elif ctx.pid is not None:  # forked, but died or failed before it was watched
        runtime.kill_process(ctx.pid, ctx.state.get("pipeline", {}).get("starttime"))
    errors = teardown(stack, ctx, labels_generated=labels_generated)
    ctx.instance.destroy_marker_path(ctx.domain.name).unlink(missing_ok=True)
    return errors


def finish(conn: Connection, launched: Launched) -> list[str]:
    """Tear down a domain whose QEMU has exited (or was killed): every host change given back,
    the lifetime lock released. Returns the problems (the journal is kept if any)."""
    launched.preopened.close()
    launched.process.close()
    errors = teardown(conn.stack, launched.ctx)
    conn.instance.destroy_marker_path(launched.name).unlink(missing_ok=True)
    launched.lock.release()
    return errors
