"""File capabilities (``setcap``) survive a domain: the chown that gives an image to QEMU makes
the kernel drop ``security.capability``; the DAC driver remembers it like the owner and puts it
back at teardown (also when vmconfine was killed and the next command recovers) — but not on
a file that was written meanwhile (a write drops them too, and must not get them back)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.host.test_dac_cli import _gone
from tests.support import require_binary
from tests.unit.test_dac_support import qemu_ids

FCAPS = "security.capability"


def caps(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, FCAPS)
    except OSError:
        return None


def image_with_caps(vm_dir: VmDir, name: str) -> tuple[Path, Path, bytes]:
    setcap = require_binary("setcap")
    img = vm_dir.image(f"{name}.img")
    os.chown(img, 1201, 1201)
    os.chmod(img, 0o640)
    subprocess.run([setcap, "cap_net_raw+ep", str(img)], check=True)
    before = caps(img)
    assert before, "setcap did not set security.capability"
    return vm_dir.domain_xml(name, image=img), img, before


def assert_labelled(img: Path) -> None:
    """The control: while QEMU runs the image is QEMU's and its capabilities are gone."""
    st = os.stat(img)
    assert (st.st_uid, st.st_gid) == qemu_ids()
    assert caps(img) is None, "the chown kept the capabilities: this test proves nothing"


def test_destroy_gives_capabilities_back(embed: Embed, vm_dir: VmDir) -> None:
    xml, img, before = image_with_caps(vm_dir, "fcap1")
    run = embed.start(xml, "--paused")
    assert_labelled(img)
    embed.cli("destroy", "fcap1", check=True)
    assert run.wait(timeout=60) == 0
    assert (os.stat(img).st_uid, os.stat(img).st_gid) == (1201, 1201)
    assert caps(img) == before
    assert "cap_net_raw" in subprocess.run([require_binary("getcap"), str(img)],
                                           capture_output=True, text=True).stdout


def test_kill_9_then_recovery_gives_capabilities_back(embed: Embed, vm_dir: VmDir) -> None:
    xml, img, before = image_with_caps(vm_dir, "fcap2")
    run = embed.start(xml, "--paused")
    assert_labelled(img)
    pid = qemu_pid(embed, "fcap2")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert _gone(pid)
    assert caps(img) is None  # nobody gave them back yet
    embed.cli("list", check=True)  # finishes the teardown from the journal
    assert (os.stat(img).st_uid, caps(img)) == (1201, before)


def test_a_written_file_does_not_get_them_back(embed: Embed, vm_dir: VmDir) -> None:
    xml, img, _before = image_with_caps(vm_dir, "fcap3")
    run = embed.start(xml, "--paused")
    assert_labelled(img)
    with open(img, "r+b") as f:  # what QEMU may do to its image (the guest's writes)
        f.seek(512 * 1024)
        f.write(b"written by the guest")
    embed.cli("destroy", "fcap3", check=True)
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 0
    assert os.stat(img).st_uid == 1201
    assert caps(img) is None
    assert "not giving the file capabilities back" in err
