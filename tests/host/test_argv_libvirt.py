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
master-key secret object and its monitor (each side's monitor is only used to ask QMP), PCI
bridges (libvirt adds pcie-root-ports on q35; vmconfine lets QEMU place devices on the root
bus). ``type='kvm'`` guests run as ``type='qemu'`` here (both command lines use TCG). Host
devices cannot be compared (libvirt needs the devices present).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host.test_argv_qmp import (
    CASES,
    CONFIG_OVERRIDES,
    DATA,
    Workspace,
    launch,
    prepare,
    qemu_binary,
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
BRIDGES = ("pcie-root-port", "pci-bridge")
NOBODY = 65534


class LibvirtEmbed:
    """``virsh -c qemu:///embed?root=DIR`` run as an unprivileged user."""

    def __init__(self, root: Path, virsh: str) -> None:
        self.root = root
        self.virsh = virsh
        self.uri = f"qemu:///embed?root={root}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={self.root}"]
        cmd = [*env, self.virsh, "-q", "-c", self.uri, *args]
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

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
        if arg == "-object" and '"masterKey0"' in value:
            key = re.search(r'"file":"([^"]+)"', value)
            assert key is not None
            Path(key.group(1)).parent.mkdir(parents=True, exist_ok=True)
            Path(key.group(1)).write_bytes(os.urandom(32))
    assert monitor is not None, "libvirt's command line has no monitor"
    path = monitor.group(1).replace(",,", ",")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


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
