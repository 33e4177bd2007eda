"""Launch-path hardening: what reaches QEMU, what a crash or a signal leaves, odd input."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.host.conftest import VMCONFINE, Embed, VmDir, qemu_pid
from tests.host.test_pipeline import snapshot, state_files
from tests.support import REPO


def test_inherited_fds_do_not_reach_qemu(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("fds")
    secret = vm_dir.path / "secret"
    secret.write_text("not for the guest\n")
    os.chmod(secret, 0o600)
    fd = os.open(secret, os.O_RDONLY)  # inheritable: whoever starts vmconfine may leak one
    try:
        p = subprocess.Popen([VMCONFINE, "-c", embed.uri, "run", str(xml)], pass_fds=(fd,),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        embed.procs.append(p)
        assert p.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "started" not in p.stdout.readline():
            pass
    finally:
        os.close(fd)
    pid = qemu_pid(embed, "fds")
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue
    assert str(secret) not in targets, targets
    embed.cli("destroy", "fds", check=True)


def test_monitor_lock_is_not_in_a_directory_qemu_can_write(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("lockdir")
    embed.start(xml)
    domain_dir = embed.root / "run" / "qemu" / "domain-lockdir"
    planted = vm_dir.path / "planted-by-qemu"
    (domain_dir / "monitor-user.sock.lock").symlink_to(planted)
    embed.cli("qemu-monitor-command", "lockdir", '{"execute": "query-status"}', check=True)
    assert not planted.exists()
    assert (embed.root / "run" / "qemu" / ".lockdir.qmp.lock").exists()
    embed.cli("destroy", "lockdir", check=True)
    assert not (embed.root / "run" / "qemu" / ".lockdir.qmp.lock").exists()


def _cgroup_dirs(info: str) -> list[Path]:
    for line in info.splitlines():
        if "cgroup /" in line:
            rel = line.split("cgroup ", 1)[1].split(";", 1)[0].strip()
            return [p for p in Path("/sys/fs/cgroup").glob(f"*/{rel.lstrip('/')}")] + [
                p for p in Path("/sys/fs/cgroup").glob(f"*/*/{rel.lstrip('/')}")]
    raise AssertionError(f"no cgroup in dominfo: {info}")


def test_recovery_undoes_with_the_drivers_that_made_the_changes(
        embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("recfg")
    img = vm_dir.path / "recfg.img"
    os.chown(img, 1000, 1000)
    before = snapshot([img])
    run = embed.start(xml)
    dirs = _cgroup_dirs(embed.cli("dominfo", "recfg", check=True).stdout)
    assert dirs and all(d.is_dir() for d in dirs)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    # the administrator changes qemu.conf before the next command: cgroups are off now
    embed.configure('security_driver = "none"\ncgroup_controllers = [ ]\n')
    embed.cli("list", check=True)
    assert state_files(embed) == []
    assert snapshot([img]) == before
    leftover = [d for d in dirs if d.exists()]
    assert leftover == [], leftover


def test_sigterm_while_labelling_undoes_everything(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("termset")
    img = vm_dir.path / "termset.img"
    os.chown(img, 1000, 1000)
    before = snapshot([img])
    env = dict(os.environ, VMCONFINE_PAUSE_AT="set-labels")
    run = embed.start(xml, env=env, wait_for="paused at set-labels")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 130
    assert state_files(embed) == []
    assert snapshot([img]) == before


def test_qemu_failing_at_start_is_reported_at_once(embed: Embed, vm_dir: VmDir) -> None:
    extra = ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
             "<qemu:arg value='-no-such-option'/></qemu:commandline>")
    xml = vm_dir.domain_xml("badarg", extra=extra)
    proc = embed.cli("run", str(xml))
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("vmconfine: ")]
    assert len(errors) == 1, proc.stderr  # the taint warning is logged; one error line
    assert "QEMU exited during start-up" in errors[0] and "no-such-option" in errors[0]
    assert state_files(embed) == []


def test_names_that_would_hide_state_files_are_refused(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("visible")
    text = xml.read_text().replace("<name>visible</name>", "<name>.hidden</name>")
    xml.write_text(text)
    proc = embed.cli("run", str(xml))
    assert proc.returncode == 1 and "must not start with '.'" in proc.stderr
    long_name = xml.read_text().replace("<name>.hidden</name>", f"<name>{'x' * 250}</name>")
    xml.write_text(long_name)
    proc = embed.cli("run", str(xml))
    assert proc.returncode == 1 and "at most 200 are allowed" in proc.stderr
    assert state_files(embed) == []


def test_oversized_input_is_refused_without_reading_it_all(embed: Embed) -> None:
    proc = subprocess.run([VMCONFINE, "-c", embed.uri, "run", "/dev/zero"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "larger than 10 MiB" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torn_journal_line_is_cut_before_recovery_appends(embed: Embed, vm_dir: VmDir) -> None:
    xml = vm_dir.domain_xml("torn")
    env = dict(os.environ, VMCONFINE_PAUSE_AT="set-labels")
    run = embed.start(xml, env=env, wait_for="paused at set-labels")
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    journal = embed.root / "run" / "qemu" / "torn.journal"
    with open(journal, "a") as f:
        f.write('{"driver": "dac", "op": "chown", "pa')  # a crash in the middle of a write
    embed.cli("list", check=True)
    assert state_files(embed) == []

