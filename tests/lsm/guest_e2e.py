"""Guest side of the end-to-end lsm test: ``vmconfine run`` under the booted LSM.

Runs INSIDE the AppArmor guest and inside the SELinux guest (the same tests for both), with the
real CLI and real QEMU (TCG):

1. two domains A and B run with ``security_driver = "<lsm>"``: QEMU runs with the domain's
   label (``/proc/PID/attr/current``), the images carry the image label (SELinux: the file
   context; AppArmor: the profile's file rules), and over QMP (``qemu-monitor-command``,
   ``blockdev-add`` of a read-only ``file`` node) A's QEMU opens its own image and is refused B's
   image and a world-readable file outside the domain; under SELinux A and B get different MCS
   pairs;
2. control: a ``security_driver = "none"`` domain in the same boot opens exactly what A was
   refused, so the denials above come from the LSM and the test can fail;
3. a TPM emulator domain: swtpm runs confined (AppArmor: the domain profile's ``//swtpm``
   child profile in enforce mode; SELinux: QEMU's sVirt label and MCS pair, entered through
   vmconfine's module ``vmconfine_swtpm.cil``, its state under the image label), QEMU's
   ``query-tpm`` answers over QMP, and the real swtpm binary under that label is denied
   another domain's TPM state (controls: the same command unconfined works, and under
   SELinux so does the other domain's own label); SELinux also stops and starts the domain
   again: the state is reused (no swtpm_setup) under the new start's labels;
4. ``vmconfine run`` killed with SIGKILL at every pipeline step (``VMCONFINE_PAUSE_AT``): the
   next command restores every label, unloads every profile, frees every MCS lease and leaves
   no QEMU behind.

SELinux only, before any of that: with ``virt_use_execmem`` off and the emulator relabelled
``bin_t``, ``vmconfine run`` refuses to start and names both fixes (Debian's refpolicy has no
TCG domain type; its boolean grants execmem to ``svirt_t``). Then the boolean is turned on, as
docs/selinux.md tells an operator to.

Observations go to ``$VMCONFINE_GUEST_RESULTS/e2e-<lsm>.json`` for the host side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host.conftest import VMCONFINE, VmDir, wait_for_line
from tests.host.test_swtpm import XML as TPM_XML
from tests.lsm.e2e_checks import assert_confined
from tests.lsm.harness import EMULATOR
from tests.support import REPO
from vmconfine.launch.pipeline import STEPS

pytestmark = pytest.mark.lsm_guest

LSM = os.environ.get("VMCONFINE_LSM", "")
RESULTS = Path(os.environ.get("VMCONFINE_GUEST_RESULTS", "/run/out"))
WORK = Path("/run/vmconfine-e2e")  # tmpfs: SELinux labels stick here (the 9p root has none)
AA_PROFILES = Path("/sys/kernel/security/apparmor/profiles")
OBSERVED: dict[str, Any] = {}
START_TIMEOUT = 300


def record(key: str, value: Any) -> None:
    OBSERVED[key] = value
    (RESULTS / f"e2e-{LSM}.json").write_text(json.dumps(OBSERVED, indent=1, sort_keys=True))


class Instance:
    """An embed instance driven through the CLI; ``run`` starts domains in the background."""

    def __init__(self, root: Path, driver: str) -> None:
        self.root = root
        self.uri = f"qemu:///embed?root={root}"
        (root / "etc").mkdir(parents=True)
        conf = f'security_driver = "{driver}"\n'
        if driver == "apparmor":
            conf += f'apparmor_profile_dir = "{root / "profiles"}"\n'
        (root / "etc" / "qemu.conf").write_text(conf)
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *args: str) -> list[str]:
        return [VMCONFINE, "-c", self.uri, *args]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return clis(self.argv(*args))[0]

    def run(self, xml: Path, env: dict[str, str] | None = None,
            extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        proc = subprocess.Popen([VMCONFINE, "-c", self.uri, "run", str(xml), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
        self.procs.append(proc)
        return proc

    def qmp_open(self, name: str, node: str, path: Path) -> list[str]:
        """The CLI call asking domain ``name``'s QEMU to open ``path`` read-only."""
        return self.argv("qemu-monitor-command", name, json.dumps(blockdev_add(node, path)))

    def stop_all(self) -> None:
        """Kill what a failed test left running; the next command finishes the teardown."""
        left = [proc for proc in self.procs if proc.poll() is None]
        for proc in left:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if left:
            self.cli("list")


class RootView:
    """A domain confined by ``lsm`` and a ``security_driver = "none"`` control, both with
    ``namespaces = ["mount", "root"]``: the root-view tests of the AppArmor and the SELinux boot
    (tests/lsm/guest_apparmor.py, tests/lsm/guest_selinux.py) start, probe and stop them here."""

    CONFINED, CONTROL = "rv-a", "rv-c"

    def __init__(self, base: Path, lsm: str) -> None:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        os.chmod(base, 0o755)
        self.vms = VmDir(base / "vms")
        self.vms.path.mkdir()
        os.chmod(self.vms.path, 0o755)
        self.confined, self.control = Instance(base / lsm, lsm), Instance(base / "none", "none")
        for inst in (self.confined, self.control):
            with (inst.root / "etc" / "qemu.conf").open("a") as conf:
                conf.write('namespaces = [ "mount", "root" ]\n')
        self.pids: dict[str, int] = {}

    def owner(self, name: str) -> Instance:
        return self.confined if name == self.CONFINED else self.control

    def image(self, name: str) -> Path:
        return self.vms.path / f"{name}.img"

    def start(self) -> dict[str, Any]:
        """Start both (one at a time, see above); what the kernel shows of the confined one."""
        for name in (self.CONFINED, self.CONTROL):
            run = self.owner(name).run(self.vms.domain_xml(name))
            self.pids[name] = started_pid(wait_for_line(run, "started", timeout=START_TIMEOUT))
        pid = self.pids[self.CONFINED]
        return {"label": attr_current(pid),
                "own_ns": {n: os.readlink(f"/proc/{p}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                           for n, p in self.pids.items()},
                "view_root": sorted(os.listdir(f"/proc/{pid}/root"))}

    def opens(self, asks: dict[str, tuple[str, Path]]) -> dict[str, str]:
        """``{key: (domain, path)}``: each QEMU asked over QMP (at once) to open the path."""
        argvs = [self.owner(name).qmp_open(name, key, path) for key, (name, path) in asks.items()]
        return dict(zip(asks, map(qmp_outcome, clis(*argvs)), strict=True))

    def stop(self) -> None:
        stops = clis(self.confined.argv("destroy", self.CONFINED),
                     self.control.argv("destroy", self.CONTROL))
        assert all(s.returncode == 0 for s in stops), [s.stderr for s in stops]
        for proc in self.confined.procs + self.control.procs:
            proc.wait(timeout=START_TIMEOUT)

    def stop_all(self) -> None:
        self.confined.stop_all()
        self.control.stop_all()


def blockdev_add(node: str, path: Path) -> dict[str, Any]:
    """QMP: open ``path`` read-only as a ``file`` node (what a compromised QEMU would ask)."""
    return {"execute": "blockdev-add", "arguments": {
        "driver": "file", "node-name": node, "filename": str(path), "read-only": True,
        "locking": "off"}}


def clis(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI calls at the same time (the guest has two vCPUs); results in order."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, cwd=REPO) for argv in argvs]
    out = []
    for argv, proc in zip(argvs, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=START_TIMEOUT)
        out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return out


def qmp_outcome(proc: subprocess.CompletedProcess[str]) -> str:
    """"ok" when QEMU opened the file, else QEMU's error."""
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"{proc.args}: {proc.stdout}{proc.stderr}") from None
    return "ok" if "return" in reply else str(reply["error"]["desc"])


def started_pid(line: str) -> int:
    """The QEMU pid of "Domain 'X' started (id N, pid P)"."""
    return int(line.rsplit("pid", 1)[1].strip(" )\n"))


def attr_current(pid: int) -> str:
    return Path(f"/proc/{pid}/attr/current").read_text().strip("\x00\n")


def live_labels(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """(label, imagelabel) that ``dumpxml``'s live XML shows for the booted LSM."""
    import xml.etree.ElementTree as ET

    assert proc.returncode == 0, proc.stderr
    for sec in ET.fromstring(proc.stdout).iter("seclabel"):
        if sec.get("model") == LSM:
            return sec.findtext("label") or "", sec.findtext("imagelabel") or ""
    raise AssertionError(f"no {LSM} seclabel in {proc.stdout}")


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaps (the guest's PID 1 is a plain shell)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def file_state(paths: list[Path]) -> dict[str, Any]:
    """Owner, mode and every xattr (security.selinux included) of each path."""
    out = {}
    for p in paths:
        st = os.stat(p)
        xattrs = {k: os.getxattr(p, k).decode(errors="replace").rstrip("\x00")
                  for k in os.listxattr(p)}
        out[str(p)] = [st.st_uid, st.st_gid, oct(st.st_mode), xattrs]
    return out


def loaded_profiles() -> list[str]:
    if LSM != "apparmor":
        return []
    return sorted(ln.rsplit(" (", 1)[0] for ln in AA_PROFILES.read_text().splitlines()
                  if ln.startswith("vmconfine-"))


def leases_in_use(inst: Instance) -> int:
    """MCS pairs the instance's registry holds (0 for AppArmor)."""
    if LSM != "selinux":
        return 0
    from tests.support import make_ctx, make_host
    from vmconfine_selinux.driver import SELinuxDriver

    host = make_host(inst.root, [])
    probe = make_ctx(host, "<domain type='qemu'><name>lease-probe</name><memory>1024</memory>"
                           "<os><type arch='x86_64'>hvm</type></os></domain>")
    return SELinuxDriver(host).registry(probe).in_use()


def denials() -> list[str]:
    text = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    mark = 'apparmor="DENIED"' if LSM == "apparmor" else "avc:  denied"
    return [ln for ln in text.splitlines() if mark in ln]


def set_execmem_boolean(on: bool) -> None:
    subprocess.run(["setsebool", "virt_use_execmem", "1" if on else "0"], check=True,
                   capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    if LSM not in ("apparmor", "selinux"):
        pytest.skip(f"guest booted with {LSM or 'no'} LSM")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.chmod(WORK, 0o755)
    if LSM == "selinux":
        set_execmem_boolean(True)
    yield WORK


def vm_dir(work: Path, name: str) -> VmDir:
    d = work / name
    d.mkdir()
    os.chmod(d, 0o755)
    return VmDir(d)


def test_selinux_names_what_the_policy_lacks(work: Path) -> None:
    """Emulator labelled bin_t and no execmem: refused before anything is labelled."""
    if LSM != "selinux":
        pytest.skip("SELinux only")
    import selinux

    vms = vm_dir(work, "refused")
    inst = Instance(work / "refused-inst", "selinux")
    xml = vms.domain_xml("refused")
    image = vms.path / "refused.img"
    before = file_state([image])
    right = str(selinux.getfilecon_raw(EMULATOR)[1])
    wrong = right.replace(":qemu_exec_t:", ":bin_t:")
    selinux.setfilecon_raw(EMULATOR, wrong)
    set_execmem_boolean(False)
    try:
        proc = inst.run(xml)
        out, err = proc.communicate(timeout=START_TIMEOUT)
    finally:
        set_execmem_boolean(True)
        selinux.setfilecon_raw(EMULATOR, right)
    record("refused", {"rc": proc.returncode, "stdout": out, "stderr": err})
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert f"the emulator {EMULATOR} is labelled '{wrong}'" in lines[0]
    assert f"label it '{right}'" in lines[0]
    assert "setsebool -P virt_use_execmem on" in lines[0]
    assert "Traceback" not in err
    assert file_state([image]) == before
    assert leases_in_use(inst) == 0


def test_confined_qemu_opens_only_its_own_image(work: Path) -> None:
    vms = vm_dir(work, "vms")
    secret = work / "secret.txt"  # world-readable, outside every domain
    secret.write_text("not for any guest\n")
    os.chmod(secret, 0o644)
    if LSM == "selinux":
        # what the policy gives such a file in a home dir (user_home_t); a fresh tmpfs file
        # would be tmpfs_t, which refpolicy lets svirt_t read (guest shared memory)
        import selinux

        selinux.setfilecon_raw(str(secret), selinux.matchpathcon("/root/secret.txt", 0)[1])
    inst = Instance(work / "inst", LSM)
    control = Instance(work / "control", "none")
    xmls = {n: vms.domain_xml(n) for n in ("dom-a", "dom-b", "dom-c")}
    images = {n: vms.path / f"{n}.img" for n in xmls}
    before = file_state(list(images.values()))
    try:
        runs: dict[str, subprocess.Popen[str]] = {}
        pids: dict[str, int] = {}
        # one at a time: a QEMU started on a busy guest can miss the QMP connection deadline
        for name, owner in (("dom-a", inst), ("dom-b", inst), ("dom-c", control)):
            runs[name] = owner.run(xmls[name])
            pids[name] = started_pid(wait_for_line(runs[name], "started",
                                                   timeout=START_TIMEOUT))
        seen: dict[str, Any] = {"pids": pids}
        dumps = clis(inst.argv("dumpxml", "dom-a"), inst.argv("dumpxml", "dom-b"))
        for name, dump in zip(("dom-a", "dom-b"), dumps, strict=True):
            label, imagelabel = live_labels(dump)
            seen[name] = {"label": label, "imagelabel": imagelabel,
                          "current": attr_current(pids[name]),
                          "image": file_state([images[name]])[str(images[name])]}
        record("confined", seen)
        for name in ("dom-a", "dom-b"):
            got = seen[name]
            assert_confined(LSM, got)
            if LSM == "apparmor":
                rules = (inst.root / "profiles" / f"{got['label']}.files").read_text()
                assert f'"{images[name]}" rwk,' in rules, rules
        if LSM == "selinux":
            level_a, level_b = (seen[n]["label"].split(":", 3)[3] for n in ("dom-a", "dom-b"))
            record("levels", [level_a, level_b])
            assert level_a != level_b
            assert seen["dom-a"]["label"].split(":")[2] == "svirt_t"
        assert attr_current(pids["dom-c"]) == (  # the control runs unconfined
            "unconfined" if LSM == "apparmor" else "system_u:system_r:kernel_t:s0")

        asks = {
            "own": inst.qmp_open("dom-a", "own", images["dom-a"]),
            "other": inst.qmp_open("dom-a", "other", images["dom-b"]),
            "secret": inst.qmp_open("dom-a", "secret", secret),
            "control_other": control.qmp_open("dom-c", "other", images["dom-b"]),
            "control_secret": control.qmp_open("dom-c", "secret", secret),
        }
        opens = dict(zip(asks, map(qmp_outcome, clis(*asks.values())), strict=True))
        record("opens", opens)
        assert opens["own"] == "ok"
        assert "Permission denied" in opens["other"], opens
        assert "Permission denied" in opens["secret"], opens
        assert opens["control_other"] == opens["control_secret"] == "ok", opens

        stops = clis(inst.argv("destroy", "dom-a"), inst.argv("destroy", "dom-b"),
                     control.argv("destroy", "dom-c"))
        assert all(s.returncode == 0 for s in stops), [s.stderr for s in stops]
        for proc in runs.values():
            proc.wait(timeout=START_TIMEOUT)
    finally:
        inst.stop_all()
        control.stop_all()
    serial = (vms.path / "dom-a.serial").read_text()
    found = denials()
    after = {"files": file_state(list(images.values())), "profiles": loaded_profiles(),
             "leases": leases_in_use(inst), "qemu_gone": all(gone(p) for p in pids.values()),
             "serial": serial, "denials": found}
    record("after", after)
    assert "hello from the test guest" in serial
    assert after["files"] == before
    assert after["profiles"] == [] and after["leases"] == 0 and after["qemu_gone"]
    # QEMU was refused only what it was asked to open over QMP, never its own files
    image_a = seen["dom-a"]["imagelabel"]
    own = [ln for ln in found if str(images["dom-a"]) in ln or f"tcontext={image_a} " in ln]
    assert own == [], own
    expected = {str(images["dom-b"]), str(secret)}
    if LSM == "apparmor":
        profile_a = f'profile="{seen["dom-a"]["label"]}"'
        names = {ln.split(' name="', 1)[1].split('"', 1)[0] for ln in found if profile_a in ln}
        assert names == expected, found


def test_sigkill_at_every_step_is_finished_by_the_next_command(work: Path) -> None:
    vms = vm_dir(work, "crash")
    inst = Instance(work / "crash-inst", LSM)
    names = {step: f"crash-{step}" for step in STEPS}
    xmls = {step: vms.domain_xml(name) for step, name in names.items()}
    images = [vms.path / f"{name}.img" for name in names.values()]
    before = file_state(images)
    runs: dict[str, subprocess.Popen[str]] = {}
    try:
        # the steps before the QMP handshake start together; the later ones one by one, so a
        # busy guest never makes a QEMU miss its QMP connection deadline
        first = STEPS[:STEPS.index("qmp")]
        for step in first:
            runs[step] = inst.run(xmls[step], env={"VMCONFINE_PAUSE_AT": step})
        for step in STEPS:
            if step not in runs:
                runs[step] = inst.run(xmls[step], env={"VMCONFINE_PAUSE_AT": step})
            wait_for_line(runs[step], f"paused at {step}", stderr=True,
                          timeout=START_TIMEOUT)
        during = {"files_changed": file_state(images) != before, "profiles": loaded_profiles(),
                  "leases": leases_in_use(inst)}
        qemus = []
        for name in names.values():
            journal = inst.root / "run" / "qemu" / f"{name}.journal"
            for line in journal.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("op") in ("forked", "started") and rec.get("pid"):
                    qemus.append(int(rec["pid"]))
        for proc in runs.values():
            proc.send_signal(signal.SIGKILL)  # the supervisor only: QEMU stays behind
            proc.wait(timeout=60)
        left_running = sorted({p for p in qemus if not gone(p)})
        listing = inst.cli("list")
    finally:
        inst.stop_all()
    state = sorted(p.name for p in (inst.root / "run" / "qemu").iterdir()
                   if not p.name.startswith(".") and p.name != "selinux-mcs")
    after = {"list": listing.stdout, "list_rc": listing.returncode, "state": state,
             "files": file_state(images), "profiles": loaded_profiles(),
             "leases": leases_in_use(inst), "qemus": sorted(set(qemus)),
             "qemu_alive": sorted({p for p in qemus if not gone(p)})}
    record("sigkill", {"during": during, "left_running": left_running, "after": after})
    assert during["files_changed"]  # the runs that got that far had labelled the images
    # every run past "begin" holds an MCS lease / a loaded profile (both made by gen_label)
    held = during["leases"] if LSM == "selinux" else len(during["profiles"])
    assert held == len(STEPS) - 1
    assert len(set(qemus)) == len(STEPS) - STEPS.index("forked")
    assert listing.returncode == 0, listing.stderr
    assert not any(name in listing.stdout for name in names.values())
    assert after["files"] == before
    assert after["profiles"] == [] and after["leases"] == 0
    assert after["qemu_alive"] == []
    assert state == [], state




def swtpm_probe(state: Path, label: str | None, tss: tuple[int, int]) -> tuple[int, str]:
    """``swtpm socket --print-states`` on ``state`` (it locks the directory and lists the
    state files) as the tss account, under ``label`` entered at exec as vmconfine starts
    swtpm (AppArmor: ``aa_change_onexec``, SELinux: ``setexeccon``) or unconfined:
    (exit status, output)."""
    if LSM == "apparmor":
        from vmconfine_apparmor import kernel

        kernel.load_binding()
        change = kernel.change_onexec
    else:
        import selinux

        change = selinux.setexeccon_raw

    def enter() -> None:
        if label is not None:
            change(label)
        os.setgroups([])
        os.setgid(tss[1])
        os.setuid(tss[0])

    proc = subprocess.run(["/usr/bin/swtpm", "socket", "--tpm2", "--print-states",
                           "--tpmstate", f"dir={state}"], preexec_fn=enter,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def file_label(path: Path) -> str:
    return os.getxattr(path, "security.selinux").decode().rstrip("\x00")


#: the image label of another domain (an MCS pair no vmconfine domain of the test gets) and
#: the process label of that domain's swtpm
OTHER_IMAGE = "system_u:object_r:svirt_image_t:s0:c998,c999"
OTHER_PROCESS = "system_u:system_r:svirt_t:s0:c998,c999"


def tpm_started(inst: Instance, run: subprocess.Popen[str]) -> dict[str, Any]:
    """Once ``run`` says the TPM domain started: its QEMU and swtpm pids and labels, which
    helpers this start forked, the live XML's labels and QEMU's ``query-tpm`` over QMP."""
    from vmconfine.launch.journal import Journal

    qemu = started_pid(wait_for_line(run, "started", timeout=START_TIMEOUT))
    journal = Journal(inst.root / "run" / "qemu" / "dom-tpm.journal")
    forked = journal.records("pipeline", "helper-forked")
    pid = int([r for r in forked if r["name"] == "swtpm"][-1]["pid"])
    dump, query = clis(inst.argv("dumpxml", "dom-tpm"), inst.argv(
        "qemu-monitor-command", "dom-tpm", '{"execute": "query-tpm"}'))
    label, imagelabel = live_labels(dump)
    assert query.returncode == 0, query.stderr
    return {"pid": pid, "qemu_pid": qemu, "current": attr_current(pid),
            "qemu": attr_current(qemu), "label": label, "imagelabel": imagelabel,
            "exe": os.path.realpath(f"/proc/{pid}/exe"),
            "forked": [r["name"] for r in forked], "query": json.loads(query.stdout)}


def test_swtpm_runs_confined(work: Path) -> None:
    """A TPM domain: swtpm runs confined (AppArmor: ``<profile>//swtpm`` in enforce mode;
    SELinux: QEMU's label, its state under the image label), QEMU's TPM answers over QMP, the
    real swtpm binary under that label is denied another domain's TPM state (controls:
    unconfined, and SELinux: with that domain's own label, it is not), and after destroy no
    swtpm, profile or label is left. SELinux also restarts the domain: the state is reused
    under the new MCS pair."""
    import hashlib
    import pwd
    import time
    import uuid as uuidlib

    began = time.monotonic()
    tss = pwd.getpwnam("tss")
    # the guest's /tmp is a RAM overlay whose root has the upper dir's mode (0755); swtpm_setup
    # (as tss) makes its certificates' temporary directory there, as on a host's /tmp (1777)
    os.chmod("/tmp", 0o1777)
    inst = Instance(work / "tpm-inst", LSM)
    uuid, other = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    xml = work / "tpm.xml"
    xml.write_text(TPM_XML.format(name="dom-tpm", uuid=uuid, model="tpm-crb"))
    # another domain's TPM state, where vmconfine keeps it, owned by the swtpm account
    storage = inst.root / "lib" / "qemu" / "swtpm"
    stolen = storage / other / "tpm2"
    stolen.mkdir(parents=True)
    (stolen / "tpm2-00.permall").write_bytes(b"another domain's TPM secrets")
    for p in (stolen, stolen / "tpm2-00.permall"):
        os.chown(p, tss.pw_uid, tss.pw_gid)
        if LSM == "selinux":
            os.setxattr(p, "security.selinux", OTHER_IMAGE.encode())
    os.chmod(stolen.parent, 0o711)
    own = storage / uuid / "tpm2" / "tpm2-00.permall"
    ids = (tss.pw_uid, tss.pw_gid)
    try:
        run = inst.run(xml, extra=("--paused",))
        seen: dict[str, Any] = tpm_started(inst, run)
        label, pid = seen["label"], seen["pid"]
        seen["loaded"] = [ln for ln in loaded_profiles() if ln.startswith(label)]
        seen["own_state"] = sorted(p.name for p in own.parent.iterdir())
        if LSM == "selinux":
            seen["own_label"] = file_label(own)
            seen["swtpm_file"] = file_label(Path("/usr/bin/swtpm"))
            seen["matching"] = swtpm_probe(stolen, OTHER_PROCESS, ids)
        probe_label = f"{label}//swtpm" if LSM == "apparmor" else label
        seen["confined"] = swtpm_probe(stolen, probe_label, ids)
        seen["control"] = swtpm_probe(stolen, None, ids)
        stop = inst.cli("destroy", "dom-tpm")
        run.wait(timeout=START_TIMEOUT)
        seen["destroy"] = stop.returncode
        seen["after"] = {"swtpm_gone": gone(pid), "profiles": loaded_profiles(),
                         "leases": leases_in_use(inst)}
        if LSM == "selinux":
            seen["after"]["own_label"] = file_label(own)
            digest = hashlib.sha256(own.read_bytes()).hexdigest()
            again = inst.run(xml, extra=("--paused",))
            restart = tpm_started(inst, again)
            restart["same_state"] = hashlib.sha256(own.read_bytes()).hexdigest() == digest
            restart["own_label"] = file_label(own)
            stop = inst.cli("destroy", "dom-tpm")
            again.wait(timeout=START_TIMEOUT)
            restart["destroy"] = stop.returncode
            restart["after"] = {"swtpm_gone": gone(restart["pid"]),
                                "leases": leases_in_use(inst), "own_label": file_label(own)}
            seen["restart"] = restart
    except BaseException:  # what the failed start left to read: swtpm's log, the AVCs
        swtpm_log = inst.root / "log" / "qemu" / "dom-tpm-swtpm.log"
        record("tpm_failure", {"log": swtpm_log.read_text(errors="replace")[-4000:]
                               if swtpm_log.exists() else None, "denials": denials()[-40:]})
        raise
    finally:
        inst.stop_all()
    mark = f'profile="{label}//swtpm"' if LSM == "apparmor" else f"scontext={label} "
    found = [ln for ln in denials() if mark in ln]
    seen["denials"] = found
    seen["seconds"] = round(time.monotonic() - began, 1)
    record("tpm", seen)
    assert seen["exe"] == os.path.realpath("/usr/bin/swtpm")
    assert "tpm2-00.permall" in seen["own_state"]
    assert_tpm_answers(seen["query"])
    if LSM == "apparmor":
        assert seen["current"] == f"{label}//swtpm (enforce)"
        assert sorted(seen["loaded"]) == [label, f"{label}//swtpm"]
        # the only thing swtpm's profile refused: the probe, in the other domain's state
        assert found and all(f'name="{stolen}/' in ln for ln in found), found
    else:
        assert seen["current"] == seen["qemu"] == label  # QEMU's sVirt label, its MCS pair
        assert label.split(":")[2] == "svirt_t"
        assert ":swtpm_exec_t:" in seen["swtpm_file"]  # entered through vmconfine's module
        assert seen["own_label"] == seen["imagelabel"]
        assert seen["forked"] == ["swtpm_setup", "swtpm"]
        # the probe was refused by MCS alone: the other domain's own label reads its state
        assert seen["matching"][0] == 0 and '"permall"' in seen["matching"][1], seen
        # the only thing refused to swtpm (QEMU shares the label: its AVCs are left out)
        swtpm_found = [ln for ln in found if ' comm="swtpm" ' in ln]
        assert swtpm_found and all(f"tcontext={OTHER_IMAGE} " in ln
                                   for ln in swtpm_found), found
        assert seen["after"]["own_label"] != seen["imagelabel"]
        restart = seen["restart"]
        assert restart["forked"] == ["swtpm"]  # no swtpm_setup: the state was there
        assert restart["same_state"]
        # a new start, a new MCS pair (random; equal only by a one-in-500000 chance)
        assert restart["current"] == restart["qemu"] == restart["label"]
        assert restart["own_label"] == restart["imagelabel"]
        assert_tpm_answers(restart["query"])
        assert restart["destroy"] == 0
        assert restart["after"]["swtpm_gone"] and restart["after"]["leases"] == 0
        assert restart["after"]["own_label"] == seen["after"]["own_label"]
    assert seen["confined"][0] != 0 and "permall" not in seen["confined"][1], seen
    assert seen["control"][0] == 0 and '"permall"' in seen["control"][1], seen
    assert seen["destroy"] == 0
    assert {k: seen["after"][k] for k in ("swtpm_gone", "profiles", "leases")} == {
        "swtpm_gone": True, "profiles": [], "leases": 0}


def assert_tpm_answers(reply: dict[str, Any]) -> None:
    """QMP ``query-tpm``: the CRB device on the emulator backend."""
    [tpm] = reply["return"]
    assert tpm["model"] == "tpm-crb" and tpm["options"]["type"] == "emulator", reply
