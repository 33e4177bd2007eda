"""Nothing QEMU or the guest writes reaches the terminal raw: a guest that prints escape
sequences on a serial port QEMU logs (stdio) cannot set the title, clear lines or forge
vmconfine's own output when vmconfine shows QEMU's log."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.host.conftest import Embed, VmDir, qemu_pid

HOSTILE = "\x1b]0;PWNED\x07\x1b[2K\rerror: forged by the guest"


def wait_for_text(path: Path, text: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes():
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never got {text!r}: {path.read_bytes()[-2000:]!r}")


def test_qemu_log_tail_is_escaped(vm_dir: VmDir, embed: Embed) -> None:
    img = vm_dir.image("esc.img", greeting=HOSTILE)
    xml = vm_dir.domain_xml("esc", image=img)
    text = xml.read_text()
    start = text.index("<serial type='file'>")
    end = text.index("</serial>") + len("</serial>")
    xml.write_text(text[:start] + "<serial type='stdio'><target port='0'/></serial>"
                   + text[end:])
    run = embed.start(xml)
    log = embed.root / "log" / "qemu" / "esc.log"
    wait_for_text(log, b"\x1b]0;PWNED")  # the control: QEMU really logged the raw sequence
    os.kill(qemu_pid(embed, "esc"), signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "QEMU log:" in err and "\\x1b]0;PWNED\\x07\\x1b[2K\\x0derror: forged" in err, err
    for stream in (out, err):
        assert not any((ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0
                       for c in stream), repr(stream)
    # the forged text never starts a line of its own
    assert not any(line.startswith("error: forged") for line in err.splitlines())
