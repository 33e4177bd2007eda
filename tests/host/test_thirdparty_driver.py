"""A third-party driver package, pip-installed and found through its entry point.

``examples/thirdparty_driver`` (the ``rlimit`` driver) is installed with pip into a directory
of its own (``--target``: a real wheel build and a real dist-info with the entry point; the
venv other tests use is not changed) that the CLI gets on ``PYTHONPATH``. It is selected in
qemu.conf, runs a real domain, and the limit is read from the real QEMU process. Broken
third-party drivers (a misspelt hook, an unmarked hook-named method, a crashing
``set_all_labels``) each give one clear line naming the driver, exit 1, and leave the host
unchanged.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir
from tests.support import REPO, VENV_BIN, install_plugin_package, require

EXAMPLE = REPO / "examples" / "thirdparty_driver"
LIMIT = 256


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip (a wheel built from its pyproject.toml)."""
    target = tmp_path_factory.mktemp("thirdparty-site")
    proc = subprocess.run([str(VENV_BIN / "pip"), "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", str(target),
                           str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    require(proc.returncode == 0, f"pip cannot build the example driver: {proc.stderr[-500:]}")
    assert list(target.glob("vmconfine_rlimit-*.dist-info/entry_points.txt"))
    return target


def env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("VMCONFINE_DEBUG", None)
    return env


@pytest.fixture
def rl_embed(embed: Embed, site: Path) -> Iterator[tuple[Embed, dict[str, str]]]:
    env = env_with(site)
    embed.configure(f'security_driver = "rlimit"\n# the example driver\'s own key\n'
                    f"rlimit_nofile = {LIMIT}\n")
    yield embed, env
    # the next command (with the driver installed) finishes any teardown left behind
    embed.cli("list", env=env)


def test_example_driver_runs_a_real_domain(rl_embed: tuple[Embed, dict[str, str]],
                                           vm_dir: VmDir) -> None:
    embed, env = rl_embed
    conf = embed.root / "etc" / "qemu.conf"
    drivers = embed.cli("drivers", env=env, check=True).stdout
    assert re.search(r"^rlimit\s+security\s+example third-party driver", drivers, re.M)
    shown = embed.cli("config", env=env, check=True).stdout
    assert f"rlimit_nofile = {LIMIT} # {conf}:3\n" in shown
    assert "## RLIMIT_NOFILE (soft and hard) QEMU runs with" in shown
    assert embed.cli("config", "--check", env=env).returncode == 0

    # control: without the driver QEMU would inherit vmconfine's own limit, which differs
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (LIMIT, LIMIT)
    xml = vm_dir.domain_xml("rl1")
    embed.start(xml, env=env)
    info = embed.cli("dominfo", "rl1", env=env, check=True).stdout
    pid = int(re.search(r"^PID:\s+(\d+)", info, re.M).group(1))  # type: ignore[union-attr]
    assert Path(f"/proc/{pid}/exe").resolve().name.startswith("qemu-system")
    assert _limit(pid) == f"{LIMIT}/{LIMIT}"

    # no label, so no security model line; what it applies is shown by its describe hook
    assert re.findall(r"^Security model:\s+(\S+)", info, re.M) == ["none", "dac"]
    assert re.search(rf"^Confinement \(rlimit\):\s*RLIMIT_NOFILE {LIMIT}$", info, re.M)
    live = embed.cli("dumpxml", "rl1", env=env, check=True).stdout.replace('"', "'")
    assert "model='rlimit'" not in live and "model='dac'" in live
    caps = embed.cli("capabilities", env=env, check=True).stdout
    assert "<model>rlimit</model>" not in caps and "<model>none</model>" in caps
    report = embed.cli("confinement", "rl1", env=env).stdout
    assert f"rlimit: RLIMIT_NOFILE {LIMIT}" in report and "rlimit label" not in report
    embed.cli("destroy", "rl1", env=env, check=True)


def test_example_driver_fails_closed_on_a_process_without_the_limit(site: Path,
                                                                    tmp_path: Path) -> None:
    sys.path.insert(0, str(site))
    try:
        import vmconfine_rlimit
        from vmconfine_rlimit.driver import RlimitDriver

        from tests.support import make_ctx, make_host

        host = make_host(tmp_path, [vmconfine_rlimit], config=f"rlimit_nofile = {LIMIT}\n")
        ctx = make_ctx(host, "<domain type='qemu'><name>rl2</name><memory>65536</memory>"
                             "<os><type arch='x86_64'>hvm</type></os></domain>")
        drv = RlimitDriver(host)
        # this test process does not run under the limit: a difference, so QEMU would die
        assert drv.verify_process(ctx, os.getpid()) == [
            f"RLIMIT_NOFILE is {_limit(os.getpid())} (soft/hard), expected {LIMIT}/{LIMIT}"]
        assert drv.verify_process(ctx, 2**22 + 12345)[0].startswith(
            "cannot read the limits of QEMU")
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m.startswith("vmconfine_rlimit")]:
            del sys.modules[name]


def _limit(pid: int) -> str:
    row = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
               if line.startswith("Max open files"))
    return "/".join(row.split()[3:5])


def test_default_and_wrong_type_of_the_example_key(embed: Embed, site: Path,
                                                   vm_dir: VmDir) -> None:
    env = env_with(site)
    embed.configure('security_driver = "rlimit"\n')
    assert "rlimit_nofile = 1024 # default\n" in embed.cli("config", env=env,
                                                            check=True).stdout
    embed.configure('security_driver = "rlimit"\nrlimit_nofile = "many"\n')
    conf = embed.root / "etc" / "qemu.conf"
    for args in (("config",), ("run", str(vm_dir.domain_xml("rl3")))):
        proc = embed.cli(*args, env=env)
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [
            f"error: {conf}:2: expected an unsigned integer for 'rlimit_nofile' parameter"]


# ---- broken third-party drivers -----------------------------------------------------------------

BROKEN = {
    "typo": ("""
    @hookimpl
    def child_confined(self, ctx):
        pass
""", "driver 'typo' (plugin typo): method 'child_confined' is marked @hookimpl but vmconfine "
     "has no hook of that name"),
    "plain": ("""
    def set_all_labels(self, ctx):
        pass
""", "driver 'plain' (plugin plain): method 'set_all_labels' has the name of a vmconfine hook "
     "but no @hookimpl marker"),
    "crash": ("""
    @hookimpl
    def set_all_labels(self, ctx):
        raise RuntimeError("boom")
""", "crash: set_all_labels failed: RuntimeError: boom"),
}

BROKEN_MODULE = """
from vmconfine.plugin.hookspecs import hookimpl


class Broken:
    @hookimpl
    def probe(self, host):
        return True, ""

    @hookimpl
    def model(self):
        return "{name}"
{body}

@hookimpl
def vmconfine_register_drivers(registry):
    registry.add("{name}", lambda host: Broken(), "a broken third-party driver",
                 kind="{kind}", labels=False)
"""


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_third_party_driver_is_one_clear_line(embed: Embed, vm_dir: VmDir,
                                                    tmp_path: Path, name: str) -> None:
    body, message = BROKEN[name]
    site = tmp_path / "site"
    # the crashing one is a pipeline driver: it runs after DAC gave QEMU the image, so the
    # rollback must give it back
    kind = "pipeline" if name == "crash" else "security"
    install_plugin_package(site, name, BROKEN_MODULE.format(name=name, body=body, kind=kind))
    embed.configure(f'security_driver = "{name}"\n' if kind == "security" else
                    'security_driver = "none"\n')
    xml = vm_dir.domain_xml(f"broken-{name}")
    image = vm_dir.path / f"broken-{name}.img"
    before = os.stat(image)
    proc = embed.cli("run", str(xml), env=env_with(site))
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stderr
    after = os.stat(image)  # DAC gave the image back (its restore ran once, and worked)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                            before.st_mode)
    assert not (embed.root / "run" / "qemu" / f"broken-{name}.journal").exists()
    assert not list((embed.root / "run").rglob("*.journal"))
