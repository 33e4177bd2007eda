"""The cgroups driver inside the real launch pipeline: QEMU runs in the domain's cgroup with
the device filter in force, and a SIGKILLed supervisor's cgroup is removed by the next command.

``test_cli_*`` drive the ``vmconfine`` CLI (they need the DAC driver, which a privileged embed
instance always stacks). ``test_pipeline_*`` run the same pipeline in a helper process whose
plugin manager holds the nop and cgroups drivers plus a stand-in for DAC, so the cgroups
integration is proven whether or not the DAC plugin is installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.support import REPO, VENV_BIN, require
from vmconfine.config.instance import open_instance
from vmconfine.plugin.registry import collect_drivers, make_plugin_manager
from vmconfine_cgroups import placement

pytestmark = pytest.mark.host

HELPER = """
import sys
import vmconfine_cgroups
from vmconfine.launch.connection import Connection
from vmconfine.domain import parse_domain
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.config.instance import open_instance
from vmconfine.plugin.registry import make_plugin_manager
from vmconfine.launch.supervisor import run_domain
from vmconfine.plugin import nop


class StandInDac:
    '''Takes DAC's place in the stack; QEMU keeps vmconfine's identity.'''

    @hookimpl
    def model(self):
        return "dac"


class Plugin:
    @hookimpl
    def vmconfine_register_drivers(self, registry):
        registry.add("dac", lambda host: StandInDac(), "stand-in for the DAC driver",
                     implicit=True)


def connect(uri, recover):
    pm = make_plugin_manager(autoload=False, plugins=[nop, vmconfine_cgroups, Plugin()])
    return Connection(open_instance(uri), pm=pm, recover=recover)


if __name__ == "__main__":
    uri, xml, mode = sys.argv[1:4]
    conn = connect(uri, recover=mode != "recover")
    if mode == "recover":
        print("recovered", conn.recover(), flush=True)
        sys.exit(0)
    settings = conn.host.config.driver_settings("cgroups")
    settings.cgroup_devices_backend = mode.split("-")[1]  # run-v1 / run-v2
    run_domain(conn, parse_domain(open(xml).read(), source=xml), on_ready=lambda l: print(
        "started", l.pid, conn.stack.describe(l.ctx).get("cgroups", {}).get("summary"),
        flush=True))
"""


def domain_type() -> str:
    return "kvm" if os.path.exists("/dev/kvm") else "qemu"


def leaf_dirs(root: Path, name: str) -> list[str]:
    """Every directory the domain's cgroup would have, in every mounted hierarchy."""
    h = placement.detect()
    seg = placement.instance_segment(open_instance(f"qemu:///embed?root={root}"))
    rel = f"/vmconfine/{seg}/{name}"
    mounts = {(m, h.self_v1.get(c, "/")) for c, m in h.v1.items()}
    if h.v2:
        mounts.add((h.v2, h.self_v2))
    return [placement.join(m, own, rel) for m, own in mounts]


def in_domain_cgroup(pid: int, name: str) -> list[str]:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return [ln for ln in lines if ln.endswith(f"/{name}")]


def wait_gone(pid: int) -> None:
    for _ in range(500):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} is still there")


# ---- through a helper process (no DAC plugin needed) ---------------------------------------------
class Helper:
    def __init__(self, root: Path, tmp: Path) -> None:
        self.uri = f"qemu:///embed?root={root}"
        self.root = root
        self.script = tmp / "cgroups_helper.py"
        self.script.write_text(HELPER)
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, xml: Path, backend: str) -> tuple[subprocess.Popen[str], str]:
        p = subprocess.Popen([sys.executable, str(self.script), self.uri, str(xml),
                              f"run-{backend}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("started"):
            p.kill()
            out, err = p.communicate(timeout=30)
            raise AssertionError(f"helper did not start the domain: {line}{out}{err}")
        return p, line

    def recover(self) -> str:
        out = subprocess.run([sys.executable, str(self.script), self.uri, "-", "recover"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        self.recover()


@pytest.fixture
def helper(vm_dir: VmDir) -> Helper:
    root = vm_dir.path / "instance"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n')
    h = Helper(root, vm_dir.path)
    yield h  # type: ignore[misc]
    h.cleanup()


@pytest.mark.parametrize("backend", ["v1", "v2"])
def test_pipeline_places_qemu_and_recovers_after_sigkill(helper: Helper, vm_dir: VmDir,
                                                         backend: str) -> None:
    h = placement.detect()
    require("devices" in h.v1 if backend == "v1" else h.v2 is not None,
            f"no cgroup {backend} devices backend on this host")
    xml = vm_dir.domain_xml("cgpipe", virt_type=domain_type())
    proc, line = helper.run(xml, backend)
    pid = int(line.split()[1])
    label = {"v1": "devices: cgroup v1", "v2": "devices: cgroup v2 BPF"}[backend]
    assert label in line  # the summary names the backend, and QEMU started under it
    assert in_domain_cgroup(pid, "cgpipe"), Path(f"/proc/{pid}/cgroup").read_text()
    existing = [d for d in leaf_dirs(helper.root, "cgpipe") if os.path.isdir(d)]
    assert existing
    # crash: the supervisor dies (QEMU follows through its parent-death signal)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_gone(pid)
    assert all(os.path.isdir(d) for d in existing)  # nobody tore down yet
    assert "cgpipe" in helper.recover()  # the next command finishes the teardown
    assert not [d for d in existing if os.path.exists(d)]


# ---- through the CLI -----------------------------------------------------------------------------
def dac_installed() -> bool:
    registry = collect_drivers(make_plugin_manager())
    return registry.get("dac") is not None


def test_cli_qemu_in_cgroup_and_list_cleans_up_after_sigkill(embed: Embed, vm_dir: VmDir) -> None:
    require(dac_installed(), "the DAC driver (plugins/dac) is not installed yet")
    require((VENV_BIN / "vmconfine").exists(), "vmconfine is not installed in .venv")
    xml = vm_dir.domain_xml("cgcli", virt_type=domain_type())
    run = embed.start(xml)
    pid = qemu_pid(embed, "cgcli")
    assert in_domain_cgroup(pid, "cgcli"), Path(f"/proc/{pid}/cgroup").read_text()
    info = embed.cli("dominfo", "cgcli", check=True).stdout
    assert "Confinement (cgroups):" in info and "devices: cgroup v" in info
    existing = [d for d in leaf_dirs(embed.root, "cgcli") if os.path.isdir(d)]
    assert existing
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    embed.cli("list", check=True)
    wait_gone(pid)
    assert not [d for d in existing if os.path.exists(d)]
