"""Real QEMU started from vmconfine's command line: QMP shows the VM the XML describes.

For every corpus XML (tests/data/argv/) that can run here, the test creates the images and
files it names, starts QEMU paused (``-S``) with ``build_command(...).argv()`` and its
environment, and compares QMP's view (block devices and backing chains with read-only flags,
CPUs, memory, chardevs, PCI device classes, machine type, name, UUID, accelerator) with what
the domain model asks for. QEMU is always killed in a finally.

Host devices cannot be passed through here: ``hostdev-pci`` and the bus/address USB device are
checked to be rejected by QEMU for the missing host device (so the options are right up to
the device lookup), and ``hostdev-usb`` runs as a documented variant with only the
vendor/product device, which QEMU accepts and waits for.

The helpers here are shared with tests/host/test_argv_libvirt.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns
from qemu.qmp import ConnectError, QMPClient

from tests.support import require
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import Domain, parse_domain
from vmconfine.launch import preopen
from vmconfine.launch.journal import Journal
from vmconfine.launch.netdev import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, tun_ioctl
from vmconfine.qemu.argv import CommandPaths, PassedFd, QemuCommand, build_command
from vmconfine.qemu.fdpass import NETFD
from vmconfine.qemu.netdev import TUN_PATH

pytestmark = pytest.mark.host

DATA = Path(__file__).resolve().parent.parent / "data" / "argv"
CASES = sorted(p.stem for p in DATA.glob("*.xml"))
IMAGES: dict[str, dict[str, str]] = json.loads((DATA / "images.json").read_text())

CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "seccomp-off": {"seccomp_sandbox": 0},
    "process-name": {"set_process_name": True},
}

#: cases QEMU must refuse here, and the error it must give (no such host device)
REFUSED = {
    "hostdev-pci": "vfio /sys/bus/pci/devices/0000:06:12.5: no such host device",
}
#: documented variants: (text to remove from the XML, why)
VARIANTS = {
    "hostdev-usb": (
        "<hostdev mode='subsystem' type='usb' managed='no'>\n      <source>\n"
        "        <address bus='1' device='3'/>\n      </source>\n    </hostdev>\n",
        "USB device 1:3 does not exist here; QEMU waits for a vendor/product device instead",
    ),
}

#: PCI class codes of the devices vmconfine adds (QMP query-pci class_info.class)
PCI_CLASSES = {
    "virtio-blk-pci": 0x0100, "virtio-scsi-pci": 0x0100, "lsi53c895a": 0x0100,
    "ahci": 0x0106, "piix3-usb-uhci": 0x0C03, "qemu-xhci": 0x0C03, "nec-usb-xhci": 0x0C03,
    "usb-ehci": 0x0C03, "virtio-net-pci": 0x0200, "e1000": 0x0200, "e1000e": 0x0200,
    "rtl8139": 0x0200, "VGA": 0x0300, "cirrus-vga": 0x0300, "virtio-vga": 0x0300,
    "virtio-serial-pci": 0x0780, "virtio-balloon-pci": 0x00FF, "virtio-rng-pci": 0x00FF,
    "i6300esb": 0x0880, "pcie-root-port": 0x0604, "pcie-pci-bridge": 0x0604,
    "vfio-pci": -1,
}


# --------------------------------------------------------------------------- workspace


class Workspace:
    """A scratch directory for one guest, with cleanups run in reverse order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.img = root / "img"
        self.img.mkdir(parents=True, exist_ok=True)
        self._cleanups: list[Callable[[], object]] = []
        self.servers: list[socket.socket] = []  # listening ends of connect-mode chardevs
        self.xml = ""  # the XML after substitution (set by prepare)

    def defer(self, fn: Callable[[], object]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    require(path, "qemu-img is not installed (apt-get install qemu-utils)")
    assert path is not None
    return path


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    require(path, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    assert path is not None
    return path


def fake_bzimage(path: Path) -> None:
    """A file QEMU's x86 Linux loader accepts (boot protocol 2.15 header); never executed."""
    setup_sects = 4
    data = bytearray(512 * (setup_sects + 1) + 64 * 1024)
    data[0x1F1] = setup_sects
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    data[0x211] = 0x01  # LOADED_HIGH: a bzImage
    struct.pack_into("<I", data, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", data, 0x238, 2048)  # cmdline_size
    path.write_bytes(bytes(data))


def _loop_device(ws: Workspace, name: str) -> str:
    require(os.geteuid() == 0, "block-device disks need root for loop devices")
    losetup = shutil.which("losetup") or "/sbin/losetup"
    backing = ws.img / f"{name}.loop"
    with open(backing, "wb") as f:
        f.truncate(4 << 20)
    proc = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True,
                          text=True, check=False)
    require(proc.returncode == 0, f"no loop device available: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    ws.defer(lambda: subprocess.run([losetup, "-d", dev], check=False, capture_output=True))
    return dev


def substitute(case: str, ws: Workspace, text: str | None = None) -> str:
    """The corpus XML (or ``text``) with real paths: images under ``ws.img``, a pty, loop
    devices, and the local QEMU when the XML names an emulator that is not installed.
    Corpus cases in VARIANTS lose the part that cannot run here."""
    if text is None:
        text = (DATA / f"{case}.xml").read_text()
        if case in VARIANTS:
            cut, _why = VARIANTS[case]
            assert cut in text
            text = text.replace(cut, "")
    text = text.replace("@DIR@", str(ws.img))
    if "@TTY@" in text:
        master, slave = os.openpty()
        ws.defer(lambda: os.close(master))
        ws.defer(lambda: os.close(slave))
        text = text.replace("@TTY@", os.ttyname(slave))
    for n, dev in enumerate(sorted(set(re.findall(r"dev='([^']+)'", text)))):
        if dev.startswith("@BLOCK") or (dev.startswith("/dev/") and not os.path.exists(dev)):
            text = text.replace(f"dev='{dev}'", f"dev='{_loop_device(ws, f'block{n}')}'")
    for emu in re.findall(r"<emulator>([^<]+)</emulator>", text):
        if not os.access(emu, os.X_OK):
            text = text.replace(f"<emulator>{emu}</emulator>",
                                f"<emulator>{qemu_binary()}</emulator>")
    return text


def _layers(disk: Any) -> list[tuple[str, str, str | None]]:
    """(path, format, backing name to record) of a disk's images, top first."""
    out: list[tuple[str, str, str | None]] = []
    node = disk.source
    while node is not None:
        out.append((node.path, node.format, None))
        last = node
        node = node.backing
    if not last.backing_declared:
        entry = IMAGES.get(os.path.basename(last.path))
        while entry:
            path = os.path.join(os.path.dirname(last.path), entry["backing"])
            out[-1] = (out[-1][0], out[-1][1], entry["backing"])
            out.append((path, entry["format"], None))
            entry = IMAGES.get(entry["backing"])
    for i in range(len(out) - 1):
        if out[i][2] is None:
            out[i] = (out[i][0], out[i][1], out[i + 1][0])
    return out


def create_files(domain: Domain, ws: Workspace) -> None:
    """Every file the domain needs to start: images (with backing files), kernel, firmware,
    FIFOs, and a listening server for each connect-mode unix socket."""
    tool = qemu_img()
    for disk in domain.disks:
        if disk.source is None or disk.source.type != "file":
            continue
        layers = _layers(disk)
        for i in range(len(layers) - 1, -1, -1):
            path, fmt, backing = layers[i]
            if os.path.exists(path):
                continue
            size = "1440K" if disk.device == "floppy" else "16M"
            cmd = [tool, "create", "-q", "-f", "raw" if fmt == "iso" else fmt]
            if backing is not None:
                cmd += ["-b", backing, "-F", layers[i + 1][1], "-u"]
            subprocess.run([*cmd, path, size], check=True, capture_output=True)
    os_ = domain.os
    if os_.kernel:
        fake_bzimage(Path(os_.kernel))
    for extra in (os_.initrd, os_.dtb):
        if extra:
            Path(extra).write_bytes(b"\xd0\x0d\xfe\xed" + bytes(4092))
    if os_.loader and os_.loader.path:
        size = (256 << 10) if os_.loader.type != "pflash" else (2 << 20)
        with open(os_.loader.path, "wb") as f:
            f.truncate(size)
    if os_.nvram:
        with open(os_.nvram, "wb") as f:
            f.truncate(128 << 10)
    for dev in domain.chardevs:
        if dev.type == "pipe" and dev.path and not os.path.exists(dev.path):
            os.mkfifo(dev.path)
        if dev.type == "unix" and dev.mode == "connect" and dev.path:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(dev.path)
            server.listen(4)
            ws.defer(server.close)
            ws.servers.append(server)


def config_for(case: str) -> QemuConfig:
    return QemuConfig(**CONFIG_OVERRIDES.get(case, {}))


def paths_for(ws: Workspace) -> CommandPaths:
    run = ws.root / "run"
    run.mkdir(exist_ok=True)
    return CommandPaths(monitor_socket=str(run / "monitor.sock"), home_dir=str(ws.root),
                        runtime_dir=str(run), user="root", path_env="/usr/bin:/bin")


def prepare(case: str, ws: Workspace, text: str | None = None
            ) -> tuple[Domain, QemuCommand, CommandPaths]:
    """Substitute, parse, create the files and build the command for one corpus case."""
    xml = ws.xml = substitute(case, ws, text)
    domain = parse_domain(xml, f"{case}.xml")
    if domain.virt_type == "kvm":
        require(os.access("/dev/kvm", os.R_OK | os.W_OK), "type='kvm' needs a usable /dev/kvm")
    create_files(domain, ws)
    paths = paths_for(ws)
    return domain, build_command(domain, config_for(case), paths), paths


# --------------------------------------------------------------------------- QEMU + QMP


def launch(argv: list[str], env: dict[str, str], ws: Workspace, tag: str = "qemu",
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start QEMU; it is killed by ``ws.close()``."""
    log = open(ws.root / f"{tag}.log", "wb")  # closed by the cleanup
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            pass_fds=pass_fds)

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()

    ws.defer(stop)
    return proc


def qemu_log(ws: Workspace, tag: str = "qemu") -> str:
    path = ws.root / f"{tag}.log"
    return path.read_text(errors="replace").strip() if path.exists() else ""


def wait_exit(proc: subprocess.Popen[bytes], seconds: float = 30) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=seconds)
    return None


def _qdev_id(qdev: str) -> str:
    parts = [p for p in qdev.split("/") if p and p != "virtio-backend"]
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    return parts[-1] if parts else qdev


def _plain(filename: str) -> str:
    """The image path of a QEMU filename; ``json:{...}`` appears when the backing names in an
    image header are relative (QEMU then cannot describe the explicit graph by a path)."""
    if filename.startswith("json:"):
        spec = json.loads(filename[5:])
        return str(spec.get("file", {}).get("filename", filename))
    return filename


def _chain(image: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    node: dict[str, Any] | None = image
    while node:
        out.append((_plain(node["filename"]), node["format"]))
        node = node.get("backing-image")
    return out


def _pci_devices(buses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    todo = [d for bus in buses for d in bus["devices"]]
    while todo:
        dev = todo.pop(0)
        out.append(dev)
        todo.extend(dev.get("pci_bridge", {}).get("devices", []))
    return out


async def _collect(sock: str, proc: subprocess.Popen[bytes],
                   vnc: socket.socket | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"QEMU's monitor never answered (rc={proc.poll()})")
        if os.path.exists(sock):
            client = QMPClient("vmconfine-test")
            try:
                await client.connect(sock)
                break
            except ConnectError:  # the socket exists a moment before QEMU listens on it
                pass
        await asyncio.sleep(0.02)
    try:
        if vnc is not None:  # as `vmconfine run` does after the handshake
            await preopen.hand_over_vnc(client, vnc)
        view = await read_view(client)
        await client.execute("quit")
    finally:
        with contextlib.suppress(Exception, EOFError):
            await client.disconnect()
    return view


async def read_view(client: QMPClient) -> dict[str, Any]:
    """What QMP shows of the VM (compared by the tests): status, name, UUID, CPUs, memory,
    accelerator, machine, block devices and nodes, chardevs, PCI classes, devices, VNC, TPMs."""
    view: dict[str, Any] = {}
    view["status"] = (await client.execute("query-status"))["status"]
    view["name"] = (await client.execute("query-name")).get("name")
    view["uuid"] = (await client.execute("query-uuid"))["UUID"]
    view["cpus"] = len(await client.execute("query-cpus-fast"))
    view["memory"] = (await client.execute("query-memory-size-summary"))["base-memory"]
    view["kvm"] = (await client.execute("query-kvm"))["enabled"]
    # QEMU 7.2 has no "is-current" in query-machines: read the machine's QOM type
    qom_type = await client.execute("qom-get", {"path": "/machine", "property": "type"})
    current = str(qom_type).removesuffix("-machine")
    aliases = {m["name"]: m.get("alias") for m in await client.execute("query-machines")}
    view["machine"] = (current, aliases.get(current))
    view["block"] = {}
    for blk in await client.execute("query-block"):
        ins = blk.get("inserted")
        view["block"][_qdev_id(blk.get("qdev") or blk["device"])] = None if ins is None else {
            "file": _plain(ins["file"]), "ro": ins["ro"], "drv": ins["drv"],
            "chain": _chain(ins["image"]), "depth": ins["backing_file_depth"]}
    view["nodes"] = sorted(
        (_plain(n["file"]), n["drv"], n["ro"]) for n in await client.execute(
            "query-named-block-nodes", {"flat": True})
        if n["drv"] not in ("file", "host_device", "host_cdrom"))
    view["chardev"] = {c["label"]: c["filename"].removeprefix("disconnected:")
                       for c in await client.execute("query-chardev")}
    view["pci"] = sorted((d.get("qdev_id", ""), d["class_info"]["class"])
                         for d in _pci_devices(await client.execute("query-pci")))
    view["peripheral"] = {
        p["name"]: p["type"][len("child<"):-1]
        for path in ("/machine/peripheral", "/machine/peripheral-anon")
        for p in await client.execute("qom-list", {"path": path})
        if p["type"].startswith("child<")}
    vnc = await client.execute("query-vnc")
    view["vnc"] = {k: vnc.get(k) for k in ("enabled", "family", "host", "service")}
    view["tpm"] = sorted((t["model"], t["options"]["type"])
                         for t in await client.execute("query-tpm"))
    return view


def qmp_view(sock: str, proc: subprocess.Popen[bytes], ws: Workspace, tag: str = "qemu",
             vnc: socket.socket | None = None) -> dict[str, Any]:
    """Connect to a paused QEMU (handing it ``vnc``), read its view of the VM, quit it."""
    try:
        return asyncio.run(asyncio.wait_for(_collect(sock, proc, vnc), 60))
    except Exception as exc:
        raise AssertionError(f"QMP failed: {exc!r}; QEMU said: {qemu_log(ws, tag)}") from exc


# --------------------------------------------------------------------------- expectations


def device_list(cmd: QemuCommand) -> list[dict[str, Any]]:
    a = cmd.args
    return [json.loads(a[i + 1]) for i, x in enumerate(a[:-1])
            if x == "-device" and a[i + 1].startswith("{")]


def expected_block(domain: Domain, cmd: QemuCommand) -> dict[str, Any]:
    """Per device id: None for an empty drive, else top file, ro, format and chain."""
    drives = [d for d in device_list(cmd)
              if d["driver"] in ("virtio-blk-pci", "ide-hd", "ide-cd", "scsi-hd", "scsi-cd",
                                 "floppy")]
    assert len(drives) == len(domain.disks)
    out: dict[str, Any] = {}
    for dev, disk in zip(drives, domain.disks, strict=True):
        chain = disk.chain()
        if disk.source is None:
            out[dev["id"]] = None
            continue
        out[dev["id"]] = {
            "file": chain[0].path, "ro": disk.readonly,
            "drv": "raw" if chain[0].format == "iso" else chain[0].format,
            "chain": [(s.path, "raw" if s.format == "iso" else s.format) for s in chain],
            "depth": len(chain) - 1}
    return out


def check_view(case: str, domain: Domain, cmd: QemuCommand, view: dict[str, Any]) -> None:
    assert view["status"] == "prelaunch"
    assert view["name"] == domain.name
    assert view["uuid"] == domain.uuid
    assert view["cpus"] == (domain.vcpus_current or domain.vcpus)
    assert view["memory"] == math.ceil(domain.memory_kib / 1024) * 1024 * 1024
    assert view["kvm"] == (domain.virt_type == "kvm")
    machine = domain.os.machine or "pc"
    assert machine in view["machine"], view["machine"]

    block = {k: v for k, v in view["block"].items() if not k.startswith("system.flash")}
    assert block == expected_block(domain, cmd)
    # every backing layer is read-only, the top follows <readonly/>
    for disk in domain.disks:
        for depth, src in enumerate(disk.chain()):
            ro = [n[2] for n in view["nodes"] if n[0] == src.path]
            assert ro == [disk.readonly or depth > 0], (src.path, view["nodes"])

    flash = sorted(k for k in view["block"] if k.startswith("system.flash"))
    loader = domain.os.loader
    pflash = loader is not None and loader.type == "pflash"
    assert flash == (["system.flash0"] + (["system.flash1"] if domain.os.nvram else [])
                     if pflash else [])

    labels = set(view["chardev"])
    expected = {"charmonitor"} | expected_chardev_labels(domain)
    assert labels == expected
    for dev, label in chardev_labels(domain):
        fname = view["chardev"][label]
        if dev.type == "pty":
            assert fname.startswith("pty:/dev/pts/"), fname
        elif dev.type == "unix" and dev.mode == "bind":
            assert fname == f"unix:{dev.path},server=on", fname
        elif dev.type == "unix":
            assert fname.startswith("unix:") and "server" not in fname, fname
        else:
            assert fname.split(":")[0] in (dev.type, {"dev": "serial"}.get(dev.type)), fname

    # devices behind a bridge (Q35's root ports) are not in query-pci before the firmware
    # numbered the buses: tests/host/test_argv_libvirt.py compares the whole tree
    ours = {d["id"]: d["driver"] for d in device_list(cmd) if d["driver"] in PCI_CLASSES
            and d.get("bus", "pcie.0") in ("pcie.0", "pci.0")}
    got = {qid: cls for qid, cls in view["pci"] if qid}
    assert set(got) == set(ours), (got, ours)
    for qid, driver in ours.items():
        assert got[qid] == PCI_CLASSES[driver], (qid, driver, hex(got[qid]))

    if domain.graphics:
        g = domain.graphics[0]
        assert view["vnc"]["enabled"] is True
        if g.socket:
            assert view["vnc"]["family"] == "unix"
        else:
            assert view["vnc"]["host"] == "127.0.0.1"
            port = int(view["vnc"]["service"])
            assert port == g.port if not g.autoport else port >= 5900
    else:
        assert view["vnc"]["enabled"] is False


def chardev_labels(domain: Domain) -> list[tuple[Any, str]]:
    """(chardev, QEMU label) the way vmconfine names them."""
    out = []
    serials = [c for c in domain.chardevs if c.kind == "serial"]
    consoles = [c for c in domain.chardevs if c.kind == "console"]
    if not serials and consoles and (consoles[0].target_type or "serial") == "serial":
        serials = [consoles[0]]
    out += [(c, f"charserial{i}") for i, c in enumerate(serials)]
    out += [(c, f"charparallel{i}")
            for i, c in enumerate(c for c in domain.chardevs if c.kind == "parallel")]
    out += [(c, f"charconsole{i}") for i, c in enumerate(consoles)
            if c.target_type == "virtio"]
    out += [(c, f"charchannel{i}")
            for i, c in enumerate(c for c in domain.chardevs if c.kind == "channel")]
    return out


def expected_chardev_labels(domain: Domain) -> set[str]:
    return {label for _dev, label in chardev_labels(domain)}


# --------------------------------------------------------------------------- tests


def preopened(cmd: QemuCommand, ws: Workspace
              ) -> tuple[list[str], dict[str, int], socket.socket | None]:
    """What the pipeline passes QEMU (vmconfine.launch.preopen): argv, inherited fds by
    name, and the VNC socket to hand over QMP."""
    opened = preopen.open_passed(Journal(ws.root / "preopen.journal"), cmd.passed)
    ws.defer(opened.close)
    vnc = opened.take("vnc")
    if vnc is not None:
        ws.defer(vnc.close)
    fds = {**opened.fds, **private_taps([p for p in cmd.passed if p.kind == NETFD], ws)}
    return cmd.argv(fds=fds), fds, vnc


def private_taps(placeholders: list[PassedFd], ws: Workspace) -> dict[str, int]:
    """A tap descriptor for each network placeholder, the taps made in a network namespace
    of the test's own (the host's interfaces are never touched; each tap goes away with its
    descriptor)."""
    if not placeholders:
        return {}
    name = f"vmc-argv-{os.getpid()}-{ws.root.name}"
    netns.create(name)
    ws.defer(lambda: netns.remove(name))
    fds: dict[str, int] = {}
    netns.pushns(name)
    try:
        for p in placeholders:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)  # vhost-net: not on TCG
            ws.defer(lambda fd=fd: os.close(fd))
            tun_ioctl(fd, "vnet%d", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fds[p.name] = fd
    finally:
        netns.popns()
    return fds


@pytest.fixture
def ws() -> Any:
    # unix socket paths must stay under 108 bytes: use a short directory
    root = Path(tempfile.mkdtemp(prefix="vmc-argv-", dir="/tmp"))
    space = Workspace(root)
    try:
        yield space
    finally:
        space.close()
        shutil.rmtree(root, ignore_errors=True)


STARTABLE = [c for c in CASES if c not in REFUSED]


@pytest.mark.parametrize("case", STARTABLE)
def test_qemu_builds_the_described_vm(case: str, ws: Workspace) -> None:
    qemu_binary()
    domain, cmd, paths = prepare(case, ws)
    # as `vmconfine run` does: create the listening sockets and open the chardev files,
    # QEMU inherits them (the VNC socket follows over QMP)
    argv, fds, vnc = preopened(cmd, ws)
    assert f"socket,id=charmonitor,fd={fds['charmonitor']},server=on,wait=off" in argv
    proc = launch(argv, cmd.env, ws, pass_fds=tuple(fds.values()))
    view = qmp_view(paths.monitor_socket, proc, ws, vnc=vnc)
    check_view(case, domain, cmd, view)
    assert wait_exit(proc) == 0, qemu_log(ws)
    for server in ws.servers:  # QEMU connected to each connect-mode unix socket
        server.settimeout(5)
        conn, _addr = server.accept()
        conn.close()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_qemu_refuses_missing_host_device(case: str, ws: Workspace) -> None:
    qemu_binary()
    if case == "hostdev-pci":
        require(os.access("/dev/kvm", os.R_OK | os.W_OK), "type='kvm' needs a usable /dev/kvm")
    _domain, cmd, _paths = prepare(case, ws)
    proc = launch(cmd.argv(), cmd.env, ws)
    assert wait_exit(proc) == 1
    assert REFUSED[case] in qemu_log(ws)


def test_usb_host_by_address_is_refused_when_absent(ws: Workspace) -> None:
    qemu_binary()
    require(not os.path.exists("/dev/bus/usb/001/003"), "USB device 1:3 exists on this host")
    text = (DATA / "hostdev-usb.xml").read_text()
    cut = "<vendor id='0x0627'/>\n        <product id='0x0001'/>"
    assert cut in text
    text = text.replace(cut, "<address bus='1' device='4'/>")
    _domain, cmd, _paths = prepare("hostdev-usb", ws, text)
    proc = launch(cmd.argv(), cmd.env, ws)
    assert wait_exit(proc) == 1
    assert "failed to find host usb device 1:" in qemu_log(ws)


def test_seccomp_sandbox_is_in_force(ws: Workspace) -> None:
    """With the default seccomp_sandbox, the running QEMU is in seccomp filter mode."""
    qemu_binary()
    _domain, cmd, paths = prepare("qemu-pc", ws)
    proc = launch(cmd.argv(), cmd.env, ws)
    deadline = time.monotonic() + 30
    while not os.path.exists(paths.monitor_socket) and time.monotonic() < deadline:
        time.sleep(0.02)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    assert sorted(e.split(b"=")[0] for e in env if e) == [
        b"HOME", b"LC_ALL", b"LOGNAME", b"PATH", b"USER"]


def test_block_disks_use_host_device_nodes(ws: Workspace) -> None:
    qemu_binary()
    domain, cmd, _paths = prepare("disk-block", ws)
    storage = {json.loads(v)["filename"]: json.loads(v)["driver"]
               for i, v in enumerate(cmd.args) if cmd.args[i - 1] == "-blockdev"
               and '"filename"' in v}
    for disk in domain.disks:
        assert disk.source is not None
        assert stat.S_ISBLK(os.stat(disk.source.path).st_mode)
        # a loop device is no CD-ROM drive: host_cdrom is only for those (libvirt's rule)
        assert storage[disk.source.path] == "host_device"
