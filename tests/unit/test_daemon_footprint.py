"""The daemon's memory is mostly the modules it imports (docs/performance.md, P7a): it must
not import code that only other verbs need. Core's function-level imports are few and listed
(tests/unit/test_architecture.py): the connection loads its plugins, model and pipeline on first
use, which the serving daemon always makes; so what ``vmconfine.daemon.main`` imports at
module level is what the serving daemon holds."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO

#: modules only other verbs need: ``domxml-from-native`` and ``qemu-attach`` convert a
#: native QEMU command line; the daemon only reads an adopted domain's recorded state
NOT_FOR_THE_DAEMON = ("vmconfine.qemu.fromnative", "vmconfine.launch.attach")


def _imported_after(module: str) -> list[str]:
    code = (f"import json, sys, {module}\n"
            f"print(json.dumps(sorted(m for m in {list(NOT_FOR_THE_DAEMON)!r} "
            "if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True)
    return json.loads(out.stdout)


def test_the_daemon_imports_no_native_argv_converter() -> None:
    assert _imported_after("vmconfine.daemon.main") == []
    # control: the CLI's attach path does import both, so the check can fail
    assert _imported_after("vmconfine.launch.attach") == sorted(NOT_FOR_THE_DAEMON)
