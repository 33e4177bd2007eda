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

from tests.support import REPO

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
