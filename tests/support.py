"""Shared test helpers.

``require`` is the only sanctioned way for a test to skip: for a missing host feature, with the
reason. CI sets ``VMCONFINE_REQUIRE_ALL=1``, which turns every such skip into a failure, so
nothing silently stops being tested.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


def interruptible() -> None:
    """``preexec_fn`` for a child the test stops with SIGINT: a test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then never
    installs its KeyboardInterrupt handler, so the child would not stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def strict() -> bool:
    """True when skips must fail (CI)."""
    return os.environ.get("VMCONFINE_REQUIRE_ALL", "") not in ("", "0")


def require(condition: object, reason: str) -> None:
    """Skip the calling test unless ``condition`` holds; fail instead in strict mode."""
    if condition:
        return
    if strict():
        pytest.fail(f"required host feature missing (VMCONFINE_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None and os.path.exists(f"/usr/sbin/{name}"):
        path = f"/usr/sbin/{name}"
    require(path, f"{name} is not installed (run scripts/setup.sh)")
    assert path is not None
    return path


@functools.cache
def builtin_roles(name: str) -> dict[str, object]:
    """The roles (``autodetect``, ``implicit``) the installed driver ``name`` registers with,
    for stand-ins that take its place in a test's stack (empty for an unknown name)."""
    from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

    info = collect_drivers(make_plugin_manager()).get(name)
    if info is None or info.kind != "security":
        return {}
    return {"autodetect": info.autodetect, "implicit": info.implicit}


def make_host(root: Path, plugins: list[object], *, config: str | None = None,
              autoload: bool = False):  # type: ignore[no-untyped-def]
    """A HostContext for an embed instance under ``root`` with the given plugin modules.

    ``config`` (qemu.conf text) is written to ROOT/etc/qemu.conf first.
    """
    from vmconfine.config.instance import open_instance
    from vmconfine.plugin.context import HostContext
    from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

    if config is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "qemu.conf").write_text(config)
    inst = open_instance(f"qemu:///embed?root={root}")
    inst.ensure_dirs()
    pm = make_plugin_manager(autoload=autoload, plugins=plugins)
    return HostContext(inst, pm, collect_drivers(pm))


def make_ctx(host, xml: str):  # type: ignore[no-untyped-def]
    """A DomainContext for ``xml`` on ``host`` (journal in the instance's run dir)."""
    from vmconfine.domain import parse_domain
    from vmconfine.launch.journal import Journal
    from vmconfine.plugin.context import DomainContext

    domain = parse_domain(xml)
    return DomainContext(host, domain, Journal(host.instance.journal_path(domain.name)))


def install_plugin_package(site: Path, name: str, source: str) -> None:
    """Install module ``name`` (its ``__init__.py`` is ``source``) under ``site`` as pip would
    leave a distribution: a dist-info with a ``vmconfine`` entry point, so a vmconfine run with
    ``site`` on PYTHONPATH discovers it like any installed driver package."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(source)
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[vmconfine]\n{name} = {name}\n")
