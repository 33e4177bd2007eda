"""``<os firmware='efi'>`` on the real host: Debian's OVMF picked from QEMU's firmware
descriptors, the NVRAM made from its template, both confined by the whole stack.

One q35 domain runs paused under ``vmconfine run`` (embed URI, TCG) with Landlock, DAC (QEMU
as vmconfine-qemu), cgroups and a per-domain root view. QMP shows the two pflash drives
(firmware read-only, NVRAM read-write), SMM and the secure flash; the NVRAM belongs to QEMU's
account while it runs and to root after, and is never made again over guest data. A
compromised QEMU (QMP ``blockdev-add``) cannot open the firmware or another NVRAM for writing;
the control opens its own NVRAM read-write (and the firmware read-only). The same XML through
libvirt 9.0's ``domxml-to-native`` picks the same firmware and builds the same flash devices (QMP).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import SCRATCH_PARENT, Embed
from tests.host.test_argv_libvirt import (
    LibvirtEmbed,
    flags,
    libvirt,  # noqa: F401 (fixture)
    options,
    run_libvirt,
    split_native,
)
from tests.host.test_landlock_enforce import require_landlock
from tests.host.test_landlock_readonly import Qmp
from tests.support import require, require_root
from vmconfine.config.instance import open_instance

DESCRIPTORS = "/usr/share/qemu/firmware"
LOADER = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"  # 40-edk2-x86_64-secure-enrolled.json
TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
NAME = "efi-q35"
QEMU_USER = "vmconfine-qemu"
CONF = f"""security_driver = "landlock"
namespaces = [ "mount", "root" ]
user = "{QEMU_USER}"
group = "{QEMU_USER}"
"""
XML = f"""<domain type='qemu'>
  <name>{NAME}</name>
  <uuid>6f1c1b8e-2b1e-4f39-9a43-0c2a1f0e9e51</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <pm>
    <suspend-to-mem enabled='no'/>
    <suspend-to-disk enabled='no'/>
  </pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Efi:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.embed = Embed(root / "instance")
        self.embed.configure(CONF)
        self.xml = root / f"{NAME}.xml"
        self.xml.write_text(XML)
        self.nvram = open_instance(self.embed.uri).nvram_dir / f"{NAME}_VARS.fd"

    def start(self, *extra: str) -> None:
        self.embed.start(self.xml, "--paused", *extra)

    def stop(self) -> None:
        assert self.embed.cli("destroy", NAME).returncode == 0
        for p in self.embed.procs:
            p.wait(timeout=60)


@pytest.fixture(scope="module")
def efi() -> Iterator[Efi]:
    require_root()
    require_landlock()
    require(os.path.exists(f"{DESCRIPTORS}/40-edk2-x86_64-secure-enrolled.json"),
            "Debian's OVMF descriptors are missing (apt-get install ovmf)")
    require(_has_user(QEMU_USER), f"no {QEMU_USER} account (run scripts/setup.sh)")
    root = Path(tempfile.mkdtemp(prefix="vmc-efi-", dir=SCRATCH_PARENT))
    os.chmod(root, 0o755)
    e = Efi(root)
    try:
        e.start()
        yield e
    finally:
        e.embed.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_qmp_shows_the_pflash_drives(efi: Efi) -> None:
    qmp = Qmp(efi.embed, NAME)
    try:
        blocks = {b["qdev"]: b["inserted"] for b in qmp.cmd("query-block")["return"]
                  if "flash" in b.get("qdev", "")}
        smm = qmp.cmd("qom-get", path="/machine", property="smm")["return"]
        secure = qmp.cmd("qom-get", path="/machine/system.flash0", property="secure")["return"]
        status = qmp.cmd("query-status")["return"]["status"]
    finally:
        qmp.close()
    assert status == "prelaunch"
    flash0, flash1 = blocks["/machine/system.flash0"], blocks["/machine/system.flash1"]
    assert (flash0["file"], flash0["ro"], flash0["drv"]) == (LOADER, True, "raw")
    assert (flash1["file"], flash1["ro"], flash1["drv"]) == (str(efi.nvram), False, "raw")
    assert (smm, secure) == ("on", True)


def test_nvram_is_made_from_the_template_and_belongs_to_qemu(efi: Efi) -> None:
    st = efi.nvram.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam(QEMU_USER).pw_uid, 0o600)
    assert efi.nvram.read_bytes() == Path(TEMPLATE).read_bytes()
    live = efi.embed.cli("dumpxml", NAME, check=True).stdout
    assert f'<loader readonly="yes" secure="yes" type="pflash">{LOADER}</loader>' in live
    assert f'<nvram template="{TEMPLATE}">{efi.nvram}</nvram>' in live
    inactive = efi.embed.cli("dumpxml", "--inactive", NAME, check=True).stdout
    assert '<os firmware="efi">' in inactive and "<loader" not in inactive


def test_compromised_qemu_cannot_write_firmware_or_another_nvram(efi: Efi) -> None:
    other = efi.nvram.parent / "other_VARS.fd"
    shutil.copyfile(TEMPLATE, other)
    os.chmod(other, 0o600)
    qmp = Qmp(efi.embed, NAME)
    try:
        got = {
            "loader-ro": qmp.blockdev_add("a1", Path(LOADER), read_only=True),
            "loader-rw": qmp.blockdev_add("a2", Path(LOADER), read_only=False),
            "template-rw": qmp.blockdev_add("a3", Path(TEMPLATE), read_only=False),
            "other-ro": qmp.blockdev_add("a4", other, read_only=True),
            "own-nvram-rw": qmp.blockdev_add("a5", efi.nvram, read_only=False),  # control
        }
    finally:
        qmp.close()
        other.unlink()
    assert got["loader-ro"] == got["own-nvram-rw"] == "ok", got
    # the firmware is in QEMU's root view read-only; the template and another domain's NVRAM
    # are not in it at all
    assert "Permission denied" in got["loader-rw"], got
    for what in ("template-rw", "other-ro"):
        assert "No such file or directory" in got[what], got


def test_nvram_outlives_the_domain_and_is_not_made_again(efi: Efi) -> None:
    efi.stop()
    st = efi.nvram.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)  # DAC gave it back
    data = bytearray(efi.nvram.read_bytes())
    data[-16:] = b"guest-variables!"
    efi.nvram.write_bytes(bytes(data))
    efi.start()
    assert efi.nvram.read_bytes() == bytes(data)
    efi.stop()
    efi.start("--reset-nvram")
    assert efi.nvram.read_bytes() == Path(TEMPLATE).read_bytes()


def test_same_firmware_as_libvirt(efi: Efi, libvirt: LibvirtEmbed) -> None:  # noqa: F811
    ours_line = efi.embed.cli("domxml-to-native", "qemu-argv", str(efi.xml), check=True).stdout
    _env, ours = split_native(ours_line)
    env, theirs = split_native(libvirt.domxml_to_native(NAME, XML, {}))

    def pflash(argv: list[str]) -> list[str]:
        return [a.split('"filename":"')[1].split('"')[0] for a in argv if '"filename"' in a]

    assert pflash(ours)[0] == pflash(theirs)[0] == LOADER
    assert [os.path.basename(p) for p in pflash(theirs)] == [os.path.basename(LOADER),
                                                             f"{NAME}_VARS.fd"]
    assert flags(ours)["machine"] == flags(theirs)["machine"]  # smm=on, both pflash chains

    assert options(ours, "-global") == options(theirs, "-global") == [
        "ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1",
        "driver=cfi.pflash01,property=secure,value=on"]
    # libvirt's command line runs with its NVRAM made from the same template: same flash
    view, _nvram = run_libvirt(theirs, env, TEMPLATE)
    flash = {k: (os.path.basename(v["file"]), v["ro"], v["drv"])
             for k, v in view["block"].items() if k.startswith("system.flash")}
    assert flash == {"system.flash0": (os.path.basename(LOADER), True, "raw"),
                     "system.flash1": (f"{NAME}_VARS.fd", False, "raw")}


NATIVE, RUN = ["domxml-to-native", "qemu-argv"], ["run", "--paused"]
#: (replacements in XML, the verbs that refuse it, the error): the NVRAM template is only read
#: when the domain starts
BAD = {
    "secret-template": (
        [("<os firmware='efi'>", "<os>"),
         ("<boot dev='hd'/>", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/"
                              "OVMF_CODE_4M.fd</loader><nvram template='/etc/shadow'/>"
                              "<boot dev='hd'/>")],
        [RUN], "NVRAM template /etc/shadow is not a regular file that everybody may read"),
    "secure-i440fx": (
        [("machine='q35'", "machine='pc'"),
         ("<boot dev='hd'/>", "<firmware><feature enabled='yes' name='secure-boot'/>"
                              "</firmware><boot dev='hd'/>")],
        [RUN], "Secure boot is supported with q35 machine types only"),
    "no-firmware": (
        [("<suspend-to-disk enabled='no'/>", "<suspend-to-disk enabled='yes'/>")],
        [NATIVE, RUN], "Unable to find any firmware to satisfy 'efi' for x86_64 machine "
                       "'pc-q35-7.2' (descriptors: 40-edk2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_firmware_requests_are_one_line_and_change_nothing(efi: Efi, case: str) -> None:
    edits, verbs, message = BAD[case]
    name = f"efi-{case}"
    text = XML.replace(NAME, name).replace("6f1c1b8e", "7f1c1b8e")
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    xml = efi.root / f"{name}.xml"
    xml.write_text(text)
    for verb in verbs:
        proc = efi.embed.cli(*verb, str(xml))
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert proc.stderr.startswith(f"error: {message}"), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (efi.nvram.parent / f"{name}_VARS.fd").exists()
    assert efi.embed.cli("list", check=True).stdout.count("efi-") == 1  # only the good one
