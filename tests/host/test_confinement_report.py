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
from vmconfine.report.validate import landlock_abi

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
