"""`vmconfine host-validate` on this host: every check whose feature exists passes, and a
missing QEMU account or an instance directory QEMU cannot search is a FAIL with exit 1."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir
from tests.support import require
from vmconfine_landlock.syscalls import probe_abi as landlock_abi

pytestmark = pytest.mark.host


def checks(embed: Embed) -> tuple[int, dict[str, dict[str, str]]]:
    proc = embed.cli("host-validate", "--json")
    data = json.loads(proc.stdout)
    return proc.returncode, {c["name"]: c for c in data}


def test_passes_where_the_feature_exists(embed: Embed) -> None:
    rc, found = checks(embed)
    fails = [c for c in found.values() if c["status"] == "FAIL"]
    assert rc == 0 and not fails, fails
    assert found["QEMU user exists"]["status"] == "PASS"
    assert found["QEMU emulators"]["status"] == "PASS"
    assert found["TPM emulator (swtpm)"]["status"] == "PASS"
    assert "/usr/bin/swtpm_setup" in found["TPM emulator (swtpm)"]["detail"]
    assert "/usr/bin/qemu-system-x86_64" in found["QEMU emulators"]["detail"]
    assert found["security stack"]["status"] == "PASS"
    assert found["Python binding capng"]["status"] == "PASS"
    if os.path.exists("/dev/kvm"):
        assert found["/dev/kvm usable by QEMU"]["status"] == "PASS"
    if landlock_abi()[0] > 0:
        assert found["Landlock"]["status"] == "PASS"
        assert found["Landlock"]["detail"] == f"ABI {landlock_abi()[0]}"
    if Path("/sys/fs/cgroup").is_dir() and os.listdir("/sys/fs/cgroup"):
        assert found["cgroup hierarchies"]["status"] == "PASS"
        assert found["cgroup device filtering"]["status"] == "PASS"
    if not Path("/sys/fs/selinux/enforce").exists():
        assert found["SELinux"]["status"] == "WARN"  # not configured, so only a warning
    run_dir = embed.root / "run" / "qemu"
    assert found[f"xattrs trusted.* in {run_dir}"]["status"] == "PASS"
    text = embed.cli("host-validate").stdout.splitlines()
    assert text and all(ln.split()[0] in ("PASS", "WARN", "FAIL") for ln in text)


def test_missing_qemu_user_fails(embed: Embed) -> None:
    embed.configure('security_driver = "none"\nuser = "vmconfine-no-such-user"\n')
    rc, found = checks(embed)
    assert rc == 1
    check = found["QEMU user exists"]
    assert check["status"] == "FAIL" and "vmconfine-no-such-user" in check["detail"]
    assert "+ID" in check["fix"]
    line = next(ln for ln in embed.cli("host-validate").stdout.splitlines()
                if "QEMU user exists" in ln)
    assert line.startswith("FAIL") and "; fix: " in line


def test_unsearchable_instance_dir_fails(vm_dir: VmDir) -> None:
    locked = vm_dir.path / "locked"
    locked.mkdir(mode=0o700)
    embed = Embed(locked / "instance")
    embed.configure('security_driver = "none"\n')
    try:
        rc, found = checks(embed)
        assert rc == 1
        check = found[f"searchable by QEMU: {embed.root / 'run' / 'qemu'}"]
        assert check["status"] == "FAIL" and str(locked) in check["detail"]
        assert check["fix"].startswith(f"chmod o+x {locked}")
    finally:
        shutil.rmtree(locked, ignore_errors=True)


def test_configured_but_unavailable_driver_fails(embed: Embed) -> None:
    missing = [name for name, flag in (("apparmor", "/sys/module/apparmor/parameters/enabled"),
                                       ("selinux", "/sys/fs/selinux/enforce"))
               if not Path(flag).exists()]
    require(missing, "both AppArmor and SELinux are enabled here; no unavailable driver")
    name = missing[0]
    embed.configure(f'security_driver = "{name}"\n')
    rc, found = checks(embed)
    assert rc == 1
    assert found["AppArmor" if name == "apparmor" else "SELinux"]["status"] == "FAIL"
    assert found[f"driver {name}"]["status"] == "FAIL"
    assert found["security stack"]["status"] == "FAIL"
