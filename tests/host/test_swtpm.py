"""The TPM emulator (``<tpm><backend type='emulator'>``): real swtpm beside a real, paused
QEMU, confined by the landlock + dac + cgroups (+ namespaces) stack.

One domain is started once and shared: QMP ``query-tpm``, swtpm's ids, capabilities,
no_new_privs and cgroup from /proc, a compromised QEMU denied the TPM state, then a kill -9 of
vmconfine (no swtpm left; also between swtpm's start and QEMU's fork), a restart that reuses
the state (swtpm_setup does not run again, the EK in the state file stays), the daemon's
``start``, ``undefine --keep-tpm`` and ``undefine``. Also: swtpm missing from PATH is one line
and changes nothing, the helper's Landlock ruleset really denies another domain's state (with
a control), and the TPM options are libvirt's ``domxml-to-native``'s.
"""

from __future__ import annotations

import ctypes
import grp
import hashlib
import json
import os
import pwd
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.host.conftest import Embed, VmDir, qemu_pid
from tests.host.test_argv_libvirt import LibvirtEmbed, libvirt, split_native  # noqa: F401
from tests.host.test_daemon import Daemon
from tests.support import require, require_binary, require_root
from vmconfine.launch.journal import Journal
from vmconfine.launch.runtime import proc_starttime, proc_status, same_process
from vmconfine.plugin.helper import Helper, HelperPath
from vmconfine_landlock import syscalls
from vmconfine_landlock.ruleset import apply_ruleset, helper_ruleset

NAME = "tpm-guest"
XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <tpm model='{model}'><backend type='emulator' version='2.0'/></tpm>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class TpmEnv:
    vm_dir: VmDir
    embed: Embed
    xml: Path
    uuid: str

    @property
    def storage(self) -> Path:
        return self.embed.root / "lib" / "qemu" / "swtpm" / self.uuid

    @property
    def state_file(self) -> Path:
        return self.storage / "tpm2" / "tpm2-00.permall"

    @property
    def log(self) -> Path:
        return self.embed.root / "log" / "qemu" / f"{NAME}-swtpm.log"

    def start(self) -> subprocess.Popen[str]:
        return self.embed.start(self.xml, "--paused")

    def swtpm(self) -> tuple[int, int | None]:
        """swtpm's pid and start time, from the domain's journal."""
        journal = Journal(self.embed.root / "run" / "qemu" / f"{NAME}.journal")
        rec = [r for r in journal.records("pipeline", "helper-forked") if r["name"] == "swtpm"]
        assert rec, journal.records()
        return int(rec[-1]["pid"]), rec[-1]["starttime"]


@pytest.fixture(scope="module")
def env() -> Iterator[TpmEnv]:
    require_root()
    require_binary("swtpm")
    require_binary("swtpm_setup")
    require(_account("tss"), "no tss account (Debian's swtpm-tools creates it)")
    d = Path(tempfile.mkdtemp(prefix="vmconfine-tests-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    embed = Embed(d / "instance")
    embed.configure('security_driver = "landlock"\n')
    uuid = str(uuidlib.uuid4())
    xml = d / "tpm.xml"
    xml.write_text(XML.format(name=NAME, uuid=uuid, model="tpm-crb"))
    e = TpmEnv(VmDir(d), embed, xml, uuid)
    try:
        yield e
    finally:
        embed.cleanup()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _account(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def running(env: TpmEnv) -> subprocess.Popen[str]:
    return env.start()


def _qmp(env: TpmEnv, command: str) -> object:
    out = env.embed.cli("qemu-monitor-command", NAME, json.dumps({"execute": command}),
                        check=True).stdout
    return json.loads(out)["return"]


def _gone(pid: int, starttime: int | None, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not same_process(pid, starttime):
            return True
        time.sleep(0.05)
    return False


def test_guest_has_the_emulated_tpm(env: TpmEnv, running: subprocess.Popen[str]) -> None:
    tpms = _qmp(env, "query-tpm")
    assert tpms == [{"model": "tpm-crb", "id": "tpm-tpm0",
                     "options": {"type": "emulator", "data": {"chardev": "chrtpm"}}}]


def test_swtpm_runs_confined(env: TpmEnv, running: subprocess.Popen[str]) -> None:
    pid, _ = env.swtpm()
    tss = pwd.getpwnam("tss")
    status = proc_status(pid)
    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath("/usr/bin/swtpm")
    assert status["Uid"].split() == [str(tss.pw_uid)] * 4
    assert status["Gid"].split() == [str(tss.pw_gid)] * 4
    groups = {g.gr_gid for g in grp.getgrall() if "tss" in g.gr_mem} | {tss.pw_gid}
    assert {int(g) for g in status["Groups"].split()} == groups
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    # in the domain's cgroup, as libvirt's qemuExtDevicesSetupCgroup puts it
    qemu = qemu_pid(env.embed, NAME)
    assert Path(f"/proc/{pid}/cgroup").read_text() == Path(f"/proc/{qemu}/cgroup").read_text()
    assert "/vmconfine/" in Path(f"/proc/{pid}/cgroup").read_text()
    # its state is its account's; the directories above it are vmconfine's
    st = (env.storage / "tpm2").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (tss.pw_uid, tss.pw_gid, 0o700)
    assert env.state_file.stat().st_uid == tss.pw_uid
    assert env.storage.stat().st_uid == 0
    # the control channel is a socket pair: no socket file anywhere for another QEMU
    assert not list(env.embed.root.rglob("*swtpm*.sock"))


def _blockdev_add(env: TpmEnv, node: str, path: Path) -> str:
    """A compromised QEMU opening ``path`` (QMP blockdev-add): "" or QEMU's error."""
    cmd = {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": node,
                                                     "filename": str(path), "read-only": True}}
    out = env.embed.cli("qemu-monitor-command", NAME, json.dumps(cmd)).stdout
    reply = json.loads(out)
    return reply["error"]["desc"] if "error" in reply else ""


def test_compromised_qemu_cannot_read_the_tpm_state(env: TpmEnv,
                                                    running: subprocess.Popen[str]) -> None:
    """QEMU holds only its end of the channel: the TPM's state (its keys) stays out of its
    reach. Control: the same QMP open of a file in QEMU's own HOME succeeds."""
    home = env.embed.root / "lib" / "qemu" / f"domain-{NAME}" / "control.img"
    home.write_bytes(b"\0" * 512)
    os.chown(home, pwd.getpwnam("vmconfine-qemu").pw_uid, -1)
    assert _blockdev_add(env, "control0", home) == ""
    denied = _blockdev_add(env, "stolen0", env.state_file)
    assert "Permission denied" in denied, denied


def test_kill9_of_vmconfine_leaves_no_swtpm(env: TpmEnv,
                                            running: subprocess.Popen[str]) -> None:
    pid, start = env.swtpm()
    qemu = qemu_pid(env.embed, NAME)
    qemu_start = proc_starttime(qemu)
    os.killpg(running.pid, signal.SIGKILL)
    running.wait(timeout=30)
    assert _gone(qemu, qemu_start), "QEMU outlived vmconfine"
    assert _gone(pid, start), "swtpm outlived vmconfine"
    env.embed.cli("list", check=True)  # the next command finishes the teardown
    assert not (env.embed.root / "run" / "qemu" / f"{NAME}.journal").exists()
    assert env.state_file.exists(), "the TPM state must survive a crash"


def test_kill9_between_swtpm_and_qemu_leaves_no_swtpm(env: TpmEnv) -> None:
    """vmconfine killed after swtpm started and before QEMU was forked: swtpm dies with it
    (parent-death signal), and the next command finishes the teardown from the journal."""
    name = "tpm-window"
    xml = env.vm_dir.path / "window.xml"
    xml.write_text(XML.format(name=name, uuid=str(uuidlib.uuid4()), model="tpm-tis"))
    proc = env.embed.start(xml, "--paused", env={**os.environ, "VMCONFINE_PAUSE_AT": "helpers"},
                           wait_for="paused at helpers")
    journal = Journal(env.embed.root / "run" / "qemu" / f"{name}.journal")
    rec = [r for r in journal.records("pipeline", "helper-forked") if r["name"] == "swtpm"][-1]
    assert same_process(int(rec["pid"]), rec["starttime"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _gone(int(rec["pid"]), rec["starttime"]), "swtpm outlived vmconfine"
    env.embed.cli("list", check=True)
    assert not journal.path.exists()


def test_state_is_reused_by_the_next_start(env: TpmEnv) -> None:
    before = hashlib.sha256(env.state_file.read_bytes()).hexdigest()
    inode = env.state_file.stat().st_ino
    proc = env.start()
    try:
        assert _qmp(env, "query-tpm")[0]["options"]["type"] == "emulator"  # type: ignore[index]
        pid, start = env.swtpm()
        assert hashlib.sha256(env.state_file.read_bytes()).hexdigest() == before
        assert env.state_file.stat().st_ino == inode
        # swtpm_setup manufactured the TPM (its EK) once, on the first start only
        assert env.log.read_text().count("Starting vTPM manufacturing") == 1
        env.embed.cli("destroy", NAME, check=True)
        proc.wait(timeout=60)
        assert _gone(pid, start), "teardown did not stop swtpm"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert env.state_file.exists()
    assert not (env.embed.root / "run" / "qemu" / f"{NAME}.journal").exists()


def test_daemon_start_and_undefine_with_and_without_keep_tpm(env: TpmEnv) -> None:
    d = Daemon(env.embed)
    d.start()
    try:
        d.cli("define", str(env.xml))
        d.cli("start", "--paused", NAME)  # the daemon's swtpm outlives no one: QEMU's peer
        assert _qmp(env, "query-tpm")[0]["model"] == "tpm-crb"  # type: ignore[index]
        pid, start = env.swtpm()
        assert proc_status(pid)["Uid"].split()[0] == str(pwd.getpwnam("tss").pw_uid)
        d.cli("undefine", "--keep-tpm", NAME)  # running: becomes transient, state kept
        d.cli("destroy", NAME)
        assert _gone(pid, start), "destroy did not stop swtpm"
        deadline = time.monotonic() + 30
        while NAME in d.cli("list", "--all").stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.state_file.exists(), "--keep-tpm must keep the TPM state"
        d.cli("define", str(env.xml))
        out = d.cli("undefine", NAME).stdout
        assert f"Domain '{NAME}' has been undefined" in out
        assert not env.storage.exists(), "undefine must remove the TPM state"
    finally:
        d.stop()


def test_missing_swtpm_is_one_line_and_changes_nothing(env: TpmEnv) -> None:
    uuid = str(uuidlib.uuid4())
    xml = env.vm_dir.path / "nosw.xml"
    xml.write_text(XML.format(name="tpm-nosw", uuid=uuid, model="tpm-tis"))
    bare = env.vm_dir.path / "bin"  # a PATH without swtpm
    bare.mkdir()
    proc = env.embed.cli("run", "--paused", str(xml),
                         env={**os.environ, "PATH": str(bare)})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: domain 'tpm-nosw': the TPM emulator needs swtpm, which is not "
                     f"installed (not found in PATH={bare}); install Debian's swtpm and "
                     "swtpm-tools packages"], proc.stderr
    assert not (env.embed.root / "lib" / "qemu" / "swtpm" / uuid).exists()
    assert not list((env.embed.root / "run" / "qemu").glob("tpm-nosw*"))


def test_helper_ruleset_denies_another_domains_state(tmp_path: Path) -> None:
    """The Landlock ruleset swtpm gets, applied in a real child: its own state is writable,
    another domain's state next to it is not (control: the same opens without the ruleset)."""
    require_root()
    abi, why = syscalls.probe_abi()
    require(abi > 0, f"Landlock is unavailable: {why}")
    own, other = tmp_path / "a" / "tpm2", tmp_path / "b" / "tpm2"
    for d in (own, other):
        d.mkdir(parents=True)
        (d / "tpm2-00.permall").write_bytes(b"state")
    helper = Helper("swtpm", "/usr/bin/swtpm", "+0", "+0",
                    paths=(HelperPath("/usr/bin/swtpm", "rx"), HelperPath(str(own), "rw",
                                                                          tree=True)))

    def opens(confined: bool) -> tuple[bool, bool]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                if confined:
                    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
                    apply_ruleset(helper_ruleset(helper).for_abi(abi))
                result = ""
                for d in (own, other):
                    try:
                        with open(d / "tpm2-00.permall", "r+b"):
                            result += "1"
                    except PermissionError:
                        result += "0"
                os.write(w, result.encode())
            finally:
                os._exit(0)
        os.close(w)
        data = os.read(r, 16).decode()
        os.close(r)
        os.waitpid(pid, 0)
        return data[0] == "1", data[1] == "1"

    assert opens(confined=False) == (True, True)  # control
    assert opens(confined=True) == (True, False)


def test_tpm_options_are_libvirts(libvirt: LibvirtEmbed,  # noqa: F811
                                  tmp_path: Path) -> None:
    xml = XML.format(name="tpm-argv", uuid=str(uuidlib.uuid4()), model="tpm-crb")
    _, theirs = split_native(libvirt.domxml_to_native("tpm-argv", xml, {}))
    embed = Embed(tmp_path / "instance")
    (tmp_path / "tpm.xml").write_text(xml)
    ours = split_native(embed.cli("domxml-to-native", "qemu-argv", str(tmp_path / "tpm.xml"),
                                  check=True).stdout.strip())[1]

    def tpm_args(argv: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(argv[:-1]):
            if arg == "-tpmdev" or (arg == "-device" and "tpm" in argv[i + 1]):
                out += [arg, argv[i + 1]]
            if arg == "-chardev" and "id=chrtpm" in argv[i + 1]:
                out += [arg, argv[i + 1].split(",")[1]]  # libvirt: null; here: the channel
        return out

    assert tpm_args(ours) == tpm_args(theirs)
    assert tpm_args(ours)[:4] == ["-chardev", "id=chrtpm", "-tpmdev",
                                  "emulator,id=tpm-tpm0,chardev=chrtpm"]
