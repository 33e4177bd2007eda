"""Crash loops: ``run`` gets SIGTERM (twice: power off, then destroy) and SIGKILL at random
moments, the recovering command is SIGKILLed at a random moment too, and in the end one
command finishes every teardown: no state file (journal, status, destroy marker, lock) is
left, every image is given back and every per-domain uid (``user_range``) is released.
Plus: vmconfine replacing a stale listening socket is not reported as a file "replaced
while it was being labelled"."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from examples.mkbootimg import write_image
from tests.host.conftest import VMCONFINE, Embed, VmDir
from tests.host.test_identity_isolation import identity_conf, leases
from tests.host.test_pipeline import snapshot, state_files
from tests.support import REPO

ITERATIONS = 102
WORKERS = 3  #: in parallel, so the loop stays well under a minute on 2 cores


def _spawn(embed: Embed, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([VMCONFINE, "-c", embed.uri, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                            start_new_session=True)


def _wait_started(run: subprocess.Popen[bytes]) -> None:
    """Until ``run`` says the domain started (or ends): the kills then land in supervision
    and teardown, however fast this machine starts QEMU."""
    assert run.stdout is not None
    while line := run.stdout.readline():
        if b"started" in line:
            return


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def _worker(embed: Embed, xmls: list[Path], rng: random.Random) -> None:
    for xml in xmls:
        run = _spawn(embed, "run", "--shutdown-timeout", "0.2", str(xml))
        if rng.random() < 0.6:
            _wait_started(run)
            time.sleep(rng.uniform(0, 0.1))
        else:  # somewhere in the start sequence
            time.sleep(rng.uniform(0, 0.8))
        for _ in range(2):  # power off, then destroy (creates the destroy marker)
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
            time.sleep(rng.uniform(0, 0.1))
        time.sleep(rng.uniform(0, 0.25))
        _kill(run)
        recovering = _spawn(embed, "list")
        time.sleep(rng.uniform(0, 0.3))
        _kill(recovering)


@pytest.mark.slow
def test_sigterm_sigkill_and_killed_recovery_leave_nothing(embed: Embed, vm_dir: VmDir) -> None:
    seed = random.randrange(1 << 30)
    conf, rng, _shared = identity_conf()  # every domain also gets a uid of its own
    embed.configure(conf)
    xmls: list[list[Path]] = [[] for _ in range(WORKERS)]
    images = []
    for i in range(ITERATIONS):
        img = vm_dir.path / f"kl{i}.img"
        write_image(str(img), "hello", poweroff=False)
        os.chown(img, 1000, 1000)
        images.append(img)
        xmls[i % WORKERS].append(vm_dir.domain_xml(f"kl{i}", image=img))
    before = snapshot(images)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            _worker(embed, xmls[w], random.Random(seed + w))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"seed {seed}: {errors}"
    final = embed.cli("list", timeout=300)
    assert final.returncode == 0, f"seed {seed}: {final.stderr}"
    assert "replaced while" not in final.stderr, f"seed {seed}: {final.stderr}"
    assert state_files(embed) == [], f"seed {seed}"
    hidden = [p.name for p in (embed.root / "run" / "qemu").iterdir()
              if p.name.startswith(".") and p.name.endswith((".lock", ".destroy"))
              and p.name != ".instance.lock"]
    assert hidden == [], f"seed {seed}"
    after = snapshot(images)
    changed = [p for p in before if after[p] != before[p]]
    assert changed == [], f"seed {seed}: not given back: {changed}"
    assert leases(embed, rng) == [], f"seed {seed}: uids not given back"


def test_replacing_a_stale_listening_socket_is_no_swap_warning(embed: Embed,
                                                               vm_dir: VmDir) -> None:
    """A bind socket is vmconfine's own (created, passed as an fd, removed at teardown); a
    stale one left by a crash is replaced by the next start with a new inode: that is no file
    an attacker swapped, so no driver may warn about it."""
    from tests.host.test_landlock_enforce import require_landlock

    require_landlock()
    embed.configure('security_driver = "landlock"\n')
    socks = vm_dir.path / "socks"
    socks.mkdir()
    sock = socks / "serial.sock"
    xml = vm_dir.domain_xml("sockreuse", extra_devices=(
        f"<serial type='unix'><source mode='bind' path='{sock}'/><target port='1'/></serial>"))
    old = vm_dir.path / "first-socket"
    for attempt in range(2):
        if attempt == 1:  # a stale socket where the next start binds (as after a crash)
            os.link(old, sock)
        run = embed.start(xml, "--paused")
        if attempt == 1:  # the control: the second start did replace the stale socket
            assert os.stat(sock).st_ino != os.stat(old).st_ino
        elif attempt == 0:
            os.link(sock, old)  # keeps the first inode, for the stale copy and the control
        embed.cli("destroy", "sockreuse", check=True)
        _out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert "replaced while" not in err and "WARNING" not in err, err
        assert not sock.exists()  # vmconfine removed the socket it created
