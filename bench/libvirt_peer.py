"""libvirt 9.0 as the benchmarks' peer: a private libvirtd + virtlogd, driven with virsh.

:class:`LibvirtPeer` starts both daemons in a private mount namespace (their config, runtime,
state, log and cache directories are scratch directories bind-mounted over the real ones, so
the host's libvirt state is never touched) under a subreaper that reaps QEMU at once — this
machine's PID 1 reaps orphans only every ~1.7 s, which would otherwise be measured as part of
``virsh destroy``. Its qemu.conf only sets ``user``/``group`` to vmconfine's QEMU account, so
libvirt applies its defaults: DAC (chown + remembered owners) and cgroups, like vmconfine's
``none, dac, cgroups`` stack. Everything is stopped by PID and removed on exit, including
the empty ``machine`` cgroups libvirt leaves behind.

Set ``VMCONFINE_BENCH_LIBVIRT_CACHE`` to a directory to share libvirt's QEMU capabilities cache
between benchmarks (``bench.run`` does; the first probe takes several seconds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import SCRATCH_BASE

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
VIRSH = "/usr/bin/virsh"
SYSTEM_PYTHON = "/usr/bin/python3"
NS_SCRIPT = Path(__file__).with_name("_libvirt_ns.py")
MOUNTPOINTS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
               "/var/cache/libvirt")
CACHE_ENV = "VMCONFINE_BENCH_LIBVIRT_CACHE"
CGROUP_ROOT = Path("/sys/fs/cgroup")
QEMU_USER = "vmconfine-qemu"


#: an abstract unix socket name: one benchmark libvirtd at a time on this host (released when
#: the process exits, leaves no file)
LOCK_NAME = b"\0vmconfine-bench-libvirt-peer"
LOCK_WAIT = 120.0


class PeerUnavailable(Exception):
    """libvirt cannot be run here (the message says why)."""


def _take_lock() -> socket.socket:
    """Wait (up to LOCK_WAIT) until no other benchmark runs its libvirtd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            sock.bind(LOCK_NAME)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                sock.close()
                raise PeerUnavailable("another benchmark's libvirtd kept running for "
                                      f"{LOCK_WAIT:.0f} s") from None
            time.sleep(0.2)


def why_unavailable() -> str | None:
    """None when the peer can run on this host, else the reason."""
    if os.geteuid() != 0:
        return "needs root"
    for path in (LIBVIRTD, VIRTLOGD, VIRSH, SYSTEM_PYTHON, "/usr/bin/unshare"):
        if not os.access(path, os.X_OK):
            return (f"{path} is missing (apt-get install libvirt-daemon "
                    "libvirt-daemon-driver-qemu libvirt-clients)")
    if _running("libvirtd") or _running("virtqemud"):
        return "another libvirtd is running on this host; stop it first"
    return None


def _running(comm: str) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    return True
            except OSError:
                continue
    return False


def _machine_cgroups() -> set[Path]:
    return {p for p in CGROUP_ROOT.glob("*/machine") if p.is_dir()} | (
        {CGROUP_ROOT / "machine"} if (CGROUP_ROOT / "machine").is_dir() else set())


class LibvirtPeer:
    """A private libvirtd; use as a context manager."""

    def __init__(self) -> None:
        self.state: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.made_mountpoints: list[str] = []
        self.cgroups_before: set[Path] = set()
        self.defined: list[str] = []
        self.uri = ""
        self._own_cache: Path | None = None
        self._lock: socket.socket | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> LibvirtPeer:
        self._lock = _take_lock()
        reason = why_unavailable()
        if reason:
            self._lock.close()
            raise PeerUnavailable(reason)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        SCRATCH_BASE.mkdir(parents=True, exist_ok=True)
        self.state = Path(tempfile.mkdtemp(prefix="libvirt-", dir=SCRATCH_BASE))
        os.chmod(self.state, 0o755)
        for sub in ("etc", "run", "lib", "log"):
            (self.state / sub).mkdir(mode=0o755)
        (self.state / "etc" / "qemu.conf").write_text(
            f'user = "{QEMU_USER}"\ngroup = "{QEMU_USER}"\n')
        cache = os.environ.get(CACHE_ENV)
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
        else:
            self._own_cache = self.state / "cache"
            self._own_cache.mkdir()
            cache = str(self._own_cache)
        for mp in MOUNTPOINTS:
            if not os.path.exists(mp):
                os.makedirs(mp, mode=0o755)
                self.made_mountpoints.append(mp)
        self.cgroups_before = _machine_cgroups()
        self.proc = subprocess.Popen(
            ["/usr/bin/unshare", "-m", "--propagation", "private", SYSTEM_PYTHON, "-I",
             str(NS_SCRIPT), str(self.state), cache, QEMU_USER],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.state / "ns.log", "wb"),
            start_new_session=True)
        sock = self.state / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={sock}"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise PeerUnavailable(f"libvirtd did not start: {self._log_tail()}")
            time.sleep(0.02)
        # the first connection to the QEMU driver probes QEMU's capabilities (seconds when
        # the cache is cold): do it now, untimed
        out = self.virsh("capabilities", timeout=120)
        if out.returncode != 0:
            raise PeerUnavailable(f"virsh capabilities failed: {out.stderr.strip()}")

    def _log_tail(self) -> str:
        assert self.state is not None
        text = ""
        for name in ("ns.log", "daemons.log"):
            with contextlib.suppress(OSError):
                text += (self.state / name).read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-4:]) or "no output"

    def stop(self) -> None:
        """Destroy and undefine what we defined, stop the daemons by PID, remove the state."""
        if self.proc is not None and self.proc.poll() is None:
            for name in list(self.defined):
                self.virsh("destroy", name, timeout=30)
                self.virsh("undefine", name, timeout=30)
            self.defined.clear()
            self.proc.send_signal(signal.SIGTERM)  # the subreaper forwards it to the daemons
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for mp in reversed(self.made_mountpoints):
            with contextlib.suppress(OSError):
                os.rmdir(mp)
        self.made_mountpoints.clear()
        for cg in sorted(_machine_cgroups() - self.cgroups_before, reverse=True):
            _rmdir_empty_tree(cg)
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)
            self.state = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- virsh ----------------------------------------------------------------------------------
    def virsh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def timed_virsh(self, *args: str, timeout: float = 60) -> float:
        """Run virsh and return its wall time; raise PeerUnavailable when it fails."""
        t0 = time.perf_counter()
        out = self.virsh(*args, timeout=timeout)
        elapsed = time.perf_counter() - t0
        if out.returncode != 0:
            raise PeerUnavailable(f"virsh {' '.join(args)} failed: {out.stderr.strip()}")
        return elapsed

    def define(self, xml_path: Path, name: str) -> None:
        out = self.virsh("define", str(xml_path))
        if out.returncode != 0:
            raise PeerUnavailable(f"virsh define {xml_path} failed: {out.stderr.strip()}")
        self.defined.append(name)

    def daemon_pids(self) -> list[int]:
        """PIDs of virtlogd and libvirtd."""
        assert self.state is not None
        try:
            return [int(p) for p in (self.state / "daemons.pid").read_text().split()]
        except (OSError, ValueError):
            return []

    def qemu_pid(self, name: str) -> int | None:
        assert self.state is not None
        try:
            return int((self.state / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def _rmdir_empty_tree(path: Path) -> None:
    """Remove ``path`` and its sub-directories bottom-up (cgroup dirs: only empty ones go)."""
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()
