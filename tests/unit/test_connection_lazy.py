"""A command loads the plugins, the domain model and the pipeline only when it needs them.

``vmconfine list`` of an instance with nothing running (the daemonless embed URI of the
README) imports none of them: it was 0.19 s against virsh's 0.02 s before (docs/performance.md,
P1 CLI start-up). Crash recovery, which does need them, still runs on every command: the host
tests finish a killed domain's teardown with ``list`` (tests/host/test_dac_cli.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import REPO

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance

#: what a start needs and an idle listing does not
HEAVY = ("pluggy", "lxml.etree", "asyncio", "vmconfine.domain.model",
         "vmconfine.launch.pipeline", "vmconfine.plugin.stack")

_CODE = """
import io, json, sys, contextlib
from vmconfine.cli import main
uri = sys.argv[1]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["-c", uri, "list", "--all"])
heavy = {heavy!r}
listed = sorted(m for m in heavy if m in sys.modules)
from vmconfine.launch.connection import Connection
Connection.open(uri, recover=False).stack  # control: a command that needs the stack
print(json.dumps({{"rc": rc, "out": out.getvalue(), "listed": listed,
                  "control": sorted(m for m in heavy if m in sys.modules)}}))
"""


def _list_in_fresh_process(uri: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _CODE.format(heavy=HEAVY), uri],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_list_of_an_idle_instance_imports_no_plugin_model_or_pipeline(tmp_path: Path) -> None:
    from vmconfine.config.instance import open_instance

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n')
    uri = f"qemu:///embed?root={root}"
    defs = open_instance(uri).definitions_dir
    defs.mkdir(parents=True)
    (defs / "idle-vm.xml").write_text("<domain/>")  # listed by name, never parsed

    got = _list_in_fresh_process(uri)

    assert got["rc"] == 0
    assert "idle-vm" in str(got["out"]) and "shut off" in str(got["out"])
    assert got["listed"] == []
    # control: the same process imports the plugins and the model as soon as a command needs
    # the stack (so the check above can fail)
    assert {"pluggy", "lxml.etree", "vmconfine.domain.model",
            "vmconfine.plugin.stack"} <= set(got["control"])  # type: ignore[arg-type]


def _leftover(tmp_path: Path) -> tuple[Instance, subprocess.Popen[bytes]]:
    """An embed instance whose domain's supervisor died: its journal names a live process."""
    from vmconfine.config.instance import open_instance
    from vmconfine.launch import runtime
    from vmconfine.launch.journal import Journal

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n')
    inst = open_instance(f"qemu:///embed?root={root}")
    inst.run_dir.mkdir(parents=True, exist_ok=True)
    victim = subprocess.Popen(["sleep", "60"])
    uuid = "11111111-2222-4333-8444-555555555555"
    journal = Journal(inst.journal_path("vm1"))
    journal.record("pipeline", "begin", xml=(
        f"<domain type='qemu'><name>vm1</name><uuid>{uuid}</uuid><memory>1024</memory>"
        "<os><type>hvm</type></os></domain>"), supervisor=2**22 + 7, id=1, uuid=uuid,
        stack=[], outlive=False)
    journal.record("pipeline", "started", pid=victim.pid,
                   starttime=runtime.proc_starttime(victim.pid))
    return inst, victim


def test_recovery_with_plugins_that_cannot_load_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken plugin fails the command before recovery kills the leftover QEMU: the
    process and its journal stay for the next command, once the plugin is fixed."""
    from vmconfine.errors import DriverError
    from vmconfine.launch.connection import Connection
    from vmconfine.plugin import registry

    inst, victim = _leftover(tmp_path)
    try:
        def broken(*_a: object, **_k: object) -> None:
            raise DriverError("plugin 'x' failed to load: broken")

        with monkeypatch.context() as m:
            m.setattr(registry, "make_plugin_manager", broken)
            with pytest.raises(DriverError, match="broken"):
                Connection(inst)
        assert victim.poll() is None
        assert inst.journal_path("vm1").exists()
        # control: with the plugins loading, the same command finishes the teardown
        Connection(inst)
        assert victim.wait(timeout=30) is not None
        assert not inst.journal_path("vm1").exists()
    finally:
        victim.kill()
        victim.wait()
