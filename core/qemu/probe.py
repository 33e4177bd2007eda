"""Running an emulator (or its ELF interpreter) to ask it something: the one place that does.

The domain XML names the ``<emulator>``, so whatever it points to is untrusted: inspecting an
XML (``confinement FILE.xml``, ``domxml-to-native``) must never run that binary as root. Every
probe (``EMULATOR -L help``, ``LD.SO --list EMULATOR``...) runs as QEMU's own account — the
configured ``user``/``group`` on privileged instances, the caller otherwise — like libvirt's
capability probing, and with less than QEMU gets:

* no capabilities: the bounding and ambient sets are emptied while still root, then the uid
  switch, then effective/permitted/inheritable cleared (also for a ``user = "root"`` config);
* ``no_new_privs`` (a setuid or file-capability binary gains nothing);
* a clean environment (``PATH`` only), stdin ``/dev/null``, a new session (no controlling
  terminal), no inherited fds;
* a timeout (the whole process group is killed) and a cap on what it may print.

Results are cached by the identity (path, device, inode, size, mtime) of every file they depend
on and by the account that ran them: in memory, and on disk under the instance's cache dir
(``emulator-probes/``, written atomically, and only when the cache dir exists: a report on a
fresh instance creates nothing; a cache file is only read when it, and its directory, belong
to the current user and nobody else can write them). A probe failure is a
:class:`ProbeError` whose message is one line naming the emulator.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import hashlib
import json
import logging
import os
import pwd
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmconfine.errors import VmconfineError
from vmconfine.sanitize import one_line

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance

log = logging.getLogger(__name__)

#: bounds an emulator that never ends (a FIFO, a wrapper that hangs); generous because a
#: loaded host (or QEMU under nested TCG) can take many seconds for what is ~0.1 s when idle
TIMEOUT = 60.0
OUTPUT_MAX = 4 << 20
CACHE_SUBDIR = "emulator-probes"
CACHE_FORMAT = 1
PROBE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


class ProbeError(VmconfineError):
    """An emulator probe failed (one line, naming the emulator)."""


@dataclass(frozen=True)
class ProbeUser:
    """The account a probe runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid}"


def _account_id(spec: str, kind: str) -> int:
    if spec.startswith("+") and spec[1:].isdigit():
        return int(spec[1:])
    try:
        return pwd.getpwnam(spec).pw_uid if kind == "user" else grp.getgrnam(spec).gr_gid
    except KeyError:
        if spec.isdigit():
            return int(spec)
    raise ProbeError(f"qemu.conf {kind} '{spec}' does not exist, so the emulator cannot be "
                     f"probed as QEMU's account; create it or give a numeric id as +N")


def probe_user(instance: Instance) -> ProbeUser:
    """QEMU's account for ``instance``: qemu.conf ``user``/``group`` (with that user's groups)
    when privileged, the caller otherwise."""
    if not instance.privileged:
        return ProbeUser(os.getuid(), os.getgid(), tuple(sorted(set(os.getgroups()))))
    cfg = instance.config
    uid, gid = _account_id(cfg.user, "user"), _account_id(cfg.group, "group")
    groups = {gid}
    with contextlib.suppress(KeyError):
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return ProbeUser(uid, gid, tuple(sorted(groups)))


# ---- file identity ------------------------------------------------------------------------------


def identity(path: str) -> list[Any]:
    """(path, device, inode, size, mtime) of ``path`` (following symlinks); a missing file is
    an identity too (``[path, None]``)."""
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def regular_file(path: str, what: str = "emulator") -> str:
    """The real path of ``path`` when it is a regular file; else a :class:`ProbeError` (never
    open a FIFO or a device named by an XML)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ProbeError(f"{what} {one_line(path)}: {exc.strerror}; check <emulator> in the "
                         "domain XML or emulator_search_path in qemu.conf") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProbeError(f"{what} {one_line(path)} is not a regular file; check <emulator> in "
                         "the domain XML")
    return real


# ---- the on-disk cache -------------------------------------------------------------------


class DiskCache:
    """JSON values under DIR/emulator-probes, trusted only when owned by us and not writable by
    anyone else (file and directory), opened relative to the directory fd (no symlinks)."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent

    def _dir_fd(self, create: bool) -> int | None:
        path = self.parent / CACHE_SUBDIR
        if create and self.parent.is_dir():  # never creates the instance's own directories
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.warning("ignoring the probe cache %s: it is not owned by uid %d or others can "
                        "write it", path, os.geteuid())
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _name(key: Any) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".json"

    def get(self, key: Any) -> Any | None:
        dfd = self._dir_fd(create=False)
        if dfd is None:
            return None
        try:
            fd = os.open(self._name(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError:
            return None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_mode & 0o022 or st.st_size > OUTPUT_MAX * 4):
                return None
            with os.fdopen(fd, "rb") as f:
                fd = -1
                record = json.loads(f.read())
        except (OSError, ValueError):
            return None
        finally:
            if fd >= 0:
                os.close(fd)
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        return record.get("value")

    def put(self, key: Any, value: Any) -> None:
        dfd = self._dir_fd(create=True)
        if dfd is None:
            return
        name = self._name(key)
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                os.write(fd, json.dumps({"key": key, "value": value}).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            log.debug("probe cache not written: %s", exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        finally:
            os.close(dfd)


# ---- running a probe ---------------------------------------------------------------------


def _cap_last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _clear_capabilities() -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _become(user: ProbeUser, last_cap: int) -> Callable[[], None]:
    """The function run in the forked child before exec (async-signal-unsafe work is limited
    to syscalls)."""

    def drop() -> None:
        if os.geteuid() == 0:
            for cap in range(last_cap + 1):
                _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if os.geteuid() == 0:
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
        _clear_capabilities()
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")

    return drop


def _collect(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes, str | None]:
    """stdout, stderr and a failure reason (timeout, too much output) of a running probe."""
    out: dict[int, list[bytes]] = {}
    total = 0
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        sel.register(stream, selectors.EVENT_READ)
        out[stream.fileno()] = []
    deadline = time.monotonic() + timeout
    why = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            why = f"did not finish within {timeout:g} s"
            break
        for key, _ in sel.select(left):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            out[key.fd].append(data)
            total += len(data)
        if total > OUTPUT_MAX:
            why = f"printed more than {OUTPUT_MAX >> 20} MiB"
            break
    sel.close()
    if why is None:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            why = f"did not finish within {timeout:g} s"
    if why is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    return (b"".join(out[proc.stdout.fileno()]), b"".join(out[proc.stderr.fileno()]), why)


def _describe_status(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


@dataclass
class EmulatorProbe:
    """Runs probes as ``user`` with the caching described in the module docstring."""

    user: ProbeUser
    cache: DiskCache | None = None
    timeout: float = TIMEOUT

    def run(self, argv: Sequence[str], *, emulator: str, depends: Sequence[str] = ()) -> str:
        """The stdout of ``argv`` run as the probe user (cached). ``emulator`` names the
        binary in errors; ``depends`` lists more files the answer depends on (argv[0] always
        counts). Raises :class:`ProbeError`."""
        key = self.key("run", [*argv], [argv[0], *depends])
        found = self.cached(key, lambda: self._run(list(argv), emulator))
        return str(found)

    def key(self, kind: str, what: Any, files: Sequence[str]) -> list[Any]:
        """A cache key: the kind, what is asked, the account, every file's identity."""
        return [CACHE_FORMAT, kind, what, [self.user.uid, self.user.gid, list(self.user.groups)],
                [identity(p) for p in files]]

    def cached(self, key: list[Any], compute: Callable[[], Any],
               valid: Callable[[Any], bool] | None = None) -> Any:
        """``compute()`` (a JSON value) cached in memory and on disk under ``key``; a cached
        value ``valid`` rejects is computed again."""
        mem = json.dumps(key, sort_keys=True)
        value = _MEMORY.get(mem)
        if value is not None and (valid is None or valid(value)):
            return value
        value = self.cache.get(key) if self.cache is not None else None
        if value is None or (valid is not None and not valid(value)):
            value = compute()
            if self.cache is not None:
                self.cache.put(key, value)
        _MEMORY[mem] = value
        return value

    def _run(self, argv: list[str], emulator: str) -> str:
        regular_file(argv[0])  # a FIFO or a device would hang or mislead the exec
        shown = one_line(" ".join(argv))
        where = f"emulator {one_line(emulator)}: `{shown}` (run as {self.user.describe()})"
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": PROBE_PATH}, close_fds=True, start_new_session=True,
                preexec_fn=_become(self.user, _cap_last_cap()), cwd="/",
            )
        except OSError as exc:
            raise ProbeError(f"{where} cannot be run: {exc.strerror or exc}; check <emulator> "
                             "in the domain XML (QEMU's account must be able to execute it)"
                             ) from None
        except subprocess.SubprocessError as exc:
            raise ProbeError(f"{where} could not drop its privileges: {exc}") from None
        out, err, why = _collect(proc, self.timeout)
        if why is None and proc.returncode != 0:
            why = _describe_status(proc.returncode)
        if why is not None:
            tail = err.decode(errors="replace").strip().splitlines()
            detail = f": {one_line(tail[-1])}" if tail else ""
            raise ProbeError(f"{where} {why}{detail}; check <emulator> in the domain XML")
        return out.decode(errors="replace")


_MEMORY: dict[str, Any] = {}


def for_instance(instance: Instance) -> EmulatorProbe:
    """The probe runner of ``instance`` (its QEMU account, its cache dir)."""
    return EmulatorProbe(probe_user(instance), DiskCache(instance.cache_dir))
