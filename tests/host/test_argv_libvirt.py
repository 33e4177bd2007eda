"""vmconfine's command line builds the same VM as libvirt's for the same domain XML.

For each corpus XML, ``virsh domxml-to-native qemu-argv`` (libvirt 9, Debian's
libvirt-daemon-driver-qemu + libvirt-clients) gives libvirt's command line; no daemon is
needed: virsh opens the embedded driver (``qemu:///embed?root=DIR``) as an unprivileged user
(as root, libvirt's privileged embedded driver would want the ``libvirt-qemu`` account that only
libvirt-daemon-system creates). QEMU is started paused from both command lines, one after the
other, and the QMP views must agree: block devices and backing chains with the same read-only
flags, memory, CPUs, resolved machine type, chardevs, PCI device classes and ids, VNC.

Left out on purpose: network interfaces (libvirt's domxml-to-native turns them into tap
devices that need /dev/net/tun; they are removed from the XML given to both), libvirt's
master-key secret object and its monitor (each side's monitor is only used to ask QMP).
``type='kvm'`` guests run as ``type='qemu'`` here (both command lines use TCG). Host
devices cannot be compared (libvirt needs the devices present).

Q35 topology: for held-out Q35 domains (tests/data/pci/) both command lines must place every
PCI device on the same bus and address behind the same pcie-root-ports and
pcie-to-pci-bridge, and the running VMs (firmware started, so every bridge's bus is numbered)
must show the same PCI tree over QMP: class, vendor and device id of every function, by its
path of slots from pcie.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError, QMPClient

from tests.host.test_argv_qmp import (
    CASES,
    CONFIG_OVERRIDES,
    DATA,
    Workspace,
    launch,
    prepare,
    qemu_binary,
    qemu_log,
    qmp_view,
    wait_exit,
)
from tests.support import require

pytestmark = pytest.mark.host

QEMU_DRIVER_DIRS = ("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver",
                    "/usr/lib64/libvirt/connection-driver", "/usr/lib/libvirt/connection-driver")
#: cases that cannot be compared, and why
EXCLUDED = {
    "hostdev-pci": "libvirt needs the PCI device to exist",
    "hostdev-usb": "libvirt resolves the USB device on the host, which has none",
}
#: flags (keys of :func:`flags`) compared in every case but these, and why
FLAG_DIFFERENCES = {
    "disk-backing-discover": {
        "disks": "libvirt's domxml-to-native does not probe images, so it shows no backing "
                 "chain for a disk whose XML has no <backingStore>; at start libvirt probes "
                 "the chain as vmconfine always does (QMP above compares the started VMs)",
    },
}
#: qemu.conf lines for the CONFIG_OVERRIDES of the corpus
QEMU_CONF = {
    "seccomp_sandbox": lambda v: f"seccomp_sandbox = {int(v)}",
    "set_process_name": lambda v: f"set_process_name = {1 if v else 0}",
}
#: separates the answers of a virsh script (domxml_to_native_many)
MARK = "@@vmconfine-next@@"
BRIDGES = ("pcie-root-port", "pci-bridge", "pcie-pci-bridge")
NOBODY = 65534


class LibvirtEmbed:
    """``virsh -c qemu:///embed?root=DIR`` run as an unprivileged user."""

    def __init__(self, root: Path, virsh: str) -> None:
        self.root = root
        self.virsh = virsh
        self.uri = f"qemu:///embed?root={root}"

    def _run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={self.root}"]
        cmd = [*env, self.virsh, "-q", "-c", self.uri, *args]
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              input=stdin)

    def domxml_to_native_many(self, xmls: dict[str, str]) -> dict[str, str]:
        """``domxml-to-native`` of many domains in one virsh (commands read from stdin, as a
        virsh script: one connection instead of one per domain); name → the command line, or
        ``error: ...`` when libvirt refused the domain."""
        script = []
        for name, xml in xmls.items():
            path = self.root / f"{name}.xml"
            path.write_text(xml)
            path.chmod(0o644)
            script += [f"domxml-to-native qemu-argv {path}", f"echo {MARK}"]
        proc = self._run(stdin="\n".join(script) + "\n")
        # virsh echoes a prompt line per command (readline may redraw it), then the answer: a
        # single line, without a final newline
        chunks = proc.stdout.split(f"virsh # echo {MARK}\n")[:-1]
        answers = [next((ln for ln in c.split("\n") if ln.startswith("LC_ALL=")), "")
                   for c in chunks]
        errors = iter(ln for ln in proc.stderr.splitlines() if ln.startswith("error:"))
        result = {name: answer.strip() or next(errors, "error: (no message)")
                  for name, answer in zip(xmls, answers, strict=False)}
        assert len(result) == len(xmls), proc.stderr
        return result

    def domxml_to_native(self, name: str, xml: str, settings: dict[str, Any],
                         extra_conf: str = "") -> str:
        """libvirt's command line; ``extra_conf``: more qemu.conf lines, as written."""
        conf = self.root / "etc" / "qemu.conf"
        conf.write_text("".join(QEMU_CONF[k](v) + "\n" for k, v in settings.items())
                        + extra_conf)
        path = self.root / f"{name}.xml"
        path.write_text(xml)
        path.chmod(0o644)
        proc = self._run("domxml-to-native", "qemu-argv", str(path))
        errors = [ln for ln in proc.stderr.splitlines() if " info : " not in ln]
        assert proc.returncode == 0, f"virsh domxml-to-native failed: {' '.join(errors)}"
        return proc.stdout.strip()


@pytest.fixture(scope="module")
def libvirt() -> Iterator[LibvirtEmbed]:
    virsh = shutil.which("virsh")
    require(virsh, "virsh is not installed (apt-get install libvirt-clients)")
    require(any(os.path.exists(f"{d}/libvirt_driver_qemu.so") for d in QEMU_DRIVER_DIRS),
            "libvirt's QEMU driver is not installed (apt-get install "
            "libvirt-daemon-driver-qemu)")
    if os.geteuid() == 0:
        require(shutil.which("setpriv"), "setpriv is missing (util-linux)")
        require(_has_uid(NOBODY), "no nobody account (uid 65534)")
    assert virsh is not None
    root = Path(tempfile.mkdtemp(prefix="vmc-lv-", dir="/tmp"))
    (root / "etc").mkdir()
    if os.geteuid() == 0:
        for path in (root, root / "etc"):
            os.chown(path, NOBODY, NOBODY)
    try:
        yield LibvirtEmbed(root, virsh)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def for_libvirt(case: str) -> str:
    """The corpus XML both sides get: no interfaces, TCG."""
    text = (DATA / f"{case}.xml").read_text()
    text = re.sub(r"\s*<interface\b.*?</interface>", "", text, flags=re.S)
    return text.replace("<domain type='kvm'", "<domain type='qemu'")


def split_native(line: str) -> tuple[dict[str, str], list[str]]:
    """``NAME=value ... binary args`` → (environment, argv)."""
    words = shlex.split(line)
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def libvirt_runtime(argv: list[str]) -> str:
    """Create what libvirt would at start (domain dir, master key); return its monitor path."""
    monitor = None
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg == "-chardev" and value.startswith("socket,id=charmonitor,"):
            monitor = re.search(r"path=((?:[^,]|,,)+)", value)
        if arg == "-chardev" and value.startswith("socket,") and "server=on" in value:
            sock = re.search(r"path=((?:[^,]|,,)+)", value)
            if sock is not None:  # a generated channel path under libvirt's root
                Path(sock.group(1).replace(",,", ",")).parent.mkdir(parents=True,
                                                                     exist_ok=True)
        if arg == "-object" and '"masterKey0"' in value:
            key = re.search(r'"file":"([^"]+)"', value)
            assert key is not None
            Path(key.group(1)).parent.mkdir(parents=True, exist_ok=True)
            Path(key.group(1)).write_bytes(os.urandom(32))
    assert monitor is not None, "libvirt's command line has no monitor"
    path = monitor.group(1).replace(",,", ",")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def options(argv: list[str], name: str) -> list[str]:
    """The values of every ``name`` option of ``argv``, sorted."""
    return sorted(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name)


def run_libvirt(argv: list[str], env: dict[str, str], nvram_template: str | None = None,
                ) -> tuple[dict[str, Any], str | None]:
    """QEMU started paused from libvirt's command line, with what libvirt makes at start (its
    domain directory and master key, the generated channel directory, the NVRAM copied from
    ``nvram_template``, swtpm for a TPM emulator); return its QMP view and the NVRAM path
    (None: no NVRAM)."""
    ws = Workspace(Path(tempfile.mkdtemp(prefix="vmc-lv-run-", dir="/tmp")))
    try:
        monitor = libvirt_runtime(argv)
        for value in options(argv, "-chardev"):
            found = re.search(r"^socket,.*?path=((?:[^,]|,,)+)", value)
            if found:
                Path(found.group(1).replace(",,", ",")).parent.mkdir(parents=True,
                                                                     exist_ok=True)
        nvram = next((json.loads(v)["filename"] for v in options(argv, "-blockdev")
                      if "pflash1-storage" in v), None)
        if nvram is not None:
            assert nvram_template is not None, "libvirt's command line has an NVRAM"
            Path(nvram).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(nvram_template, nvram)
        proc = launch(_with_swtpm(argv, ws), env, ws, "libvirt")
        view = qmp_view(monitor, proc, ws, "libvirt")
        assert wait_exit(proc) == 0
    finally:
        ws.close()
        shutil.rmtree(ws.root, ignore_errors=True)
    return view, nvram


def _with_swtpm(argv: list[str], ws: Workspace) -> list[str]:
    """libvirt's command line as libvirt runs it: ``domxml-to-native`` shows a TPM emulator's
    chardev as ``null`` (no swtpm in a dry run); at start libvirt starts swtpm and gives QEMU
    its socket, which this does too."""
    out = list(argv)
    for i, value in enumerate(out):
        found = re.fullmatch(r"null,id=(chrtpm\d*)", value)
        if i and out[i - 1] == "-chardev" and found:
            sock = str(ws.root / f"{found.group(1)}.sock")
            _swtpm(sock, ws)
            out[i] = f"socket,id={found.group(1)},path={sock}"
    return out


def _swtpm(sock: str, ws: Workspace) -> None:
    """swtpm on ``sock``, as libvirt starts it before QEMU (it ends when QEMU lets go)."""
    swtpm = shutil.which("swtpm")
    require(swtpm, "swtpm is not installed (apt-get install swtpm)")
    assert swtpm is not None
    state = ws.root / f"tpm-{len(list(ws.root.glob('tpm-*')))}"
    state.mkdir()
    Path(sock).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl",
                             f"type=unixio,path={sock}", "--terminate"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ws.defer(lambda: (proc.kill(), proc.wait(timeout=30)))
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "swtpm did not listen"
        time.sleep(0.02)


def comparable(view: dict[str, Any]) -> dict[str, Any]:
    """The parts of a QMP view both command lines must agree on."""
    vnc = view["vnc"]
    return {
        "name": view["name"], "uuid": view["uuid"], "cpus": view["cpus"],
        "memory": view["memory"], "machine": view["machine"], "kvm": view["kvm"],
        "status": view["status"], "block": view["block"], "nodes": view["nodes"],
        "chardev": {label: fname.split(":")[0] for label, fname in view["chardev"].items()},
        # machine built-ins (no id) by PCI class; user devices by id and QOM type (query-pci
        # cannot see behind a bridge before the firmware numbered the buses)
        "builtin_pci": sorted(cls for qid, cls in view["pci"] if not qid),
        "devices": {k: v for k, v in view["peripheral"].items() if v not in BRIDGES},
        "vnc": (vnc["enabled"], vnc["family"], vnc["host"]),
        "tpm": view["tpm"],
    }


def _options(value: str) -> dict[str, str]:
    """``a,b=c,d=e`` → {"": "a", "b": "c", "d": "e"} (QEMU's option syntax, ``,,`` kept)."""
    out: dict[str, str] = {}
    for part in re.split(r"(?<!,),(?!,)", value):
        key, eq, val = part.partition("=")
        out[key if eq else ""] = val if eq else key
    return out


def flags(argv: list[str], topology: bool = False) -> dict[str, Any]:
    """The command-line flags that change the guest or its confinement, normalised so that
    spellings QEMU treats alike compare equal: boot order per device, -sandbox, each disk's
    block graph (cache, discard, aio, detect-zeroes, read-only, formats) and write-cache,
    machine options (but the versioned type name and libvirt's always-on RAM backend),
    -rtc, -cpu (absent = QEMU's default model), the vCPU counts, the topology when the XML
    gives one (``topology``; libvirt's default topology is a documented difference), the
    watchdog and a file RAM backend.
    """
    opts: dict[str, list[str]] = {}
    for i, arg in enumerate(argv[:-1]):
        if arg.startswith("-") and not argv[i + 1].startswith("-"):
            opts.setdefault(arg, []).append(argv[i + 1])
    devices = [json.loads(v) for v in opts.get("-device", []) if v.startswith("{")]
    nodes = {n["node-name"]: n for n in (json.loads(v) for v in opts.get("-blockdev", []))}

    def chain(name: str | None) -> list[dict[str, Any]]:
        out = []
        while name is not None:
            fmt = nodes[name]
            store = nodes[fmt["file"]]
            out.append({"format": fmt["driver"], "read-only": fmt.get("read-only"),
                        "storage": store["driver"], "aio": store.get("aio"),
                        "cache": (store.get("cache"), fmt.get("cache")),
                        "discard": (store.get("discard"), fmt.get("discard")),
                        "detect-zeroes": fmt.get("detect-zeroes")})
            name = fmt.get("backing")
        return out

    machine = _options(opts["-machine"][0])
    machine.pop("")
    for unit in ("pflash0", "pflash1"):
        if unit in machine:
            machine[unit] = str(chain(machine[unit]))
    if machine.get("memory-backend") == "pc.ram" and not any(
            '"memory-backend-file"' in v for v in opts.get("-object", [])):
        machine.pop("memory-backend")  # libvirt's plain RAM backend: the same guest RAM
    if "-no-acpi" in argv:
        machine["acpi"] = "off"
    smp = _options(opts["-smp"][0])
    count = smp.pop("")
    maxcpus = smp.pop("maxcpus", count)
    if topology:
        smp.setdefault("dies", "1")
    actions = [v.removeprefix("watchdog=") for v in opts.get("-action", [])
               if v.startswith("watchdog=")] + opts.get("-watchdog-action", [])
    default_cpu = "qemu32" if argv[0].endswith("-i386") else "qemu64"  # the binary's own
    return {
        "boot": opts.get("-boot"),
        "bootindex": {d["id"]: d["bootindex"] for d in devices if "bootindex" in d},
        "sandbox": opts.get("-sandbox"),
        "disks": {d["id"]: (chain(d.get("drive")), d.get("write-cache")) for d in devices
                  if "drive" in d},
        "machine": machine,
        "rtc": opts.get("-rtc", ["base=utc"]),
        "cpu": opts.get("-cpu", [default_cpu]),
        "smp": (count, maxcpus, smp if topology else None),
        "watchdog": ([d["driver"] for d in devices if d["id"].startswith("watchdog")],
                     actions),
        "ram": [v for v in opts.get("-object", []) if "memory-backend-file" in v],
    }


COMPARED = [c for c in CASES if c not in EXCLUDED]


def test_enough_cases_are_compared() -> None:
    assert len(COMPARED) >= 10


@pytest.mark.parametrize("case", COMPARED)
def test_same_vm_as_libvirt(case: str, libvirt: LibvirtEmbed) -> None:
    qemu_binary()
    root = Path(tempfile.mkdtemp(prefix="vmc-cmp-", dir="/tmp"))
    ws = Workspace(root)
    try:
        _domain, ours, paths = prepare(case, ws, for_libvirt(case))
        native = libvirt.domxml_to_native(case, ws.xml, CONFIG_OVERRIDES.get(case, {}))
        env, argv = split_native(native)
        assert os.path.basename(argv[0]) == os.path.basename(ours.emulator)
        monitor = libvirt_runtime(argv)

        proc = launch(ours.argv(), ours.env, ws, "vmconfine")
        view_ours = qmp_view(paths.monitor_socket, proc, ws, "vmconfine")
        assert wait_exit(proc) == 0
        proc = launch(argv, env, ws, "libvirt")
        view_libvirt = qmp_view(monitor, proc, ws, "libvirt")
        assert wait_exit(proc) == 0
    finally:
        ws.close()
        shutil.rmtree(root, ignore_errors=True)
    assert comparable(view_ours) == comparable(view_libvirt)
    topology = bool(_domain.cpu and _domain.cpu.topology)
    mine, theirs = flags(ours.argv(), topology), flags(argv, topology)
    for key, _why in FLAG_DIFFERENCES.get(case, {}).items():
        mine.pop(key), theirs.pop(key)
    assert mine == theirs
    # PCI class of every device both sides let QMP see
    ours_pci, theirs_pci = dict(view_ours["pci"]), dict(view_libvirt["pci"])
    for qid in set(ours_pci) & set(theirs_pci) - {""}:
        assert ours_pci[qid] == theirs_pci[qid], qid


# --------------------------------------------------------------------------- Q35 topology

PCI_DATA = DATA.parent / "pci"
#: held-out Q35 domains (tests/unit/test_pci.py compares their addresses with libvirt's XML)
Q35_CASES = sorted(p.stem for p in PCI_DATA.glob("*.xml") if not p.stem.endswith(".libvirt"))


def q35_xml(case: str) -> str:
    """A held-out Q35 domain for both sides: images in the workspace, a channel socket path
    (vmconfine's generated one is made by the pipeline), no interfaces (see for_libvirt)."""
    text = (PCI_DATA / f"{case}.xml").read_text().replace("/nonexist/", "@DIR@/")
    text = text.replace("<channel type='unix'>",
                        "<channel type='unix'><source mode='bind' path='@DIR@/ga.sock'/>")
    text = re.sub(r"\s*<interface\b.*?</interface>", "", text, flags=re.S)
    return text.replace("<graphics type='vnc'/>",
                        "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>")


def placement(argv: list[str]) -> dict[str, tuple[Any, ...]]:
    """Every -device with an id → (driver, bus, addr, multifunction, port, chassis)."""
    out = {}
    for i, arg in enumerate(argv[:-1]):
        if arg == "-device" and argv[i + 1].startswith("{"):
            d = json.loads(argv[i + 1])
            driver = {"lsi": "lsi53c895a"}.get(d["driver"], d["driver"])  # QEMU's alias
            out[d["id"]] = (driver, d.get("bus"), d.get("addr"), d.get("multifunction"),
                            d.get("port"), d.get("chassis"))
    return out


async def _pci_tree(sock: str, proc: subprocess.Popen[bytes]) -> list[tuple[Any, ...]]:
    """Run the firmware until it has numbered every bridge's bus, then the PCI tree QMP
    shows: (path of (slot, function) from pcie.0, class, vendor, device) per function."""
    client = QMPClient("vmconfine-test")
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no monitor"
        if os.path.exists(sock):
            with contextlib.suppress(ConnectError):  # it exists a moment before QEMU listens
                await client.connect(sock)
                break
        await asyncio.sleep(0.05)
    try:
        await client.execute("cont")
        while True:
            buses = await client.execute("query-pci")
            tree: list[tuple[Any, ...]] = []
            numbered = _walk(buses[0]["devices"], (), tree)
            if numbered:
                break
            assert time.monotonic() < deadline, "the firmware never numbered the buses"
            await asyncio.sleep(0.2)
        await client.execute("quit")
    finally:
        with contextlib.suppress(Exception, EOFError):
            await client.disconnect()
    return sorted(tree)


def _walk(devices: list[dict[str, Any]], path: tuple[Any, ...],
          out: list[tuple[Any, ...]]) -> bool:
    numbered = True
    for d in devices:
        here = (*path, (d["slot"], d["function"]))
        out.append((here, d["class_info"]["class"], d["id"]["vendor"], d["id"]["device"]))
        bridge = d.get("pci_bridge")
        if bridge is not None:
            numbered &= bridge["bus"]["secondary"] > 0
            numbered &= _walk(bridge.get("devices", []), here, out)
    return numbered


def pci_tree(sock: str, proc: subprocess.Popen[bytes], ws: Workspace,
             tag: str) -> list[tuple[Any, ...]]:
    try:
        return asyncio.run(asyncio.wait_for(_pci_tree(sock, proc), 60))
    except Exception as exc:
        raise AssertionError(f"QMP failed: {exc!r}; QEMU said: {qemu_log(ws, tag)}") from exc


def test_enough_q35_cases() -> None:
    assert len(Q35_CASES) >= 4


@pytest.mark.parametrize("case", Q35_CASES)
def test_q35_topology_is_libvirts(case: str, libvirt: LibvirtEmbed) -> None:
    """The same pcie-root-ports, bridge and device placement on the command line, and the
    same PCI tree (classes, vendor and device ids behind the bridges) in the running VM."""
    qemu_binary()
    root = Path(tempfile.mkdtemp(prefix="vmc-q35-", dir="/tmp"))
    ws = Workspace(root)
    try:
        _domain, ours, paths = prepare(case, ws, q35_xml(case))
        native = libvirt.domxml_to_native(case, ws.xml, {})
        env, argv = split_native(native)
        monitor = libvirt_runtime(argv)
        mine, theirs = placement(ours.argv()), placement(argv)
        proc = launch(ours.argv(), ours.env, ws, "ours")
        tree_ours = pci_tree(paths.monitor_socket, proc, ws, "ours")
        # both sides listen on the first VNC port (autoport): QEMU holds it until it has
        # exited, not merely until it answered "quit"
        assert wait_exit(proc) == 0
        tree_libvirt = pci_tree(monitor, launch(argv, env, ws, "libvirt"), ws, "libvirt")
    finally:
        ws.close()
        shutil.rmtree(root, ignore_errors=True)
    on_pci = [k for k, v in theirs.items() if str(v[1]).startswith(("pci.", "pcie."))]
    assert {k: mine.get(k) for k in on_pci} == {k: theirs[k] for k in on_pci}
    assert not [k for k, v in mine.items() if str(v[1]).startswith("pci") and k not in on_pci]
    assert any(v[0] == "pcie-root-port" for v in mine.values())
    assert tree_ours == tree_libvirt
    assert any(len(path) > 1 for path, *_ in tree_ours)  # devices behind bridges were seen
