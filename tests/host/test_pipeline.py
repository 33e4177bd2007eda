"""The launch pipeline end to end: real QEMU, real supervision, crash-safe teardown."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, proc_status, qemu_pid
from tests.support import require
from vmconfine.launch.pipeline import STEPS
from vmconfine_landlock import syscalls


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int, int, dict[str, bytes]]]:
    out = {}
    for p in paths:
        st = os.stat(p)
        xattrs = {k: os.getxattr(p, k) for k in os.listxattr(p)}
        out[str(p)] = (st.st_uid, st.st_gid, st.st_mode, xattrs)
    return out


def state_files(e: Embed) -> list[str]:
    run = e.root / "run" / "qemu"
    if not run.exists():
        return []
    return sorted(p.name for p in run.iterdir() if not p.name.startswith("."))


def test_run_boots_guest_and_exits_zero_after_poweroff(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("boot", stay=False)
    img = vm_dir.path / "boot.img"
    os.chown(img, 1000, 1000)
    before = snapshot([img])
    proc = embed.cli("run", str(xml), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Domain 'boot' started" in proc.stdout
    assert "stopped: guest powered off" in proc.stdout
    assert "hello from the test guest" in (vm_dir.path / "boot.serial").read_text()
    assert snapshot([img]) == before
    assert state_files(embed) == []


def test_verbs_from_another_process(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("verbs")
    run = embed.start(xml)
    listing = embed.cli("list", check=True).stdout
    assert "verbs" in listing and "running" in listing
    pid = qemu_pid(embed, "verbs")
    assert proc_status(pid)["NoNewPrivs"] == "1"
    info = embed.cli("dominfo", "verbs", check=True).stdout
    assert "Security model:" in info and "Security DOI:   0" in info
    live = embed.cli("dumpxml", "verbs", check=True).stdout
    assert "<seclabel" in live and " id=" in live
    inactive = embed.cli("dumpxml", "--inactive", "verbs", check=True).stdout
    assert "<label>" not in inactive
    reply = embed.cli("qemu-monitor-command", "verbs", '{"execute": "query-status"}',
                      check=True).stdout
    assert json.loads(reply)["return"]["status"] == "running"
    hmp = embed.cli("qemu-monitor-command", "verbs", "--hmp", "info", "name", check=True)
    assert "verbs" in hmp.stdout
    assert "custom-monitor" in embed.cli("dominfo", "verbs", check=True).stdout
    out = embed.cli("destroy", "verbs", check=True).stdout
    assert "destroyed" in out
    assert run.wait(timeout=60) == 0
    assert "destroyed" in run.stdout.read()  # type: ignore[union-attr]
    assert not Path(f"/proc/{pid}").exists()
    assert state_files(embed) == []


def test_same_name_or_uuid_cannot_run_twice(embed: Embed, vm_dir: VmDir) -> None:
    first = vm_dir.domain_xml("dup", uuid="11111111-2222-3333-4444-555555555555")
    embed.start(first)
    again = embed.cli("run", str(first))
    assert again.returncode == 1 and "domain 'dup' is already running" in again.stderr
    other = vm_dir.domain_xml("dup2", uuid="11111111-2222-3333-4444-555555555555")
    clash = embed.cli("run", str(other))
    assert clash.returncode == 1 and "same UUID" in clash.stderr
    embed.cli("destroy", "dup", check=True)


#: the security_driver stacks killed at every step (dac and cgroups are appended to both)
CRASH_STACKS = {
    "none": 'security_driver = "none"\n',
    "landlock": 'security_driver = "landlock"\nlandlock_mode = "enforce"\n',
}


@pytest.mark.parametrize("driver", CRASH_STACKS)
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_is_finished_by_next_command(
        embed: Embed, vm_dir: VmDir, step: str, driver: str) -> None:
    if driver == "landlock":
        abi, why = syscalls.probe_abi()
        require(abi > 0, f"needs Landlock: {why}")
    embed.configure(CRASH_STACKS[driver])
    # with sockets vmconfine creates: one in a root-owned 0755 dir, one at a generated path
    sock = vm_dir.path / "crash-agent.sock"
    xml = vm_dir.domain_xml("crash", extra_devices=(
        f"<channel type='unix'><source mode='bind' path='{sock}'/>"
        "<target type='virtio' name='org.example.crash'/></channel>"
        "<channel type='unix'><source mode='bind'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"))
    img = vm_dir.path / "crash.img"
    os.chown(img, 1000, 1000)
    before = snapshot([img])
    channel_dir = embed.root / "lib" / "qemu" / "channel" / "target" / "domain-crash"
    env = dict(os.environ, VMCONFINE_PAUSE_AT=step)
    run = embed.start(xml, env=env, wait_for=f"paused at {step}")
    journal = embed.root / "run" / "qemu" / "crash.journal"
    records = [json.loads(x) for x in journal.read_text().splitlines()]
    begin = next(r for r in records if r.get("op") == "begin")
    assert driver in begin["stack"]
    started = [r for r in records if r.get("op") == "started"]
    run.send_signal(signal.SIGKILL)  # the supervisor only; QEMU dies with it (PDEATHSIG)
    run.wait(timeout=30)
    proc = embed.cli("list", check=True)
    assert "crash" not in proc.stdout
    assert state_files(embed) == []
    assert snapshot([img]) == before
    assert not (embed.root / "run" / "qemu" / "domain-crash").exists()
    assert not os.path.lexists(sock) and not channel_dir.exists()
    for rec in started:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{rec['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{rec['pid']}").exists(), "QEMU outlived the teardown"


def test_sigterm_asks_for_acpi_poweroff_then_destroys(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("term")  # this guest ignores ACPI: it gets destroyed
    run = embed.start(xml, "--shutdown-timeout", "1")
    pid = qemu_pid(embed, "term")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 0
    assert not Path(f"/proc/{pid}").exists()
    assert state_files(embed) == []


def test_custom_argv_is_tainted(embed: Embed, vm_dir: VmDir) -> None:
    extra = ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
             "<qemu:arg value='-no-user-config'/><qemu:env name='VMCONFINE_T' value='1'/>"
             "</qemu:commandline>")
    xml = vm_dir.domain_xml("taint", extra=extra)
    embed.start(xml)
    pid = qemu_pid(embed, "taint")
    assert "custom-argv" in embed.cli("dominfo", "taint", check=True).stdout
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"VMCONFINE_T=1" in environ
    embed.cli("destroy", "taint", check=True)


LIAR = '''
from vmconfine.plugin.hookspecs import hookimpl


class Liar:
    @hookimpl
    def verify_process(self, ctx, pid):
        return ["exec label is unconfined_t, expected svirt_t (test)"]


@hookimpl
def vmconfine_register_drivers(registry):
    registry.add("liar", lambda host: Liar(), "reports a confinement mismatch", kind="pipeline")
'''


def test_confinement_mismatch_kills_qemu_and_fails_closed(embed: Embed, vm_dir: VmDir,
                                                          tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "vmconfine_liar").mkdir(parents=True)
    (site / "vmconfine_liar" / "__init__.py").write_text(LIAR)
    dist = site / "vmconfine_liar-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vmconfine-liar\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vmconfine]\nliar = vmconfine_liar\n")
    xml = vm_dir.domain_xml("liar")
    img = vm_dir.path / "liar.img"
    before = snapshot([img])
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = embed.cli("run", str(xml), env=env)
    assert proc.returncode == 1
    assert "not confined as asked" in proc.stderr and "unconfined_t" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert snapshot([img]) == before
    assert state_files(embed) == []
    leftover = subprocess.run(["pgrep", "-f", str(img)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_domxml_to_native_is_what_run_executes(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("same")
    native = shlex.split(embed.cli("domxml-to-native", "qemu-argv", str(xml), check=True).stdout)
    embed.start(xml)
    pid = qemu_pid(embed, "same")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    env_words = [w for w in native if "=" in w.split(",")[0] and not w.startswith("-")
                 and w.split("=")[0].isupper()]
    argv = native[len(env_words):]
    # per-start: the serial file reaches QEMU through an fdset (-add-fd before its -chardev)
    i = cmdline.index("-add-fd")
    assert cmdline[i + 1].startswith("set=0,fd=") and \
        cmdline[i + 1].endswith(",opaque=charserial0-source")
    del cmdline[i:i + 2]
    assert len(argv) == len(cmdline)
    for want, got in zip(argv, cmdline, strict=True):
        if "id=charmonitor," in want or "id=charusermonitor," in want:
            # per-start: run hands QEMU the listening monitor sockets as inherited fds
            assert "fd=" in got and "path=" in want
            continue
        if "id=charserial0," in want:
            assert want == f"file,id=charserial0,path={vm_dir.path / 'same.serial'}"
            assert got == "file,id=charserial0,path=/dev/fdset/0"
            continue
        assert want == got
    embed.cli("destroy", "same", check=True)
