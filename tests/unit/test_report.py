"""The confinement report built from domain XMLs with in-test drivers: its JSON shape, that it
changes nothing, the per-driver columns, the problems it detects and the diagnosis of a path
QEMU could not open."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmconfine_dac
from tests.support import builtin_roles, make_host, require_root
from vmconfine.domain import parse_domain
from vmconfine.errors import XMLError
from vmconfine.launch.connection import Connection
from vmconfine.perms import QemuIds, denial
from vmconfine.plugin import nop
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.report.build import build_report, denied_paths, open_failure_hint
from vmconfine.report.render import render_text
from vmconfine.report.validate import qemu_ids
from vmconfine_landlock.driver import access_letters as landlock_letters

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


class FakeLsm:
    """A security driver with an explain hook, a label pool and a list of denied paths."""

    def __init__(self, name: str = "fakelsm", *, available: bool = True,
                 deny: tuple[str, ...] = (), explain: bool = True) -> None:
        self.name = name
        self.available = available
        self.deny = deny
        self.pool: set[str] = set()
        self.gen_calls = 0
        if not explain:
            self.explain = None  # type: ignore[assignment]

    @hookimpl
    def probe(self, host: Any) -> tuple[bool, str]:
        return (self.available, "" if self.available else "kernel lacks it; install fakelsm")

    @hookimpl
    def model(self) -> str:
        return self.name

    @hookimpl
    def gen_label(self, ctx: Any, seclabel: Any) -> None:
        self.gen_calls += 1
        seclabel.label = f"{self.name}_t:s0:c1,c2"
        seclabel.imagelabel = f"system_u:object_r:{self.name}_image_t:s0:c1,c2"
        self.pool.add(seclabel.label)

    @hookimpl
    def release_label(self, ctx: Any, seclabel: Any) -> None:
        self.pool.discard(seclabel.label)

    @hookimpl
    def describe(self, ctx: Any) -> dict[str, Any]:
        sec = ctx.seclabel(self.name)
        return {"label": sec.label if sec else None, "summary": "fake confinement",
                "rules": list(getattr(self, "rules", []))}

    @hookimpl
    def explain(self, ctx: Any, resource: Any) -> dict[str, Any] | None:
        if resource.path in self.deny:
            return {"allows": False, "summary": "DENIED",
                    "why": f"{self.name} forbids {resource.path}; allow it in fakelsm.conf"}
        return {"allows": True, "summary": f"ok {resource.access}"}


class PlanningLsm(FakeLsm):
    """A driver whose gen_label would change the host: the report must only plan its label."""

    @hookimpl
    def plan_label(self, ctx: Any, seclabel: Any) -> None:
        seclabel.label = seclabel.imagelabel = f"{self.name}-{ctx.domain.uuid}"


def dac_denial(path: str, ids: QemuIds, want: int, **kw: Any) -> tuple[str, str, str] | None:
    found = denial(path, ids, want, **kw)
    return None if found is None else (found.message, found.fix, found.culprit)


def has_account(conn: Connection) -> bool:
    """Does the stack resolve QEMU's ids (root: the configured account exists)?"""
    return qemu_ids(conn.stack, None).ids is not None


def plugin(*drivers: FakeLsm) -> types.ModuleType:
    mod = types.ModuleType("fake_drivers")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        for d in drivers:
            registry.add(d.name, lambda host, d=d: d, f"test driver {d.name}",
                         **builtin_roles(d.name))

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A 0755 directory any QEMU account can search (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vmconfine-report-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def connect(root: Path, drivers: list[FakeLsm], config: str) -> Connection:
    host = make_host(root / "inst", [nop, vmconfine_dac, plugin(*drivers)], config=config)
    return Connection(host.instance, pm=host.pm, recover=False)


def files(d: Path, names: dict[str, int]) -> dict[str, Path]:
    out = {}
    for name, mode in names.items():
        p = d / name
        p.write_bytes(b"\0" * 4096)
        os.chmod(p, mode)
        out[name] = p
    return out


def rich_xml(d: Path, disk: Path | None = None) -> str:
    return f"""<domain type='qemu'>
  <name>r1</name><uuid>{UUID}</uuid><memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>{d}/code.fd</loader><nvram>{d}/vars.fd</nvram>
    <kernel>{d}/vmlinuz</kernel><initrd>{d}/initrd</initrd></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk or d / 'top.qcow2'}'/>
      <backingStore type='file'><format type='raw'/><source file='{d}/base.img'/>
        <backingStore/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{d}/r1.serial'/><target port='0'/></serial>
    <memballoon model='none'/></devices>
</domain>"""


CONF = 'security_driver = "fakelsm"\nuser = "+4242"\ngroup = "+4242"\n'


def _image_files(d: Path) -> dict[str, Path]:
    return files(d, {"code.fd": 0o644, "vars.fd": 0o644, "vmlinuz": 0o644, "initrd": 0o644,
                     "top.qcow2": 0o644, "base.img": 0o644})


def test_json_shape_lists_every_resource_with_each_driver(scratch: Path) -> None:
    _image_files(scratch)
    lsm = FakeLsm()
    conn = connect(scratch, [lsm], CONF)
    report = build_report(conn, parse_domain(rich_xml(scratch)))
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"domain", "uri", "stack", "resources", "process", "kernel", "drivers",
                         "problems", "differences"}
    assert data["domain"] == {"name": "r1", "uuid": UUID, "state": "defined", "pid": None}
    assert data["kernel"] is None and data["differences"] == []
    roles = {r["role"]: r for r in data["resources"]}
    for role in ("disk", "backing", "kernel", "initrd", "loader", "nvram", "chardev",
                 "devnode", "runtime_dir"):
        assert role in roles, role
    assert roles["backing"]["path"] == str(scratch / "base.img")
    assert roles["backing"]["access"] == "ro" and roles["disk"]["access"] == "rw"
    assert roles["disk"]["drivers"]["fakelsm"] == {"allows": True, "summary": "ok rw"}
    assert roles["disk"]["file"]["exists"] is True and roles["disk"]["file"]["mode"] == "0644"
    assert data["stack"][0]["name"] == "fakelsm"
    assert data["drivers"]["fakelsm"]["label"] == "fakelsm_t:s0:c1,c2"
    items = {p["item"]: p for p in data["process"]}
    assert items["no_new_privs"]["intended"] == "1"
    assert items["fakelsm label"]["intended"] == "fakelsm_t:s0:c1,c2"
    if os.geteuid() == 0:  # privileged: DAC is stacked and runs QEMU as +4242
        assert items["uid"]["intended"] == "4242"
        assert roles["disk"]["drivers"]["dac"]["during"] == "+4242:+4242"
        assert roles["backing"]["drivers"]["dac"]["restore"] is False
        assert "dac" not in roles["loader"]["drivers"] or \
            roles["loader"]["drivers"]["dac"]["action"] == "none"
    assert "r1" in render_text(report) and "Problems (" in render_text(report)
    # the serial file is opened by vmconfine and passed as an fd
    assert roles["chardev"]["passed"] == "fdset" and roles["disk"]["passed"] is None
    row = next(ln for ln in render_text(report).splitlines() if "r1.serial" in ln)
    assert "rw, passed as fd" in row
    if os.geteuid() == 0:
        assert roles["chardev"]["drivers"]["dac"]["summary"].endswith("(passed as fd)")
    assert not [p for p in data["problems"] if p.get("path") == str(scratch / "r1.serial")]


def test_report_changes_nothing_and_releases_labels(scratch: Path) -> None:
    _image_files(scratch)
    lsm = FakeLsm()
    aa = PlanningLsm("planner")
    conf = 'security_driver = ["fakelsm", "planner"]\nuser = "+4242"\ngroup = "+4242"\n'
    conn = connect(scratch, [lsm, aa], conf)

    def snap() -> dict[str, tuple[int, int, int, int]]:
        out = {}
        for p in sorted(scratch.rglob("*")):
            st = os.lstat(p)
            out[str(p)] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns)
        return out

    before = snap()
    report = build_report(conn, parse_domain(rich_xml(scratch)))
    assert snap() == before  # no chown, no journal, no runtime dir, no serial file
    assert not (scratch / "r1.serial").exists()
    assert lsm.gen_calls == 1 and lsm.pool == set()  # generated, then released
    assert aa.gen_calls == 0 and aa.pool == set()  # it has plan_label: only planned
    assert report.drivers["planner"]["label"] == f"planner-{UUID}"


def test_parent_dir_0700_is_a_problem_with_its_fix(scratch: Path) -> None:
    require_root()
    _image_files(scratch)
    private = scratch / "private"
    private.mkdir(mode=0o700)
    disk = files(private, {"top.qcow2": 0o644})["top.qcow2"]
    conn = connect(scratch, [FakeLsm()], CONF)
    report = build_report(conn, parse_domain(rich_xml(scratch, disk)))
    found = [p for p in report.problems if str(private) in p.message]
    assert len(found) == 1, report.problems
    assert found[0].severity == "error" and found[0].layer == "dac"
    assert f"chmod o+x {private}" in found[0].fix
    assert all(p.path != str(disk) for p in report.problems)  # the dir is the culprit
    assert report.errors


def test_dac_denial_without_root(scratch: Path) -> None:
    d = scratch / "locked"
    d.mkdir(mode=0o700)
    f = d / "img"
    f.write_text("x")
    os.chmod(f, 0o600)
    other = QemuIds(os.getuid() + 4242, os.getgid() + 4242)
    msg, fix, where = dac_denial(str(f), other, 4) or ("", "", "")
    assert where == str(d) and "cannot search directory" in msg and f"chmod o+x {d}" in fix
    os.chmod(d, 0o711)
    msg, fix, where = dac_denial(str(f), other, 4 | 2) or ("", "", "")
    assert where == str(f) and "cannot read and write" in msg and "0600" in msg
    assert dac_denial(str(f), other, 4, owner=(other.uid, other.gid)) is None  # once chowned
    assert dac_denial(str(f), QemuIds(os.getuid(), os.getgid()), 6) is None


def test_missing_disk_and_driver_denial_are_errors(scratch: Path) -> None:
    images = _image_files(scratch)
    os.unlink(images["vmlinuz"])
    lsm = FakeLsm(deny=(str(scratch / "initrd"),))
    conn = connect(scratch, [lsm], CONF)
    report = build_report(conn, parse_domain(rich_xml(scratch)))
    msgs = [p.text() for p in report.errors]
    assert any(f"{scratch}/vmlinuz does not exist" in m for m in msgs), msgs
    denial = [p for p in report.errors if p.layer == "fakelsm"]
    assert denial and "allow it in fakelsm.conf" in denial[0].message
    text = render_text(report)
    line = next(ln for ln in text.splitlines() if f"{scratch}/initrd " in ln)
    assert line.lstrip().startswith("!") and "DENIED" in line


def test_unavailable_driver_with_require_confined(scratch: Path) -> None:
    _image_files(scratch)
    conn = connect(scratch, [FakeLsm(available=False)],
                   CONF + "security_require_confined = 1\n")
    report = build_report(conn, parse_domain(rich_xml(scratch)))
    stack = [p for p in report.problems if p.layer == "stack"]
    assert stack and "fakelsm" in stack[0].message
    assert "security_require_confined = 1" in stack[0].message and stack[0].fix
    assert report.resources  # the report is still built from the drivers that work


def test_apparmor_column_from_profile_rules(scratch: Path) -> None:
    """The AppArmor driver's explain: the profile's .files rules that match each resource."""
    from tests.support import make_ctx, make_host
    from vmconfine_apparmor import report as aa_report

    images = _image_files(scratch)
    host = make_host(scratch / "inst", [nop], config=CONF)
    ctx = make_ctx(host, rich_xml(scratch))
    ctx.domain.add_seclabel("apparmor", "dynamic").label = f"vmconfine-{UUID}"
    desc = {"rules": [
        "# DO NOT EDIT",
        f'  "{images["top.qcow2"]}" rwk,',
        f'  "{images["base.img"]}" rk,',
        f'  deny "{images["base.img"]}" w,',
        f'  "{images["vars.fd"]}" rk,',
    ]}
    cols = {r.role: aa_report.column(ctx, r, desc) for r in ctx.resources}
    assert cols["disk"]["allows"] is True
    assert cols["backing"]["summary"] == "rk"
    assert cols["nvram"]["allows"] is False  # needs w, has rk
    assert cols["kernel"]["allows"] is None and str(images["vmlinuz"]) in cols["kernel"]["why"]


def test_selinux_column_through_the_report(scratch: Path) -> None:
    """The SELinux driver (fake libselinux backend) in a real report: its explain gives each
    resource the label set_all_labels would apply (libvirt's rules)."""
    from tests.unit.test_selinux_support import CONTENT_CONTEXT, fake_backend
    from tests.unit.test_selinux_support import plugin as selinux_plugin

    _image_files(scratch)
    host = make_host(scratch / "inst", [nop, vmconfine_dac,
                                        selinux_plugin(fake_backend(scratch), dac=False)],
                     config='security_driver = "selinux"\nuser = "+4242"\ngroup = "+4242"\n')
    conn = Connection(host.instance, pm=host.pm, recover=False)
    report = build_report(conn, parse_domain(rich_xml(scratch)))
    rows = {r.role: r for r in report.resources}
    assert not [p for p in report.problems if p.layer == "stack"], report.problems
    image = report.drivers["selinux"]["imagelabel"]
    assert image and ":svirt_image_t:" in image
    assert rows["disk"].drivers["selinux"]["during"] == image
    assert rows["backing"].drivers["selinux"]["during"] == CONTENT_CONTEXT
    assert rows["loader"].drivers["selinux"]["during"] is None  # left to the policy
    items = {p["item"]: p for p in report.process}
    assert items["selinux label"]["intended"] == report.drivers["selinux"]["label"]


QEMU_LOG = """2026-01-01T00:00:00.1Z qemu-system-x86_64: -drive file=/srv/a.img,format=raw,if=none,\
id=x: Could not open '/srv/a.img': Permission denied
qemu: could not open kernel file '/boot/k': Operation not permitted
qemu-system-x86_64: -chardev file,id=c,path=/srv/c.log: Could not open '/srv/c.log': No such file
Could not access KVM kernel module: Permission denied"""


def test_denied_paths_from_qemu_messages() -> None:
    assert denied_paths(QEMU_LOG) == [("/srv/a.img", "Permission denied"),
                                      ("/boot/k", "Operation not permitted"),
                                      ("/dev/kvm", "Permission denied")]
    assert denied_paths(" | ".join(QEMU_LOG.splitlines()))[0][0] == "/srv/a.img"
    assert denied_paths("qemu: terminating on signal 15") == []


def test_open_failure_hint_names_path_and_layer(scratch: Path) -> None:
    secret = files(scratch, {"secret.img": 0o600})["secret.img"]
    lsm = FakeLsm(deny=(str(secret),))
    conn = connect(scratch, [lsm], CONF)
    from vmconfine.plugin.context import DomainContext
    from vmconfine.report.build import MemoryJournal

    _image_files(scratch)
    ctx = DomainContext(conn.host, parse_domain(rich_xml(scratch)), MemoryJournal())
    conn.stack.gen_labels(ctx)
    hint = open_failure_hint(conn, ctx, f"x: Could not open '{secret}': Permission denied")
    assert hint.startswith(f"; QEMU could not open {secret} (Permission denied): denied by")
    assert "fakelsm: fakelsm forbids" in hint
    if os.geteuid() == 0 and has_account(conn):
        assert "DAC:" in hint and "0600" in hint  # +4242 is neither owner nor in the group
    assert open_failure_hint(conn, ctx, "all good") == ""


def test_landlock_letters() -> None:
    assert landlock_letters(["read_file", "write_file", "truncate"]) == "rwt"
    assert landlock_letters(["read_dir", "make_sock", "remove_file"]) == "dmu"
    assert landlock_letters([]) == "-"


def test_start_checks_are_problems(scratch: Path) -> None:
    """What `run` stops at before QEMU starts is a problem of the report too: an emulator
    that does not exist. (A disk without <source> never gets this far: the XML is refused
    when it is read, see test_empty_source_file_is_refused_when_read.)"""
    _image_files(scratch)
    conn = connect(scratch, [FakeLsm()], CONF)
    xml = rich_xml(scratch).replace("/usr/bin/qemu-system-x86_64", f"{scratch}/no-qemu")
    report = build_report(conn, parse_domain(xml))
    msgs = [p.text() for p in report.errors]
    assert any(f"Cannot check QEMU binary {scratch}/no-qemu: No such file" in m
               for m in msgs), msgs
    assert "Problems (0)" not in render_text(report)


def test_empty_source_file_is_refused_when_read(scratch: Path) -> None:
    """libvirt's "missing source information for device vda", for `confinement` as for
    `run` (QEMU would stop with "No drive specified")."""
    xml = rich_xml(scratch).replace(f"<source file='{scratch / 'top.qcow2'}'/>",
                                    "<source file=''/>")
    xml = xml.replace("<backingStore type='file'><format type='raw'/><source file='"
                      f"{scratch}/base.img'/>\n        <backingStore/></backingStore>", "")
    with pytest.raises(XMLError, match=r"line \d+: missing source information for device vda"):
        parse_domain(xml)
    no_source = rich_xml(scratch).replace("<memballoon model='none'/>",
                                          "<disk type='file' device='disk'><target dev='vdb' "
                                          "bus='virtio'/></disk><memballoon model='none'/>")
    with pytest.raises(XMLError, match="missing source information for device vdb"):
        parse_domain(no_source)
