"""Landlock enforcement by the kernel, through the driver's own code path (no CLI needed).

The ruleset is derived by the driver in the parent; a forked child drops to an unprivileged
uid (65534, no capabilities), sets no_new_privs, applies it with ``apply_ruleset`` (exactly what
``child_confine`` does) and then tries real opens, binds, connects and signals — or execs QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import vmconfine_landlock
from examples.mkbootimg import write_image
from tests.host.conftest import VmDir
from tests.support import make_ctx, make_host, require
from vmconfine.launch import preopen
from vmconfine.launch.journal import Journal
from vmconfine.qemu.argv import CommandPaths, build_command
from vmconfine_landlock import syscalls
from vmconfine_landlock.driver import LandlockDriver
from vmconfine_landlock.ruleset import Ruleset, apply_ruleset

NOBODY = 65534
PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


def require_landlock(abi: int = 1) -> int:
    found, why = syscalls.probe_abi()
    require(found >= abi, f"needs Landlock ABI >= {abi}: {why or f'kernel has ABI {found}'}")
    return found


def drop_to(uid: int) -> None:
    """In a forked child: become ``uid`` with no groups and no capabilities, then NNP."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _try(check: tuple[Any, ...]) -> str:
    kind = check[0]
    try:
        if kind == "open":
            os.close(os.open(check[1], check[2] | os.O_CLOEXEC))
        elif kind == "create":
            os.close(os.open(check[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC))
        elif kind == "bind":
            with socket.socket() as s:
                s.bind(("127.0.0.1", check[1]))
        elif kind == "connect":
            with socket.socket() as s:
                s.connect(("127.0.0.1", check[1]))
        elif kind == "kill":
            os.kill(check[1], 0)
        elif kind == "abstract":
            with socket.socket(socket.AF_UNIX) as s:
                s.connect("\0" + check[1])
    except OSError as err:
        return os.strerror(err.errno or 0)
    return "ok"


def run_confined(rs: Ruleset, checks: list[tuple[Any, ...]], uid: int = NOBODY) -> dict[str, Any]:
    """Fork; in the child drop to ``uid``, apply ``rs``, run ``checks``; return the results."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        out: dict[str, Any] = {}
        try:
            os.close(r)
            drop_to(uid)
            out["report"] = apply_ruleset(rs)
            out["uid"] = os.getuid()
            out["results"] = [_try(c) for c in checks]
        except BaseException as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def domain_xml(d: Path, name: str, disk: Path, *, devices: str = "",
               extra: str = "") -> str:
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{disk}'/><target dev='hda' bus='ide'/></disk>
    <serial type='file'><source path='{d}/{name}.serial'/><target port='0'/></serial>
    <memballoon model='none'/>{devices}</devices>{extra}</domain>"""


class Scene:
    """A guest dir and an 'outside' dir, both owned by the unprivileged user."""

    def __init__(self, base: Path) -> None:
        self.guest = base / "guest"
        self.outside = base / "outside"
        for d in (self.guest, self.outside):
            d.mkdir()
            os.chown(d, NOBODY, NOBODY)
        self.disk = self.guest / "disk.img"
        write_image(str(self.disk), "hello from landlock", poweroff=True)
        self.secret = self.outside / "secret.txt"
        self.secret.write_text("not for the guest\n")
        for f in (self.disk, self.secret):
            os.chown(f, NOBODY, NOBODY)
            os.chmod(f, 0o600)
        self.root = base / "instance"

    def ctx(self, name: str, *, devices: str = "", extra: str = ""):  # type: ignore[no-untyped-def]
        host = make_host(self.root, [vmconfine_landlock],
                         config='security_driver = "landlock"\n')
        ctx = make_ctx(host, domain_xml(self.guest, name, self.disk, devices=devices,
                                        extra=extra))
        ctx.domain.add_seclabel("landlock", "dynamic", implicit=True)
        inst = ctx.instance
        for d in (inst.domain_run_dir(name), inst.domain_lib_dir(name)):  # as the pipeline does
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, NOBODY, NOBODY)
        return ctx, LandlockDriver(host)


@pytest.fixture
def scene(vm_dir: VmDir) -> Scene:
    require_landlock()
    return Scene(vm_dir.path)


def test_disk_allowed_same_users_outside_file_denied(scene: Scene) -> None:
    ctx, drv = scene.ctx("fs")
    rs, _ = drv.ruleset(ctx)
    assert rs is not None
    out = run_confined(rs, [
        ("open", str(scene.disk), os.O_RDWR),
        ("open", str(scene.secret), os.O_RDONLY),
        ("open", str(scene.secret), os.O_WRONLY),
        ("create", str(scene.outside / "new")),
        ("open", "/etc/passwd", os.O_RDONLY),
        ("open", "/usr/bin/qemu-system-x86_64", os.O_RDONLY),
        ("open", str(scene.outside), os.O_RDONLY | os.O_DIRECTORY),
        ("create", str(scene.guest / "extra-file")),
    ])
    assert out["uid"] == NOBODY
    assert out["report"]["applied"] and out["report"]["selftest"] == "denied"
    assert out["report"]["label"] == rs.label
    # the same uid owns both files: only Landlock tells them apart
    assert out["results"] == [
        "ok", "Permission denied", "Permission denied", "Permission denied",
        "Permission denied", "ok", "Permission denied",
        # the disk's directory is not writable as a whole
        "Permission denied",
    ]
    # the serial file is passed as an fd: vmconfine opens it, the ruleset needs no rule
    assert not (scene.guest / "fs.serial").exists()
    assert not (scene.outside / "new").exists()


def _free_port(lo: int = 29000, hi: int = 30000) -> int:
    """A free TCP port, probed away from where other tests' QEMUs take theirs (VNC/SPICE
    autoport counts up from 5900) and below the kernel's ephemeral range (32768-): a port
    taken between this probe and the confined bind would fail the test for the wrong reason."""
    for port in range(lo, hi):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise AssertionError("no free port")


def test_tcp_only_the_vnc_port_and_ipc_scoped(scene: Scene) -> None:
    abi = require_landlock(6)
    vnc = _free_port()
    other = _free_port(vnc + 1)
    ctx, drv = scene.ctx("net", devices=f"<graphics type='vnc' port='{vnc}' autoport='no' "
                                        "listen='127.0.0.1'/>")
    rs, _ = drv.ruleset(ctx)
    assert rs is not None and rs.abi == min(abi, syscalls.MAX_KNOWN_ABI)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0vmconfine-landlock-test-{os.getpid()}")
    abstract.listen(1)
    try:
        out = run_confined(rs, [
            ("bind", vnc),
            ("bind", other),
            ("connect", listener.getsockname()[1]),
            ("kill", os.getpid()),
            ("abstract", f"vmconfine-landlock-test-{os.getpid()}"),
        ], uid=os.getuid())  # same uid: DAC would allow the signal; only the scope denies it
    finally:
        listener.close()
        abstract.close()
    assert out["results"] == ["ok", "Permission denied", "Permission denied",
                              "Operation not permitted", "Operation not permitted"]


# ---- QEMU itself under the ruleset ----------------------------------------------------------


def _wait_for(path: Path, timeout: float = 30) -> None:
    """Until QEMU answers on its monitor: the socket exists before exec (vmconfine creates
    it), so wait for QMP's greeting, which only the exec'd QEMU sends."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        assert s.recv(4096).startswith(b'{"QMP"'), f"QEMU never answered on {path}"


def _qmp_cont(sock_path: Path, timeout: float = 30) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", "cont"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())):
                assert "error" not in reply, reply


def _fd_targets(pid: int, *, o_path: bool = False) -> list[str]:
    """What each open fd of ``pid`` points to (QEMU may close a transient fd meanwhile);
    ``o_path``: only the fds opened with ``O_PATH`` (the kind the driver opens rule paths
    with; QEMU's own transient fds, e.g. a module it is loading, are not)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if o_path:
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info
                                 if line.startswith("flags:"))
                if not flags & os.O_PATH:
                    continue
        except FileNotFoundError:
            continue
        out.append(target)
    return out


def exec_qemu_confined(scene: Scene, name: str, *, extra_args: tuple[str, ...] = (),
                       extra: str = "") -> tuple[int, str, list[str] | None]:
    """Start QEMU the way the pipeline does (driver ruleset, child as nobody, exec), check it
    with ``verify_process`` while paused, resume it over QMP and wait for it to exit.
    Returns (exit status, QEMU's stderr, verify_process differences or None)."""
    ctx, drv = scene.ctx(name, extra=extra)
    inst = ctx.instance
    paths = CommandPaths(monitor_socket=str(inst.monitor_path(name)),
                         home_dir=str(inst.domain_lib_dir(name)),
                         runtime_dir=str(inst.domain_run_dir(name)), user="nobody")
    cmd = build_command(ctx.domain, inst.config, paths)
    ctx.command = cmd
    drv.set_all_labels(ctx)
    rs = ctx.state["landlock"]["ruleset"]
    # the monitor socket and the serial file are pre-opened, as the pipeline does
    opened = preopen.open_passed(Journal(scene.guest / f"{name}.preopen"), cmd.passed)
    argv = [*cmd.argv(fds=opened.fds), *extra_args]
    err_path = scene.guest / f"{name}.stderr"
    pid = os.fork()
    if pid == 0:
        try:
            for passed in opened.fds.values():
                os.set_inheritable(passed, True)
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            drop_to(NOBODY)
            drv.child_confine(ctx)
            os.execve(argv[0], argv, cmd.env)
        finally:
            os._exit(127)
    opened.close()
    problems = None
    status_pipe = f"pipe:[{os.fstat(ctx.state['landlock']['status_fds'][0]).st_ino}]"
    try:
        if not extra_args:
            _wait_for(inst.monitor_path(name))
            fds = _fd_targets(pid)
            # nothing the driver opened reaches QEMU: no ruleset fd, no status pipe, no O_PATH
            # fd of a rule path QEMU did not open itself (emulator, libraries, directories)
            assert not [f for f in fds if "landlock" in f or f == status_pipe], fds
            # (an fd QEMU itself holds for a moment, e.g. the TCG module it is loading, is not
            # one of the driver's: those are O_PATH)
            leaked = _fd_targets(pid, o_path=True)
            assert not [f for f in leaked if f.startswith(("/usr/", "/etc/"))], leaked
            problems = drv.verify_process(ctx, pid)
            _qmp_cont(inst.monitor_path(name))
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    report = drv._read_report(ctx.state["landlock"])
    assert report is not None and report["label"] == rs.label
    drv.restore_all_labels(ctx)
    return os.waitstatus_to_exitcode(status), err_path.read_text(), problems


def as_older_kernel(monkeypatch: pytest.MonkeyPatch, abi: int) -> None:
    """Make the driver see Landlock ABI ``abi`` (what a kernel with that ABI would report);
    the real kernel accepts every older ruleset layout, so this really enforces it."""
    require_landlock(abi)
    monkeypatch.setattr(syscalls, "abi_version", lambda: abi)


@pytest.mark.parametrize("abi", range(1, syscalls.MAX_KNOWN_ABI + 1))
def test_each_abi_enforces_disk_vs_outside(scene: Scene, abi: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    as_older_kernel(monkeypatch, abi)
    ctx, drv = scene.ctx(f"abi{abi}")
    rs, _ = drv.ruleset(ctx)
    assert rs is not None and rs.abi == abi
    out = run_confined(rs, [("open", str(scene.disk), os.O_RDWR),
                            ("open", str(scene.secret), os.O_RDONLY)])
    assert out["report"]["abi"] == abi and out["report"]["selftest"] == "denied"
    assert out["results"] == ["ok", "Permission denied"]


@pytest.mark.parametrize("abi", range(1, syscalls.MAX_KNOWN_ABI + 1))
def test_qemu_boots_tcg_under_the_ruleset(scene: Scene, abi: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require(os.path.exists("/usr/bin/qemu-system-x86_64"), "qemu-system-x86_64 is missing")
    as_older_kernel(monkeypatch, abi)
    status, err, problems = exec_qemu_confined(scene, "boot")
    assert problems == []  # NoNewPrivs, executable, child report, self-test
    assert status == 0, err
    assert "hello from landlock" in (scene.guest / "boot.serial").read_text()
    assert "Permission denied" not in err


def test_qemu_opening_an_outside_file_is_denied(scene: Scene) -> None:
    require(os.path.exists("/usr/bin/qemu-system-x86_64"), "qemu-system-x86_64 is missing")
    status, err, _ = exec_qemu_confined(
        scene, "deny", extra_args=("-drive", f"file={scene.secret},if=none,format=raw"))
    assert status != 0
    assert str(scene.secret) in err and "Permission denied" in err, err
