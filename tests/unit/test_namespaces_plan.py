"""Planning QEMU's view (vmconfine_namespaces.plan / driver), on a fake host tree: nothing is
mounted here; the host tier builds the views on the real kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmconfine_namespaces.driver import expected_children, summary
from vmconfine_namespaces.plan import (
    EXECUTABLE,
    Builder,
    Entry,
    PlanError,
    View,
    Wanted,
    dev_entries,
    order,
    root_entries,
)


class FakeHost:
    """Host paths mapped under ``base`` (``/dev/null`` -> ``base/dev/null``)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def p(self, path: str) -> Path:
        return self.base / path.lstrip("/")

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(self.p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self.p(path))

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.p(path))

    def isdir(self, path: str) -> bool:
        return self.p(path).is_dir()

    def file(self, path: str) -> None:
        self.p(path).parent.mkdir(parents=True, exist_ok=True)
        self.p(path).write_text("")

    def dir(self, path: str) -> None:
        self.p(path).mkdir(parents=True, exist_ok=True)

    def link(self, path: str, target: str) -> None:
        self.p(path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, self.p(path))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    h = FakeHost(tmp_path)
    for n in ("null", "zero", "urandom", "kvm", "ptmx", "tty", "vda", "mem"):
        h.file(f"/dev/{n}")
    h.dir("/dev/pts")
    h.dir("/dev/shm")
    h.link("/dev/rtc", "rtc0")
    h.file("/dev/rtc0")
    h.link("/dev/disk/by-id/ata-X", "../../vda")
    return h


def builder(host: FakeHost, mode: str = "mount") -> Builder:
    return Builder(View(mode), lstat=host.lstat, readlink=host.readlink)


def test_private_dev_holds_the_acl_nodes_that_exist_and_the_domains(host: FakeHost) -> None:
    b = builder(host)
    nodes = [("/dev/null", "acl", False), ("/dev/kvm", "acl", False),
             ("/dev/missing", "acl", False), ("/dev/ptmx", "acl", False),
             ("/dev/disk/by-id/ata-X", "disk", True), ("/dev/rtc", "acl", False),
             ("/dev/gone", "disk", True)]
    dev_entries(b, nodes, root_view=False, host_has=host.isdir)
    order(b.view)
    names = b.view.dev_names()
    assert names == {"null", "kvm", "ptmx", "disk", "disk/by-id", "disk/by-id/ata-X", "vda",
                     "rtc", "rtc0", "pts", "shm", "fd", "stdin", "stdout", "stderr"}
    assert "mem" not in names and "tty" not in names
    link = b.view.by_path("/dev/disk/by-id/ata-X")
    assert (link.kind, link.source) == ("symlink", "../../vda")
    assert b.view.by_path("/dev/vda").kind == "bind"
    assert b.view.notes == ["/dev/gone (disk) does not exist on the host"]
    # a devpts instance of QEMU's own, /dev/ptmx its ptmx; the host's shm kept (libvirt)
    assert b.view.by_path("/dev/pts").kind == "devpts"
    assert b.view.by_path("/dev/ptmx") == Entry("/dev/ptmx", "symlink", "pts/ptmx", role="acl")
    assert b.view.by_path("/dev/shm").source == "/dev/shm"
    # ... and the tmpfs is size-limited like libvirt's
    assert b.view.by_path("/dev").options == "mode=755,size=65536"
    paths = [e.path for e in b.view.entries]
    assert paths.index("/dev/disk") < paths.index("/dev/disk/by-id") < \
        paths.index("/dev/disk/by-id/ata-X")


def test_user_namespace_gets_its_own_pts_instance(host: FakeHost) -> None:
    b = builder(host)
    b.view.userns = True  # no mknod there
    dev_entries(b, [("/dev/ptmx", "acl", False)], root_view=False, host_has=host.isdir)
    assert b.view.by_path("/dev/pts").kind == "devpts"
    assert b.view.by_path("/dev/ptmx").kind == "symlink"
    assert b.view.by_path("/dev/shm").kind == "bind"  # the host's, as libvirt


def test_root_view_dev_gets_its_own_pts_instance_and_shm(host: FakeHost) -> None:
    b = builder(host, "root")
    dev_entries(b, [("/dev/ptmx", "acl", False), ("/dev/null", "acl", False)], root_view=True,
                host_has=host.isdir)
    assert b.view.by_path("/dev/pts").kind == "devpts"
    assert "newinstance" in b.view.by_path("/dev/pts").options
    assert b.view.by_path("/dev/ptmx") == Entry("/dev/ptmx", "symlink", "pts/ptmx", role="acl")
    assert b.view.by_path("/dev/shm").kind == "tmpfs"


def test_dotdot_and_symlink_loops_are_refused(host: FakeHost) -> None:
    b = builder(host)
    with pytest.raises(PlanError, match=r"without '\.\.'"):
        b.walk("/dev/../etc/shadow", "disk", readonly=False, top="/dev")
    host.link("/dev/loop-a", "loop-b")
    host.link("/dev/loop-b", "loop-a")
    with pytest.raises(PlanError, match="too many levels"):
        b.walk("/dev/loop-a", "acl", readonly=False, top="/dev")


def test_root_view_binds_resources_at_their_own_paths(host: FakeHost) -> None:
    host.file("/usr/bin/qemu")
    host.dir("/usr/share/qemu")
    host.file("/usr/share/qemu/bios.bin")
    host.link("/lib64", "usr/lib64")
    host.file("/usr/lib64/ld.so")
    host.file("/img/a/disk.img")
    host.file("/img/a/base.img")
    host.file("/img/a/other-domain.img")
    host.dir("/run/vm/domain-a")
    host.dir("/lib/vm/domain-a")
    host.dir("/logs")
    b = builder(host, "root")
    root_entries(
        b, emulator_paths=["/usr/bin/qemu", "/lib64/ld.so"],
        emulator_dirs=["/usr/share/qemu"],
        wanted=[Wanted("/img/a/disk.img", "disk", True), Wanted("/img/a/base.img", "backing",
                                                                False),
                Wanted("/usr/share/qemu/bios.bin", "loader", False),
                Wanted("/run/vm/domain-a/vnc.sock", "graphics", True, create=True),
                Wanted("/logs/serial.log", "chardev", True, create=True),
                Wanted("/img/a/missing.iso", "disk", False)],
        private_dirs=["/run/vm/domain-a", "/lib/vm/domain-a"], exists=host.exists,
        executable="/usr/bin/qemu")
    order(b.view)
    v = b.view
    # the binary QEMU is exec'd from is marked: its bind is the one without nosuid
    assert v.by_path("/usr/bin/qemu").role == EXECUTABLE
    assert v.by_path("/usr/lib64/ld.so").role == "emulator"
    assert v.by_path("/img/a/disk.img").readonly is False
    assert v.by_path("/img/a/base.img").readonly is True
    assert "/img/a/other-domain.img" not in {e.path for e in v.entries}
    assert v.find("/img/a/other-domain.img") is None  # a sibling stays out of the view
    assert v.by_path("/img/a").kind == "dir"  # made in the view, not the host's directory
    assert v.by_path("/lib64") == Entry("/lib64", "symlink", "usr/lib64", role="emulator")
    assert v.by_path("/usr/lib64/ld.so").kind == "bind"
    # covered by bound directories: no entries of their own
    assert v.find("/usr/share/qemu/bios.bin") == v.by_path("/usr/share/qemu")
    assert v.find("/run/vm/domain-a/vnc.sock") == v.by_path("/run/vm/domain-a")
    # a file QEMU creates outside its own directories: that directory, noted
    assert v.by_path("/logs").is_dir and not v.by_path("/logs").readonly
    assert any("/logs/serial.log" in n for n in v.notes)
    assert "/img/a/missing.iso (disk) does not exist on the host" in v.notes
    assert v.entries[0].path == "/"
    assert v.top_names() == {"usr", "lib64", "img", "run", "lib", "logs", "tmp", "proc"}
    assert v.by_path("/proc/self") == Entry("/proc/self", "symlink", "@pid", role="proc")
    assert v.by_path("/proc/@pid").kind == "bind"
    assert expected_children(v)["/proc"] == {"@pid", "self", "thread-self"}
    kids = expected_children(v)
    assert kids["/"] == v.top_names()
    assert kids["/img/a"] == {"disk.img", "base.img"}
    assert "/tmp" not in kids  # QEMU may write there


def test_read_write_need_widens_a_read_only_entry(host: FakeHost) -> None:
    host.file("/img/shared.img")
    b = builder(host, "root")
    b.walk("/img/shared.img", "backing", readonly=True)
    b.walk("/img/shared.img", "disk", readonly=False)
    assert b.view.by_path("/img/shared.img").readonly is False
    b.walk("/img/shared.img", "backing", readonly=True)
    assert b.view.by_path("/img/shared.img").readonly is False


def test_view_round_trips_through_json_and_summarises(host: FakeHost) -> None:
    b = builder(host, "root")
    b.view.userns = True
    dev_entries(b, [("/dev/null", "acl", False)], root_view=True, host_has=host.isdir)
    again = View.from_json(b.view.to_json())
    assert again == b.view
    text = summary(again, "mnt:[1]")
    assert text.startswith("own mount namespace (mnt:[1]), private /dev: ")
    assert "null" in text and "in a user namespace, no capabilities" in text


# ---- the driver's availability policy (libvirt: default on when available; configured but
# unavailable is an error, never a silent start without namespaces) ------------------------

XML = """<domain type='qemu'><name>nsu</name>
<uuid>5a2c1cf0-2222-4e0e-9d7a-3a5d2b6c7e01</uuid><memory>65536</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='block' device='disk'><driver name='qemu' type='raw'/>
<source dev='/dev/null'/><target dev='hda' bus='ide'/></disk></devices></domain>"""


def _driver(tmp_path: Path, conf: str):  # type: ignore[no-untyped-def]
    import vmconfine_namespaces
    from tests.support import make_host
    from vmconfine_namespaces.driver import NamespacesDriver

    host = make_host(tmp_path / "inst", [vmconfine_namespaces], config=conf)
    return host, NamespacesDriver(host)


@pytest.mark.parametrize("conf,enabled", [("", True), ('namespaces = [ "mount" ]\n', True),
                                          ("namespaces = [ ]\n", False)])
def test_unavailable_default_is_skipped_but_configured_refuses_to_start(
        tmp_path: Path, conf: str, enabled: bool) -> None:
    from tests.support import make_ctx
    from vmconfine.errors import DriverError

    host, drv = _driver(tmp_path, conf)
    drv._avail = (False, "this kernel has no mount namespaces")
    explicit = conf.startswith("namespaces = [ \"")
    if not enabled:
        assert drv.enabled(host=host) is False
        return
    assert drv.enabled(host=host) is explicit
    ok, why = drv.probe(host=host)
    assert ok is explicit and "no mount namespaces" in why
    if explicit:
        with pytest.raises(DriverError, match='the "mount" namespace is not available: this '
                                              "kernel has no mount namespaces"):
            drv.preflight(ctx=make_ctx(host, XML))


def test_block_disk_node_is_planned_into_dev(tmp_path: Path) -> None:
    from tests.support import make_ctx

    host, drv = _driver(tmp_path, "")
    drv._avail = (True, "")
    ctx = make_ctx(host, XML)
    view = drv.view(ctx)
    assert view.mode == "mount" and view.by_path("/dev/null").role in ("acl", "disk")
    desc = drv.describe(ctx=ctx)
    assert desc["mode"] == "mount" and "null" in desc["dev"]
    from vmconfine.plugin.resources import Resource

    assert drv.explain(ctx=ctx, resource=Resource("/dev/null", "disk", "rw"))["allows"]
    gone = drv.explain(ctx=ctx, resource=Resource("/dev/vda", "disk", "rw"))
    assert gone["allows"] is False and "cgroup_device_acl" in gone["why"]
    assert drv.explain(ctx=ctx, resource=Resource("/var/x.img", "disk", "rw")) is None


def test_own_directories_not_yet_made_never_expose_their_parent(host: FakeHost) -> None:
    """Before start (a report), the runtime and home directories do not exist yet: they are
    planned as themselves, never as "QEMU creates it, bind the parent" (which would show
    every domain's runtime directory)."""
    host.dir("/run/vm")
    b = builder(host, "root")
    root_entries(b, emulator_paths=[], emulator_dirs=[],
                 wanted=[Wanted("/run/vm/domain-a", "runtime_dir", True, create=True,
                                is_dir=True),
                         Wanted("/run/vm/domain-a/vnc.sock", "graphics", True, create=True)],
                 private_dirs=["/run/vm/domain-a"], exists=host.exists)
    assert b.view.by_path("/run/vm/domain-a").kind == "bind"
    assert b.view.by_path("/run/vm").kind == "dir"
    assert b.view.notes == []


def test_host_validate_lines() -> None:
    from vmconfine_namespaces.report import host_checks

    assert host_checks((True, ""), ["mount"], privileged=True, explicit=False)[0]["status"] \
        == "PASS"
    bad = host_checks((False, "no userns"), ["mount", "root"], privileged=False, explicit=True)
    assert bad[0]["status"] == "FAIL" and "user namespaces" in bad[0]["fix"]
    assert host_checks((False, "x"), ["mount"], privileged=True, explicit=False)[0]["status"] \
        == "WARN"


def test_process_rows_before_start() -> None:
    from vmconfine_namespaces.report import process_rows

    view = View("mount", entries=[Entry("/dev", "tmpfs"), Entry("/dev/null", "bind", "/dev/null")])
    rows = process_rows(view, None, expected_children(view))
    assert [r["item"] for r in rows] == ["mount namespace", "/dev in QEMU's view"]
    assert rows[1]["intended"] == "null" and rows[1]["kernel"] is None
    assert not any(r["differs"] for r in rows)
