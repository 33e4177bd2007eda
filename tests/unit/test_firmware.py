"""Firmware auto-selection (vmconfine.qemu.firmware): descriptors, libvirt's matching rules,
the domain filled in, the NVRAM file made from its template."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from vmconfine.config.settings import QemuConfig
from vmconfine.domain import parse_domain
from vmconfine.errors import XMLError
from vmconfine.qemu import firmware, machines
from vmconfine.qemu.argv import CommandPaths, build_command

CODE, SECBOOT, MS = ("/fw/OVMF_CODE_4M.fd", "/fw/OVMF_CODE_4M.secboot.fd",
                     "/fw/OVMF_CODE_4M.ms.fd")
VARS, MS_VARS = "/fw/OVMF_VARS_4M.fd", "/fw/OVMF_VARS_4M.ms.fd"


def descriptor(code: str, template: str, machines_: list[str], features: list[str],
               interfaces: tuple[str, ...] = ("uefi",), **mapping: object) -> dict[str, object]:
    return {"interface-types": list(interfaces),
            "mapping": {"device": "flash", "executable": {"filename": code, "format": "raw"},
                        "nvram-template": {"filename": template, "format": "raw"}, **mapping},
            "targets": [{"architecture": "x86_64", "machines": machines_}],
            "features": features, "tags": []}


#: Debian 12's ovmf descriptors (the files' content, paths shortened)
DEBIAN = {
    "40-edk2-x86_64-secure-enrolled.json": descriptor(
        MS, MS_VARS, ["pc-q35-*"], ["acpi-s3", "amd-sev", "enrolled-keys", "requires-smm",
                                    "secure-boot", "verbose-dynamic"]),
    "50-edk2-x86_64-secure.json": descriptor(
        SECBOOT, VARS, ["pc-q35-*"], ["acpi-s3", "amd-sev", "requires-smm", "secure-boot",
                                      "verbose-dynamic"]),
    "60-edk2-x86_64.json": descriptor(
        CODE, VARS, ["pc-i440fx-*", "pc-q35-*"], ["acpi-s3", "amd-sev", "verbose-dynamic"]),
}
Q35, PC = "pc-q35-7.2", "pc-i440fx-7.2"


def write(d: Path, files: dict[str, object]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, doc in files.items():
        (d / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return d


@pytest.fixture
def debian(tmp_path: Path) -> list[firmware.Descriptor]:
    return firmware.load([str(write(tmp_path / "share", DEBIAN))])


def dom(os_attrs: str = "firmware='efi'", inner: str = "", machine: str = "q35",
        extra: str = ""):  # type: ignore[no-untyped-def]
    return parse_domain(f"""<domain type='qemu'><name>fw</name><memory>65536</memory>
  <os {os_attrs}><type arch='x86_64' machine='{machine}'>hvm</type>{inner}</os>
  <features><acpi/></features>{extra}
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>""")


def picked(domain, descriptors, machine: str = Q35) -> str | None:  # type: ignore[no-untyped-def]
    fw = firmware.select(domain, descriptors, machine, "x86_64")
    return None if fw is None else os.path.basename(fw.path)


# --------------------------------------------------------------------------- descriptors


def test_later_dirs_override_by_name_and_empty_files_hide(tmp_path: Path) -> None:
    share = write(tmp_path / "share", {"50-a.json": DEBIAN["50-edk2-x86_64-secure.json"],
                                       "60-b.json": DEBIAN["60-edk2-x86_64.json"],
                                       "70-c.json": DEBIAN["60-edk2-x86_64.json"],
                                       "README": "not a descriptor"})
    etc = write(tmp_path / "etc", {"60-b.json": descriptor("/etc/fw.fd", VARS, ["*"], []),
                                   "70-c.json": "", "10-d.json": DEBIAN["60-edk2-x86_64.json"]})
    paths = firmware.descriptor_paths([str(share), str(etc), str(tmp_path / "missing")])
    assert paths == [str(etc / "10-d.json"), str(share / "50-a.json"), str(etc / "60-b.json")]
    assert firmware.load([str(share), str(etc)])[2].executable == "/etc/fw.fd"


@pytest.mark.parametrize(("content", "why"), [
    ("{not json", "not JSON"),
    ("[]", "not a JSON object"),
    (json.dumps({"interface-types": ["uefi"], "targets": [], "features": []}), "'mapping'"),
    (json.dumps({**DEBIAN["60-edk2-x86_64.json"], "interface-types": ["cloud"]}),
     "unknown interface type 'cloud'"),
    (json.dumps({**DEBIAN["60-edk2-x86_64.json"], "targets": [{"machines": []}]}),
     "architecture"),
    (" " * (firmware.MAX_DESCRIPTOR + 1), "larger than 1 MiB"),
    (json.dumps({**DEBIAN["60-edk2-x86_64.json"], "mapping": {"device": "flash"}}),
     "mapping 'executable' needs a filename and a format"),
])
def test_a_broken_descriptor_is_one_line_naming_the_file(tmp_path: Path, content: str,
                                                         why: str) -> None:
    write(tmp_path, {"30-bad.json": content})
    with pytest.raises(firmware.FirmwareError) as err:
        firmware.load([str(tmp_path)])
    msg = str(err.value)
    assert "30-bad.json" in msg and why in msg and "\n" not in msg


def test_unknown_features_are_ignored(tmp_path: Path) -> None:
    doc = descriptor(CODE, VARS, ["pc-q35-*"], ["acpi-s3", "from-the-future"])
    fw = firmware.load([str(write(tmp_path, {"10-x.json": doc}))])[0]
    assert fw.features == {"acpi-s3", "from-the-future"}
    assert picked(dom(), [fw]) == "10-x.json"


@pytest.mark.parametrize(("pattern", "name", "ok"), [
    ("pc-q35-*", "pc-q35-7.2", True), ("pc-q35-*", "pc-i440fx-7.2", False),
    ("pc-q35-?.2", "pc-q35-7.2", True), ("pc-q35-[7].2", "pc-q35-7.2", False),
    ("*", "anything", True), ("pc-q35-7.2", "pc-q35-7.2", True),
])
def test_machine_globs_are_glibs_simple_patterns(pattern: str, name: str, ok: bool) -> None:
    assert firmware.glob_match(pattern, name) is ok


def test_machine_aliases_from_qemu_help() -> None:
    text = ("Supported machines are:\nq35                  Standard PC (Q35 + ICH9, 2009) "
            "(alias of pc-q35-7.2)\npc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
            "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n")
    assert machines.parse_machine_help(text).aliases == {"q35": Q35, "pc": PC}


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(("os_attrs", "inner", "machine", "extra", "expected"), [
    ("firmware='efi'", "", Q35, "", "40-edk2-x86_64-secure-enrolled.json"),
    ("firmware='efi'", "", PC, "", "60-edk2-x86_64.json"),
    ("firmware='efi'", "<firmware><feature enabled='no' name='secure-boot'/></firmware>", Q35,
     "", "60-edk2-x86_64.json"),
    ("firmware='efi'", "<firmware><feature enabled='no' name='enrolled-keys'/></firmware>", Q35,
     "", "50-edk2-x86_64-secure.json"),
    ("firmware='efi'", "<firmware><feature enabled='yes' name='secure-boot'/><feature "
     "enabled='yes' name='enrolled-keys'/></firmware>", Q35, "",
     "40-edk2-x86_64-secure-enrolled.json"),
    ("firmware='efi'", "<loader secure='yes'/>", Q35, "", "40-edk2-x86_64-secure-enrolled.json"),
    ("firmware='efi'", f"<loader>{CODE}</loader>", Q35, "", "60-edk2-x86_64.json"),
    ("", f"<loader readonly='yes' type='pflash'>{SECBOOT}</loader>", Q35, "",
     "50-edk2-x86_64-secure.json"),
    ("firmware='efi'", "", Q35, "<pm><suspend-to-mem enabled='no'/></pm>",
     "40-edk2-x86_64-secure-enrolled.json"),
    ("firmware='efi'", "", Q35, "<pm><suspend-to-disk enabled='yes'/></pm>", None),
    ("firmware='bios'", "", Q35, "", None),
    ("firmware='efi'", "", "pc-q35-7.2", "", "40-edk2-x86_64-secure-enrolled.json"),
])
def test_libvirts_choice(debian: list[firmware.Descriptor], os_attrs: str, inner: str,
                         machine: str, extra: str, expected: str | None) -> None:
    # the expected choices are what libvirt 9.0's domxml-to-native picks on Debian 12
    assert picked(dom(os_attrs, inner, extra=extra), debian, machine) == expected


def test_stateless_and_combined_flash_are_skipped(tmp_path: Path) -> None:
    files = {"10-stateless.json": descriptor(CODE, VARS, ["*"], [], mode="stateless"),
             "20-split.json": descriptor(SECBOOT, VARS, ["*"], [])}
    assert picked(dom(), firmware.load([str(write(tmp_path, files))])) == "20-split.json"


# --------------------------------------------------------------------------- filling in


def test_fill_records_the_firmware_in_the_live_xml_only(debian: list[firmware.Descriptor],
                                                        tmp_path: Path) -> None:
    d = dom()
    configured = d.to_xml()
    nvram = firmware.nvram_file(tmp_path, d.name)
    assert nvram == f"{tmp_path}/fw_VARS.fd"
    fw = firmware.fill(d, debian, Q35, "x86_64", nvram)
    assert fw is not None and fw.executable == MS
    assert d.os.loader is not None
    assert (d.os.loader.path, d.os.loader.type, d.os.loader.readonly, d.os.loader.secure) == (
        MS, "pflash", True, True)
    assert (d.os.nvram, d.os.nvram_template, d.smm) == (nvram, MS_VARS, "on")
    live = d.to_xml(live=True, extra={"state": {"configos": d.config_os,
                                                "smmfilled": "yes"}})
    assert f"<loader readonly=\"yes\" secure=\"yes\" type=\"pflash\">{MS}</loader>" in live
    assert f"<nvram template=\"{MS_VARS}\">{nvram}</nvram>" in live
    assert "<smm state=\"on\"/>" in live and "<os>" in live
    assert d.to_xml() == configured
    # the status XML read back (reconnect) still gives the configured XML
    again = parse_domain(live)
    assert again.os.loader is not None and again.os.loader.path == MS
    assert again.to_xml() == configured


def test_no_firmware_is_one_clear_error(debian: list[firmware.Descriptor]) -> None:
    d = dom("firmware='efi'", "", extra="<pm><suspend-to-disk enabled='yes'/></pm>")
    with pytest.raises(firmware.FirmwareError) as err:
        firmware.fill(d, debian, Q35, "x86_64", "/n")
    msg = str(err.value)
    assert msg.startswith("Unable to find any firmware to satisfy 'efi' for x86_64 machine "
                          "'pc-q35-7.2'") and "ovmf" in msg and "\n" not in msg
    with pytest.raises(firmware.FirmwareError, match="none installed"):
        firmware.fill(dom(), [], Q35, "x86_64", "/n")


def test_secure_boot_on_i440fx_is_refused(debian: list[firmware.Descriptor]) -> None:
    for inner in ("<loader secure='yes'/>",
                  "<firmware><feature enabled='yes' name='secure-boot'/></firmware>"):
        with pytest.raises(firmware.FirmwareError,
                           match="Secure boot is supported with q35 machine types only"):
            firmware.fill(dom(inner=inner, machine="pc"), debian, PC, "x86_64", "/n")


def test_smm_off_with_smm_firmware_is_refused(debian: list[firmware.Descriptor]) -> None:
    d = parse_domain(dom().to_xml().replace("<acpi/>", "<acpi/><smm state='off'/>"))
    with pytest.raises(firmware.FirmwareError, match="SMM turned off but chosen firmware "
                                                     "requires it"):
        firmware.fill(d, debian, Q35, "x86_64", "/n")


def test_old_style_loader_gets_its_template(debian: list[firmware.Descriptor]) -> None:
    d = dom("", f"<loader readonly='yes' type='pflash'>{CODE}</loader>")
    assert firmware.fill(d, debian, Q35, "x86_64", "/nv/fw_VARS.fd") is not None
    assert (d.os.nvram, d.os.nvram_template, d.smm) == ("/nv/fw_VARS.fd", VARS, None)
    # a loader no descriptor knows starts as given (libvirt's old style)
    d = dom("", "<loader readonly='yes' type='pflash'>/custom/CODE.fd</loader>")
    assert firmware.fill(d, debian, Q35, "x86_64", "/n") is None and d.os.nvram is None
    # an explicit template: nothing to select
    d = dom("", f"<loader readonly='yes' type='pflash'>{CODE}</loader><nvram "
                f"template='{VARS}'/>")
    assert not firmware.needs_selection(d, nvram_exists=False)


def test_an_existing_nvram_path_is_kept(debian: list[firmware.Descriptor]) -> None:
    d = dom("firmware='efi'", "<nvram>/mine/VARS.fd</nvram>")
    firmware.fill(d, debian, Q35, "x86_64", "/default/fw_VARS.fd")
    assert d.os.nvram == "/mine/VARS.fd"


@pytest.mark.parametrize(("inner", "message"), [
    ("<firmware><feature enabled='yes' name='nope'/></firmware>",
     "invalid firmware feature name 'nope'"),
    ("<firmware><feature name='secure-boot'/></firmware>", "enabled='yes' or enabled='no'"),
    ("<firmware><feature enabled='no' name='secure-boot'/><feature enabled='yes' "
     "name='enrolled-keys'/></firmware>", "'enrolled-keys' cannot be enabled when firmware "
                                          "feature 'secure-boot' is disabled"),
])
def test_firmware_features_are_checked_at_parse_time(inner: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        dom("firmware='efi'", inner)
    with pytest.raises(XMLError, match="unknown firmware value 'uefi'"):
        dom("firmware='uefi'")


# --------------------------------------------------------------------------- the NVRAM file


def test_nvram_is_copied_once_and_reset_only_when_asked(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"template" * 100)
    nvram = tmp_path / "nvram" / "fw_VARS.fd"
    assert firmware.create_nvram(str(nvram), str(template)) is True
    assert nvram.read_bytes() == template.read_bytes()
    assert (nvram.stat().st_mode & 0o777) == 0o600
    nvram.write_bytes(b"guest variables")
    assert firmware.create_nvram(str(nvram), str(template)) is False
    assert nvram.read_bytes() == b"guest variables"
    assert firmware.create_nvram(str(nvram), str(template), reset=True) is True
    assert nvram.read_bytes() == template.read_bytes()


def test_nvram_never_writes_through_a_symlink(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"t")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "fw_VARS.fd"
    link.symlink_to(victim)
    with pytest.raises(firmware.FirmwareError, match="not a regular file"):
        firmware.create_nvram(str(link), str(template))
    firmware.create_nvram(str(link), str(template), reset=True)
    assert victim.read_bytes() == b"precious" and not link.is_symlink()
    with pytest.raises(firmware.FirmwareError, match="cannot read the NVRAM template"):
        firmware.create_nvram(str(tmp_path / "x"), str(tmp_path / "missing"))


def test_a_private_file_is_never_a_template(tmp_path: Path) -> None:
    """A template named in the XML is copied by root into a file QEMU's account owns: a
    secret (0600, like /etc/shadow) or a device or directory is refused, nothing is made."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret")
    secret.chmod(0o600)
    for template in (secret, tmp_path, Path("/dev/zero")):
        with pytest.raises(firmware.FirmwareError, match="not a regular file that everybody"):
            firmware.create_nvram(str(tmp_path / "fw_VARS.fd"), str(template))
    assert not (tmp_path / "fw_VARS.fd").exists()
    secret.chmod(0o644)
    assert firmware.create_nvram(str(tmp_path / "fw_VARS.fd"), str(secret))


# --------------------------------------------------------------------------- command line


def test_argv_of_selected_firmware(debian: list[firmware.Descriptor], tmp_path: Path) -> None:
    d = dom(extra="<pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>")
    firmware.fill(d, debian, Q35, "x86_64", "/nv/fw_VARS.fd")
    paths = CommandPaths(monitor_socket=str(tmp_path / "m.sock"), home_dir=str(tmp_path),
                         runtime_dir=str(tmp_path), user="root")
    args = build_command(d, QemuConfig(), paths).args
    machine = args[args.index("-machine") + 1]
    assert machine.startswith("q35,usb=off,smm=on,") and "pflash1=vmc-pflash1-format" in machine
    globals_ = [args[i + 1] for i, a in enumerate(args) if a == "-global"]
    assert globals_ == ["driver=cfi.pflash01,property=secure,value=on",
                        "ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1"]
    pc = dom("", extra="<pm><suspend-to-mem enabled='yes'/></pm>", machine="pc")
    args = build_command(pc, QemuConfig(), paths).args
    assert [args[i + 1] for i, a in enumerate(args) if a == "-global"] == ["PIIX4_PM.disable_s3=0"]
    with pytest.raises(XMLError, match="has not been resolved"):
        build_command(dom(), QemuConfig(), paths)
    with pytest.raises(XMLError, match="secure='yes'> needs a pflash firmware"):
        build_command(dom("", "<loader secure='yes'/>"), QemuConfig(), paths)


# --------------------------------------------------------------------------- every driver sees it


def test_selected_firmware_reaches_every_driver(tmp_path: Path) -> None:
    """The filled loader and NVRAM are resources (DAC, SELinux, Landlock, cgroups, namespaces
    map those) and in the live XML the AppArmor helper reads: firmware read-only, NVRAM
    read-write."""
    from vmconfine.plugin.resources import Role, domain_resources
    from vmconfine_aa_helper.main import run

    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"c")
    template.write_bytes(b"v")
    fws = firmware.load([str(write(tmp_path / "fw", {"10-x.json": descriptor(
        str(code), str(template), ["pc-q35-*"], ["requires-smm", "secure-boot"])}))])
    d = dom()
    nvram = tmp_path / "nvram" / "fw_VARS.fd"
    firmware.fill(d, fws, Q35, "x86_64", str(nvram))
    firmware.create_nvram(str(nvram), str(template))
    res = {(r.role, r.path): (r.access, r.readonly) for r in domain_resources(d)}
    assert res[(Role.LOADER, str(code))] == ("ro", True)
    assert res[(Role.NVRAM, str(nvram))] == ("rw", False)
    out, err = io.StringIO(), io.StringIO()
    rc = run(["--dryrun", "-c", "-u", f"vmconfine-{d.uuid}", "-P", str(tmp_path / "profiles"),
              "--uri", f"qemu:///embed?root={tmp_path}/inst"],
             io.BytesIO(d.to_xml(live=True).encode()), out, err)
    assert rc == 0, err.getvalue()
    rules = out.getvalue()
    assert f'"{code}" rk,' in rules and f'"{nvram}" rwk,' in rules, rules


def test_a_readonly_pflash_loader_gets_the_default_nvram() -> None:
    d = dom("", f"<loader readonly='yes' type='pflash'>{CODE}</loader><nvram template='{VARS}'/>")
    configured = d.to_xml()
    d.fill_nvram("/nv/fw_VARS.fd")
    assert (d.os.nvram, d.os.nvram_template) == ("/nv/fw_VARS.fd", VARS)
    assert f'<nvram template="{VARS}">/nv/fw_VARS.fd</nvram>' in d.to_xml(live=True)
    assert d.to_xml() == configured
