"""The virt-install corpus without QEMU: every element of a ready domain is implemented, the
command line carries virt-install's defaults as libvirt renders them, and every domain listed
in waiting.json fails today for exactly the feature it waits for (so the list cannot go stale:
when the feature lands, this test names the domain to move)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import virtinstall
from vmconfine.config.settings import QemuConfig
from vmconfine.domain import Domain, parse_domain
from vmconfine.domain.chardev import fill_channel_paths
from vmconfine.domain.support import unsupported
from vmconfine.errors import VmconfineError
from vmconfine.qemu import firmware
from vmconfine.qemu.argv import CommandPaths, build_command

SCRATCH = Path("/srv/vi")
PATHS = CommandPaths(monitor_socket="/run/vi/monitor.sock", home_dir="/var/lib/vi",
                     runtime_dir="/run/vi", user="root")
#: Debian's OVMF set in short (tests/unit/test_firmware.py has the real descriptors)
FIRMWARE = [
    firmware.Descriptor(
        path="/usr/share/qemu/firmware/40-secure.json", interfaces=("uefi",), device="flash",
        executable="/fw/CODE.ms.fd", executable_format="raw", nvram_template="/fw/VARS.ms.fd",
        nvram_template_format="raw", targets=(("x86_64", ("pc-q35-*",)),),
        features=frozenset({"acpi-s3", "requires-smm", "secure-boot", "enrolled-keys"})),
    firmware.Descriptor(
        path="/usr/share/qemu/firmware/60-plain.json", interfaces=("uefi",), device="flash",
        executable="/fw/CODE.fd", executable_format="raw", nvram_template="/fw/VARS.fd",
        nvram_template_format="raw", targets=(("x86_64", ("pc-q35-*", "pc-i440fx-*")),),
        features=frozenset({"acpi-s3"})),
]
VERSIONED = {"q35": "pc-q35-7.2", "pc": "pc-i440fx-7.2"}


def load(case: str) -> Domain:
    """The domain as the host tier gets it, each qcow2 disk declared without a backing file
    (``<backingStore/>``): no image exists to read the chain from here."""
    text = virtinstall.for_host(virtinstall.text(case), SCRATCH)
    text = re.sub(r'(<source file="[^"]+\.qcow2"/>)', r"\1<backingStore/>", text)
    return parse_domain(text, f"{case}.xml")


def argv(case: str) -> list[str]:
    d = load(case)
    machine = d.os.machine or "pc"
    if machine == "pc" and d.os.firmware_features.get("secure-boot"):
        pytest.fail(f"{case}: secure boot on i440fx")
    firmware.fill(d, FIRMWARE, VERSIONED.get(machine, machine), "x86_64",
                  f"/var/lib/vi/nvram/{d.name}_VARS.fd")
    d.generated_paths = fill_channel_paths(d.chardevs, f"/var/lib/vi/channel/{d.name}")
    return build_command(d, QemuConfig(), PATHS).args


def values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def test_corpus_and_waiting_list_agree() -> None:
    assert len(virtinstall.CASES) >= 30 and len(virtinstall.READY) >= 30
    for case, features in virtinstall.WAITING.items():
        assert case in virtinstall.CASES, f"waiting.json names {case}, which is not in the corpus"
        assert features and set(features) <= set(virtinstall.FEATURES), case
    used = {f for features in virtinstall.WAITING.values() for f in features}
    assert used == set(virtinstall.FEATURES), "waiting.json declares a feature no domain needs"
    json.loads((virtinstall.DATA / "waiting.json").read_text())


@pytest.mark.parametrize("case", virtinstall.READY)
def test_every_element_is_implemented(case: str) -> None:
    d = load(case)
    assert [f.message(d.source) for f in unsupported(d)] == []
    assert argv(case)


def test_waiting_domains_fail_only_for_their_feature() -> None:
    """(One test, not one per domain: the list is empty whenever every feature has landed.)"""
    for case in sorted(virtinstall.WAITING):
        errors = [str(virtinstall.FEATURES[f]["error"]) for f in virtinstall.WAITING[case]]
        with pytest.raises(VmconfineError) as err:
            argv(case)
        assert any(e in str(err.value) for e in errors), (
            f"{case} no longer fails for {virtinstall.WAITING[case]} but with: {err.value}; if "
            "the feature has landed, remove the domain from tests/data/virtinstall/waiting.json")


def test_windows_defaults_render_as_libvirt() -> None:
    args = argv("win10-vnc-user")
    assert values(args, "-cpu") == ["qemu64,hv-time=on,hv-relaxed=on,hv-vapic=on,"
                                    "hv-spinlocks=0x1fff"]
    assert values(args, "-rtc") == ["base=localtime,driftfix=slew"]
    assert "-no-hpet" in args
    devices = {d["id"]: d for d in (json.loads(v) for v in values(args, "-device"))}
    assert devices["sound0"]["driver"] == "ich9-intel-hda"
    assert {k: devices["sound0-codec0"][k] for k in ("driver", "bus", "cad", "audiodev")} == {
        "driver": "hda-duplex", "bus": "sound0.0", "cad": 0, "audiodev": "audio1"}
    assert (devices["usb"]["driver"], devices["usb"]["p2"], devices["usb"]["p3"]) == (
        "qemu-xhci", 15, 15)
    assert values(args, "-audiodev") == ['{"id":"audio1","driver":"none"}']
    assert values(args, "-global") == ["kvm-pit.lost_tick_policy=delay",
                                       "ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1"]


def test_uefi_secure_boot_domain_gets_smm_and_secure_flash() -> None:
    args = argv("win11-vnc-uefi-user")
    machine = values(args, "-machine")[0]
    assert "smm=on" in machine and "pflash0=vmc-pflash0-format" in machine
    assert "driver=cfi.pflash01,property=secure,value=on" in values(args, "-global")


@pytest.mark.parametrize(("bad", "message"), [
    ('<spinlocks state="on" retries="8191"/>', None),
    ('<spinlocks state="on" retries="100"/>', "retry count must be at least 4095"),
    ('<spinlocks state="on"/>', "missing HyperV spinlock retry count"),
    ('<relaxed state="maybe"/>', "needs state='on' or state='off'"),
    ('<nosuch state="on"/>', "unsupported HyperV Enlightenment feature: nosuch"),
    ('<vendor_id state="on" value="way-too-long-vendor"/>', "1 to 12 letters or digits"),
])
def test_hyperv_is_checked_as_libvirt(bad: str, message: str | None) -> None:
    text = virtinstall.text("win10-vnc-user").replace(
        '<spinlocks state="on" retries="8191"/>', bad)
    if message is None:
        parse_domain(text)
        return
    with pytest.raises(VmconfineError, match=message):
        parse_domain(text)


def test_xhci_ports_are_bounded() -> None:
    base = virtinstall.text("fedora38-vnc-user")
    with pytest.raises(VmconfineError, match="at most 15 ports"):
        parse_domain(base.replace('ports="15"', 'ports="16"'))


def test_controllers_without_index_are_numbered_as_libvirt() -> None:
    """virt-install writes no index=: the root bus is 0, the rest the lowest free index of
    their type, explicit ones kept; the tree gets them (the PCI topology reads it)."""
    d = parse_domain("""<domain type='qemu'><name>x</name><memory>1024</memory>
      <os><type machine='q35'>hvm</type></os><devices>
      <controller type='usb' model='qemu-xhci'/><controller type='pci' model='pcie-root'/>
      <controller type='pci' model='pcie-root-port'/>
      <controller type='pci' index='1' model='pcie-root-port'/>
      <controller type='pci' model='pcie-root-port'/></devices></domain>""")
    assert [(c.type, c.index) for c in d.controllers] == [
        ("usb", 0), ("pci", 0), ("pci", 2), ("pci", 1), ("pci", 3)]
    assert [el.get("index") for el in d.root.iter("controller")] == ["0", "0", "2", "1", "3"]
    args = argv("fedora38-vnc-user")
    ports = [v for v in values(args, "-device") if '"pcie-root-port"' in v]
    assert len(ports) >= 14
