"""``<memoryBacking><hugepages/>`` for real: a private hugetlbfs mount, pages reserved for the
test, a guest whose RAM QEMU maps from a file in ``<mount>/vmconfine/<uuid>``.

QEMU runs as the QEMU account (DAC appended on a privileged instance) and, in the second
round, under Landlock in enforce mode: it can only create its RAM file because the directory
is a resource every driver grants. The control is a mount vmconfine was not told about: the
domain is refused in one line before anything is created. The reserved pages and the mount
are given back in a finally.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.support import require
from vmconfine_landlock import syscalls

pytestmark = pytest.mark.host

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_PAGES = 16  # 32 MiB of 2 MiB pages (conftest's guest)


def meminfo(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    assert m, key
    return int(m.group(1))


@pytest.fixture
def hugetlbfs(vm_dir: VmDir) -> Iterator[Path]:
    require(os.geteuid() == 0, "mounting hugetlbfs needs root")
    require("hugetlbfs" in Path("/proc/filesystems").read_text(), "no hugetlbfs in this kernel")
    require(meminfo("Hugepagesize") == 2048, "the default huge page size is not 2 MiB")
    mnt = vm_dir.path / "huge"
    mnt.mkdir()
    before = NR_HUGEPAGES.read_text()
    proc = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "vmc-test", str(mnt)],
                          capture_output=True, text=True, check=False)
    require(proc.returncode == 0, f"cannot mount hugetlbfs: {proc.stderr.strip()}")
    try:
        NR_HUGEPAGES.write_text(str(int(before) + 2 * GUEST_PAGES))
        require(meminfo("HugePages_Free") >= 2 * GUEST_PAGES, "the kernel found no free huge "
                "pages to reserve")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        NR_HUGEPAGES.write_text(before)


def _ram_mapping(pid: int, where: Path) -> list[str]:
    return [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if str(where) in ln]


def test_guest_ram_comes_from_hugetlbfs(embed: Embed, vm_dir: VmDir, hugetlbfs: Path) -> None:
    drivers = ['"none"']
    abi, _why = syscalls.probe_abi()
    if abi > 0:
        drivers.append('"landlock"\nlandlock_mode = "enforce"')
    for n, driver in enumerate(drivers):
        embed.configure(f"security_driver = {driver}\nhugetlbfs_mount = \"{hugetlbfs}\"\n")
        name = f"huge{n}"
        xml = vm_dir.domain_xml(name, extra="<memoryBacking><hugepages/></memoryBacking>")
        free = meminfo("HugePages_Free")
        run = embed.start(xml)
        pid = qemu_pid(embed, name)
        uuid = re.search(r"<uuid>([^<]+)</uuid>", xml.read_text())
        assert uuid
        where = hugetlbfs / "vmconfine" / uuid.group(1)
        mapped = _ram_mapping(pid, where)
        assert mapped and all("(deleted)" in ln for ln in mapped), mapped
        assert free - meminfo("HugePages_Free") >= GUEST_PAGES - 1  # prealloc: all faulted in
        st = where.stat()
        assert st.st_uid == int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
        assert (st.st_mode & 0o777) == 0o750
        embed.cli("destroy", name, check=True)
        assert run.wait(timeout=60) == 0, run.stderr.read() if run.stderr else ""
        assert not where.exists()
        deadline = time.monotonic() + 10
        while meminfo("HugePages_Free") < free and time.monotonic() < deadline:
            time.sleep(0.05)
        assert meminfo("HugePages_Free") == free


def test_unconfigured_mount_is_refused_before_any_change(embed: Embed, vm_dir: VmDir,
                                                          hugetlbfs: Path) -> None:
    other = vm_dir.path / "not-a-mount"
    other.mkdir()
    embed.configure(f'security_driver = "none"\nhugetlbfs_mount = "{other}"\n')
    xml = vm_dir.domain_xml("hugeno", extra="<memoryBacking><hugepages/></memoryBacking>")
    img = vm_dir.path / "hugeno.img"
    owner = img.stat().st_uid
    proc = embed.cli("run", str(xml), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "hugetlbfs is not mounted" in proc.stderr
    assert "hugetlbfs_mount in qemu.conf names no such mount" in proc.stderr
    assert img.stat().st_uid == owner
    assert not (hugetlbfs / "vmconfine").exists() and not (other / "vmconfine").exists()
