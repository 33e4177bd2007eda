"""P5: 32 domains started at the same time by 32 separate vmconfine processes (TCG, paused).

Each worker process (``python -m bench.p5_concurrency --worker URI XML``) runs vmconfine's own
start path — ``supervisor.run_domain()`` (start sequence, then supervise), exactly what
``vmconfine run --paused`` runs — on one embed instance shared by all of them, with the stack
``selinux, dac, cgroups``: real DAC (QEMU as vmconfine-qemu, chown + remembered owners) and
real cgroups; SELinux runs on its fake backend (no SELinux on this host: file contexts in
``user.vmconfine.selinux``, the process context is not enforced and is reported back as the
child set it), but its MCS labels come
from the instance's real, file-locked registry, which all 32 processes share.

Checked: every domain reaches QMP-ready, the 32 MCS labels are distinct, each image carries
its domain's owner and label while running; after every QEMU is stopped (SIGTERM), every
image has its original owner and no label or remembered-owner xattr, and no journal, status
file, lease or cgroup is left.

Peers: libvirt starting the same 32 domains with 32 concurrent ``virsh start --paused``; the
floor: 32 bare QEMU processes spawned at once by one process, QMP handshakes in parallel.

usage: python -m bench.p5_concurrency [--quick] [--runs N]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import types
import uuid as uuidlib
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    QEMU,
    REPO,
    Options,
    Stats,
    Table,
    bench_main,
    domain_xml,
    embed_root,
    finish_teardowns,
    is_root,
    make_disks,
    now,
    ratio,
    scratch,
)
from bench.libvirt_peer import LibvirtPeer, PeerUnavailable

VIRTD = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
LABEL_XATTR = "user.vmconfine.selinux"
READY_TIMEOUT = 180.0


# ---- the worker (one per domain) ----------------------------------------------------------------


def _bench_selinux_plugin(policy_dir: Path) -> tuple[types.ModuleType, Any]:
    """A plugin registering ``selinux`` on the fake backend (contexts in an xattr)."""
    from vmconfine.plugin.hookspecs import hookimpl
    from vmconfine_selinux import SETTINGS as SELINUX_SETTINGS
    from vmconfine_selinux.backend import FakeBackend
    from vmconfine_selinux.driver import SELinuxDriver

    backend = FakeBackend(str(policy_dir / "virtual_domain_context"),
                          str(policy_dir / "virtual_image_context"), process_context=VIRTD,
                          exec_record_dir=str(policy_dir))  # what a kernel would report
    mod = types.ModuleType("bench_selinux_fake")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add("selinux", lambda host: SELinuxDriver(host, backend),
                     "SELinux on the fake backend (benchmark)", settings=SELINUX_SETTINGS)

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod, backend


def worker(uri: str, xml_path: str, policy_dir: str) -> int:
    """Start one domain paused and supervise it until its QEMU exits."""
    import vmconfine_cgroups
    import vmconfine_dac
    from vmconfine.config.instance import open_instance
    from vmconfine.domain import parse_domain
    from vmconfine.launch.connection import Connection
    from vmconfine.launch.supervisor import run_domain
    from vmconfine.plugin import nop
    from vmconfine.plugin.registry import make_plugin_manager

    plugin, _backend = _bench_selinux_plugin(Path(policy_dir))
    pm = make_plugin_manager(autoload=False,
                             plugins=[nop, vmconfine_dac, vmconfine_cgroups, plugin])
    conn = Connection(open_instance(uri), pm=pm)
    domain = parse_domain(Path(xml_path).read_text(), source=xml_path)

    def on_ready(launched: Any) -> None:
        sec = launched.ctx.domain.seclabel("selinux")
        assert sec is not None and sec.label
        sys.stdout.write(f"READY {launched.pid} {sec.label} {sec.imagelabel}\n")
        sys.stdout.flush()

    outcome = run_domain(conn, domain, paused=True, on_ready=on_ready, shutdown_timeout=5)
    sys.stdout.write(f"DONE {outcome.reason}\n")
    return 0


# ---- floor --------------------------------------------------------------------------------------


async def _floor(images: list[Path], d: Path) -> float:
    """Spawn one bare QEMU per image at once; return the time until every QMP answered.

    As vmconfine does, the listening monitor socket is made first and passed as an fd."""
    import socket

    from vmconfine.qemu import qmp
    socks, paths, pids = [], [], []
    for i in range(len(images)):
        path = d / f"floor{i}.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(8)
        s.set_inheritable(True)
        socks.append(s)
        paths.append(path)
    t0 = now()
    try:
        for img, s in zip(images, socks, strict=True):
            argv = [QEMU, "-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display",
                    "none", "-S", "-no-user-config",
                    "-chardev", f"socket,id=mon,fd={s.fileno()},server=on,wait=off",
                    "-mon", "chardev=mon,mode=control",
                    "-blockdev", f'{{"driver":"file","filename":"{img}","node-name":"f"}}',
                    "-blockdev", '{"driver":"raw","file":"f","node-name":"r"}',
                    "-device", "virtio-blk-pci,drive=r"]
            pids.append(os.posix_spawn(QEMU, argv, {}, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2)]))
        clients = await asyncio.gather(*(qmp.connect(p, "bench-floor") for p in paths))
        elapsed = now() - t0
        for c in clients:
            await qmp.disconnect(c)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for s in socks:
            s.close()
        for p in paths:
            p.unlink(missing_ok=True)
    return elapsed


# ---- vmconfine: N workers -----------------------------------------------------------------------


class Workers:
    """N worker processes and what they print."""

    def __init__(self, uri: str, xmls: list[Path], policy: Path) -> None:
        self.uri, self.xmls, self.policy = uri, xmls, policy
        self.procs: list[subprocess.Popen[str]] = []
        self.ready: dict[int, tuple[float, int, str, str]] = {}
        self.done: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.t0 = 0.0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.t0 = now()
        for xml in self.xmls:
            self.procs.append(subprocess.Popen(
                [PYTHON, "-m", "bench.p5_concurrency", "--worker", self.uri, str(xml),
                 str(self.policy)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, cwd=REPO, env=env, start_new_session=True))
        self._stderr_threads = [threading.Thread(target=self._drain, args=(i, p), daemon=True)
                                for i, p in enumerate(self.procs)]
        for t in self._stderr_threads:
            t.start()

    def _drain(self, i: int, p: subprocess.Popen[str]) -> None:
        assert p.stderr is not None
        text = p.stderr.read()
        if text.strip():
            self.errors[i] = text.strip().splitlines()[-1]

    def wait_ready(self, timeout: float) -> None:
        """Read READY lines until every worker is ready or gone."""
        sel = selectors.DefaultSelector()
        for i, p in enumerate(self.procs):
            assert p.stdout is not None
            sel.register(p.stdout, selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.procs)))
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                i = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    pending.discard(i)
                elif line.startswith("READY"):
                    _, pid, label, image = line.split()
                    self.ready[i] = (now() - self.t0, int(pid), label, image)
                    sel.unregister(key.fileobj)
                    pending.discard(i)
        sel.close()

    def stop(self) -> None:
        """SIGTERM every QEMU; wait for the workers' teardown; kill what is left."""
        for _, pid, _, _ in self.ready.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for i, p in enumerate(self.procs):
            try:
                out, _ = p.communicate(timeout=120)
                for line in out.splitlines():
                    if line.startswith("DONE"):
                        self.done[i] = line.split()[1]
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        for t in self._stderr_threads:
            t.join(timeout=10)


def write_policy(d: Path) -> Path:
    policy = d / "policy"
    policy.mkdir()
    (policy / "virtual_domain_context").write_text(
        "system_u:system_r:svirt_t:s0\nsystem_u:system_r:svirt_tcg_t:s0\n")
    (policy / "virtual_image_context").write_text(
        "system_u:object_r:svirt_image_t:s0\nsystem_u:object_r:virt_content_t:s0\n")
    return policy


def image_state(path: Path) -> tuple[int, int, str | None, list[str]]:
    st = os.stat(path)
    try:
        label: str | None = os.getxattr(path, LABEL_XATTR).decode()
    except OSError:
        label = None
    remembered = [x for x in os.listxattr(path) if x.startswith("trusted.vmconfine")]
    return st.st_uid, st.st_gid, label, remembered


def leftovers(inst_root: Path, uri: str, names: list[str]) -> list[str]:
    """What this run left: its journals, status files, leases and cgroups. Only this
    instance's groups (``vmconfine/<its segment>``, also nested under the bench's own group,
    as the memory one is here): another instance's, of a run at the same time or one whose
    scratch root (journal included) is gone, is not this run's."""
    from vmconfine.config.instance import open_instance
    from vmconfine_cgroups.placement import instance_segment

    found = []
    run_dir = inst_root / "run"
    if run_dir.is_dir():
        found += [str(p) for p in run_dir.rglob("*") if p.suffix in (".journal", ".xml")]
    registry = inst_root / "run" / "qemu" / "selinux-mcs"
    if (registry / "leases").exists():
        from vmconfine_selinux.mcs import LabelRegistry, McsRange

        found += [f"MCS lease of {x.owner}" for x in
                  LabelRegistry(registry, McsRange("s0", 0, 1023)).leases()]
    segment = instance_segment(open_instance(uri))
    for cg in Path("/sys/fs/cgroup").glob(f"**/vmconfine/{segment}"):
        with contextlib.suppress(OSError):  # a group removed meanwhile
            found += [str(p) for p in cg.iterdir() if p.is_dir() and p.name in names]
    return found


# ---- the run ------------------------------------------------------------------------------------


def run(opts: Options) -> list[Table]:
    n = 8 if opts.quick else 32
    table = Table(f"P5: {n} domains started concurrently (separate processes, TCG, paused)",
                  ["measurement", "vmconfine", "peer", "ratio", "target"])
    if not is_root():
        table.unavailable(f"{n} domains", "needs root")
        return [table]
    import importlib.util

    if importlib.util.find_spec("vmconfine_selinux.driver") is None:
        table.unavailable(f"{n} domains", "not available yet: plugins/selinux is not there")
        return [table]
    from vmconfine_dac.identity import config_ids  # noqa: F401 - fails early when missing

    with scratch("p5") as d:
        policy = write_policy(d)
        inst_root = d / "instance"
        uri = embed_root(inst_root, 'security_driver = "selinux"\n')
        names = [f"p5-{i:02d}" for i in range(n)]
        images, xmls = [], []
        for name in names:
            img = make_disks(d, name, 1, boot=False)[0]
            images.append(img)
            xml = d / f"{name}.xml"
            xml.write_text(domain_xml(name, [img], uuid=str(uuidlib.uuid4())))
            xmls.append(xml)
        before = {img: image_state(img) for img in images}
        workers = Workers(uri, xmls, policy)
        workers.start()
        workers.wait_ready(READY_TIMEOUT)
        wall = max((r[0] for r in workers.ready.values()), default=float("nan"))
        per = Stats([r[0] for r in workers.ready.values()])
        labels = {r[2] for r in workers.ready.values()}
        labelled = 0
        for i, img in enumerate(images):
            if i in workers.ready:
                uid, _gid, label, remembered = image_state(img)
                if uid != 0 and label == workers.ready[i][3] and remembered:
                    labelled += 1
        workers.stop()
        restored = sum(1 for img in images if image_state(img) == before[img])
        left = leftovers(inst_root, uri, names)
        finish_teardowns(uri)
        floor = asyncio.run(_floor(images, d))
        lv_wall, lv_error = libvirt_concurrent(xmls, names)
    ok_all = len(workers.ready) == n
    table.add(f"wall time until all {n} are QMP-ready", f"{wall:.2f} s",
              f"{lv_wall:.2f} s (libvirt)" if lv_wall else f"libvirt n/a ({lv_error})",
              ratio(wall, lv_wall), "report")
    table.add(f"floor: {n} bare QEMU, spawned at once by one process, QMP answered",
              f"{floor:.2f} s", "-", ratio(wall, floor) + " (vmconfine/floor)", "-")
    table.add("per-domain: worker launched -> READY", per.fmt("s"), "-", "n/a", "report")
    table.add("domains started", f"{len(workers.ready)}/{n}", "-", "n/a",
              "all start: " + ("ok" if ok_all else "MISS"))
    table.add("distinct MCS labels", f"{len(labels)}/{n}", "-", "n/a",
              "unique: " + ("ok" if len(labels) == n and ok_all else "MISS"))
    table.add("images labelled while running (owner, label, remembered)", f"{labelled}/{n}",
              "-", "n/a", "report")
    table.add("images restored afterwards (owner, no label, no xattrs)", f"{restored}/{n}",
              "-", "n/a", "every file restored: " + ("ok" if restored == n else "MISS"))
    table.add("left behind: journals, status files, leases, cgroups",
              ", ".join(left[:5]) or "none", "-", "n/a", "report")
    table.notes += [
        f"workers: python -m bench.p5_concurrency --worker (supervisor.run_domain, "
        f"paused); stack selinux (fake backend, real MCS registry), dac, cgroups; {n} "
        "processes on " + str(os.cpu_count()) + " CPUs",
        "libvirt: the same XML defined, then concurrent 'virsh start --paused'",
    ]
    if workers.errors:
        table.notes.append("worker errors: " + "; ".join(
            f"{names[i]}: {e}" for i, e in sorted(workers.errors.items())[:3]))
    stopped = {r for r in workers.done.values()}
    if stopped:
        table.notes.append(f"workers ended with: {', '.join(sorted(stopped))} (SIGTERM to QEMU)")
    return [table]


def libvirt_concurrent(xmls: list[Path], names: list[str]) -> tuple[float | None, str]:
    """Concurrent ``virsh start --paused`` of every domain; (wall time, error)."""
    try:
        with LibvirtPeer() as peer:
            for xml, name in zip(xmls, names, strict=True):
                peer.define(xml, name)
            t0 = now()
            procs = [subprocess.Popen(["/usr/bin/virsh", "-q", "-c", peer.uri, "start",
                                       "--paused", name], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for name in names]
            errors = []
            for p in procs:
                _, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    errors.append(err.strip())
            wall = now() - t0
            if errors:
                return None, f"{len(errors)} starts failed: {errors[0]}"
            kills = [subprocess.Popen(["/usr/bin/virsh", "-q", "-c", peer.uri, "destroy",
                                       name], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for name in names]
            for k in kills:
                k.wait(timeout=120)
            return wall, ""
    except PeerUnavailable as exc:
        return None, str(exc)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--worker":
        return worker(*args[1:4])
    return bench_main(__doc__, "P5 concurrency", run, args, full_runs=1, quick_runs=1)


if __name__ == "__main__":
    sys.exit(main())
