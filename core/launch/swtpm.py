"""The TPM emulator: ``swtpm`` beside QEMU for ``<tpm><backend type='emulator'>`` (libvirt's
``qemu_tpm.c``), confined by the same stack.

* State: ``<lib_dir>/swtpm/<uuid>/tpm2/`` (``tpm1.2`` for a TPM 1.2), kept across starts and
  removed by ``undefine`` unless ``--keep-tpm``. ``<lib_dir>/swtpm`` and ``<uuid>/`` are
  vmconfine's (root, 0711); the version directory belongs to the helper's account (qemu.conf
  ``swtpm_user``/``swtpm_group``: the stack's ``set_helper_label`` gives it to that account).
* First start (no state file yet): ``swtpm_setup --tpm2 --tpm-state DIR --vmid NAME:UUID
  --createek --create-ek-cert --create-platform-cert --lock-nvram --not-overwrite``, as
  libvirt runs it.
* Every start: ``swtpm socket --tpm2 --tpmstate dir=DIR,mode=0600 --ctrl
  type=unixio,clientfd=N --terminate``. Unlike libvirt, whose swtpm listens on a
  socket file that QEMU connects to, vmconfine makes a connected socket pair: swtpm gets one
  end, QEMU the other (``-chardev socket,id=chrtpm,fd=M``), so no socket file exists that
  another domain's QEMU could reach. ``--terminate`` ends swtpm when QEMU closes the channel.
  swtpm is not daemonized: vmconfine forks it, so it knows its pid without a pid file. Its
  log is ``<log_dir>/NAME-swtpm.log``, opened by vmconfine: swtpm (without ``--log``) and
  swtpm_setup (without ``--logfile``) write to their stdout/stderr, which is that file.
* Both helpers are forked through :func:`vmconfine.launch.child.spawn_helper`: every driver's
  ``child_helper`` in QEMU's child order, no_new_privs, then exec; after exec each driver's
  ``verify_helper`` and the core's no_new_privs check (fail closed).
* Every step is journaled first (``pipeline``/``helper``, ``helper-forked``), so
  :func:`stop_helpers` (teardown, also crash recovery in a fresh process) kills what is left and
  restores the helper labels. ``run``'s swtpm also gets a parent-death signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.errors import LaunchError, VmconfineError
from vmconfine.launch import child, runtime
from vmconfine.plugin.helper import Helper, HelperPath
from vmconfine.qemu.argv_devices import TPM_CHARDEV, check_tpm, tpm_version

__all__ = ["TPM_CHARDEV", "check", "helpers", "remove_state", "start", "stop_helpers"]
from vmconfine.qemu.emulator import elf_interpreter
from vmconfine.sanitize import one_line

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain
    from vmconfine.plugin.context import DomainContext
    from vmconfine.plugin.stack import Stack

SETUP_TIMEOUT = 60.0
#: the programs a TPM emulator needs (Debian's swtpm and swtpm-tools)
PROGRAMS = ("swtpm", "swtpm_setup")
#: the state file swtpm writes (its presence means swtpm_setup already ran)
STATE_FILES = {"2.0": "tpm2-00.permall", "1.2": "tpm-00.permall"}
#: where Debian's swtpm-tools keeps the local CA that signs the EK certificates
LOCALCA_DIR = "/var/lib/swtpm-localca"
#: system trees the helpers read (libraries, configuration); nothing under them is writable
SYSTEM_TREES = ("/usr/lib", "/usr/share", "/etc")


def storage_root(instance: Instance, domain: Domain) -> Path:
    """``<lib_dir>/swtpm/<uuid>``: everything TPM of this domain (what undefine removes)."""
    return instance.lib_dir / "swtpm" / domain.uuid


def state_dir(instance: Instance, domain: Domain, version: str) -> Path:
    return storage_root(instance, domain) / ("tpm2" if version == "2.0" else "tpm1.2")


def log_path(instance: Instance, domain: Domain) -> Path:
    return instance.log_dir / f"{domain.name}-swtpm.log"


def find_binary(name: str, domain: Domain) -> str:
    """``name`` in PATH (libvirt's ``virTPMEmulatorInit`` looks there too), or one line."""
    found = shutil.which(name)
    if found is None:
        raise LaunchError(
            f"domain '{domain.name}': the TPM emulator needs {name}, which is not installed "
            f"(not found in PATH={one_line(os.environ.get('PATH', ''))}); install Debian's "
            "swtpm and swtpm-tools packages")
    return os.path.realpath(found)


def _program_paths(executable: str) -> list[HelperPath]:
    out = [HelperPath(executable, "rx")]
    interp = elf_interpreter(executable)
    if interp:
        out.append(HelperPath(os.path.realpath(interp), "rx"))
    return out


def helpers(ctx: DomainContext) -> tuple[Helper, Helper] | None:
    """(swtpm_setup, swtpm) for the domain's emulated TPM, or None when it has none."""
    tpm = check_tpm(ctx.domain)
    if tpm is None:
        return None
    inst, cfg = ctx.instance, ctx.config
    version = tpm_version(tpm)
    state = str(state_dir(inst, ctx.domain, version))
    swtpm = find_binary("swtpm", ctx.domain)
    setup = find_binary("swtpm_setup", ctx.domain)
    system = [HelperPath(t, "r", tree=True) for t in SYSTEM_TREES]
    own = (HelperPath(state, "rw", tree=True),)
    run = Helper("swtpm", swtpm, cfg.swtpm_user, cfg.swtpm_group,
                 paths=(*_program_paths(swtpm), *system, *own), owned=(state,))
    # swtpm_setup runs swtpm and the local CA's tools (/usr/bin), which write their CA: the
    # system's (Debian's swtpm-tools, the tss account's), or a user's in its configuration
    # directory (unprivileged instances, as libvirt's session daemon)
    ca = LOCALCA_DIR if inst.privileged else _config_home()
    setup_paths = (*_program_paths(setup), HelperPath("/usr/bin", "rx", tree=True), *system,
                   HelperPath("/dev/null", "rw"), HelperPath(ca, "rw", tree=True),
                   HelperPath("/tmp", "rw", tree=True), *own)
    return (Helper("swtpm_setup", setup, cfg.swtpm_user, cfg.swtpm_group,
                   paths=setup_paths, owned=(state,)), run)


def _config_home() -> str:
    return os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.environ.get("HOME") or os.path.expanduser("~"), ".config")


def _user_env(ctx: DomainContext) -> dict[str, str]:
    """An unprivileged instance's swtpm_setup finds the user's CA configuration (HOME)."""
    if ctx.instance.privileged:
        return {}
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return {"HOME": home, "XDG_CONFIG_HOME": _config_home()}


def check(stack: Stack, ctx: DomainContext) -> None:
    """Before anything changes: swtpm is installed and every driver can confine it."""
    pair = helpers(ctx)
    if pair is not None:
        for helper in pair:
            stack.check_helper(helper)


def _make_dirs(ctx: DomainContext, state: Path) -> None:
    """``<lib>/swtpm/<uuid>/`` (root, 0711) and the state directory (0700)."""
    for d in (state.parent.parent, state.parent):
        if not d.is_dir():
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
    if not state.is_dir():
        state.mkdir(mode=0o700)


def _open_log(ctx: DomainContext) -> int:
    path = log_path(ctx.instance, ctx.domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    os.write(fd, f"{time.strftime('%Y-%m-%d %H:%M:%S')}: starting up\n".encode())
    return fd


def _log_tail(ctx: DomainContext) -> str:
    try:
        lines = log_path(ctx.instance, ctx.domain).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(one_line(ln) for ln in lines[-6:] if ln.strip())


def _spawn(stack: Stack, ctx: DomainContext, helper: Helper, argv: list[str],
           fds: list[int], *, outlive: bool) -> tuple[int, int | None]:
    def forked(pid: int) -> None:
        ctx.journal.record("pipeline", "helper-forked", name=helper.name, pid=pid,
                           starttime=runtime.proc_starttime(pid))

    pid = child.spawn_helper(stack, ctx, helper, argv, fds, _open_log(ctx), forked,
                             env=_user_env(ctx), outlive=outlive)
    return pid, runtime.proc_starttime(pid)


async def _wait(pid: int, timeout: float) -> int | None:
    """The exit code of our child ``pid``, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.02)
    return None


async def _setup(stack: Stack, ctx: DomainContext, setup: Helper, argv: list[str]) -> None:
    """Run swtpm_setup confined and wait for it (bounded)."""
    pid, _ = _spawn(stack, ctx, setup, argv, [], outlive=False)
    code = await _wait(pid, SETUP_TIMEOUT)
    if code is None:
        runtime.kill_process(pid, None)
    if code != 0:
        raise LaunchError(
            f"domain '{ctx.domain.name}': swtpm_setup failed "
            f"({'timed out' if code is None else f'exit status {code}'}); its log "
            f"{log_path(ctx.instance, ctx.domain)}: {_log_tail(ctx)}")


def _verify(stack: Stack, ctx: DomainContext, helper: Helper, pid: int) -> None:
    try:
        nnp = runtime.proc_status(pid).get("NoNewPrivs")
        problems = [] if nnp == "1" else [f"NoNewPrivs is {nnp}, expected 1"]
    except OSError as exc:
        problems = [f"cannot read /proc/{pid}/status: {exc.strerror}"]
    problems += stack.verify_helper(ctx, helper, pid)
    if problems:
        raise LaunchError(f"domain '{ctx.domain.name}': {helper.name} is not confined as "
                          f"asked, killed it: " + "; ".join(problems))


def _control_channel(stack: Stack, ctx: DomainContext) -> tuple[socket.socket, socket.socket]:
    """The socket pair between QEMU and swtpm, made under the domain's socket label (SELinux:
    both ends get the domain's context, the one QEMU and swtpm run with)."""
    stack.set("set_socket_label", ctx)
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        stack.restore("clear_socket_label", ctx)


async def start(stack: Stack, ctx: DomainContext, fds: dict[str, int], *,
                outlive: bool) -> None:
    """Set up the TPM state on its first start, start swtpm confined and put QEMU's end of
    the control channel into ``fds`` (by the command line's name). No-op without a TPM."""
    pair = helpers(ctx)
    if pair is None:
        return
    setup, run = pair
    state = Path(run.owned[0])
    version = "2.0" if state.name == "tpm2" else "1.2"
    _make_dirs(ctx, state)
    for helper in pair:
        ctx.journal.record("pipeline", "helper", helper=helper.to_json())
    stack.set("set_helper_label", ctx, helper=setup)
    if not (state / STATE_FILES[version]).exists():
        if not ctx.instance.privileged:  # the user's local CA (libvirt does the same)
            os.makedirs(_config_home(), mode=0o700, exist_ok=True)
            await _setup(stack, ctx, setup, [setup.executable, "--create-config-files",
                                             "skip-if-exist"])
        tpm2 = ["--tpm2"] if version == "2.0" else []
        await _setup(stack, ctx, setup, [
            setup.executable, *tpm2, "--tpm-state", str(state),
            "--vmid", f"{ctx.domain.name}:{ctx.domain.uuid}", "--createek", "--create-ek-cert",
            "--create-platform-cert", "--lock-nvram", "--not-overwrite"])
    # swtpm's labels after swtpm_setup, so the files it made get them too (SELinux: the
    # domain's image label)
    stack.set("set_helper_label", ctx, helper=run)
    ours, theirs = _control_channel(stack, ctx)
    try:
        argv = [run.executable, "socket", *(["--tpm2"] if version == "2.0" else []),
                "--tpmstate", f"dir={state},mode=0600",
                "--ctrl", f"type=unixio,clientfd={theirs.fileno()}", "--terminate"]
        pid, _ = _spawn(stack, ctx, run, argv, [theirs.fileno()], outlive=outlive)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    fds[TPM_CHARDEV] = ours.detach()
    _verify(stack, ctx, run, pid)


def stop_helpers(stack: Stack, ctx: DomainContext) -> list[str]:
    """Kill every helper the journal lists that still runs (QEMU is already gone), then
    restore their labels. Returns the problems."""
    errors: list[str] = []
    for rec in reversed(ctx.journal.records("pipeline", "helper-forked")):
        pid = int(rec["pid"])
        try:
            runtime.kill_process(pid, rec.get("starttime"))
        except VmconfineError as exc:
            errors.append(exc.message)
        except Exception as exc:  # reported, teardown goes on
            errors.append(f"stopping {rec.get('name')} (pid {pid}): {exc}")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our child, exited by itself (a zombie)
    for rec in reversed(ctx.journal.records("pipeline", "helper")):
        errors += stack.restore("restore_helper_label", ctx,
                                helper=Helper.from_json(rec["helper"]))
    return errors


def remove_state(instance: Instance, domain: Domain) -> bool:
    """``undefine``: remove the domain's TPM state (libvirt's ``qemuExtTPMCleanupHost``).
    Returns True when there was some."""
    root = storage_root(instance, domain)
    if not root.exists():
        return False
    try:
        shutil.rmtree(root)
    except OSError as exc:
        raise LaunchError(f"domain '{domain.name}': removing its TPM state {root} failed: "
                          f"{exc.strerror or exc}") from None
    return True
