"""Domain XML vmconfine does not implement is never silently ignored.

One central tree (vmconfine.domain.support) says what is implemented; everything else in a
domain is one warning line (``unsupported_xml = "warn"``) or an error (``"error"``). The cheap
common elements are implemented instead (clock, cpu, watchdog, hugepages: their argv is
checked here and against libvirt in tests/host/test_argv_libvirt.py). ``--validate`` checks
the XML against libvirt's own domain.rng.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require
from vmconfine.config.hugepages import HugepagesError, hugepage_dir, hugetlbfs_mounts
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import parse_domain
from vmconfine.domain.schema import DOMAIN_RNG, validate
from vmconfine.domain.support import describe, enforce, unsupported
from vmconfine.errors import XMLError
from vmconfine.plugin.resources import domain_resources
from vmconfine.qemu.argv import CommandPaths, build_command

REPO = Path(__file__).resolve().parents[2]
ARGV = REPO / "tests" / "data" / "argv"
BASE = """<domain type='{type}'>
  <name>support</name>
  <uuid>0b8e2f4c-7f2e-4bb0-9d1a-3f1f0c9e5a11</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
  </os>
  {top}
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
  </devices>
</domain>
"""
PATHS = CommandPaths(monitor_socket="/run/x/monitor.sock", home_dir="/var/lib/x",
                     runtime_dir="/run/x", user="qemu")


def xml(top: str = "", devices: str = "", type: str = "qemu", machine: str = "pc") -> str:
    return BASE.format(top=top, devices=devices, type=type, machine=machine)


def findings(text: str) -> list[str]:
    return [f"{f.line}: {f.what}" for f in unsupported(parse_domain(text, "s.xml"))]


def argv(text: str, paths: CommandPaths = PATHS) -> list[str]:
    return build_command(parse_domain(text, "s.xml"), QemuConfig(), paths).args


# --------------------------------------------------------------------------- the list

NOT_IMPLEMENTED = {
    "sound": ("", "<sound model='sb16'/>", 12, "model='sb16' of <devices/sound>"),
    "vnc-spice-only": ("", "<graphics type='vnc'><image compression='off'/></graphics>", 12,
                       "<devices/graphics/image>"),
    "spice-gl": ("", "<graphics type='spice'><gl enable='yes'/></graphics>", 12,
                 "enable='yes' of <devices/graphics/gl>"),
    "smartcard": ("", "<smartcard mode='passthrough' type='spicevmc'/>", 12,
                  "<devices/smartcard>"),
    "redirdev": ("", "<redirdev bus='usb' type='tcp'/>", 12, "type='tcp' of <devices/redirdev>"),
    "typo": ("", "<serail type='pty'/>", 12, "<devices/serail> (did you mean <serial>?)"),
    "cputune": ("<cputune><shares>2048</shares></cputune>", "", 9, "<cputune>"),
    "numatune": ("<numatune><memory mode='strict' nodeset='0'/></numatune>", "", 9,
                 "<numatune>"),
    "blkiotune": ("<blkiotune><weight>500</weight></blkiotune>", "", 9, "<blkiotune>"),
    "memorybacking-other": ("<memoryBacking><nosharepages/></memoryBacking>", "", 9,
                            "<memoryBacking/nosharepages>"),
    "clock-timer": ("<clock offset='utc'><timer name='kvmclock' present='yes'/></clock>",
                    "", 9, "name='kvmclock' of <clock/timer>"),
    "vnc-password": ("", "<graphics type='vnc' passwd='secret'/>", 12,
                     "attribute passwd= of <devices/graphics>"),
    "vcpu-placement": ("", "", 5, "placement='auto' of <vcpu>"),
    "on-crash": ("<on_crash>restart</on_crash>", "", 9, "<on_crash>restart</on_crash>"),
    "foreign-namespace": ("<x:thing xmlns:x='urn:x'/>", "", 9, "<{urn:x}thing>"),
}


@pytest.mark.parametrize("case", sorted(NOT_IMPLEMENTED))
def test_each_unimplemented_element_is_one_finding(case: str) -> None:
    top, devices, line, what = NOT_IMPLEMENTED[case]
    text = xml(top=top, devices=devices)
    if case == "vcpu-placement":
        text = text.replace("<vcpu>", "<vcpu placement='auto'>")
    assert findings(text) == [f"{line}: {what}"]


def test_implemented_elements_are_not_reported() -> None:
    text = xml(type="kvm", machine="q35", top=(
        "<cpu mode='host-passthrough' migratable='on'/><clock offset='localtime'/>"
        "<memoryBacking><hugepages><page size='2' unit='MiB'/></hugepages></memoryBacking>"
        "<on_reboot>destroy</on_reboot>"), devices="<watchdog model='itco' action='pause'/>")
    assert findings(text) == []


@pytest.mark.parametrize("case", sorted(p.stem for p in ARGV.glob("*.xml")))
def test_the_argv_corpus_is_fully_implemented(case: str) -> None:
    """Every XML whose command line is golden-tested uses implemented XML only: a tree that
    missed something the command line does use would flag it here."""
    assert findings((ARGV / f"{case}.xml").read_text()) == []


def test_warn_mode_logs_one_line_per_finding(caplog: pytest.LogCaptureFixture) -> None:
    dom = parse_domain(xml(top="<cputune/>", devices="<smartcard mode='host'/><serail/>"),
                       "guest.xml")
    with caplog.at_level(logging.WARNING, logger="vmconfine"):
        found = enforce(dom, "warn")
    lines = [r.getMessage() for r in caplog.records]
    assert len(found) == 3 and len(lines) == 3
    assert lines[0] == ("guest.xml: line 9: <cputune> is not implemented by vmconfine; the "
                        "guest would run without it")
    assert all("\n" not in ln for ln in lines)


def test_error_mode_refuses_with_one_line() -> None:
    dom = parse_domain(xml(devices="<smartcard mode='host'/><hub type='usb'/>"), "guest.xml")
    with pytest.raises(XMLError) as info:
        enforce(dom, "error")
    msg = str(info.value)
    assert msg.startswith("guest.xml: line 12: <devices/smartcard> is not implemented by "
                          "vmconfine (and 1 more); remove it")
    assert "\n" not in msg
    enforce(parse_domain(xml(), "ok.xml"), "error")  # nothing to refuse: no error


def test_docs_list_the_same_tree() -> None:
    doc = (REPO / "docs" / "domain-xml.md").read_text()
    block = re.search(r"```text\n(domain type id\n.*?)```", doc, re.S)
    assert block, "docs/domain-xml.md lost its tree"
    assert block.group(1).rstrip("\n").splitlines() == describe()


# --------------------------------------------------------------------------- implemented ones


def test_clock_cpu_watchdog_on_the_command_line() -> None:
    args = argv(xml(type="kvm", top="<cpu mode='host-passthrough'/><clock offset='localtime'/>",
                    devices="<watchdog model='i6300esb' action='poweroff'/>"))
    line = " ".join(args)
    assert "-cpu host,migratable=on" in line and "-rtc base=localtime" in line
    assert '{"driver":"i6300esb","id":"watchdog0"}' in line
    assert "-action watchdog=poweroff" in line
    assert "-cpu max" in " ".join(argv(xml(top="<cpu mode='host-model'/>")))
    assert "-cpu host" in " ".join(argv(xml(type="kvm", top="<cpu mode='host-model'/>")))
    assert "-rtc base=utc" in " ".join(argv(xml()))  # no <clock>: utc, as libvirt writes


def test_itco_is_q35s_built_in_watchdog() -> None:
    line = " ".join(argv(xml(machine="q35", devices="<watchdog model='itco' action='pause'/>")))
    assert "-global ICH9-LPC.noreboot=off -action watchdog=pause" in line
    with pytest.raises(XMLError, match="built into Q35"):
        argv(xml(devices="<watchdog model='itco'/>"))


REFUSED = {
    "passthrough-under-tcg": (xml(top="<cpu mode='host-passthrough'/>"),
                              "CPU mode 'host-passthrough' for x86_64 qemu domain is not "
                              "supported by hypervisor"),
    "clock-variable": (xml(top="<clock offset='variable' adjustment='3600'/>"),
                       "clock offset 'variable' is not supported"),
    "watchdog-dump": (xml(devices="<watchdog model='i6300esb' action='dump'/>"),
                      "watchdog action 'dump' is not supported"),
    "topology-mismatch": (xml(top="<cpu><topology sockets='2' cores='1' threads='1'/></cpu>"),
                          "CPU topology doesn't match maximum vcpu count"),
    "features-without-model": (xml(top="<cpu><feature name='vmx'/></cpu>"),
                               "Non-empty feature list specified without CPU model"),
    "io-native-cached": (xml(devices="<disk><driver name='qemu' type='raw' io='native'/>"
                                     "<source file='/img/a.raw'/><target dev='vda'/></disk>"),
                         "io='native' needs a cache mode that bypasses the host page cache"),
    "hugepages-without-mount": (xml(top="<memoryBacking><hugepages/></memoryBacking>"),
                                "needs a hugetlbfs mount"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_rendered_is_refused(case: str) -> None:
    text, message = REFUSED[case]
    with pytest.raises(XMLError) as info:
        argv(text)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("attr", "value"), [("mode", "host-passthru"), ("offset", "local")])
def test_bad_enum_values_are_parse_errors(attr: str, value: str) -> None:
    top = f"<cpu mode='{value}'/>" if attr == "mode" else f"<clock offset='{value}'/>"
    with pytest.raises(XMLError, match=rf"^s\.xml: line 9: Invalid {attr} value '{value}'"):
        parse_domain(xml(top=top), "s.xml")


# --------------------------------------------------------------------------- hugepages


def _mounts(tmp_path: Path, lines: str) -> tuple[str, str]:
    mounts, meminfo = tmp_path / "mounts", tmp_path / "meminfo"
    mounts.write_text(lines)
    meminfo.write_text("MemTotal: 1 kB\nHugepagesize:       2048 kB\n")
    return str(mounts), str(meminfo)


def test_hugepages_use_a_per_domain_directory_on_the_mount(tmp_path: Path) -> None:
    mounts, meminfo = _mounts(tmp_path, "proc /proc proc rw 0 0\n"
                              "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
                              "none /mnt/huge1g hugetlbfs rw,pagesize=1024M 0 0\n")
    assert hugetlbfs_mounts(None, mounts, meminfo) == {2048: "/dev/hugepages",
                                                       1048576: "/mnt/huge1g"}
    dom = parse_domain(xml(top="<memoryBacking><hugepages/></memoryBacking>"), "s.xml")
    where = hugepage_dir(dom, QemuConfig(), mounts, meminfo)
    assert where == f"/dev/hugepages/vmconfine/{dom.uuid}"
    big = parse_domain(xml(top="<memoryBacking><hugepages><page size='1' unit='GiB'/>"
                               "</hugepages></memoryBacking>").replace(
        "<memory unit='MiB'>128", "<memory unit='GiB'>1"), "s.xml")
    assert hugepage_dir(big, QemuConfig(), mounts, meminfo) == f"/mnt/huge1g/vmconfine/{big.uuid}"
    # qemu.conf's hugetlbfs_mount narrows the choice
    cfg = QemuConfig(hugetlbfs_mount=["/mnt/elsewhere"])
    with pytest.raises(HugepagesError, match=r"hugetlbfs_mount in qemu\.conf names no such"):
        hugepage_dir(dom, cfg, mounts, meminfo)
    # the argv: RAM from a file backend in that directory, and every driver sees it
    line = " ".join(argv(xml(top="<memoryBacking><hugepages/></memoryBacking>"),
                         CommandPaths(**{**PATHS.__dict__, "hugepage_dir": where})))
    assert "memory-backend=pc.ram" in line
    assert (f'{{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"{where}",'
            f'"prealloc":true,"size":134217728}}') in line
    res = [r for r in domain_resources(dom, hugepage_dir=where) if r.path == where]
    assert len(res) == 1 and res[0].role == "runtime_dir" and res[0].is_dir
    assert res[0].writable and res[0].create


def test_hugepages_refused_without_a_matching_mount(tmp_path: Path) -> None:
    dom = parse_domain(xml(top="<memoryBacking><hugepages><page size='1' unit='GiB'/>"
                               "</hugepages></memoryBacking>"), "s.xml")
    mounts, meminfo = _mounts(tmp_path, "proc /proc proc rw 0 0\n")
    with pytest.raises(HugepagesError, match="hugetlbfs is not mounted"):
        hugepage_dir(dom, QemuConfig(), mounts, meminfo)
    mounts, meminfo = _mounts(tmp_path, "h /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n")
    with pytest.raises(HugepagesError, match="serve 2048 KiB; mount one with -o "
                                             "pagesize=1048576K"):
        hugepage_dir(dom, QemuConfig(), mounts, meminfo)


# --------------------------------------------------------------------------- --validate


def test_validate_uses_libvirts_schema() -> None:
    require(os.path.isfile(DOMAIN_RNG), f"{DOMAIN_RNG} is missing (apt-get install libvirt0)")
    validate((ARGV / "minimal.xml").read_text(), "minimal.xml")
    with pytest.raises(XMLError) as info:
        validate(xml(devices="<serail type='pty'/>"), "typo.xml")
    msg = str(info.value)
    assert msg.startswith("typo.xml: line ") and "failed to validate against schema" in msg
    assert "\n" not in msg


def _cli(tmp_path: Path, *args: str, conf: str = "",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "inst"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "qemu.conf").write_text('security_driver = "none"\n' + conf)
    return subprocess.run([sys.executable, "-m", "vmconfine.cli", "-c",
                           f"qemu:///embed?root={root}", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_warns_refuses_and_validates(tmp_path: Path) -> None:
    require(os.path.isfile(DOMAIN_RNG), f"{DOMAIN_RNG} is missing (apt-get install libvirt0)")
    f = tmp_path / "g.xml"
    f.write_text(xml(devices="<smartcard mode='host'/>"))
    warn = _cli(tmp_path, "domxml-to-native", "qemu-argv", str(f))
    assert warn.returncode == 0, warn.stderr
    assert warn.stderr.count("\n") == 1
    assert "line 12: <devices/smartcard> is not implemented by vmconfine" in warn.stderr
    err = _cli(tmp_path, "domxml-to-native", "qemu-argv", str(f),
               conf='unsupported_xml = "error"\n')
    assert err.returncode == 1 and err.stdout == ""
    assert err.stderr.startswith("error: ") and err.stderr.count("\n") == 1
    report = _cli(tmp_path, "confinement", str(f), conf='unsupported_xml = "error"\n')
    assert report.returncode == 1 and "<devices/smartcard> is not implemented" in report.stderr
    f.write_text(xml(devices="<serail type='pty'/>"))
    for verb in (["domxml-to-native", "qemu-argv"], ["confinement"], ["run"]):
        proc = _cli(tmp_path, *verb, "--validate", str(f))
        assert proc.returncode == 1, (verb, proc.stderr)
        assert "failed to validate against schema" in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    missing = _cli(tmp_path, "domxml-to-native", "qemu-argv", "--validate", str(f),
                   env={"VMCONFINE_DOMAIN_SCHEMA": str(tmp_path / "no.rng")})
    assert missing.returncode == 1
    assert "domain schema" in missing.stderr and "apt-get install libvirt0" in missing.stderr
