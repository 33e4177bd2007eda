"""Guest side of the AppArmor driver's lsm-tier test: runs INSIDE the AppArmor guest.

The real driver and the real vmconfine-aa-helper generate and load per-domain profiles into an
enforcing kernel; a process moved into domain A's profile (exactly as the forked QEMU child
is, through the driver's ``child_exec_label``) must read and write A's disk and be denied B's
disk, a file no rule names and /etc/shadow. A deliberately over-broad profile must make the same
probe report the leak (so the denial checks can fail). Teardown must unload the profile.
``vmconfine run`` with a real QEMU under its profile is tests/lsm/guest_e2e.py, run in the same
boot.

Observations go to ``$VMCONFINE_GUEST_RESULTS/apparmor-driver.json`` for the host side.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lsm_guest

LSM = os.environ.get("VMCONFINE_LSM", "")
RESULTS = Path(os.environ.get("VMCONFINE_GUEST_RESULTS", "/run/out"))
WORK = Path("/run/vmconfine-aa")
PROFILES_LIST = Path("/sys/kernel/security/apparmor/profiles")
OBSERVED: dict[str, Any] = {}

XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def record(key: str, value: Any) -> None:
    OBSERVED[key] = value
    (RESULTS / "apparmor-driver.json").write_text(json.dumps(OBSERVED, indent=1, sort_keys=True))


def loaded() -> dict[str, str]:
    out = {}
    for line in PROFILES_LIST.read_text().splitlines():
        name, _, mode = line.rpartition(" (")
        out[name] = mode.rstrip(")")
    return out


@pytest.fixture(scope="module")
def work() -> Path:
    if LSM != "apparmor":
        pytest.skip(f"guest booted with {LSM or 'no'} LSM, not apparmor")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    return WORK


def make_driver(base: Path, profiles: Path):  # type: ignore[no-untyped-def]
    import vmconfine_apparmor
    from tests.support import make_host
    from vmconfine_apparmor.driver import AppArmorDriver

    host = make_host(base / "root", [vmconfine_apparmor],
                     config=f'apparmor_profile_dir = "{profiles}"\n')
    return host, AppArmorDriver(host)


def domain_ctx(host, name: str, disk: Path, uuid: str | None = None):  # type: ignore[no-untyped-def]
    from tests.support import make_ctx

    xml = XML.format(name=name, uuid=uuid or uuidlib.uuid4(), disk=disk,
                     serial=disk.parent / "s.log")
    ctx = make_ctx(host, xml)
    ctx.domain.add_seclabel("apparmor", "dynamic", implicit=True)
    return ctx


def probe_in_profile(driver, ctx, paths: dict[str, tuple[Path, str]]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Fork; the child enters the domain's profile through the driver's child hook and tries
    each access (mode "r" or "rw"); report {key: "ok" | errno name} and its own label."""
    from vmconfine_apparmor import kernel

    kernel.load_binding()  # find libapparmor in the parent, as set_all_labels does
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no prints, no imports, only os calls after the profile change
        result: dict[str, Any] = {}
        try:
            os.close(r)
            driver.child_exec_label(ctx)
            for key, (path, mode) in paths.items():
                try:
                    fd = os.open(path, os.O_RDWR if mode == "rw" else os.O_RDONLY)
                    try:
                        os.read(fd, 16)
                        if mode == "rw":
                            os.pwrite(fd, b"written-by-guest", 0)
                    finally:
                        os.close(fd)
                    result[key] = "ok"
                except OSError as exc:
                    result[key] = errno.errorcode.get(exc.errno or 0, str(exc))
            fd = os.open("/proc/self/attr/current", os.O_RDONLY)
            result["label"] = os.read(fd, 4096).decode().strip("\x00\n")
            os.close(fd)
        except BaseException as exc:  # report, never run the parent's code
            result["error"] = f"{type(exc).__name__}: {exc}"
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def test_driver_profile_confines_and_is_unloaded(work: Path) -> None:
    profiles = work / "profiles"
    host, driver = make_driver(work, profiles)
    assert driver.probe(host) == (True, "")
    disk_a, disk_b, secret = work / "a.img", work / "b.img", work / "secret"
    for p in (disk_a, disk_b, secret):
        p.write_bytes(p.name.encode() * 100)
    ctx_a = domain_ctx(host, "vm-a", disk_a)
    ctx_b = domain_ctx(host, "vm-b", disk_b)
    for ctx in (ctx_a, ctx_b):
        driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
        driver.set_all_labels(ctx)
    name_a = ctx_a.domain.seclabel("apparmor").label
    name_b = ctx_b.domain.seclabel("apparmor").label
    assert name_a == f"vmconfine-{ctx_a.domain.uuid}"
    kernel_view = loaded()
    record("loaded", {n: kernel_view.get(n) for n in (name_a, name_b)})
    assert kernel_view.get(name_a) == "enforce" and kernel_view.get(name_b) == "enforce"

    seen = probe_in_profile(driver, ctx_a, {
        "own_disk": (disk_a, "rw"), "other_disk": (disk_b, "r"), "unlisted": (secret, "r"),
        "shadow": (Path("/etc/shadow"), "r"), "other_profile_files": (profiles, "r"),
    })
    record("confined", seen)
    assert "error" not in seen, seen
    assert seen["label"] == f"{name_a} (enforce)"
    assert seen["own_disk"] == "ok"
    assert disk_a.read_bytes().startswith(b"written-by-guest")
    assert seen["other_disk"] == "EACCES"
    assert seen["unlisted"] == "EACCES"
    assert seen["shadow"] == "EACCES"
    assert seen["other_profile_files"] == "EACCES"
    # unconfined, the same files are readable: the denials come from the profile
    assert disk_b.read_bytes() and Path("/etc/shadow").read_bytes()
    audit = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    assert f'apparmor="DENIED" operation="open" profile="{name_a}" name="{disk_b}"' in audit

    # fail closed: a process in A's profile is A's, and never passes as B
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        try:
            driver.child_exec_label(ctx_a)
        finally:
            os.read(r, 1)
            os._exit(0)
    os.close(r)
    time.sleep(0.5)
    try:
        verdict_a = driver.verify_process(ctx_a, pid)
        verdict_b = driver.verify_process(ctx_b, pid)
        label = driver.process_label(ctx_a, pid)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    record("verify", {"a": verdict_a, "b": verdict_b, "label": label})
    assert verdict_a == [] and label == f"{name_a} (enforce)"
    assert verdict_b == [f"pid {pid} runs under AppArmor profile '{name_a}', expected '{name_b}'"]

    for ctx in (ctx_a, ctx_b):
        driver.restore_all_labels(ctx)
        ctx.journal.close()  # teardown ends with the journal gone, as in the pipeline
        host.instance.journal_path(ctx.domain.name).unlink()
    after = loaded()
    record("after_teardown", sorted(n for n in after if n.startswith("vmconfine-")))
    assert name_a not in after and name_b not in after
    assert sorted(p.name for p in profiles.iterdir()) == []

    # restart A with unchanged content: the compiled policy comes from the cache (helper
    # --cached: no XML, no compile), is loaded and confines exactly as the compiled one did
    again = domain_ctx(host, "vm-a", disk_a, uuid=ctx_a.domain.uuid)
    calls: list[list[str]] = []
    real_helper = driver._helper

    def spy(ctx, cmd: str, name: str, **kw: Any) -> None:  # type: ignore[no-untyped-def]
        calls.append([cmd, *kw.get("extra", [])])
        real_helper(ctx, cmd, name, **kw)

    driver._helper = spy
    try:
        driver.gen_label(again, again.domain.seclabel("apparmor"))
        driver.set_all_labels(again)
    finally:
        driver._helper = real_helper
    seen = probe_in_profile(driver, again, {
        "own_disk": (disk_a, "rw"), "other_disk": (disk_b, "r"),
        "shadow": (Path("/etc/shadow"), "r"),
    })
    restart = {"helper": calls, "loaded": loaded().get(name_a), "confined": seen}
    record("restart", restart)
    assert [c[:2] for c in calls] == [["-c", "--cached"]]
    assert restart["loaded"] == "enforce"
    assert seen["label"] == f"{name_a} (enforce)"
    assert seen["own_disk"] == "ok" and seen["other_disk"] == seen["shadow"] == "EACCES"
    driver.restore_all_labels(again)
    record("after_restart_teardown", name_a in loaded())
    assert name_a not in loaded()
    assert sorted(p.name for p in profiles.iterdir()) == []


def test_over_broad_profile_is_caught(work: Path) -> None:
    """The same probe with a deliberately broken template (it grants every file) must see
    the other domain's disk: proof that the denial assertions above can fail."""
    base = work / "broken"
    profiles = base / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "TEMPLATE.qemu").write_text(
        "#include <tunables/global>\n"
        "profile VMCONFINE_TEMPLATE flags=(attach_disconnected) {\n"
        "  #include <abstractions/vmconfine-qemu>\n"
        "  /** rwk,\n"
        "}\n")
    host, driver = make_driver(base, profiles)
    disk_a, disk_b = base / "a.img", base / "b.img"
    disk_a.write_bytes(b"a" * 64)
    disk_b.write_bytes(b"b" * 64)
    ctx = domain_ctx(host, "vm-broken", disk_a)
    driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    try:
        seen = probe_in_profile(driver, ctx, {"other_disk": (disk_b, "r")})
    finally:
        driver.restore_all_labels(ctx)
    record("broken_profile", seen)
    assert seen["label"].startswith("vmconfine-")
    assert seen["other_disk"] == "ok", "the over-broad profile should have leaked B's disk"


def test_hotplugged_disk_is_readable_then_denied(work: Path) -> None:
    """Hotplug through the driver's per-device hooks, in the order the daemon calls them: after
    ``set_image_label`` (the profile regenerated through the helper and replaced) a process in
    the domain's profile reads and writes the new disk; after ``restore_image_label`` (with the
    disk gone from the live domain) it is denied again. Before the attach it is denied too."""
    from vmconfine.qemu.hotplug import with_device, without_disk

    base = work / "hotplug"
    profiles = base / "profiles"
    profiles.mkdir(parents=True)
    host, driver = make_driver(base, profiles)
    disk_a, new = base / "a.img", base / "new.img"
    disk_a.write_bytes(b"a" * 64)
    new.write_bytes(b"n" * 64)
    ctx = domain_ctx(host, "vm-hotplug", disk_a)
    driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
    driver.set_all_labels(ctx)
    try:
        before = probe_in_profile(driver, ctx, {"new": (new, "rw")})
        domain, disk = with_device(ctx.domain, (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{new}'/><target dev='vdb' bus='virtio'/></disk>"))
        driver.set_image_label(ctx, disk)
        ctx.domain = domain
        attached = probe_in_profile(driver, ctx, {"new": (new, "rw"), "own": (disk_a, "r")})
        driver.restore_image_label(ctx, next(d for d in ctx.domain.disks if d.target == "vdb"))
        ctx.domain, _ = without_disk(ctx.domain, "vdb")
        detached = probe_in_profile(driver, ctx, {"new": (new, "rw"), "own": (disk_a, "r")})
    finally:
        driver.restore_all_labels(ctx)
    record("hotplug", {"before": before, "attached": attached, "detached": detached})
    assert before["new"] == "EACCES", before
    assert attached["new"] == "ok" and attached["own"] == "ok", attached
    assert new.read_bytes().startswith(b"written-by-guest")
    assert detached["new"] == "EACCES" and detached["own"] == "ok", detached


def test_profile_applies_inside_the_root_view(work: Path) -> None:
    """``namespaces = ["mount", "root"]`` with ``security_driver = "apparmor"``: QEMU runs
    under its profile (attached at exec, after the view was built) inside its per-domain
    root. Over QMP it opens its own image (a bind at its own path: the profile's rules name
    the paths QEMU sees) and is refused ``/proc/PID/environ``, which exists in the view but
    no rule allows; a control domain with the same view and no LSM opens both."""
    from tests.host.conftest import VmDir, wait_for_line
    from tests.lsm.guest_e2e import START_TIMEOUT, Instance, clis, qmp_outcome, started_pid

    base = work / "rootview"
    base.mkdir()
    os.chmod(base, 0o755)
    vms = VmDir(base / "vms")
    vms.path.mkdir()
    os.chmod(vms.path, 0o755)
    confined, control = Instance(base / "aa", "apparmor"), Instance(base / "none", "none")
    for inst in (confined, control):
        with (inst.root / "etc" / "qemu.conf").open("a") as conf:
            conf.write('namespaces = [ "mount", "root" ]\n')
    seen: dict[str, Any] = {}
    try:
        pids = {}
        for name, inst in (("rv-a", confined), ("rv-c", control)):
            run = inst.run(vms.domain_xml(name))
            pids[name] = started_pid(wait_for_line(run, "started", timeout=START_TIMEOUT))
        seen["label"] = Path(f"/proc/{pids['rv-a']}/attr/current").read_text().strip("\x00\n")
        seen["own_ns"] = {n: os.readlink(f"/proc/{p}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                          for n, p in pids.items()}
        seen["view_root"] = sorted(os.listdir(f"/proc/{pids['rv-a']}/root"))
        asks = {
            "own": confined.qmp_open("rv-a", "own", vms.path / "rv-a.img"),
            "environ": confined.qmp_open("rv-a", "env", Path(f"/proc/{pids['rv-a']}/environ")),
            "control_own": control.qmp_open("rv-c", "own", vms.path / "rv-c.img"),
            "control_environ": control.qmp_open("rv-c", "env",
                                                Path(f"/proc/{pids['rv-c']}/environ")),
        }
        seen["opens"] = dict(zip(asks, map(qmp_outcome, clis(*asks.values())), strict=True))
        stops = clis(confined.argv("destroy", "rv-a"), control.argv("destroy", "rv-c"))
        assert all(s.returncode == 0 for s in stops), [s.stderr for s in stops]
        for proc in confined.procs + control.procs:
            proc.wait(timeout=START_TIMEOUT)
    finally:
        confined.stop_all()
        control.stop_all()
        seen["denials"] = [ln for ln in subprocess.run(
            ["dmesg"], capture_output=True, text=True).stdout.splitlines()
            if 'apparmor="DENIED"' in ln and 'profile="vmconfine-' in ln][-20:]
        record("root_view", seen)
    assert seen["label"].startswith("vmconfine-") and seen["label"].endswith(" (enforce)")
    assert seen["own_ns"] == {"rv-a": True, "rv-c": True}
    assert "usr" in seen["view_root"] and "root" not in seen["view_root"]  # a root view
    opens = seen["opens"]
    assert opens["own"] == "ok", opens
    assert "Permission denied" in opens["environ"], opens
    # refused by the profile, at the path QEMU names in its view
    environ = f'name="/proc/{pids["rv-a"]}/environ"'
    assert any(environ in ln for ln in seen["denials"]), seen["denials"]
    assert opens["control_own"] == opens["control_environ"] == "ok", opens
    assert not any(n.startswith("vmconfine-") for n in loaded())
