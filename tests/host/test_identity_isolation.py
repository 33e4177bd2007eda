"""Per-domain identity on the real kernel: with qemu.conf ``user_range`` each QEMU runs as a
uid of its own, so with only dac + cgroups + namespaces (no LSM, no Landlock, no root view) a
compromised QEMU of domain B — real QEMU driven over QMP — can neither open A's image nor
connect to A's socket; the control run without the range shows both attacks succeed. The
admin still reaches A; teardown (also after kill -9) gives every uid and file back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.host.conftest import SCRATCH_PARENT, Embed, VmDir
from tests.host.test_daemon import Daemon, destroy_running
from tests.host.test_namespaces import domain_xml
from tests.support import require_root
from tests.unit.test_dac_identity import free_range
from vmconfine_dac.identity import Identity, read_status, verify_status
from vmconfine_dac.idleases import IdentityRegistry
from vmconfine_dac.idrange import UidRange

CONTROL_CONF = 'security_driver = "none"\n'  # dac + cgroups + namespaces ["mount"]


def identity_conf() -> tuple[str, UidRange, int]:
    low, high, shared = free_range(100, start=3_500_000)
    return (CONTROL_CONF + f'user_range = "{low}-{high}"\nshared_group = "+{shared}"\n',
            UidRange(low, high), shared)


def leases(embed: Embed, rng: UidRange) -> list[str]:
    reg = IdentityRegistry(embed.root / "lib" / "qemu" / "dac-identity", rng)
    try:
        return [x.value for x in reg.leases()]
    finally:
        reg.close()


def owner(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@dataclass
class Pair:
    """Domains A and B of one instance, started paused (QMP works; no guest needs to run)."""

    embed: Embed
    d: Path
    listener: socket.socket
    runs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def service(self) -> Path:
        return self.d / "a" / "service.sock"

    @property
    def console(self) -> Path:
        return self.d / "a" / "console.sock"

    def monitor(self, name: str, cmd: dict[str, object]) -> dict[str, object]:
        proc = self.embed.cli("qemu-monitor-command", name, json.dumps(cmd))
        reply = json.loads(proc.stdout or "{}")
        assert "return" in reply or "error" in reply, proc.stdout + proc.stderr
        return reply

    def attack(self) -> dict[str, bool]:
        """B's QEMU opens A's image read-only and connects to the socket A's serial uses;
        True = it worked."""
        image = {"execute": "blockdev-add", "arguments": {
            "driver": "file", "node-name": "stolen", "read-only": True,
            "filename": str(self.d / "a" / "ida.img")}}
        sock = {"execute": "chardev-add", "arguments": {"id": "stolen", "backend": {
            "type": "socket", "data": {"addr": {"type": "unix", "data": {
                "path": str(self.service)}}, "server": False}}}}
        return {"image": "return" in self.monitor("idb", image),
                "socket": "return" in self.monitor("idb", sock)}

    def stop(self) -> None:
        for name in ("ida", "idb"):
            self.embed.cli("destroy", name)
        for run in self.runs:
            run.wait(timeout=60)
        self.listener.close()


def start_pair(d: Path, conf: str) -> Pair:
    """A: a 0600 image, a serial connecting to a service socket (root's, 0600: DAC gives it
    to A's QEMU), a bind serial for the admin, a read-only ISO shared with B."""
    embed = Embed(d / "instance")
    embed.configure(conf)
    (d / "a").mkdir(mode=0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pair = Pair(embed, d, listener)
    listener.bind(str(pair.service))
    os.chmod(pair.service, 0o600)
    listener.listen(8)
    iso = d / "shared.iso"
    iso.write_bytes(b"\0" * 65536)
    os.chmod(iso, 0o600)
    cdrom = (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
             f"<source file='{iso}'/><target dev='hdc' bus='ide'/><readonly/></disk>")
    a = domain_xml(d / "a", "ida", extra_devices=(
        f"<serial type='unix'><source mode='connect' path='{pair.service}'/>"
        f"<target port='1'/></serial><serial type='unix'><source mode='bind' "
        f"path='{pair.console}'/><target port='2'/></serial>{cdrom}"))
    b = domain_xml(d / "b", "idb", extra_devices=cdrom)
    for xml in (a, b):
        os.chmod(xml.parent / f"{xml.stem}.img", 0o600)
        pair.runs.append(embed.start(xml, "--paused"))
    return pair


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    require_root()
    d = Path(tempfile.mkdtemp(prefix="vmconfine-identity-", dir=SCRATCH_PARENT))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def identity_pair(scratch: Path) -> Iterator[tuple[Pair, UidRange, int]]:
    conf, rng, shared = identity_conf()
    (scratch / "id").mkdir()
    pair = start_pair(scratch / "id", conf)
    yield pair, rng, shared
    pair.embed.cleanup()
    pair.listener.close()


def test_compromised_qemu_is_denied_by_its_own_uid(
        identity_pair: tuple[Pair, UidRange, int]) -> None:
    pair, _rng, _shared = identity_pair
    assert pair.attack() == {"image": False, "socket": False}
    # the admin still reaches A: its monitor and its serial socket
    status = pair.monitor("ida", {"execute": "query-status"})
    assert status["return"]["running"] is False  # type: ignore[index]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(pair.console))


def test_control_without_the_range_the_same_attack_succeeds(scratch: Path) -> None:
    (scratch / "control").mkdir()
    pair = start_pair(scratch / "control", CONTROL_CONF)
    try:
        assert pair.attack() == {"image": True, "socket": True}
    finally:
        pair.stop()
        pair.embed.cleanup()


def test_each_qemu_runs_as_its_own_uid_and_the_check_is_real(
        identity_pair: tuple[Pair, UidRange, int]) -> None:
    pair, rng, shared = identity_pair
    ids = {}
    for name in ("ida", "idb"):
        pid = next(int(line.split()[1]) for line in pair.embed.cli(
            "dominfo", name, check=True).stdout.splitlines() if line.startswith("PID:"))
        status = read_status(pid)
        uid = int(status["Uid"].split()[0])
        assert uid in rng and status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert sorted(map(int, status["Groups"].split())) == sorted({uid, shared})
        ids[name] = (pid, uid)
        info = pair.embed.cli("dominfo", name, check=True).stdout
        assert (f"Confinement (dac):uid {uid}, gid {uid}, groups "
                f"{','.join(map(str, sorted({uid, shared})))} (the domain's own from "
                f"user_range {rng}") in info
    assert ids["ida"][1] != ids["idb"][1]
    # the post-exec check on the real /proc: B's QEMU is not A's identity
    a_uid = ids["ida"][1]
    mine = Identity(a_uid, a_uid, tuple(sorted({a_uid, shared})), shared_gid=shared)
    assert verify_status(read_status(ids["ida"][0]), mine) == []
    assert verify_status(read_status(ids["idb"][0]), mine)[0].startswith("Uid is ")
    report = json.loads(pair.embed.cli("confinement", "ida", "--json", check=True).stdout)
    row = next(r for r in report["process"] if r["item"] == "identity")
    assert row["differs"] is False and f"uid {a_uid} " in row["kernel"]
    assert report["drivers"]["dac"]["own_identity"] is True
    # the ISO both domains read: its owner kept, the shared group with group read only
    assert owner(pair.d / "shared.iso") == (0, shared, 0o640)
    assert owner(pair.d / "a" / "ida.img") == (a_uid, a_uid, 0o600)
    assert sorted(leases(pair.embed, rng)) == sorted(str(u) for _p, u in ids.values())


def test_teardown_gives_every_uid_and_file_back(
        identity_pair: tuple[Pair, UidRange, int]) -> None:
    pair, rng, _shared = identity_pair
    pair.stop()
    assert leases(pair.embed, rng) == []
    assert owner(pair.d / "a" / "ida.img") == (0, 0, 0o600)
    assert owner(pair.service)[:2] == (0, 0)


@pytest.mark.parametrize("step", ["labels", "set-labels"])
def test_sigkill_after_the_allocation_is_finished_by_the_next_command(
        vm_dir: VmDir, step: str) -> None:
    conf, rng, _shared = identity_conf()
    embed = Embed(vm_dir.path / "instance")
    try:
        embed.configure(conf)
        xml = domain_xml(vm_dir.path / "k", "idkill")
        img = vm_dir.path / "k" / "idkill.img"
        before = owner(img)
        run = embed.start(xml, env=dict(os.environ, VMCONFINE_PAUSE_AT=step),
                          wait_for=f"paused at {step}")
        assert len(leases(embed, rng)) == 1
        if step == "set-labels":
            assert owner(img)[0] in rng
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        assert "idkill" not in embed.cli("list", check=True).stdout
        assert leases(embed, rng) == []
        assert owner(img) == before
    finally:
        embed.cleanup()


def test_a_defined_domain_keeps_its_uid_until_undefined(vm_dir: VmDir) -> None:
    """Through the daemon: the uid of a defined domain survives stop and start; undefine
    gives it back (the drivers' forget_domain)."""
    conf, rng, _shared = identity_conf()
    embed = Embed(vm_dir.path / "instance")
    embed.configure(conf)
    d = Daemon(embed)
    d.start()
    try:
        d.cli("define", str(vm_dir.domain_xml("keep")))
        uids = []
        for _ in range(2):
            d.cli("start", "--paused", "keep")
            uids.append(int(read_status(d.qemu_pid("keep"))["Uid"].split()[0]))
            assert leases(embed, rng) == [str(uids[-1])]
            d.cli("destroy", "keep")
            assert leases(embed, rng) == [str(uids[-1])]  # defined: kept while stopped
        assert uids[0] == uids[1] and uids[0] in rng
        d.cli("undefine", "keep")
        assert leases(embed, rng) == []
    finally:
        if d.proc is not None and d.proc.poll() is None:
            destroy_running(embed)
            d.stop()
        embed.cleanup()
