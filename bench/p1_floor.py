"""P1's safety floor: the host changes of vmconfine's start, made the minimal safe way.

:func:`start` makes, in plain Python and for one fixed domain, exactly the host changes that
``run_domain`` makes for the benchmark's domain with the stack ``none, dac, cgroups,
namespaces`` (taken from ``strace -f`` of one API start and the drivers' code), each the
cheapest correct way, with the same fd-based, symlink-safe system calls and nothing else; QEMU's
process is created in its v2 group and joins the v1 groups through ``tasks`` (no cgroup
migration wait, as in vmconfine: :mod:`vmconfine.launch.respawn`):

1. the domain's lifetime lock (``flock`` on ``NAME.lock``, ``O_NOFOLLOW``);
2. **one** journal record, written before the first change: the intent (the XML, which names
   the images, the runtime paths, the cgroup directories). It is the only record a crash
   needs: every change after it is named in it and its undo is idempotent (an image's original
   owner is remembered on its inode before its chown). It is made durable (``fsync``, step 5)
   before the first change that outlives a power loss, the files; the cgroups do not;
3. cgroups: the three-level group in every hierarchy vmconfine places QEMU in (v1 cpu,
   cpuacct, cpuset with its cpus/mems copied at each level, memory, freezer, blkio; the v2
   group for devices), the device program (the instructions vmconfine assembles for this
   domain, loaded without verifier log, attached, its id read back);
4. the QEMU account (``getpwnam``, ``getgrouplist``) and the images: their directory opened
   once by a walk of ``O_PATH|O_NOFOLLOW`` components, each image ``openat(O_NOFOLLOW)``,
   ``fstat`` (a regular file), ``fgetxattr`` of the remembered-owner reference (another
   domain's would be shared) and of ``security.capability`` (a chown clears it);
5. the ``fsync`` of the record;
6. the runtime directories (``run``: the sockets and the staging of QEMU's /dev; ``lib``: its
   home) and the two monitor sockets (``bind``, ``chmod 0600``, ``listen``); DAC: per image
   three ``fsetxattr`` (remembered owner, timestamp, reference) and ``fchown`` on the fd, the
   home directory ``fchown`` on an ``O_NOFOLLOW`` fd;
7. the log file (``O_APPEND|O_NOFOLLOW``, one header line);
8. ``clone3(CLONE_INTO_CGROUP)`` into the v2 leaf group (``fork`` + ``cgroup.procs`` where
   the kernel refuses); the child: default SIGPIPE/SIGXFSZ, ``setsid``, stdio, every fd but
   the two sockets close-on-exec (one ``close_range``), ``tasks`` of the v1 leaf groups,
   the mount namespace with the same /dev view (tmpfs staged on the runtime directory, six
   device binds, devpts, /dev/shm, the symlinks, ``MS_MOVE`` onto /dev), the bounding set
   dropped, ``setgroups``/``setresgid``/``setresuid``, ``capset`` to zero,
   no_new_privs, the parent-death signal, ``execve`` of the same QEMU argv;
9. QMP capabilities, the verification of the kernel's view (``/proc/PID/status``: ids, groups,
   the five capability sets, NoNewPrivs; ``/proc/PID/cgroup``; the attached program; the
   mount namespace and its /dev), the status file (``rename``), ``cont``.

:func:`stop` sends SIGTERM and undoes it all (the host is left as before). Only the fixed
parts are prepared before timing (:func:`plan`): the QEMU argv, the program's instructions, the
cgroup paths — what a program written for this one domain would have compiled in.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import itertools
import json
import os
import pwd
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import now
from vmconfine.launch import respawn

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NOEXEC, MS_BIND, MS_MOVE, MS_REC, MS_SLAVE = 2, 8, 4096, 8192, 16384, 1 << 19
CLOSE_RANGE_CLOEXEC = 4
CAP_V3 = 0x20080522
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
SYS_BPF = 321  # x86_64
OPEN_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
OPEN_IMAGE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
XATTRS = ("trusted.vmconfine.security.dac", "trusted.vmconfine.security.timestamp_dac",
          "trusted.vmconfine.security.ref_dac")
#: QEMU's /dev, as the namespaces driver builds it for this domain
DEV_BINDS = ("full", "kvm", "null", "random", "urandom", "zero")
DEV_LINKS = (("/proc/self/fd", "fd"), ("pts/ptmx", "ptmx"), ("/proc/self/fd/2", "stderr"),
             ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"))
DEV_NAMES = frozenset((*DEV_BINDS, *(n for _, n in DEV_LINKS), "pts", "shm"))
#: the steps :func:`start` times, in order
STEPS = ("lock, journal: the intent record written",
         "cgroups: dirs, cpuset, device program",
         "account, images opened and checked", "journal: fsync of the record",
         "runtime dirs, sockets, DAC (xattrs, chown)",
         "log, fork -> exec (the child's confinement)", "QEMU start-up until QMP answers",
         "verify the kernel's view", "status file, cont")
#: the child's steps (its own timestamps, sent to the parent before exec)
CHILD_STEPS = ("fork() until the child runs", "signals, setsid, stdio, fds close-on-exec",
               "v1 groups joined through tasks (v2: created in it)",
               "mount namespace, /dev view", "caps, ids, no_new_privs, parent check")


@dataclass
class Plan:
    """What is fixed for one domain before timing."""

    name: str
    xml: str
    root: Path
    argv: list[str]
    env: dict[str, str]
    socket_names: list[str]
    image_dir: str
    images: list[str]
    user: str
    #: per hierarchy: (the group's directories, parents first; copy cpuset.cpus/mems?)
    groups: list[tuple[list[str], bool]]
    v2_leaf: str
    #: /proc/PID/cgroup as it must read for QEMU: controller ("" for v2) -> group
    placed: dict[str, str]
    program: bytes
    v2_mount: str
    cap_last: int
    cpuset: tuple[bytes, bytes] = (b"", b"")

    @property
    def run_dir(self) -> Path:
        return self.root / "run" / f"domain-{self.name}"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib" / f"domain-{self.name}"

    @property
    def leaves(self) -> list[str]:
        return [dirs[-1] for dirs, _ in self.groups]


@dataclass
class Started:
    """One started QEMU and what :func:`stop` must undo."""

    plan: Plan
    pid: int = 0
    socks: list[socket.socket] = field(default_factory=list)
    owners: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name: ino, uid, gid
    made_dirs: list[str] = field(default_factory=list)
    lock_fd: int = -1
    steps: list[float] = field(default_factory=list)
    child: list[float] = field(default_factory=list)  # seconds per CHILD_STEPS


def plan(conn: Connection, name: str, xml: str, root: Path) -> Plan:
    """Everything fixed for ``xml``: the QEMU argv (fds as placeholders), the cgroup paths, the
    device program vmconfine assembles for it (the cgroups driver's rules)."""
    from vmconfine.domain import parse_domain
    from vmconfine.launch.pipeline import command_paths, prepare_domain
    from vmconfine.plugin.resources import BASE_DEVNODES
    from vmconfine.qemu.argv import build_command
    from vmconfine_cgroups import bpf, placement
    from vmconfine_cgroups.rules import domain_rules

    domain = parse_domain(xml)
    prepare_domain(conn, domain)
    config = conn.instance.config
    command = build_command(domain, config, command_paths(conn, domain, symbolic=False))
    names = [p.name for p in command.inherited]
    if any(p.kind != "listen" for p in command.inherited):
        raise RuntimeError("the safety floor knows this domain's two monitor sockets only")
    argv = command.argv(fds={n: 1000 + i for i, n in enumerate(names)})
    for d in ("run", "lib", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    env = dict(command.env, HOME=str(root / "lib" / f"domain-{name}"))
    images = [d.source.path for d in domain.disks]
    image_dir = os.path.dirname(images[0])
    if any(os.path.dirname(p) != image_dir for p in images):
        raise RuntimeError("the safety floor opens one image directory")
    h = placement.detect()
    if h.v2 is None:
        raise RuntimeError("the safety floor needs the cgroup2 mount (device program)")
    rel = f"/vmconfine-floor/{os.getpid()}/{name}"
    groups = [(placement.components(h.v2, h.self_v2, rel), False)]
    placed = {"": _group(h.self_v2, rel)}
    for ctrl in placement.AUTODETECT:
        if ctrl != "devices" and ctrl in h.v1:
            own = h.self_v1.get(ctrl, "/")
            groups.append((placement.components(h.v1[ctrl], own, rel), ctrl == "cpuset"))
            placed[ctrl] = _group(own, rel)
    rules = domain_rules(domain, config.driver_settings("cgroups"), devnodes=BASE_DEVNODES)
    cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    out = Plan(name, xml, root, argv, env, names, image_dir,
               [os.path.basename(p) for p in images], "vmconfine-qemu", groups,
               groups[0][0][-1], placed, bpf.assemble(rules),
               h.v2, cap_last)
    cpuset = next((dirs for dirs, cs in groups if cs), None)
    if cpuset is not None:
        base = os.path.dirname(cpuset[0])
        out.cpuset = (Path(base, "cpuset.cpus").read_bytes().strip(),
                      Path(base, "cpuset.mems").read_bytes().strip())
    return out


def _group(own: str, rel: str) -> str:
    """``rel`` under ``own`` as /proc/PID/cgroup names it."""
    return "/" + "/".join(x for x in (*own.split("/"), *rel.split("/")) if x)


# ---- system calls the os module lacks ----------------------------------------------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _prog_load(program: bytes) -> int:
    """BPF_PROG_LOAD of a device program, no verifier log (asked for only on failure)."""
    insns = ctypes.create_string_buffer(program, len(program))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(program) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic))
    struct.pack_into("<I", attr, 68, BPF_CGROUP_DEVICE)
    _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_PROG_LOAD), attr,
                       ctypes.c_uint(128))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_LOAD: {os.strerror(err)}")
    return int(fd)


def _capset_zero() -> None:
    hdr = (ctypes.c_uint32 * 2)(CAP_V3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(hdr, data), "capset")


# ---- start --------------------------------------------------------------------------------------


def _open_dir(path: str) -> int:
    """``path`` opened by a walk of ``O_NOFOLLOW`` components (no symlink anywhere)."""
    fd = os.open("/", OPEN_DIR)
    try:
        for part in [p for p in path.split("/") if p]:
            nxt = os.open(part, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _child(p: Plan, fds: list[int], log_fd: int, null_fd: int, times_w: int, parent: int,
           uid: int, gid: int, groups: list[int], born_in_v2: bool) -> None:
    """Between fork and exec: only system calls, in libvirt's order. Writes when it reached
    each of :data:`CHILD_STEPS` to ``times_w`` just before exec (the benchmark's own cost:
    one write)."""
    times = [now()]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the interpreter ignores these two
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    os.setsid()
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _check(_libc.close_range(3, ctypes.c_uint(0xFFFFFFFF), CLOSE_RANGE_CLOEXEC), "close_range")
    for fd in fds:
        os.set_inheritable(fd, True)
    times.append(now())
    for leaf in p.leaves:  # cgroups: v1 through ``tasks`` (one thread: the whole process)
        if leaf == p.v2_leaf:
            if born_in_v2:
                continue
            fd = os.open(f"{leaf}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        else:
            fd = os.open(f"{leaf}/tasks", os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, b"0")
        os.close(fd)
    times.append(now())
    _check(_libc.unshare(CLONE_NEWNS), "unshare")  # the mount namespace and QEMU's /dev
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    stage = str(p.run_dir)
    _mount("vmconfine", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536")
    for dev in DEV_BINDS:
        os.close(os.open(f"{stage}/{dev}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600))
        _mount(f"/dev/{dev}", f"{stage}/{dev}", None, MS_BIND)
    for target, link in DEV_LINKS:
        os.symlink(target, f"{stage}/{link}")
    os.mkdir(f"{stage}/pts", 0o755)
    _mount("devpts", f"{stage}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(f"{stage}/shm", 0o755)
    _mount("/dev/shm", f"{stage}/shm", None, MS_BIND | MS_REC)
    _mount(stage, "/dev", None, MS_MOVE)
    times.append(now())
    for cap in range(p.cap_last + 1):  # the bounding set, while CAP_SETPCAP is held
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # without keepcaps: permitted, effective, ambient cleared
    _capset_zero()  # and inheritable
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "the parent died")
    times.append(now())
    os.write(times_w, struct.pack(f"{len(times)}d", *times))
    os.execve(p.argv[0], p.argv, p.env)


def _fork_exec(p: Plan, s: Started, fds: list[int], log_fd: int, uid: int, gid: int,
               groups: list[int]) -> int:
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    times_r, times_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    forked = now()
    # created in its v2 group (clone3 CLONE_INTO_CGROUP, as vmconfine: no migration wait);
    # a kernel that refuses: fork, and the child writes cgroup.procs
    v2fd = os.open(p.v2_leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    pid = -1
    try:
        try:
            pid, born = respawn.spawn_into(v2fd), True
        except OSError:
            pid, born = os.fork(), False
    finally:
        if pid != 0:
            os.close(v2fd)
    if pid == 0:
        try:
            os.close(v2fd)
            respawn.set_signal_mask(signal.SIG_SETMASK, respawn.NO_SIGNALS)
            _child(p, fds, log_fd, null_fd, times_w, parent, uid, gid, groups, born)
        except BaseException as exc:
            try:
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(127)
        os._exit(127)
    os.close(err_w)
    os.close(times_w)
    os.close(null_fd)
    os.close(log_fd)
    msg = b""
    while chunk := os.read(err_r, 4096):
        msg += chunk
    os.close(err_r)
    if msg:
        os.close(times_r)
        os.waitpid(pid, 0)
        raise RuntimeError(f"safety floor child: {msg.decode(errors='replace')}")
    times = os.read(times_r, 8 * (len(CHILD_STEPS) + 1))
    os.close(times_r)
    marks = [forked, *struct.unpack(f"{len(times) // 8}d", times)]
    s.child = [b - a for a, b in itertools.pairwise(marks)]
    return pid


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", "rb") as fh:
        text = fh.read().decode()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _verify(p: Plan, pid: int, uid: int, gid: int, groups: list[int], prog_id: int) -> None:
    """Fail closed: the kernel's view of QEMU is the one asked for."""
    from vmconfine_cgroups import bpf
    st = _status(pid)
    problems = []
    if st["Uid"].split() != [str(uid)] * 4 or st["Gid"].split() != [str(gid)] * 4:
        problems.append(f"ids {st['Uid']!r} / {st['Gid']!r}")
    if sorted(int(g) for g in st["Groups"].split()) != sorted(groups):
        problems.append(f"groups {st['Groups']!r}")
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(st.get(caps, "0"), 16):
            problems.append(f"{caps} {st[caps]}")
    if st.get("NoNewPrivs", "").strip() != "1":
        problems.append("no_new_privs not set")
    with open(f"/proc/{pid}/cgroup", "rb") as fh:
        placed = {}
        for line in fh.read().decode().splitlines():
            _n, ctrls, path = line.split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                placed[ctrl] = path
    wrong = [c for c, path in p.placed.items() if placed.get(c) != path]
    if wrong:
        problems.append(f"not in its cgroup under {', '.join(wrong)}")
    if bpf.query(p.v2_leaf) != [prog_id]:
        problems.append("device program not attached")
    if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
        problems.append("no mount namespace")
    if set(os.listdir(f"/proc/{pid}/root/dev")) != DEV_NAMES:
        problems.append("its /dev is not the planned view")
    if problems:
        raise RuntimeError(f"safety floor: QEMU not confined: {'; '.join(problems)}")


def kernel_view(pid: int) -> dict[str, object]:
    """What the kernel shows of a confined QEMU, to compare the safety floor's with
    vmconfine's: its /dev, ids, groups, capability sets, no_new_privs, and the hierarchies in
    which it sits elsewhere than this process, the tag of its device program (read after
    the timing)."""
    st = _status(pid)
    out: dict[str, object] = {k: st.get(k, "").split() for k in (
        "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")}
    out["dev"] = sorted(os.listdir(f"/proc/{pid}/root/dev"))

    def placed(path: str) -> dict[str, str]:
        with open(path) as fh:
            return {line.split(":", 2)[1]: line.split(":", 2)[2]
                    for line in fh.read().splitlines()}

    own, its = placed("/proc/self/cgroup"), placed(f"/proc/{pid}/cgroup")
    out["cgroups"] = sorted(k for k, v in its.items() if own.get(k) != v)
    from vmconfine_cgroups import bpf, placement
    v2 = placement.detect().v2
    tags = []
    if v2 is not None and "" in its:
        for prog_id in bpf.query(os.path.normpath(f"{v2}/{its[''].strip('/')}")):
            fd = bpf.prog_fd_by_id(prog_id)
            try:
                tags.append(bpf.prog_info(fd).tag)
            finally:
                os.close(fd)
    out["device program"] = tags
    return out


async def _qmp_ready(p: Plan, s: Started, uid: int, gid: int, groups: list[int],
                     prog_id: int, mark: Any) -> None:
    from vmconfine.qemu import qmp
    client = await qmp.connect(p.run_dir / "monitor.sock", "bench-safety-floor")
    try:
        mark()
        _verify(p, s.pid, uid, gid, groups, prog_id)
        mark()
        tmp = p.root / "run" / f".{p.name}.status.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        os.write(fd, f"pid={s.pid}\n".encode())
        os.close(fd)
        os.rename(tmp, p.root / "run" / f"{p.name}.status")
        await client.execute("cont")
        mark()
    finally:
        await qmp.disconnect(client)


def start(p: Plan) -> Started:
    """Start QEMU the minimal safe way (module docstring); ``steps`` holds each step's end
    time after the start time. On failure everything made is undone before raising."""
    s = Started(p)
    t0 = now()

    def mark() -> None:
        s.steps.append(now() - t0)

    try:
        _start(p, s, mark)
    except BaseException:
        stop(s, kill=True)
        raise
    return s


def _open_images(p: Plan, s: Started, dfd: int) -> list[int]:
    """Each image ``openat(O_NOFOLLOW)`` in the walked directory, checked, owner noted."""
    fds: list[int] = []
    try:
        for name in p.images:
            fd = os.open(name, OPEN_IMAGE, dir_fd=dfd)
            fds.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"{name} is not a regular file")
            for attr in (XATTRS[2], "security.capability"):
                try:
                    os.getxattr(fd, attr)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
                else:  # shared with another domain, or file capabilities to keep
                    raise RuntimeError(f"{name} has {attr}: the safety floor handles neither")
            s.owners[name] = (st.st_ino, st.st_uid, st.st_gid)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _cgroups(p: Plan, s: Started) -> int:
    """The groups, cpuset copies, the device program attached; returns the program's id."""
    from vmconfine_cgroups import bpf
    for dirs, cpuset in p.groups:
        for d in dirs:
            os.mkdir(d, 0o755)
            s.made_dirs.append(d)
            if cpuset:
                for fname, value in zip(("cpuset.cpus", "cpuset.mems"), p.cpuset, strict=True):
                    fd = os.open(f"{d}/{fname}", os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, value)
                    finally:
                        os.close(fd)
    prog = _prog_load(p.program)
    try:
        prog_id = bpf.prog_info(prog).id
        bpf.attach(p.v2_leaf, prog)
    finally:
        os.close(prog)
    return prog_id


def _files(p: Plan, s: Started, image_fds: list[int], uid: int, gid: int) -> list[int]:
    """Runtime directories and sockets (returns their fds), then DAC: remembered owners and
    chown of every image, chown of the home directory."""
    for d in (p.run_dir, p.lib_dir):
        os.mkdir(d, 0o750)
        s.made_dirs.append(str(d))
    fds = []
    for sock_name in ("monitor.sock", "monitor-user.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.socks.append(sock)
        path = str(p.run_dir / sock_name)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(8)
        fds.append(sock.fileno())
    stamp = str(int(time.time())).encode()
    for fd, name in zip(image_fds, p.images, strict=True):
        _ino, ouid, ogid = s.owners[name]
        os.setxattr(fd, XATTRS[0], f"+{ouid}:+{ogid}".encode())
        os.setxattr(fd, XATTRS[1], stamp)
        os.setxattr(fd, XATTRS[2], b"1")
        os.fchown(fd, uid, gid)
    hfd = os.open(p.lib_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(hfd, uid, gid)
    finally:
        os.close(hfd)
    return fds


def _start(p: Plan, s: Started, mark: Any) -> None:
    run = p.root / "run"
    s.lock_fd = os.open(run / f"{p.name}.lock",
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(s.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # the one record: every change below is named in it (the images by the XML: their original
    # owners are remembered on each inode before its chown) and undone idempotently. Written
    # before the first change (the cgroups: a crashed process's record is in the page cache),
    # made durable before the first change that outlives a power loss (the files)
    record = {"op": "begin", "xml": p.xml, "supervisor": os.getpid(),
              "dirs": [str(p.run_dir), str(p.lib_dir)], "sockets": p.socket_names,
              "cgroups": [dirs for dirs, _ in p.groups]}
    jfd = os.open(run / f"{p.name}.journal",
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(jfd, json.dumps(record).encode() + b"\n")
        mark()
        prog_id = _cgroups(p, s)
        mark()
        pw = pwd.getpwnam(p.user)
        uid, gid = pw.pw_uid, pw.pw_gid
        groups = os.getgrouplist(p.user, gid)
        dfd = _open_dir(p.image_dir)
        try:
            image_fds = _open_images(p, s, dfd)
        finally:
            os.close(dfd)
        mark()
        os.fsync(jfd)
    finally:
        os.close(jfd)
    mark()
    try:
        fds = _files(p, s, image_fds, uid, gid)
    finally:
        for fd in image_fds:
            os.close(fd)
    mark()
    log_fd = os.open(p.root / "log" / f"{p.name}.log",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    argv = list(p.argv)
    for i, fd in enumerate(fds):
        argv = [a.replace(f"fd={1000 + i},", f"fd={fd},") for a in argv]
    os.write(log_fd, f"starting up\n{' '.join(argv)}\n".encode())
    s.pid = _fork_exec(replace(p, argv=argv), s, fds, log_fd, uid, gid, groups)
    mark()
    asyncio.run(_qmp_ready(p, s, uid, gid, groups, prog_id, mark))


# ---- stop ---------------------------------------------------------------------------------------


def _rmdir_cgroup(path: str) -> None:
    """rmdir a cgroup; EBUSY for a moment after its last task was reaped."""
    deadline = now() + 2.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or now() > deadline:
                raise
            time.sleep(0.001)


def stop(s: Started, *, kill: bool = False) -> None:
    """SIGTERM (SIGKILL with ``kill``) to QEMU, wait, then undo every change of :func:`start`
    (owners given back from the journal's inode-checked record, xattrs removed, groups,
    sockets, directories, files removed)."""
    p = s.plan
    if s.pid:
        os.kill(s.pid, signal.SIGKILL if kill else signal.SIGTERM)
        os.waitpid(s.pid, 0)
    for sock in s.socks:
        sock.close()
    for d in reversed(s.made_dirs):
        if d.startswith("/sys/fs/cgroup"):
            _rmdir_cgroup(d)
    if s.owners:
        dfd = _open_dir(p.image_dir)
        try:
            for name, (ino, ouid, ogid) in s.owners.items():
                fd = os.open(name, OPEN_IMAGE, dir_fd=dfd)
                try:
                    if os.fstat(fd).st_ino != ino:
                        raise RuntimeError(f"{name} was replaced: not restored")
                    os.fchown(fd, ouid, ogid)
                    for attr in XATTRS:
                        try:
                            os.removexattr(fd, attr)
                        except OSError as exc:
                            if exc.errno != errno.ENODATA:
                                raise
                finally:
                    os.close(fd)
        finally:
            os.close(dfd)
    if p.run_dir.is_dir():
        for sock_name in ("monitor.sock", "monitor-user.sock"):
            (p.run_dir / sock_name).unlink(missing_ok=True)
    for d in reversed(s.made_dirs):
        if not d.startswith("/sys/fs/cgroup"):
            os.rmdir(d)
    run = p.root / "run"
    for f in (run / f"{p.name}.status", run / f"{p.name}.journal", run / f"{p.name}.lock"):
        f.unlink(missing_ok=True)
    if s.lock_fd >= 0:
        os.close(s.lock_fd)
        s.lock_fd = -1
