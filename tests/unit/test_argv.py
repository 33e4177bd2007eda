"""The QEMU command line (vmconfine.qemu.argv) against the golden corpus in tests/data/argv/.

Each ``NAME.xml`` is built with fixed paths and compared with ``NAME.args`` (the one-line
``format_native()`` output). ``VMCONFINE_REGEN_GOLDEN=1`` rewrites the golden files instead;
review the diff before committing it.

Placeholders in the corpus: ``@DIR@`` (image directory), ``@TTY@`` (a terminal device),
``@BLOCKn@`` (block devices). The host tier substitutes real paths and starts QEMU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest

from vmconfine.config.settings import QemuConfig
from vmconfine.domain import chain, parse_domain
from vmconfine.qemu import argv as argv_mod
from vmconfine.qemu.argv import (
    CommandPaths,
    EmulatorNotFoundError,
    QemuCommand,
    UnsupportedConfigError,
    build_command,
    find_emulator,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "argv"
CASES = sorted(p.stem for p in DATA.glob("*.xml"))
REGEN = os.environ.get("VMCONFINE_REGEN_GOLDEN", "") not in ("", "0")

#: values the unit tier puts in for the corpus placeholders
SUBST = {
    "@DIR@": "/var/lib/vmconfine/images",
    "@TTY@": "/dev/ttyS0",
    "@BLOCK0@": "/dev/vg0/guest-root",
    "@BLOCK1@": "/dev/vg0/guest-data",
    "@BLOCK2@": "/dev/sr0",
}

#: qemu.conf settings some cases need (everything else: the defaults)
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "seccomp-off": {"seccomp_sandbox": 0},
    "process-name": {"set_process_name": True},
}

#: what image headers record for images the XML gives no <backingStore> for
IMAGES = json.loads((DATA / "images.json").read_text())


def corpus_xml(name: str, subst: dict[str, str] | None = None) -> str:
    text = (DATA / f"{name}.xml").read_text()
    for key, value in (subst or SUBST).items():
        text = text.replace(key, value)
    return text


def command_paths(name: str) -> CommandPaths:
    return CommandPaths(
        monitor_socket=f"/run/vmconfine/qemu/domain-{name}/monitor.sock",
        home_dir=f"/var/lib/vmconfine/qemu/domain-{name}",
        runtime_dir=f"/run/vmconfine/qemu/domain-{name}",
        user="vmconfine-qemu",
        path_env="/usr/bin:/bin",
    )


def config_for(case: str, bindir: Path) -> QemuConfig:
    cfg = QemuConfig(emulator_search_path=[str(bindir)])
    return dataclasses.replace(cfg, **CONFIG_OVERRIDES.get(case, {}))


def fake_header(path: str, fmt: str, *, qemu_img: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` as the images named in images.json would answer it."""
    info: dict[str, Any] = {"filename": path, "format": fmt}
    entry = IMAGES.get(os.path.basename(path))
    if entry:
        info["backing-filename"] = entry["backing"]
        info["backing-filename-format"] = entry["format"]
    return info


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """A search-path directory holding (fake) qemu-system-x86_64 and qemu-system-i386."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("qemu-system-x86_64", "qemu-system-i386"):
        (d / name).write_text("#!/bin/sh\nexit 1\n")
        (d / name).chmod(0o755)
    return d


@pytest.fixture(autouse=True)
def no_image_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "read_image_header", fake_header)
    monkeypatch.setattr(chain, "path_exists", lambda path: True)


def build(case: str, bindir: Path, *, symbolic: bool = True) -> QemuCommand:
    domain = parse_domain(corpus_xml(case), f"{case}.xml")
    return build_command(domain, config_for(case, bindir), command_paths(case),
                         symbolic=symbolic)


def render(cmd: QemuCommand, bindir: Path) -> str:
    return cmd.format_native().replace(str(bindir), "@BINDIR@") + "\n"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, bindir: Path) -> None:
    got = render(build(case, bindir), bindir)
    golden = DATA / f"{case}.args"
    if REGEN:
        golden.write_text(got)
    assert golden.exists(), f"missing {golden}; run with VMCONFINE_REGEN_GOLDEN=1"
    assert got == golden.read_text()


@pytest.mark.parametrize("case", CASES)
def test_native_line_is_one_shell_line_that_splits_back(case: str, bindir: Path) -> None:
    cmd = build(case, bindir)
    line = cmd.format_native()
    assert "\n" not in line
    words = shlex.split(line)
    n_env = len(cmd.env)
    assert words[:n_env] == [f"{k}={v}" for k, v in cmd.env.items()]
    assert words[n_env:] == cmd.argv()
    assert list(cmd.env)[:5] == ["LC_ALL", "PATH", "HOME", "USER", "LOGNAME"]


def opts(cmd: QemuCommand, flag: str) -> list[str]:
    a = cmd.args
    return [a[i + 1] for i, x in enumerate(a[:-1]) if x == flag]


def devices(cmd: QemuCommand) -> list[dict[str, Any]]:
    return [json.loads(v) for v in opts(cmd, "-device") if v.startswith("{")]


def blockdevs(cmd: QemuCommand) -> list[dict[str, Any]]:
    return [json.loads(v) for v in opts(cmd, "-blockdev")]


def test_every_blockdev_layer_names_its_driver(bindir: Path) -> None:
    for case in CASES:
        for node in blockdevs(build(case, bindir)):
            assert node.get("driver"), (case, node)


def test_backing_chain_from_xml(bindir: Path) -> None:
    nodes = {n["node-name"]: n for n in blockdevs(build("disk-backing-chain", bindir))}
    disk = next(d for d in devices(build("disk-backing-chain", bindir))
                if d["id"] == "virtio-disk0")
    top = nodes[disk["drive"]]
    mid = nodes[top["backing"]]
    base = nodes[mid["backing"]]
    assert [nodes[n["file"]]["filename"] for n in (top, mid, base)] == [
        "/var/lib/vmconfine/images/top.qcow2", "/var/lib/vmconfine/images/mid.qcow2",
        "/var/lib/vmconfine/images/base.img"]
    assert [(n["driver"], n["read-only"]) for n in (top, mid, base)] == [
        ("qcow2", False), ("qcow2", True), ("raw", True)]
    assert "backing" not in base  # raw has no backing option
    # the second disk has no backing file: QEMU is told so (it must not open one itself)
    scratch = next(n for n in nodes.values() if n.get("driver") == "qcow2"
                   and nodes[n["file"]]["filename"].endswith("scratch.qcow2"))
    assert scratch["backing"] is None


def test_backing_chain_discovered_from_images(bindir: Path) -> None:
    cmd = build("disk-backing-discover", bindir)
    files = [n["filename"] for n in blockdevs(cmd) if "filename" in n]
    # bottom layer first; the relative names resolve against the image's directory
    assert files == ["/var/lib/vmconfine/images/base-raw.img",
                     "/var/lib/vmconfine/images/base.qcow2",
                     "/var/lib/vmconfine/images/overlay.qcow2"]


def test_readonly_shareable_and_cdroms(bindir: Path) -> None:
    ro = build("disk-readonly", bindir)
    fmt_nodes = {n["node-name"]: n for n in blockdevs(ro) if "file" in n}
    for dev in devices(ro):
        if dev.get("drive"):
            expect = dev["id"] != "virtio-disk0"
            assert fmt_nodes[dev["drive"]]["read-only"] is expect, dev
    shared = devices(build("disk-shareable", bindir))
    assert [d.get("share-rw") for d in shared if "drive" in d] == [True, True]
    empty = devices(build("cdrom-empty", bindir))
    cds = [d for d in empty if d["driver"] in ("ide-cd", "scsi-cd")]
    assert len(cds) == 2 and all("drive" not in d for d in cds)
    assert not blockdevs(build("cdrom-empty", bindir))


def test_accelerator_and_machine(bindir: Path) -> None:
    kvm = build("kvm-q35", bindir)
    assert opts(kvm, "-accel") == ["kvm"] and opts(kvm, "-machine")[0].startswith("q35,")
    tcg = build("qemu-pc", bindir)
    assert opts(tcg, "-accel") == ["tcg"]
    assert opts(tcg, "-machine")[0].startswith("pc-i440fx-7.2,")
    assert "acpi=off" in opts(build("smp-memory", bindir), "-machine")[0]


def test_memory_is_rounded_up_to_whole_mib(bindir: Path) -> None:
    assert opts(build("smp-memory", bindir), "-m") == ["size=220160k"]  # 219200 KiB → 215 MiB
    assert opts(build("smp-memory", bindir), "-smp") == ["2"]


def test_sandbox_follows_seccomp_sandbox(bindir: Path) -> None:
    assert opts(build("seccomp-off", bindir), "-sandbox") == ["off"]
    assert opts(build("qemu-pc", bindir), "-sandbox") == [argv_mod.SANDBOX_ON]


def test_process_name(bindir: Path) -> None:
    assert opts(build("process-name", bindir), "-name") == [
        "guest=process-name,debug-threads=on,process=qemu:process-name"]
    assert opts(build("qemu-pc", bindir), "-name") == ["guest=qemu-pc,debug-threads=on"]


def test_qemu_commandline_is_appended_and_taints(bindir: Path) -> None:
    cmd = build("qemu-commandline", bindir)
    assert cmd.args[-2:] == ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    assert cmd.env["QEMU_AUDIO_DRV"] == "none" and cmd.env["VMC_EMPTY"] == ""
    assert cmd.taints == ["custom-argv"] and cmd.tainted
    assert not build("qemu-pc", bindir).tainted
    assert "custom-dtb" in build("kernel-dtb", bindir).taints


def test_boot_order(bindir: Path) -> None:
    by_id = {d["id"]: d.get("bootindex") for d in devices(build("boot-order", bindir))}
    assert (by_id["ide0-1-0"], by_id["virtio-disk0"], by_id["net0"]) == (1, 2, 3)
    by_id = {d["id"]: d.get("bootindex") for d in devices(build("boot-dev", bindir))}
    assert (by_id["ide0-1-0"], by_id["virtio-disk0"]) == (1, 2)


def test_monitors_and_inherited_fds(bindir: Path) -> None:
    domain = parse_domain(corpus_xml("qemu-pc"))
    paths = dataclasses.replace(command_paths("qemu-pc"),
                                user_monitor_socket="/run/vmc/domain-qemu-pc/monitor-user.sock")
    cmd = build_command(domain, config_for("qemu-pc", bindir), paths)
    assert opts(cmd, "-chardev") == [
        "socket,id=charmonitor,path=/run/vmconfine/qemu/domain-qemu-pc/monitor.sock,"
        "server=on,wait=off",
        "socket,id=charusermonitor,path=/run/vmc/domain-qemu-pc/monitor-user.sock,"
        "server=on,wait=off"]
    assert opts(cmd, "-mon") == ["chardev=charmonitor,id=monitor,mode=control",
                                 "chardev=charusermonitor,id=usermonitor,mode=control"]
    # `run` passes the listening sockets it created; only the monitor arguments change
    assert [p.name for p in cmd.inherited] == ["charmonitor", "charusermonitor"]
    fds = {"charmonitor": 7, "charusermonitor": 9}
    with_fds = cmd.argv(fds=fds)
    assert opts(QemuCommand(cmd.env, cmd.emulator, with_fds[1:]), "-chardev") == [
        "socket,id=charmonitor,fd=7,server=on,wait=off",
        "socket,id=charusermonitor,fd=9,server=on,wait=off"]
    changed = [i for i, (x, y) in enumerate(zip(cmd.argv(), with_fds, strict=True)) if x != y]
    assert len(changed) == 2
    assert "fd=7" in cmd.format_native(fds=fds) and "fd=" not in cmd.format_native()
    with pytest.raises(ValueError, match="no descriptor for charusermonitor"):
        cmd.argv(fds={"charmonitor": 7})
    # domxml-to-native (symbolic) prints the same line run would log
    shown = build_command(domain, config_for("qemu-pc", bindir), paths, symbolic=True)
    assert shown.format_native() == cmd.format_native()


PASSED_DEVICES = """
    <serial type='file'><source path='/srv/a,b/serial.log' append='on'/>
      <log file='/srv/serial0.log' append='off'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='unix'><source mode='bind'/><target type='virtio'/></channel>
    <channel type='unix'><source mode='connect' path='/srv/peer.sock'/>
      <target type='virtio' name='peer'/></channel>
    <graphics type='vnc' socket='/srv/vnc.sock'/>
"""


def test_preopened_chardevs_files_logs_and_vnc(bindir: Path) -> None:
    """libvirt 9's fd passing: bind sockets as fd=N, files and logs through -add-fd and
    /dev/fdset/N, the VNC socket over QMP (-vnc none); paths in the symbolic line."""
    from vmconfine.domain.chardev import fill_channel_paths

    xml = corpus_xml("qemu-pc").replace("</devices>", PASSED_DEVICES + "</devices>")
    domain = parse_domain(xml)
    generated = fill_channel_paths(domain.chardevs, "/var/lib/vmc/channel/target/domain-x")
    assert generated == ["/var/lib/vmc/channel/target/domain-x/org.qemu.guest_agent.0",
                         "/var/lib/vmc/channel/target/domain-x/vioser-00-00-02.sock"]
    assert "path=\"/var/lib/vmc/channel/target/domain-x/org.qemu.guest_agent.0\"" in \
        domain.to_xml(live=True)
    cmd = build_command(domain, config_for("qemu-pc", bindir), command_paths("qemu-pc"))
    assert [(p.kind, p.name) for p in cmd.passed] == [
        ("listen", "charmonitor"), ("fdset", "charserial0-source"), ("fdset", "charserial0-log"),
        ("listen", "charchannel0"), ("listen", "charchannel1"), ("qmp", "vnc")]
    chardevs = opts(cmd, "-chardev")
    assert "file,id=charserial0,path=/srv/a,,b/serial.log,append=on,"\
           "logfile=/srv/serial0.log,logappend=off" in chardevs
    assert "socket,id=charchannel0,path=/var/lib/vmc/channel/target/domain-x/"\
           "org.qemu.guest_agent.0,server=on,wait=off" in chardevs
    assert "socket,id=charchannel2,path=/srv/peer.sock" in chardevs  # QEMU connects
    assert opts(cmd, "-vnc") == ["unix:/srv/vnc.sock"]
    fds = {p.name: 20 + n for n, p in enumerate(cmd.inherited)}
    assert "vnc" not in fds
    run = cmd.argv(fds=fds)[1:]
    assert opts(QemuCommand(cmd.env, cmd.emulator, run), "-add-fd") == [
        "set=0,fd=21,opaque=charserial0-source", "set=1,fd=22,opaque=charserial0-log"]
    # each -add-fd comes right before the -chardev that uses its set
    i = run.index("file,id=charserial0,path=/dev/fdset/0,append=on,logfile=/dev/fdset/1,"
                  "logappend=off")
    assert run[i - 5:i] == ["-add-fd", "set=0,fd=21,opaque=charserial0-source",
                            "-add-fd", "set=1,fd=22,opaque=charserial0-log", "-chardev"]
    assert "socket,id=charchannel0,fd=23,server=on,wait=off" in run
    assert run[run.index("-vnc") + 1] == "none"
    ports = {d["id"]: d.get("nr") for d in devices(cmd) if d["driver"] == "virtserialport"}
    assert ports == {"channel0": 1, "channel1": 2, "channel2": 3}


def test_commas_in_paths_are_escaped(bindir: Path) -> None:
    cmd = build("quoting", bindir)
    assert "file,id=charserial0,path=/var/lib/vmconfine/images/serial log,,1.txt" in cmd.args
    assert any(n.get("filename") == "/var/lib/vmconfine/images/it's a disk, really.img"
               for n in blockdevs(cmd))


def test_find_emulator(bindir: Path, tmp_path: Path) -> None:
    i686 = parse_domain(corpus_xml("arch-i686"))
    assert find_emulator(i686, QemuConfig(emulator_search_path=[str(bindir)])) == str(
        bindir / "qemu-system-i386")
    (bindir / "qemu-system-i386").unlink()
    assert find_emulator(i686, QemuConfig(emulator_search_path=[str(bindir)])) == str(
        bindir / "qemu-system-x86_64")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmulatorNotFoundError) as err:
        find_emulator(i686, QemuConfig(emulator_search_path=[str(empty)]))
    assert str(empty) in str(err.value) and "qemu-system-i386" in str(err.value)
    seed = parse_domain(corpus_xml("seed-demo"))
    assert find_emulator(seed, QemuConfig()) == "/usr/bin/qemu"


def _modified(case: str, old: str, new: str) -> str:
    text = corpus_xml(case)
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("case", "old", "new", "message"),
    [
        ("disk-ide", "<target dev='hda' bus='ide'/>",
         "<target dev='hda' bus='ide'/><readonly/>", "read-only ide disks"),
        ("kvm-q35", "bus='sata'", "bus='ide'", "IDE is not available"),
        ("net-user", "<interface type='user'>",
         "<interface type='vhostuser'><source type='unix' path='/s' mode='client'/>",
         "interface type 'vhostuser'"),
        ("input-usb", "model='qemu-xhci'", "model='none'", "needs a USB controller"),
        ("firmware-rom", "<loader type='rom'>", "<loader type='bogus'>", "loader type"),
        ("qemu-pc", "<memballoon model='virtio'/>",
         "<tpm model='tpm-crb'><backend type='emulator' version='1.2'/></tpm>",
         "TPM 1.2 is not supported with the CRB interface"),
        ("qemu-pc", "<memballoon model='virtio'/>",
         "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>"
         "</backend></tpm>", "passthrough backend is not supported"),
        ("vnc-port", "type='vnc'", "type='sdl'", "graphics type 'sdl'"),
        ("serial-pty", "<target type='serial' port='0'/>", "<target type='sclp'/>",
         "console target type"),
        ("channel", "<target type='virtio' name='org.example.pty.0'/>",
         "<target type='guestfwd'/>", "channel target type"),
    ],
)
def test_unsupported_configs_fail_clearly(case: str, old: str, new: str, message: str,
                                          bindir: Path) -> None:
    domain = parse_domain(_modified(case, old, new))
    with pytest.raises(UnsupportedConfigError, match=message) as err:
        build_command(domain, config_for(case, bindir), command_paths(case))
    assert "\n" not in str(err.value)
