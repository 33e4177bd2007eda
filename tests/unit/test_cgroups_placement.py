"""cgroup naming and placement, hierarchy detection, and the driver's plan (no kernel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vmconfine_cgroups
from tests.support import make_ctx, make_host
from vmconfine.config.instance import Instance
from vmconfine.config.settings import config_from_text
from vmconfine.domain import parse_domain
from vmconfine.errors import ConfigError, DriverError
from vmconfine_cgroups import placement, v1
from vmconfine_cgroups.driver import CgroupsDriver

XML = """<domain type='kvm'><name>{name}</name><memory>65536</memory>
  <os><type arch='x86_64'>hvm</type></os>{extra}</domain>"""


def instance(kind: str, root: str | None = None, privileged: bool = True) -> Instance:
    p = Path(root or "/x")
    return Instance(uri="qemu:///x", kind=kind, privileged=privileged, config_path=p / "q.conf",
                    run_dir=p, lib_dir=p, cache_dir=p, log_dir=p,
                    root=Path(root) if root else None, caller_uid=0)


def cfg(text: str = "") -> Any:
    """The cgroups driver's settings from qemu.conf ``text``."""
    return config_from_text(text, privileged=True, caller_uid=0, caller_gid=0,
                            drivers=[("cgroups", vmconfine_cgroups.SETTINGS)]
                            ).driver_settings("cgroups")


def dom(name: str = "vm1", extra: str = "") -> Any:
    return parse_domain(XML.format(name=name, extra=extra))


# ---- naming -------------------------------------------------------------------------------------
def test_default_layout_is_vmconfine_qemu_name() -> None:
    assert placement.group_path(instance("system"), dom(), cfg()) == "/vmconfine/qemu/vm1"


def test_embed_roots_get_distinct_segments() -> None:
    a = placement.group_path(instance("embed", "/srv/a"), dom(), cfg())
    b = placement.group_path(instance("embed", "/srv/b"), dom(), cfg())
    assert a != b
    assert a.startswith("/vmconfine/qemu-embed-") and a.endswith("/vm1")
    assert len(a.split("/")[2]) == len("qemu-embed-") + 8


def test_session_segment_names_the_user() -> None:
    inst = instance("session", privileged=False)
    assert placement.group_path(inst, dom(), cfg()) == "/vmconfine/qemu-root/vm1"


def test_explicit_partition_uses_libvirt_naming() -> None:
    conf = cfg('cgroup_partition = "/machine/tenant1"\n')
    assert placement.group_path(instance("system"), dom(), conf) == \
        "/machine/tenant1.partition/qemu-vm1.vmconfine-qemu"


def test_xml_partition_wins_over_config() -> None:
    d = dom(extra="<resource><partition>/machine</partition></resource>")
    conf = cfg('cgroup_partition = "/other"\n')
    assert placement.group_path(instance("system"), d, conf) == \
        "/machine/qemu-vm1.vmconfine-qemu"


def test_relative_xml_partition_is_refused() -> None:
    d = dom(extra="<resource><partition>machine</partition></resource>")
    with pytest.raises(ConfigError, match="must start with '/'"):
        placement.group_path(instance("system"), d, cfg())


@pytest.mark.parametrize(("name", "escaped"), [
    ("vm1", "vm1"), ("cpu.stat", "_cpu.stat"), ("cgroup.procs", "_cgroup.procs"),
    ("_x", "__x"), (".hidden", "_.hidden"), ("devices.x", "_devices.x")])
def test_escaping(name: str, escaped: str) -> None:
    assert placement.escape(name) == escaped


@pytest.mark.parametrize(("path", "out"), [
    ("/machine", "/machine"), ("/machine/foo", "/machine/foo.partition"),
    ("/foo/bar.x", "/foo.partition/bar.x"), ("/system/cpu.x", "/system/_cpu.x")])
def test_partition_suffix(path: str, out: str) -> None:
    assert placement.partition_suffix(path) == out


def test_machine_name_is_filtered_and_capped() -> None:
    name = placement.machine_name(instance("system"), "a b..c" + "x" * 80)
    assert name.startswith("qemu-a-b-c") and len(name) <= 64


# ---- detection ---------------------------------------------------------------------------------
MOUNTINFO = """\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:1 - cgroup cgroup rw,cpu,cpuacct
27 25 0:25 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
28 25 0:26 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
29 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
SELF_CGROUP = "3:cpu,cpuacct:/box\n2:devices:/\n1:name=systemd:/\n0::/svc\n"


def test_detect_reads_mounts_and_own_placement(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(MOUNTINFO)
    (tmp_path / "self" / "cgroup").write_text(SELF_CGROUP)
    h = placement.detect(tmp_path)
    assert h.v1["cpu"] == h.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert h.v1["devices"] == "/sys/fs/cgroup/devices"
    assert h.v2 == "/sys/fs/cgroup/unified"
    assert h.self_v1["cpu"] == "/box" and h.self_v2 == "/svc"
    assert placement.join(h.v1["cpu"], "/box", "/vmconfine/qemu/vm1") == \
        "/sys/fs/cgroup/cpu,cpuacct/box/vmconfine/qemu/vm1"
    assert placement.components("/m", "/box", "/a/b") == ["/m/box/a", "/m/box/a/b"]


def test_detect_with_nothing_mounted(tmp_path: Path) -> None:
    assert placement.detect(tmp_path).empty


# ---- the driver's plan --------------------------------------------------------------------------
def hybrid() -> placement.Hierarchies:
    return placement.Hierarchies(
        v1={"cpu": "/cg/cpu,cpuacct", "cpuacct": "/cg/cpu,cpuacct", "devices": "/cg/devices",
            "memory": "/cg/memory", "pids": "/cg/pids"},
        v2="/cg/unified", v2_controllers={"hugetlb"},
        self_v1={"memory": "/job"}, self_v2="/")


def driver(tmp_path: Path, *, bpf_ok: bool = True, backend: str | None = None,
           controllers: list[str] | None = None,
           hier: placement.Hierarchies | None = None) -> tuple[CgroupsDriver, Any]:
    host = make_host(tmp_path / "inst", [vmconfine_cgroups])
    host.instance.privileged = True
    host.config.driver_settings("cgroups").cgroup_controllers = controllers
    if backend is not None:
        host.config.driver_settings("cgroups").cgroup_devices_backend = backend
    info = host.registry.get("cgroups")
    assert info is not None and info.kind == "pipeline"
    drv: CgroupsDriver = info.factory(host)
    drv._hier = hier or hybrid()
    drv._bpf_ok = (True, "", 0) if bpf_ok else (False, "cannot load: Function not implemented", 38)
    return drv, make_ctx(host, XML.format(name="vm1", extra=""))


def test_auto_picks_bpf_on_a_hybrid_host(tmp_path: Path) -> None:
    drv, ctx = driver(tmp_path)
    plan = drv.plan(ctx)
    assert plan.devices == "v2"
    assert plan.devices_dir is not None and plan.devices_dir.startswith("/cg/unified/vmconfine/")
    assert "/cg/devices" not in plan.dirs  # v1 devices is not used as well
    assert plan.controllers["/cg/cpu,cpuacct"] == ["cpu", "cpuacct"]  # co-mounted: one dir
    assert plan.dirs["/cg/memory"].startswith("/cg/memory/job/vmconfine/")  # nested under own


def test_auto_falls_back_to_v1_without_bpf(tmp_path: Path) -> None:
    drv, ctx = driver(tmp_path, bpf_ok=False)
    plan = drv.plan(ctx)
    assert plan.devices == "v1" and plan.devices_dir == plan.dirs["/cg/devices"]


def test_forced_backends(tmp_path: Path) -> None:
    drv, ctx = driver(tmp_path, backend="v1")
    assert drv.plan(ctx).devices == "v1"
    drv, ctx = driver(tmp_path, backend="v2", bpf_ok=False)
    with pytest.raises(DriverError, match="cgroup_devices_backend"):
        drv.plan(ctx)
    drv, ctx = driver(tmp_path, backend="bogus")
    with pytest.raises(ConfigError, match="cgroup_devices_backend must be one of"):
        drv.plan(ctx)


def test_unknown_controller_message(tmp_path: Path) -> None:
    drv, ctx = driver(tmp_path, controllers=["cpu", "x"])
    with pytest.raises(ConfigError, match="Unknown cgroup controller 'x'"):
        drv.plan(ctx)


def test_devices_not_listed_means_no_filtering(tmp_path: Path) -> None:
    drv, ctx = driver(tmp_path, controllers=["cpu", "pids"])
    plan = drv.plan(ctx)
    assert plan.devices == "none" and "cgroup_controllers" in plan.reason
    assert set(plan.dirs) == {"/cg/cpu,cpuacct", "/cg/pids"}


def test_enabled_rules(tmp_path: Path) -> None:
    drv, _ctx = driver(tmp_path)
    host = drv.host
    assert drv.enabled(host=host) is True
    host.config.driver_settings("cgroups").cgroup_controllers = []
    assert drv.enabled(host=host) is False
    host.config.driver_settings("cgroups").cgroup_controllers = None
    host.instance.privileged = False
    drv._hier = placement.Hierarchies(v2=str(tmp_path / "no-such-cgroup"), self_v2="/")
    assert drv.enabled(host=host) is False  # session without a delegated subtree
    drv._hier = placement.Hierarchies()
    assert drv.probe(host=host)[0] is False


def test_copy_cpuset_fills_only_empty_files(tmp_path: Path) -> None:
    parent = tmp_path / "machine"
    leaf = parent / "dom"
    leaf.mkdir(parents=True)
    (parent / "cpuset.cpus").write_text("0-1\n")
    (parent / "cpuset.mems").write_text("0\n")
    (leaf / "cpuset.cpus").write_text("\n")  # a new group: empty
    (leaf / "cpuset.mems").write_text("1\n")  # already set: kept
    v1.copy_cpuset(str(leaf))
    assert (leaf / "cpuset.cpus").read_text() == "0-1"
    assert (leaf / "cpuset.mems").read_text() == "1\n"
    v1.copy_cpuset(str(tmp_path / "gone"))  # no files: nothing to do, no error
