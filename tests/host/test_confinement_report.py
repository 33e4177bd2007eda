"""`vmconfine confinement` on this host: a domain XML before start (nothing changes), a running
domain read back from the kernel (QEMU's uid, NoNewPrivs, capabilities, cgroup, device rules,
Landlock rules), a difference marked after tampering, and the diagnosis of a path QEMU could
not open at start."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.host.conftest import Embed, VmDir, proc_status, qemu_pid
from tests.support import require
from vmconfine_landlock.syscalls import probe_abi as landlock_abi

pytestmark = pytest.mark.host

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def report(embed: Embed, target: str) -> tuple[int, dict[str, Any]]:
    proc = embed.cli("confinement", "--json", target)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["item"]: r for r in data["process"]}


def tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        st = os.lstat(p)
        out[str(p)] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def landlock_embed(embed: Embed) -> Embed:
    require(landlock_abi()[0] > 0, "the kernel has no Landlock")
    embed.configure('security_driver = "landlock"\n')
    return embed


def test_running_domain_kernel_view(landlock_embed: Embed, vm_dir: VmDir) -> None:
    embed = landlock_embed
    xml = vm_dir.domain_xml("rep1")
    embed.start(xml)
    pid = qemu_pid(embed, "rep1")
    status = proc_status(pid)
    rc, data = report(embed, "rep1")
    assert data["domain"]["state"] == "running" and data["domain"]["pid"] == pid
    assert data["differences"] == [] and rc == 0, data["differences"]
    items = rows(data)
    uid = status["Uid"].split()[0]
    assert uid != "0" and items["uid"]["kernel"] == " ".join([uid] * 4)
    assert items["uid"]["intended"] == uid and not items["uid"]["differs"]
    assert items["no_new_privs"]["kernel"] == "1"
    caps = items["capabilities"]["kernel"]
    assert "CapEff=0000000000000000" in caps and "CapBnd=0000000000000000" in caps
    assert items["seccomp sandbox"]["kernel"] == "filter"
    cgroup_rows = [r for k, r in items.items() if k.startswith("cgroup (")]
    assert cgroup_rows and all("/rep1" in (r["kernel"] or "") or r["kernel"] == "/"
                               for r in cgroup_rows), cgroup_rows
    assert any(r["kernel"].endswith("/rep1") for r in cgroup_rows)
    assert "c 1:3 rw" in data["drivers"]["cgroups"]["rules"]
    assert items["landlock ruleset"]["intended"].startswith("landlock:abi")
    assert data["drivers"]["landlock"]["rules"]
    disk = next(r for r in data["resources"] if r["role"] == "disk")
    assert {"read_file", "write_file"} <= set(disk["drivers"]["landlock"]["access"])
    assert disk["drivers"]["dac"]["during"] == f"+{uid}:+{status['Gid'].split()[0]}"
    assert disk["file"]["owner"] == disk["drivers"]["dac"]["during"]
    null = next(r for r in data["resources"] if r["path"] == "/dev/null")
    assert null["drivers"]["cgroups"]["device"] == "c 1:3"
    assert null["drivers"]["cgroups"]["allows"] is True
    text = embed.cli("confinement", "rep1").stdout
    assert f"running, pid {pid}" in text and "Differences from what vmconfine applied (0)" in text


def test_tampering_is_marked(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("rep2")
    image = vm_dir.path / "rep2.img"
    embed.start(xml)
    rc, data = report(embed, "rep2")
    assert rc == 0 and data["differences"] == [], (data["differences"], data["problems"])
    os.chown(image, 4321, 4321)
    rc, data = report(embed, "rep2")
    assert rc == 1
    diffs = [d for d in data["differences"] if str(image) in d]
    assert diffs and "+4321:+4321" in diffs[0] and "dac" in diffs[0], data["differences"]
    disk = next(r for r in data["resources"] if r["path"] == str(image))
    assert disk["differences"]
    line = next(ln for ln in embed.cli("confinement", "rep2").stdout.splitlines()
                if str(image) in ln and " disk " in ln)
    assert line.lstrip().startswith("!")


def test_domain_xml_report_changes_nothing(landlock_embed: Embed, vm_dir: VmDir) -> None:
    embed = landlock_embed
    xml = vm_dir.domain_xml("rep3")
    before = tree(vm_dir.path)
    rc, data = report(embed, str(xml))
    assert tree(vm_dir.path) == before  # no chown, no journal, no runtime dirs, no serial file
    assert rc == 0, data["problems"]
    assert data["domain"]["state"] == "defined" and data["kernel"] is None
    cg = data["drivers"]["cgroups"]
    assert cg["planned"] is True
    assert not any(os.path.exists(d) for d in cg["dirs"].values())  # no cgroup was created
    serial = next(r for r in data["resources"] if r["role"] == "chardev")
    assert serial["file"]["exists"] is False
    # the serial file is opened by vmconfine and QEMU gets the fd: nothing to chown or allow
    assert serial["passed"] == "fdset"
    assert serial["drivers"]["dac"]["during"] is None
    assert serial["drivers"]["dac"]["summary"].endswith("(passed as fd)")
    assert serial["drivers"]["landlock"]["summary"] == "passed as fd (no rule needed)"
    assert data["drivers"]["landlock"]["label"].startswith("landlock:abi")


def test_private_parent_dir_is_reported_with_fix(embed: Embed, vm_dir: VmDir) -> None:
    private = vm_dir.path / "private"
    private.mkdir(mode=0o700)
    image = vm_dir.image("private/rep4.img")
    xml = vm_dir.domain_xml("rep4", image=image)
    rc, data = report(embed, str(xml))
    assert rc == 1
    found = [p for p in data["problems"] if str(private) in p["message"]]
    assert found and found[0]["severity"] == "error"
    assert f"chmod o+x {private}" in found[0]["fix"]


def test_eacces_at_start_names_path_and_layer(embed: Embed, vm_dir: VmDir) -> None:
    secret = vm_dir.path / "secret.img"
    with open(secret, "wb") as f:
        f.truncate(1 << 20)
    os.chown(secret, 4321, 4321)
    os.chmod(secret, 0o600)
    extra = (f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-drive'/>"
             f"<qemu:arg value='file={secret},format=raw,if=none,id=extra0'/>"
             "</qemu:commandline>")
    xml = vm_dir.domain_xml("rep5", extra=extra)
    proc = embed.cli("run", str(xml))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert f"QEMU could not open {secret} (Permission denied): denied by DAC" in err, err
    assert "+4321:+4321 0600" in err and f"chown vmconfine-qemu:vmconfine-qemu {secret}" in err
    # the start was undone: the image QEMU did get is its owner's again
    assert os.stat(vm_dir.path / "rep5.img").st_uid == 0


def test_domain_xml_report_finds_what_run_stops_at(embed: Embed, vm_dir: VmDir) -> None:
    """`confinement FILE.xml` reports what `run` refuses before QEMU starts: the domain (or its
    UUID) is already running, the emulator does not exist; both with the start's own words."""
    xml = vm_dir.domain_xml("rep6")
    embed.start(xml)
    rc, data = report(embed, str(xml))
    assert rc == 1
    errors = [p["message"] for p in data["problems"] if p["severity"] == "error"]
    assert any("domain 'rep6' is already running" in m for m in errors), errors
    again = embed.cli("run", str(xml))
    assert again.returncode == 1 and "domain 'rep6' is already running" in again.stderr
    twin = vm_dir.path / "rep6b.xml"
    twin.write_text(xml.read_text().replace("<name>rep6</name>", "<name>rep6b</name>")
                    .replace("/usr/bin/qemu-system-x86_64", f"{vm_dir.path}/no-qemu"))
    rc, data = report(embed, str(twin))
    errors = [p["message"] for p in data["problems"] if p["severity"] == "error"]
    assert rc == 1 and any("same UUID" in m and "'rep6'" in m for m in errors), errors
    assert any(f"Cannot check QEMU binary {vm_dir.path}/no-qemu" in m for m in errors), errors
    embed.cli("destroy", "rep6", check=True)
    rc, data = report(embed, str(twin))
    errors = [p["message"] for p in data["problems"] if p["severity"] == "error"]
    assert not any("same UUID" in m for m in errors), errors
    proc = embed.cli("run", str(twin))
    assert proc.returncode == 1
    assert f"Cannot check QEMU binary {vm_dir.path}/no-qemu: No such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unprivileged_kvm_advice_is_group_membership(vm_dir: VmDir) -> None:
    """An unprivileged instance with <domain type='kvm'> and a caller outside /dev/kvm's
    group: the fix is `usermod -aG`, never a chown/chmod of the device node."""
    import grp
    import shutil
    import subprocess

    from tests.host.conftest import VMCONFINE

    require(shutil.which("setpriv"), "setpriv is missing (util-linux)")
    require(os.path.exists("/dev/kvm"), "/dev/kvm is missing")
    st = os.stat("/dev/kvm")
    require(not st.st_mode & 0o006 and st.st_gid != 0, "/dev/kvm is world-usable here")
    nobody = 65534
    require(st.st_gid != nobody, "/dev/kvm belongs to nobody's group")
    home = vm_dir.path / "nobody"
    home.mkdir()
    os.chown(home, nobody, nobody)
    xml = vm_dir.domain_xml("rep7", virt_type="kvm")
    proc = subprocess.run(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", VMCONFINE,
         "-c", f"qemu:///embed?root={home}/inst", "confinement", "--json", str(xml)],
        capture_output=True, text=True, timeout=120, env={"HOME": str(home), "PATH":
                                                          os.environ.get("PATH", "")})
    assert proc.stdout, proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    kvm = [p for p in problems if p.get("path") == "/dev/kvm"]
    group = grp.getgrgid(st.st_gid).gr_name
    assert kvm and kvm[0]["layer"] == "permissions", problems
    assert f"usermod -aG {group} nobody" in kvm[0]["fix"], kvm
    assert "chown" not in kvm[0]["fix"] and "chmod" not in kvm[0]["fix"], kvm


def test_domain_xml_report_sees_a_start_in_progress(embed: Embed, vm_dir: VmDir) -> None:
    """A `run` of the same domain that has begun (paused right after its journal's begin):
    the report says what a second `run` would."""
    xml = vm_dir.domain_xml("rep8")
    embed.start(xml, env={**os.environ, "VMCONFINE_PAUSE_AT": "begin"}, wait_for="paused at begin")
    rc, data = report(embed, str(xml))
    errors = [p["message"] for p in data["problems"] if p["severity"] == "error"]
    assert rc == 1 and any("'rep8' is being started by another process" in m
                           for m in errors), errors
    second = embed.cli("run", str(xml))
    assert second.returncode == 1 and "is being started by another process" in second.stderr
