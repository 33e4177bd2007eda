"""The cgroups driver against the real kernel: device rules enforced (cgroup v1 devices and
cgroup v2 BPF), hotplug, verification read-back, journal-driven teardown and crash recovery.

Hooks are called directly on the driver (built from the registry of an embed instance); a
forked probe process joins the domain's cgroups through ``child_cgroup`` and opens devices on
request, so each check is an open(2) the kernel allows or refuses.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmconfine_cgroups
from tests.support import make_ctx, make_host, require, require_binary, require_root
from vmconfine.errors import DriverError
from vmconfine.launch import respawn
from vmconfine_cgroups import bpf, placement, v1
from vmconfine_cgroups.driver import CgroupsDriver

pytestmark = pytest.mark.host

DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    {disks}
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
"""

BLOCK_DISK = """<disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='{dev}'/>
      <target dev='{target}' bus='virtio'/>
      {ro}
    </disk>"""

#: devices that root can normally open but no domain rule allows
UNLISTED = ("/dev/mem", "/dev/kmsg", "/dev/loop-control")


def unlisted_device() -> str:
    """An unlisted device that opens outside the cgroup (so a refusal inside is the cgroup's)."""
    for path in UNLISTED:
        try:
            os.close(os.open(path, os.O_RDONLY))
            return path
        except OSError:
            continue
    require(False, f"none of {', '.join(UNLISTED)} can be opened on this host")
    raise AssertionError


class Probe:
    """A forked child that joins the domain's cgroups (``child_cgroup``) and then opens
    device nodes on request, answering with the errno (0 = opened)."""

    def __init__(self, drv: CgroupsDriver, ctx: Any) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 0
            try:
                os.close(cmd_w)
                os.close(res_r)
                try:
                    v2_dir = drv.spawn_cgroup(ctx=ctx)
                    if v2_dir is not None:  # the v2 group, joined as the pipeline's fallback
                        respawn.join(v2_dir)
                        os.close(v2_dir)
                    drv.child_cgroup(ctx=ctx)
                    os.write(res_w, b"ok\n")
                except BaseException as exc:
                    os.write(res_w, f"error {exc}\n".encode())
                    code = 1
                else:
                    with os.fdopen(cmd_r) as cmds:
                        for line in cmds:
                            path, mode = line.split()
                            flags = os.O_RDWR if mode == "rw" else os.O_RDONLY
                            try:
                                os.close(os.open(path, flags))
                                answer = 0
                            except OSError as exc:
                                answer = exc.errno or -1
                            os.write(res_w, f"{answer}\n".encode())
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(res_w)
        self.pid = pid
        self._cmd = os.fdopen(cmd_w, "w", buffering=1)
        self._res = os.fdopen(res_r)
        hello = self._res.readline().strip()
        if hello != "ok":
            self.close()
            raise AssertionError(f"probe could not join the cgroup: {hello}")

    def open(self, path: str, mode: str = "rw") -> int:
        self._cmd.write(f"{path} {mode}\n")
        return int(self._res.readline())

    def close(self) -> None:
        if self.pid:
            self._cmd.close()
            self._res.close()
            os.waitpid(self.pid, 0)
            self.pid = 0


def hierarchy_ok(backend: str) -> None:
    h = placement.detect()
    if backend == "v1":
        require("devices" in h.v1, "no cgroup v1 devices controller mounted")
    else:
        require(h.v2 is not None, "no cgroup2 mount")
        ok, why, _ = bpf.available()
        require(ok, why)


class Env:
    """An embed instance on a fresh root with the cgroups driver, and its domain contexts."""

    def __init__(self, root: Path, backend: str, controllers: list[str]) -> None:
        self.root = root
        self.backend = backend
        self.controllers = controllers
        self.host = make_host(root, [vmconfine_cgroups])
        self._configure(self.host)
        self.contexts: list[Any] = []

    def _configure(self, host: Any) -> None:
        cfg = host.config
        cfg.driver_settings("cgroups").cgroup_controllers = list(self.controllers)
        cfg.driver_settings("cgroups").cgroup_devices_backend = self.backend

    def driver(self, host: Any | None = None) -> CgroupsDriver:
        host = host or self.host
        info = host.registry.get("cgroups")
        assert info is not None and info.kind == "pipeline"
        return info.factory(host)  # type: ignore[no-any-return]

    def ctx(self, xml: str, host: Any | None = None) -> Any:
        c = make_ctx(host or self.host, xml)
        self.contexts.append(c)
        return c

    def fresh_host(self) -> Any:
        """A new host context for the same root, as the next vmconfine command builds it."""
        host = make_host(self.root, [vmconfine_cgroups])
        self._configure(host)
        return host

    def leaves(self, ctx: Any) -> list[str]:
        return [r["path"] for r in ctx.journal.records("cgroups", "mkdir") if r.get("leaf")]

    def cleanup(self) -> None:
        """Teardown from the journal with a fresh driver; then make sure nothing is left."""
        for c in self.contexts:
            leaves = self.leaves(c)
            created = [r["path"] for r in c.journal.records("cgroups", "mkdir")]
            try:
                self.driver().restore_all_labels(ctx=c)
            finally:
                for path in reversed(created):  # safety net, never leave groups behind
                    v1.rmdir(path, wait=0)
            assert not [p for p in leaves if os.path.exists(p)]


@pytest.fixture(params=["v1", "v2"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    require_root()
    hierarchy_ok(request.param)
    e = Env(tmp_path / "inst", request.param, ["devices"])
    yield e
    e.cleanup()


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    require_root()
    losetup = require_binary("losetup")
    img = tmp_path / "blk.img"
    img.write_bytes(b"\0" * (1 << 20))
    out = subprocess.run([losetup, "--find", "--show", str(img)], capture_output=True,
                         text=True, check=False)
    require(out.returncode == 0 and out.stdout.strip(), f"losetup failed: {out.stderr}")
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], capture_output=True, check=False)


def started(env: Env, xml: str) -> tuple[CgroupsDriver, Any]:
    drv = env.driver()
    ctx = env.ctx(xml)
    drv.set_all_labels(ctx=ctx)
    return drv, ctx


# ---- enforcement ---------------------------------------------------------------------------------
def test_domain_cgroup_enforces_device_acl(env: Env) -> None:
    other = unlisted_device()
    drv, ctx = started(env, DOMAIN.format(name="acl", disks=""))
    probe = Probe(drv, ctx)
    try:
        assert probe.open("/dev/null") == 0
        assert probe.open("/dev/urandom", "r") == 0
        if os.path.exists("/dev/kvm"):
            assert probe.open("/dev/kvm") == 0
        assert probe.open(other, "r") == errno.EPERM
        assert drv.verify_process(ctx=ctx, pid=probe.pid) == []
    finally:
        probe.close()
    desc = drv.describe(ctx=ctx)
    assert desc["devices"] == {"v1": "cgroup v1", "v2": "cgroup v2 BPF"}[env.backend]
    assert "c 1:3 rw" in desc["rules"] and "c 136:* rw" in desc["rules"]
    leaf = env.leaves(ctx)[0]
    assert leaf.endswith("/vmconfine/" + placement.instance_segment(env.host.instance) + "/acl")


def test_block_disk_is_read_write(env: Env, loopdev: str) -> None:
    disks = BLOCK_DISK.format(dev=loopdev, target="vda", ro="")
    drv, ctx = started(env, DOMAIN.format(name="blk", disks=disks))
    probe = Probe(drv, ctx)
    try:
        assert probe.open(loopdev, "r") == 0
        assert probe.open(loopdev, "rw") == 0
    finally:
        probe.close()
    st = os.stat(loopdev)
    assert f"b {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rw" in drv.describe(ctx=ctx)["rules"]


def test_readonly_block_disk_is_read_only(env: Env, loopdev: str) -> None:
    disks = BLOCK_DISK.format(dev=loopdev, target="vdb", ro="<readonly/>")
    drv, ctx = started(env, DOMAIN.format(name="ro", disks=disks))
    probe = Probe(drv, ctx)
    try:
        assert probe.open(loopdev, "r") == 0
        assert probe.open(loopdev, "rw") == errno.EPERM
    finally:
        probe.close()
    st = os.stat(loopdev)
    assert f"b {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} r" in drv.describe(ctx=ctx)["rules"]


def test_hotplug_changes_enforcement_immediately(env: Env, loopdev: str) -> None:
    from vmconfine.domain import parse_domain

    drv, ctx = started(env, DOMAIN.format(name="hot", disks=""))
    disk = parse_domain(DOMAIN.format(name="x", disks=BLOCK_DISK.format(
        dev=loopdev, target="vdc", ro=""))).disks[0]
    probe = Probe(drv, ctx)
    try:
        assert probe.open(loopdev) == errno.EPERM
        drv.set_image_label(ctx=ctx, disk=disk)
        assert probe.open(loopdev) == 0
        assert drv.verify_process(ctx=ctx, pid=probe.pid) == []
        drv.restore_image_label(ctx=ctx, disk=disk)
        assert probe.open(loopdev, "r") == errno.EPERM
        assert probe.open("/dev/null") == 0
        assert drv.verify_process(ctx=ctx, pid=probe.pid) == []
    finally:
        probe.close()
    if env.backend == "v2":  # replaced, not stacked: one program in force
        assert len(drv.describe(ctx=ctx)["bpf_prog_ids"]) == 1


def test_verify_process_reports_tampering(env: Env) -> None:
    drv, ctx = started(env, DOMAIN.format(name="tamper", disks=""))
    probe = Probe(drv, ctx)
    try:
        assert drv.verify_process(ctx=ctx, pid=probe.pid) == []
        assert drv.verify_process(ctx=ctx, pid=os.getpid()) != []  # not in the group
        cg = ctx.driver_state("cgroups")["plan"].devices_dir
        if env.backend == "v1":
            v1.allow(cg, "c 1:11 r")
        else:
            prog_id = drv.describe(ctx=ctx)["bpf_prog_ids"][0]
            assert bpf.detach_id(cg, prog_id)
        problems = drv.verify_process(ctx=ctx, pid=probe.pid)
        assert problems and all(isinstance(p, str) for p in problems)
    finally:
        probe.close()


# ---- teardown ------------------------------------------------------------------------------------
def test_teardown_removes_cgroup_and_is_idempotent(env: Env) -> None:
    drv, ctx = started(env, DOMAIN.format(name="down", disks=""))
    leaves = env.leaves(ctx)
    assert leaves and all(os.path.isdir(p) for p in leaves)
    Probe(drv, ctx).close()  # a process came and went
    drv.restore_all_labels(ctx=ctx)
    assert not any(os.path.exists(p) for p in leaves)
    drv.restore_all_labels(ctx=ctx)  # again: nothing to do, no error


def test_fresh_process_removes_cgroup_from_journal(env: Env) -> None:
    _drv, ctx = started(env, DOMAIN.format(name="crash", disks=""))
    leaves = env.leaves(ctx)
    ctx.journal.close()
    # the next command: a new host, driver and context built from the same journal
    fresh_host = env.fresh_host()
    fresh = env.ctx(DOMAIN.format(name="crash", disks=""), host=fresh_host)
    fresh.recovering = True
    assert fresh.journal.records("cgroups", "placement")
    desc = env.driver(fresh_host).describe(ctx=fresh)  # dominfo from another process
    assert desc["devices"] in ("cgroup v1", "cgroup v2 BPF") and "c 1:3 rw" in desc["rules"]
    env.driver(fresh_host).restore_all_labels(ctx=fresh)
    assert not any(os.path.exists(p) for p in leaves)


def test_teardown_keeps_filters_while_processes_remain(env: Env) -> None:
    drv, ctx = started(env, DOMAIN.format(name="busy", disks=""))
    other = unlisted_device()
    probe = Probe(drv, ctx)
    try:
        with pytest.raises(DriverError, match="still holds processes"):
            drv.restore_all_labels(ctx=ctx)
        assert probe.open(other, "r") == errno.EPERM  # still filtered
        assert probe.open("/dev/null") == 0
    finally:
        probe.close()
    drv.restore_all_labels(ctx=ctx)
    assert not any(os.path.exists(p) for p in env.leaves(ctx))


def test_teardown_finishes_when_another_domain_prunes_the_shared_parent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two domains of one instance stop together: A's teardown, refused removing the shared
    ``vmconfine/<instance>`` directory (B's group is in it), looks at what it holds just as
    B's teardown removes B's group and that directory. The directory is gone, not an error:
    A's teardown goes on and removes A's groups in every other hierarchy too (it used to stop
    there with ENOENT, leaving them; ENODEV when the read of ``cgroup.procs`` came second)."""
    require_root()
    h = placement.detect()
    wanted = [c for c in ("cpu", "cpuacct", "freezer", "blkio") if c in h.v1]
    require(len(wanted) >= 2, "fewer than two of the v1 cpu/cpuacct/freezer/blkio mounted")
    env = Env(tmp_path / "inst", "auto", wanted)
    try:
        drv_a, a = started(env, DOMAIN.format(name="prune-a", disks=""))
        drv_b, b = started(env, DOMAIN.format(name="prune-b", disks=""))
        leaves_a, leaves_b = env.leaves(a), env.leaves(b)
        assert len(leaves_a) == len(wanted) and all(os.path.isdir(p) for p in leaves_a)
        real_procs = v1.procs
        raced: list[str] = []

        def procs_racing_b(cgroup_dir: str) -> list[int]:
            if not raced and os.path.basename(cgroup_dir).startswith("qemu-embed-"):
                raced.append(cgroup_dir)
                monkeypatch.setattr(v1, "procs", real_procs)
                drv_b.restore_all_labels(ctx=b)  # B goes, and with it the shared directory
                assert not os.path.exists(cgroup_dir)
            return real_procs(cgroup_dir)

        monkeypatch.setattr(v1, "procs", procs_racing_b)
        drv_a.restore_all_labels(ctx=a)  # no error
        assert raced, "A's teardown never found the shared directory busy"
        assert [p for p in leaves_a + leaves_b if os.path.exists(p)] == []
    finally:
        monkeypatch.undo()
        env.cleanup()


# ---- controllers and errors ----------------------------------------------------------------------
def test_other_controllers_get_the_domain_cgroup(tmp_path: Path) -> None:
    require_root()
    h = placement.detect()
    wanted = [c for c in ("cpu", "cpuset", "pids", "freezer") if c in h.v1]
    require(wanted, "no v1 cpu/cpuset/pids/freezer hierarchy mounted")
    backend = "v2" if h.v2 is not None and bpf.available()[0] else "v1"
    hierarchy_ok(backend)
    env = Env(tmp_path / "inst", backend, ["devices", *wanted])
    try:
        drv, ctx = started(env, DOMAIN.format(name="ctl", disks=""))
        plan = ctx.driver_state("cgroups")["plan"]
        probe = Probe(drv, ctx)
        try:
            own = Path(f"/proc/{probe.pid}/cgroup").read_text()
            for ctrl in wanted:
                line = next(ln for ln in own.splitlines() if ctrl in ln.split(":")[1].split(","))
                assert line.endswith(plan.rel), line
            assert drv.verify_process(ctx=ctx, pid=probe.pid) == []
        finally:
            probe.close()
        dirs = drv.describe(ctx=ctx)["dirs"]
        assert all(any(c in k.split(",") for k in dirs) for c in wanted)
    finally:
        env.cleanup()


def test_unknown_controller_is_refused(tmp_path: Path) -> None:
    require_root()
    env = Env(tmp_path / "inst", "auto", ["devices", "bogus"])
    ctx = env.ctx(DOMAIN.format(name="bad", disks=""))
    with pytest.raises(Exception, match="Unknown cgroup controller 'bogus'"):
        env.driver().set_all_labels(ctx=ctx)
    assert not ctx.journal.records("cgroups", "mkdir")


def test_eperm_on_devices_warns_or_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    hierarchy_ok("v1")

    def denied(cg: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(v1, "deny_all", denied)
    env = Env(tmp_path / "inst", "v1", ["devices"])
    try:
        drv, ctx = started(env, DOMAIN.format(name="eperm", disks=""))
        assert "Group devices ACL is not accessible, disabling filtering" in caplog.text
        assert drv.describe(ctx=ctx)["devices"].startswith("not filtered")
        env.host.config.security_require_confined = True
        strict = env.ctx(DOMAIN.format(name="eperm2", disks=""))
        with pytest.raises(DriverError, match="security_require_confined"):
            env.driver().set_all_labels(ctx=strict)
    finally:
        env.cleanup()


def test_a_program_the_verifier_refuses_is_reported_with_its_log() -> None:
    """The load without the verifier's log (the fast path) is retried with it on refusal."""
    require_root()
    ok, why, _ = bpf.available()
    require(ok, why)
    exit_only = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # exit with r0 never set
    with pytest.raises(bpf.BpfError) as err:
        bpf.prog_load(exit_only)
    assert err.value.errno == errno.EACCES
    assert "R0 !read_ok" in err.value.verifier_log
