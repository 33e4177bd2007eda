"""Landlock ruleset derivation (vmconfine_landlock.ruleset) over the domain corpus.

The emulator's files are faked (EmulatorFiles), so these tests need no QEMU and no Landlock.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmconfine.domain import parse_domain
from vmconfine.plugin.resources import domain_resources
from vmconfine.qemu.emulator import EmulatorFiles
from vmconfine_landlock import syscalls
from vmconfine_landlock.ruleset import (
    ALL_FS,
    EXEC_FILE,
    RO_DIR,
    RO_FILE,
    RW_DIR,
    RW_FILE,
    NetRule,
    PathRule,
    Ruleset,
    derive_ruleset,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "argv"
CASES = sorted(p.stem for p in DATA.glob("*.xml"))

EMU = EmulatorFiles(
    executable="/opt/emu/bin/qemu-system-x86_64",
    interpreter="/opt/emu/lib/ld-linux-x86-64.so.2",
    libraries=("/opt/emu/lib/libglib-2.0.so.0", "/opt/emu/lib/libc.so.6"),
    loader_cache="/etc/ld.so.cache",
    data_dirs=("/opt/emu/share/qemu", "/opt/emu/share/seabios"),
    module_dirs=("/opt/emu/lib/qemu",),
    module_libraries=("/opt/emu/lib/libusb-1.0.so.0",),
)
EMU_PATHS = {EMU.executable, EMU.interpreter, *EMU.libraries, EMU.loader_cache,
             *EMU.data_dirs, *EMU.module_dirs, *EMU.module_libraries}


def _subst(tmp: Path) -> dict[str, str]:
    return {"@DIR@": str(tmp / "images"), "@TTY@": "/dev/ttyS0",
            "@BLOCK0@": str(tmp / "blk0"), "@BLOCK1@": str(tmp / "blk1"),
            "@BLOCK2@": str(tmp / "blk2")}


def load(name: str, tmp: Path):  # type: ignore[no-untyped-def]
    text = (DATA / f"{name}.xml").read_text()
    for key, value in _subst(tmp).items():
        text = text.replace(key, value)
    return parse_domain(text, f"{name}.xml")


def derive(domain, tmp: Path) -> tuple[Ruleset, list]:  # type: ignore[no-untyped-def]
    run = tmp / "run" / f"domain-{domain.name}"
    res = domain_resources(domain, run)
    rs = derive_ruleset(domain, res, EMU, home_dir=str(tmp / "lib" / f"domain-{domain.name}"))
    return rs, res


def rule(rs: Ruleset, path: str | Path) -> PathRule:
    found = rs.rule_for(os.path.realpath(path))
    assert found is not None, f"no rule for {path}: {[r.path for r in rs.path_rules]}"
    return found


# ---- invariants over the whole corpus -----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_corpus_invariants(case: str, tmp_path: Path) -> None:
    domain = load(case, tmp_path)
    rs, res = derive(domain, tmp_path)
    images = str(tmp_path / "images")
    allowed_dirs = {os.path.realpath(p) for p in (
        tmp_path / "run" / f"domain-{domain.name}", tmp_path / "lib" / f"domain-{domain.name}",
        "/dev/pts", images)} | set(EMU.data_dirs) | set(EMU.module_dirs)
    for r in rs.path_rules:
        # execute only for the emulator and its loader
        if "execute" in r.access:
            assert r.path in (EMU.executable, EMU.interpreter), r
        if not r.is_dir:
            assert r.access <= syscalls.FILE_ONLY_ACCESS, r
        else:
            # no broad directory grants: only the domain's own dirs, QEMU's data/module dirs,
            # /dev/pts; never make_sock or make_reg in a directory of the admin's
            assert r.path in allowed_dirs - {images}, r
        assert "refer" not in r.access and "make_char" not in r.access
        assert "make_block" not in r.access
        assert r.path not in ("/", "/usr", "/etc", "/home", "/tmp", "/dev"), r
    # every resource is covered with the access it needs
    for res_ in res:
        if not res_.path:
            continue
        if res_.passed:
            # vmconfine opens it and QEMU gets the fd: no rule on it or its directory
            assert rs.rule_for(os.path.realpath(res_.path)) is None, res_
            continue
        r = rule(rs, res_.path)
        if res_.writable:
            assert {"read_file", "write_file"} <= r.access, (res_, r)
        else:
            assert "write_file" not in r.access and "read_file" in r.access, (res_, r)
    # and nothing else: every rule comes from a resource, the emulator, or a known extra
    known = {os.path.realpath(r.path) for r in res if r.path}
    known |= {os.path.realpath(os.path.dirname(r.path)) for r in res if r.path and r.create}
    known |= EMU_PATHS | {"/dev/pts", "/dev/urandom",
                          os.path.realpath(tmp_path / "lib" / f"domain-{domain.name}")}
    if domain.clock_offset == "localtime":  # the time zone QEMU reads for -rtc base=localtime
        known.add(os.path.realpath("/etc/localtime"))
    assert {r.path for r in rs.path_rules} <= known
    assert rs.handled_fs == ALL_FS


def test_minimal_exact_rules(tmp_path: Path) -> None:
    domain = load("minimal", tmp_path)
    rs, _ = derive(domain, tmp_path)
    run = str(tmp_path / "run" / "domain-minimal")
    home = str(tmp_path / "lib" / "domain-minimal")
    expected = {run, home, *EMU_PATHS, "/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                "/dev/urandom"}
    assert {r.path for r in rs.path_rules} == {os.path.realpath(p) for p in expected}
    assert rule(rs, run).access == RW_DIR and rule(rs, run).is_dir
    assert rule(rs, home).optional
    assert rule(rs, EMU.executable).access == EXEC_FILE
    assert rule(rs, EMU.interpreter).access == EXEC_FILE
    assert rule(rs, EMU.libraries[0]).access == RO_FILE
    assert rule(rs, EMU.module_libraries[0]).roles == ("module-library",)
    assert rule(rs, EMU.data_dirs[0]).access == RO_DIR
    assert rule(rs, EMU.module_dirs[0]).access == RO_DIR
    assert rule(rs, "/dev/null").access >= {"read_file", "write_file", "ioctl_dev"}
    assert rule(rs, "/dev/null").optional


# ---- per role -------------------------------------------------------------------------------


def test_backing_chain_top_rw_layers_ro(tmp_path: Path) -> None:
    rs, _ = derive(load("disk-backing-chain", tmp_path), tmp_path)
    img = tmp_path / "images"
    assert rule(rs, img / "top.qcow2").access == RW_FILE
    assert rule(rs, img / "top.qcow2").roles == ("disk",)
    for layer in ("mid.qcow2", "base.img"):
        assert rule(rs, img / layer).access == RO_FILE
        assert rule(rs, img / layer).roles == ("backing",)
    assert rule(rs, img / "scratch.qcow2").access == RW_FILE


def test_readonly_disks_are_read_only(tmp_path: Path) -> None:
    rs, _ = derive(load("disk-readonly", tmp_path), tmp_path)
    img = tmp_path / "images"
    assert rule(rs, img / "disk0.img").access == RW_FILE
    assert rule(rs, img / "shared-ro.img").access == RO_FILE
    assert rule(rs, img / "ro.qcow2").access == RO_FILE


def test_kernel_initrd_dtb_read_only(tmp_path: Path) -> None:
    for case, files in (("kernel-boot", ("vmlinuz", "initrd.img")),
                        ("kernel-dtb", ("vmlinuz", "board.dtb"))):
        rs, _ = derive(load(case, tmp_path), tmp_path)
        for f in files:
            assert rule(rs, tmp_path / "images" / f).access == RO_FILE


def test_firmware_loader_ro_nvram_rw(tmp_path: Path) -> None:
    rs, _ = derive(load("firmware-pflash", tmp_path), tmp_path)
    img = tmp_path / "images"
    assert rule(rs, img / "OVMF_CODE.fd").access == RO_FILE
    assert rule(rs, img / "firmware-pflash_VARS.fd").access == RW_FILE
    assert rule(rs, img / "firmware-pflash_VARS.fd").roles == ("nvram",)


def test_passed_chardevs_get_no_rule(tmp_path: Path) -> None:
    """Files and bind sockets vmconfine opens and passes as fds need no Landlock access."""
    rs, res = derive(load("channel", tmp_path), tmp_path)
    img = tmp_path / "images"
    assert {r.path for r in res if r.passed} >= {str(img / "channel.log"),
                                                  str(img / "guest-agent.sock")}
    for p in (img / "channel.log", img / "guest-agent.sock", img):
        assert rs.rule_for(str(p)) is None, p
    assert rule(rs, img / "channel.pipe").access == RW_FILE  # QEMU opens pipes by path
    assert rule(rs, "/dev/ptmx").access >= {"read_file", "write_file", "ioctl_dev"}
    pts = rule(rs, "/dev/pts")
    assert pts.is_dir and "ioctl_dev" in pts.access and "make_reg" not in pts.access


def test_kvm_device_node(tmp_path: Path) -> None:
    rs, _ = derive(load("kvm-q35", tmp_path), tmp_path)
    kvm = rule(rs, "/dev/kvm")
    assert kvm.access >= {"read_file", "write_file"}
    if os.path.exists("/dev/kvm"):
        assert "ioctl_dev" in kvm.access
    rs2, _ = derive(load("minimal", tmp_path), tmp_path)
    assert rs2.rule_for("/dev/kvm") is None


def test_existing_block_device_gets_ioctl(tmp_path: Path) -> None:
    # a block/char device used as a read-only disk needs ioctls (CD-ROM), never write
    xml = (DATA / "cdrom-full.xml").read_text().replace("@DIR@/install.iso", "/dev/null")
    rs, _ = derive(parse_domain(xml.replace("@DIR@", str(tmp_path))), tmp_path)
    assert rule(rs, "/dev/null").access >= {"read_file", "ioctl_dev"}


def test_merged_rule_keeps_every_role(tmp_path: Path) -> None:
    xml = (DATA / "disk-readonly.xml").read_text().replace("shared-ro.img", "disk0.img")
    rs, _ = derive(parse_domain(xml.replace("@DIR@", str(tmp_path))), tmp_path)
    r = rule(rs, tmp_path / "disk0.img")
    assert r.access == RW_FILE  # rw wins over ro for the same file
    assert r.roles == ("disk",)


# ---- network --------------------------------------------------------------------------------


def _with_devices(name: str, devices: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory>65536</memory><os><type>hvm</type>"
            f"</os><devices>{devices}</devices></domain>")


def test_vnc_fixed_port_is_the_only_bind(tmp_path: Path) -> None:
    dom = parse_domain(_with_devices("v", "<graphics type='vnc' port='5907' autoport='no' "
                                          "listen='127.0.0.1'/>"))
    rs, _ = derive(dom, tmp_path)
    assert rs.handled_net == {"bind_tcp", "connect_tcp"}
    assert rs.net_rules == (NetRule(5907, frozenset({"bind_tcp"}), ("vnc",)),)


def test_vnc_autoport_leaves_bind_unhandled(tmp_path: Path) -> None:
    rs, _ = derive(load("vnc-autoport", tmp_path), tmp_path)
    assert rs.handled_net == {"connect_tcp"}
    assert rs.net_rules == ()
    assert any("autoport" in n for n in rs.notes)


def test_vnc_socket_needs_no_port(tmp_path: Path) -> None:
    rs, _ = derive(load("vnc-socket", tmp_path), tmp_path)
    assert rs.handled_net == {"bind_tcp", "connect_tcp"}
    assert rs.net_rules == ()


def test_user_networking_leaves_connect_unhandled(tmp_path: Path) -> None:
    rs, _ = derive(load("net-user", tmp_path), tmp_path)
    assert rs.handled_net == {"bind_tcp"}
    assert any("user-mode networking" in n for n in rs.notes)


def test_no_network_denies_all_tcp(tmp_path: Path) -> None:
    rs, _ = derive(load("minimal", tmp_path), tmp_path)
    assert rs.handled_net == {"bind_tcp", "connect_tcp"} and rs.net_rules == ()
    assert rs.scoped == {"abstract_unix_socket", "signal"}


def test_tcp_chardev_ports(tmp_path: Path) -> None:
    dom = parse_domain(_with_devices("t", (
        "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/></serial>"
        "<channel type='tcp'><source mode='connect' host='127.0.0.1' service='4556'/>"
        "<target type='virtio' name='x'/></channel>")))
    rs, _ = derive(dom, tmp_path)
    assert {(n.port, tuple(sorted(n.access))) for n in rs.net_rules} == {
        (4555, ("bind_tcp",)), (4556, ("connect_tcp",))}


# ---- ABI masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("abi", range(1, syscalls.MAX_KNOWN_ABI + 2))
def test_for_abi_masks(abi: int, tmp_path: Path) -> None:
    dom = parse_domain(_with_devices("v", "<graphics type='vnc' port='5907' autoport='no'/>"))
    full, _ = derive(dom, tmp_path)
    rs = full.for_abi(abi)
    eff = min(abi, syscalls.MAX_KNOWN_ABI)
    assert rs.abi == eff
    assert rs.handled_fs == syscalls.fs_rights(eff)
    for r in rs.path_rules:
        assert r.access <= rs.handled_fs and r.access
    assert ("refer" in rs.handled_fs) == (eff >= 2)
    assert ("truncate" in rs.handled_fs) == (eff >= 3)
    assert ("ioctl_dev" in rs.handled_fs) == (eff >= 5)
    assert bool(rs.handled_net) == (eff >= 4)
    assert bool(rs.net_rules) == (eff >= 4)
    assert bool(rs.scoped) == (eff >= 6)
    assert bool(rs.flags) == (eff >= 7)
    if eff < 4:
        assert any("TCP" in n for n in rs.notes)
    if abi > syscalls.MAX_KNOWN_ABI:
        assert any("newer than vmconfine knows" in n for n in rs.notes)
    assert rs.label.startswith(f"landlock:abi{eff}:")


# ---- digest ---------------------------------------------------------------------------------


def test_digest_stable_and_order_independent(tmp_path: Path) -> None:
    a, _ = derive(load("disk-backing-chain", tmp_path), tmp_path)
    b, _ = derive(load("disk-backing-chain", tmp_path), tmp_path)
    assert a.digest() == b.digest() and a.label == b.label
    assert len(a.label.rsplit(":", 1)[1]) == 12
    shuffled = Ruleset(a.abi, a.handled_fs, a.handled_net, a.scoped, a.flags,
                       tuple(reversed(a.path_rules)), a.net_rules)
    resorted = Ruleset.from_dict({**shuffled.to_dict(),
                                  "path_rules": sorted(shuffled.to_dict()["path_rules"],
                                                       key=lambda r: r["path"])})
    assert resorted.digest() == a.digest()
    assert Ruleset.from_dict(a.to_dict()) == a
    assert Ruleset.from_dict(a.to_dict()).digest() == a.digest()
    # notes are explanations, not enforcement
    assert Ruleset(**{**a.__dict__, "notes": ("x",)}).digest() == a.digest()


def test_digest_changes_with_access(tmp_path: Path) -> None:
    text = (DATA / "disk-virtio.xml").read_text().replace("@DIR@", str(tmp_path))
    rw, _ = derive(parse_domain(text), tmp_path)
    ro_text = text.replace("</disk>", "<readonly/></disk>", 1)
    ro, _ = derive(parse_domain(ro_text), tmp_path)
    assert rw.digest() != ro.digest()
    assert rw.for_abi(3).digest() != rw.digest()


def test_localtime_only_for_a_local_time_clock(tmp_path: Path) -> None:
    utc, _ = derive(load("minimal", tmp_path), tmp_path)
    assert utc.rule_for(os.path.realpath("/etc/localtime")) is None
    text = (DATA / "minimal.xml").read_text().replace("</domain>",
                                                       "<clock offset='localtime'/></domain>")
    local, _ = derive(parse_domain(text), tmp_path)
    if os.path.exists("/etc/localtime"):
        assert rule(local, "/etc/localtime").access == RO_FILE
