"""lsm tier: markers and fixtures.

Two kinds of tests live in tests/lsm:

* ``lsm`` tests run on the host. They take the ``guest_kernel`` fixture and call
  ``tests.lsm.harness.run_in_guest`` to boot a kernel with AppArmor or SELinux enforcing.
* ``lsm_guest`` tests run INSIDE that guest (the harness passes ``-m lsm_guest``). On the host
  they are deselected: they need the guest's LSM and may load policy. The guest init exports
  ``VMCONFINE_IN_GUEST=1``, which is what lets them run.

Guest test modules are named without the ``test_`` prefix (e.g. ``guest_smoke.py``) so a plain
``pytest tests`` does not even collect them; the deselection is a second guard.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.lsm.harness import GuestKernel, GuestSetupError, cache_dir
from tests.support import REPO, require, require_root

PREPARE = REPO / "scripts" / "lsm-prepare.sh"


def in_guest() -> bool:
    """True inside the lsm guest (set by the harness's guest script)."""
    return os.environ.get("VMCONFINE_IN_GUEST") == "1"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # scripts/test.sh stops a background lsm tier with SIGTERM: end the session as on Ctrl-C,
    # so a running guest is killed (tests.lsm.harness) instead of being left behind.
    if not in_guest() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    config.addinivalue_line(
        "markers",
        "lsm_guest: runs inside the lsm-tier guest kernel via tests/lsm/harness.py; "
        "deselected on the host",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_guest():
        return
    guest_only = [item for item in items if item.get_closest_marker("lsm_guest")]
    if guest_only:
        config.hook.pytest_deselected(items=guest_only)
        items[:] = [item for item in items if not item.get_closest_marker("lsm_guest")]


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The prepared guest kernel: runs scripts/lsm-prepare.sh once per session (idempotent)."""
    require_root()
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is not installed "
            "(apt-get install -y --no-install-recommends qemu-system-x86)")
    proc = subprocess.run(
        [str(PREPARE)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1200,
        check=False,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        require(False, f"lsm guest kernel unavailable ({PREPARE.name} exit {proc.returncode}): "
                f"{lines[-1]}")
    try:
        return GuestKernel.load(cache_dir())
    except GuestSetupError as exc:
        require(False, f"lsm guest kernel unavailable: {exc}")
        raise


@pytest.fixture(scope="session")
def selinux_guest_kernel(guest_kernel: GuestKernel) -> GuestKernel:
    """``guest_kernel``, requiring the private SELinux policy too."""
    require(guest_kernel.selinux_root is not None,
            "no private SELinux policy was built (install selinux-policy-default and "
            "policycoreutils, then rerun scripts/lsm-prepare.sh)")
    return guest_kernel
