"""vmconfine-aa-helper refuses hostile or broken input: exit 1, one line, nothing written.

The cases follow libvirt's tests/virt-aa-helper-test (expected failures and expected passes),
plus quotes, newlines, globs, ``..``, symlinks into /etc, restricted prefixes, oversized and
hostile XML. Refusals run WITHOUT --dryrun (with --compile-only), so a missing check would
really write a profile and the "nothing written" assertion would catch it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from vmconfine_aa_helper.main import MAX_XML_BYTES, run
from vmconfine_aa_helper.paths import READ_ONLY, RESTRICTED

UUID = "00000000-0000-0000-0000-0123456789ab"
NAME = f"vmconfine-{UUID}"

TEMPLATE = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory>524288</memory>
  <currentMemory>524288</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>{ostype}</type>
    <boot dev='hd'/>{os_extra}
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='hda' bus='ide'/>{disk_extra}
    </disk>
    <interface type='network'>
      <mac address='52:54:00:50:4b:26'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>{devices}
  </devices>
</domain>
"""


class Env:
    """A scratch directory with disk images, a profile dir and an embed instance root."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.profiles = base / "profiles"
        self.disk1 = base / "1.img"
        self.disk2 = base / "2.img"
        self.disk1.touch()
        self.disk2.touch()
        self.uri = f"qemu:///embed?root={base}/inst"

    def xml(self, *, name: str = "vmconfine-aa-helper-test", uuid: str = UUID,
            disk: str | None = None, devices: str = "", os_extra: str = "",
            disk_extra: str = "", ostype: str = "hvm",
            emulator: str = "/usr/bin/qemu-system-x86_64") -> str:
        return TEMPLATE.format(name=name, uuid=uuid, disk=disk or self.disk1, devices=devices,
                               os_extra=os_extra, disk_extra=disk_extra, ostype=ostype,
                               emulator=emulator)

    def run(self, args: list[str], xml: str | bytes = "", *,
            profile_dir: bool = True) -> tuple[int, str, str]:
        argv = list(args)
        if profile_dir:
            argv += ["-P", str(self.profiles)]
        if "--uri" not in args and any(a in ("-c", "-r") for a in args):
            argv += ["--uri", self.uri]
        data = xml.encode() if isinstance(xml, str) else xml
        out, err = io.StringIO(), io.StringIO()
        rc = run(argv, io.BytesIO(data), out, err)
        return rc, out.getvalue(), err.getvalue()

    def snapshot(self) -> dict[str, bytes]:
        if not self.profiles.exists():
            return {}
        return {p.name: p.read_bytes() for p in sorted(self.profiles.iterdir())}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def assert_refused(env: Env, args: list[str], xml: str | bytes = "", *,
                   contains: str = "", before: dict[str, bytes] | None = None) -> str:
    """Run the helper and check: exit 1, exactly one stderr line, no stdout, no change."""
    before = env.snapshot() if before is None else before
    rc, out, err = env.run([*args, "--compile-only"], xml)
    assert rc == 1, f"expected a refusal, got rc={rc}: {err}{out}"
    lines = err.splitlines()
    assert len(lines) == 1, f"refusal must be one line: {err!r}"
    assert lines[0].startswith("vmconfine-aa-helper: error: ")
    assert out == ""
    assert env.snapshot() == before, "a refusal changed the profile directory"
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def assert_ok(env: Env, args: list[str], xml: str = "") -> str:
    rc, out, err = env.run(["--dryrun", *args], xml)
    assert rc == 0, err
    assert not env.profiles.exists(), "--dryrun wrote something"
    return out


# ---- command line (virt-aa-helper-test "expected failures") ---------------------------------


@pytest.mark.parametrize("args", [
    ["-z"], ["-A"], ["-c"], ["-p"], ["-c", "-n", "foo", "-u", NAME], ["-c", "-u"],
    ["-R"], ["-r"], [], ["-c", "-r", "-u", NAME], ["-u", NAME], ["-c", "-u", NAME, "extra"],
    ["-a", "-u", NAME, "-f", "TMP/x"], ["-c", "-u", NAME, "-F", "TMP/x"],
    ["-c", "-u", NAME, "--parser", "apparmor_parser"],
    ["-c", "-u", NAME, "--prefix", "bad prefix"],
    ["-c", "-u", NAME, "-f", "TMP/a", "-F", "TMP/b"],
    ["-a", "-u", NAME, "--cached", "0" * 64], ["-c", "-u", NAME, "--cached", "0" * 63],
    ["-c", "-u", NAME, "--cached", "0" * 64, "--no-cache"],
    ["-c", "-u", NAME, "--cache-dir", "TMP/a\nb"], ["-c", "-u", NAME, "--cache-dir", "rel"],
    ["-c", "-u", NAME, "--prefix", "-x"],
], ids=lambda a: " ".join(a) or "no-args")
def test_bad_command_lines(env: Env, args: list[str], tmp_path: Path) -> None:
    args = [a.replace("TMP/", f"{tmp_path}/") for a in args]  # never a fixed /tmp path
    assert_refused(env, args, env.xml())


@pytest.mark.parametrize("name", [
    "vmconfine-00000000-0000-0000-0000-00000000000g",   # bad digit
    f"{NAME}abcdef",                                     # too long
    "vmconfine-00000000-0000-0000-0000-0123456789a",    # too short
    "vmconfine-00000000-0000-0000-0000-0123456789AB",   # not canonical (uppercase)
    "libvirt-00000000-0000-0000-0000-0123456789ab",     # wrong prefix
    "vmconfine-0000000000000000000000000123456789ab-",  # dashes moved
    "vmconfine-../../../../../etc/apparmor.d/x-00000",  # a path
    "vmconfine-00000000-0000-0000-0000-0123456789a\n",  # newline
])
def test_bad_profile_names(env: Env, name: str) -> None:
    assert_refused(env, ["-c", "-u", name], env.xml(), contains="invalid")


def test_uuid_must_match_the_xml(env: Env) -> None:
    other = "vmconfine-00000000-0000-0000-0000-00000000000a"
    assert_refused(env, ["-c", "-u", other], env.xml(), contains="does not match")


def test_xml_without_uuid(env: Env) -> None:
    xml = env.xml().replace(f"<uuid>{UUID}</uuid>", "")
    assert_refused(env, ["-c", "-u", NAME], xml, contains="no <uuid>")


def test_remove_of_unknown_profile(env: Env) -> None:
    assert_refused(env, ["-R", "-u", "vmconfine-00000000-0000-0000-0000-000000000001"],
                   contains="does not exist")


def test_add_of_unknown_profile(env: Env) -> None:
    assert_refused(env, ["-a", "-u", NAME], contains="does not exist")


def test_create_when_profile_exists(env: Env) -> None:
    rc, _, err = env.run(["-c", "-u", NAME, "--compile-only"], env.xml())
    assert rc == 0, err
    assert_refused(env, ["-c", "-u", NAME], env.xml(), contains="exists")


# ---- domain XML ------------------------------------------------------------------------------


@pytest.mark.parametrize("char", [*list('/[]{}?^,"*'), "\t", "\x7f"])
def test_bad_domain_names(env: Env, char: str) -> None:
    name = f"vmconfine-aa-helper-test-{char}".replace("&", "&amp;").replace('"', "&quot;")
    name = name.replace("\t", "&#9;").replace("\x7f", "&#127;")
    assert_refused(env, ["-c", "-u", NAME], env.xml(name=name))


@pytest.mark.parametrize("what,mutate", [
    ("malformed", lambda x: x.replace("</devices>", "<devices>")),
    ("malformed disk", lambda x: x.replace("/1.img'/>", "/1.img'/></disk>")),
    ("no os type", lambda x: x.replace("<type arch='x86_64' machine='pc'>hvm</type>", "")),
    ("invalid hvm", lambda x: x.replace(">hvm<", ">hvm_invalid<")),
    ("no domain type", lambda x: x.replace("<domain type='kvm'>", "<domain>")),
    ("lxc domain", lambda x: x.replace("<domain type='kvm'>", "<domain type='lxc'>")),
    ("not a domain", lambda x: "<network><name>n</name></network>"),
    ("empty", lambda x: ""),
    ("entity", lambda x: '<!DOCTYPE d [<!ENTITY e "x">]>' + x.replace("<vcpu>1", "<vcpu>&e;1")),
    ("nul byte", lambda x: x.replace("<vcpu>", "<vcpu>\x00")),
    ("binary", lambda x: "\xff\xfe garbage"),
])
def test_bad_xml(env: Env, what: str, mutate) -> None:  # type: ignore[no-untyped-def]
    assert_refused(env, ["-c", "-u", NAME], mutate(env.xml()))


def test_oversized_xml(env: Env) -> None:
    xml = env.xml()
    padding = "<!--" + "x" * (MAX_XML_BYTES - len(xml)) + "-->"
    big = xml.replace("<devices>", "<devices>" + padding)
    assert len(big.encode()) > MAX_XML_BYTES
    assert_refused(env, ["-c", "-u", NAME], big, contains="10 MiB")


# ---- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("disk", [
    "/etc/passwd", "/etc/shadow", "/usr/bin/env", "/bin/sh", "/sbin/init", "/proc/self/mem",
    "/sys/kernel/security/apparmor/.load", "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/modules", "/usr/share/doc/x", "/usr/sbin/sshd", "/usr/local/etc/x", "/selinux/x",
    "/lost+found/x", "/boot/evil.img", "/vmlinuz-rw", "/usr/share/qemu/rw.img",
    "/usr/share/OVMF/OVMF_VARS.fd",
])
def test_restricted_disks(env: Env, disk: str) -> None:
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=disk), contains=" under ")


def _ancestors(prefix: str) -> list[str]:
    """Every proper ancestor directory of ``prefix``, ``/`` included."""
    parts = prefix.strip("/").split("/")[:-1]
    return ["/", *("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))]


def _tree_cases() -> list[tuple[str, bool]]:
    """(source dir, readonly) pairs a <filesystem> may never be given: every restricted
    prefix itself with and without its trailing slash, every ancestor of one, ``/``; the
    read-only prefixes and their ancestors for writing."""
    cases: dict[tuple[str, bool], None] = {}
    for prefix in RESTRICTED:
        bare = prefix.rstrip("/")
        for path in (bare, bare + "/", bare + "//", *_ancestors(prefix)):
            cases[(path, False)] = None
            cases[(path, True)] = None
    for prefix in READ_ONLY:
        bare = prefix.rstrip("/")
        for path in (bare, bare + "/", *_ancestors(prefix)):
            cases[(path, False)] = None
    for path in ("/", "//", "/.", "/etc/..", "/usr/./"):
        cases[(path, True)] = None
    return list(cases)


def _filesystem(source: str, readonly: bool) -> str:
    return (f"\n    <filesystem type='mount' accessmode='passthrough'><source dir='{source}'/>"
            f"<target dir='share'/>{'<readonly/>' if readonly else ''}</filesystem>")


@pytest.mark.parametrize("source,readonly", _tree_cases(),
                         ids=lambda v: v if isinstance(v, str) else ("ro" if v else "rw"))
def test_restricted_trees_and_their_ancestors(env: Env, source: str, readonly: bool) -> None:
    """A restricted directory itself (libvirt's virt-aa-helper compares /etc with /etc/ and
    grants "/etc/**"), any ancestor of one and / are refused, read-only or not."""
    line = assert_refused(env, ["-c", "-u", NAME], env.xml(devices=_filesystem(source, readonly)))
    assert "restricted" in line or "root directory" in line or "read-only" in line, line


@pytest.mark.parametrize("source", ["/boot", "/boot/", "/usr/share/qemu", "/usr/share/OVMF/"])
def test_read_only_trees_may_be_shared_read_only(env: Env, source: str) -> None:
    out = assert_ok(env, ["-c", "-u", NAME], env.xml(devices=_filesystem(source, True)))
    bare = source.rstrip("/")
    assert f'"{bare}/**" r,' in out and f'deny "{bare}/**" w,' in out


@pytest.mark.parametrize("target", ["/", "/usr", "/etc", "/sys"])
def test_symlink_to_a_restricted_tree_is_judged_by_its_target(env: Env, target: str) -> None:
    link = env.base / "share"
    link.symlink_to(target)
    line = assert_refused(env, ["-c", "-u", NAME], env.xml(devices=_filesystem(str(link), False)))
    assert f"resolves to {target}" in line


def test_tree_next_to_a_restricted_prefix_is_granted(env: Env) -> None:
    """Only the prefixes and their ancestors: a sibling directory is a normal share."""
    share = env.base / "etc"
    share.mkdir()
    out = assert_ok(env, ["-c", "-u", NAME], env.xml(devices=_filesystem(str(share), False)))
    assert f'"{share}/**" rwl,' in out


def test_restricted_second_disk(env: Env) -> None:
    extra = ("\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             "<source file='/etc/passwd'/><target dev='hdb' bus='ide'/></disk>")
    assert_refused(env, ["-c", "-u", NAME], env.xml(devices=extra), contains="/etc/")


@pytest.mark.parametrize("suffix,contains", [
    ('a&quot;b.img', "'\"'"),
    ("a&#10;b.img", "control character"),
    ("a&#13;b.img", "control character"),
    ("a&#9;b.img", "control character"),
    ("a*.img", "'*'"),
    ("a?.img", "'?'"),
    ("a[0-9].img", "'['"),
    ("a{b,c}.img", "'{'"),
    ("a^b.img", "'^'"),
    ("a\\b.img", "'\\\\'"),
    ("@{HOME}.img", "'{'"),
])
def test_hostile_characters_in_paths(env: Env, suffix: str, contains: str) -> None:
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=f"{env.base}/{suffix}"),
                   contains=contains)


def test_dotdot_below_missing_directory(env: Env) -> None:
    disk = f"{env.base}/missing/../../../../../../etc/shadow"
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=disk), contains="'..'")


def test_dotdot_resolving_into_etc(env: Env) -> None:
    depth = len(env.base.parts)
    disk = f"{env.base}/{'../' * depth}etc/passwd"
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=disk), contains="resolves to /etc/passwd")


def test_symlink_into_etc(env: Env) -> None:
    link = env.base / "innocent.img"
    link.symlink_to("/etc/shadow")
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=str(link)), contains="/etc/shadow")


def test_symlinked_directory_into_etc(env: Env) -> None:
    (env.base / "images").symlink_to("/etc")
    assert_refused(env, ["-c", "-u", NAME], env.xml(disk=f"{env.base}/images/new.img"),
                   contains="resolves to /etc/new.img")


def test_readonly_only_prefix_refused_for_writable_kernel_loader(env: Env) -> None:
    os_extra = "\n    <loader readonly='no' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
    assert_refused(env, ["-c", "-u", NAME], env.xml(os_extra=os_extra), contains="read-only")


def test_restricted_kernel(env: Env) -> None:
    assert_refused(env, ["-c", "-u", NAME], env.xml(os_extra="\n    <kernel>/usr/bin/env</kernel>"),
                   contains="/usr/bin/")


@pytest.mark.parametrize("device", [
    "<serial type='file'><source path='/etc/cron.d/evil'/><target port='0'/></serial>",
    "<serial type='unix'><source mode='bind' path='/run/x*.sock'/><target port='0'/></serial>",
    "<channel type='unix'><source mode='bind' path='/proc/1/x'/>"
    "<target type='virtio' name='a'/></channel>",
    "<graphics type='vnc' socket='/etc/vnc.sock'/>",
    "<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>",
])
def test_restricted_device_paths(env: Env, device: str) -> None:
    assert_refused(env, ["-c", "-u", NAME], env.xml(devices="\n    " + device))


def test_restricted_emulator(env: Env) -> None:
    assert_refused(env, ["-c", "-u", NAME], env.xml(emulator="/usr/sbin/evil"),
                   contains="/usr/sbin/")


@pytest.mark.parametrize("flag", ["-f", "-F"])
def test_restricted_added_file(env: Env, flag: str) -> None:
    rc, _, err = env.run(["-c", "-u", NAME, "--compile-only"], env.xml())
    assert rc == 0, err
    assert_refused(env, ["-r", "-u", NAME, flag, "/etc/passwd"], env.xml(), contains="/etc/")


def test_bad_profile_directory(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "a\nb"
    rc, _out, err = env.run(["-c", "-u", NAME, "-P", str(bad), "--compile-only"],
                           env.xml(), profile_dir=False)
    assert rc == 1 and len(err.splitlines()) == 1 and not bad.exists()


@pytest.mark.parametrize("uri", ["qemu:///session", "qemu+ssh://host/system",
                                 "qemu:///embed?root=relative", "xen:///"])
def test_bad_instance_uri(env: Env, uri: str) -> None:
    rc, out, err = env.run(["-c", "-u", NAME, "--compile-only", "--uri", uri], env.xml())
    assert rc == 1 and len(err.splitlines()) == 1 and out == ""
    assert not env.profiles.exists()


def test_broken_admin_template(env: Env) -> None:
    env.profiles.mkdir()
    (env.profiles / "TEMPLATE.qemu").write_text("profile SOMETHING {\n}\n")
    assert_refused(env, ["-c", "-u", NAME], env.xml(), contains="VMCONFINE_TEMPLATE")


def test_refused_replace_keeps_existing_files(env: Env) -> None:
    rc, _, err = env.run(["-c", "-u", NAME, "--compile-only"], env.xml())
    assert rc == 0, err
    before = env.snapshot()
    assert set(before) == {NAME, f"{NAME}.files", f"{NAME}.hash"}
    assert_refused(env, ["-r", "-u", NAME], env.xml(disk="/etc/shadow"), before=before)


def test_embed_root_in_etc_is_refused(env: Env) -> None:
    rc, _, err = env.run(["-c", "-u", NAME, "--compile-only", "--uri",
                          "qemu:///embed?root=/etc/vmconfine-root"], env.xml())
    assert rc == 1 and "/etc/" in err and not env.profiles.exists()


# ---- expected passes (virt-aa-helper-test) ----------------------------------------------------


def test_pass_cases(env: Env) -> None:
    base = env.base
    for fifo in ("serial.pipe.in", "serial.pipe.out", "console.pipe.in", "console.pipe.out",
                 "parallel.pipe.in", "parallel.pipe.out"):
        os.mkfifo(base / fifo)
    (base / "kernel").touch()
    (base / "initrd").touch()
    (base / "console.log").touch()
    rel = f"{base}/./../{base.name}//./1.img"
    second = ("\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
              f"<source file='{env.disk2}'/><target dev='hdb' bus='ide'/></disk>")
    cdrom = ("\n    <disk type='block' device='cdrom'><target dev='hdc' bus='ide'/>"
             "<readonly/></disk>")
    cases: list[tuple[list[str], str]] = [
        (["-c"], env.xml()),
        (["-c"], env.xml().replace("arch='x86_64'", "arch='i686'")),
        (["-c"], env.xml(devices=second)),
        (["-c"], env.xml(disk_extra="\n      <readonly/>")),
        (["-c"], env.xml(disk=f"{base}/nonexistent.img")),
        (["-c"], env.xml(disk=rel)),
        (["-r"], env.xml(disk=str(env.disk2))),
        (["-r"], env.xml(disk=f"{base}/nonexistent.img")),
        (["-r", "-f", str(env.disk2)], env.xml()),
        (["-r", "-f", f"{base}/nonexistent.img"], env.xml()),
        (["-r", "-F", str(env.disk2)], env.xml()),
        (["-r", "-F", f"{base}/nonexistent.img"], env.xml()),
        (["-r"], env.xml(devices=cdrom)),
        (["-r"], env.xml(devices=f"\n    <serial type='file'><source path='{base}/serial.log'/>"
                                 "<target port='0'/></serial>")),
        (["-r"], env.xml(devices="\n    <serial type='pty'><target port='0'/></serial>")),
        (["-r"], env.xml(devices="\n    <serial type='dev'><source path='/dev/ttyS0'/>"
                                 "<target port='0'/></serial>")),
        (["-r"], env.xml(devices=f"\n    <serial type='pipe'><source path='{base}/serial.pipe'/>"
                                 "<target port='0'/></serial>")),
        (["-r"], env.xml(devices=f"\n    <console type='file'><source path='{base}/console.log'"
                                 "/><target port='0'/></console>")),
        (["-r"], env.xml(devices="\n    <console type='pty'><target port='0'/></console>")),
        (["-r"], env.xml(devices=f"\n    <console type='pipe'><source path='{base}/console.pipe'"
                                 "/><target port='0'/></console>")),
        (["-r"], env.xml(devices="\n    <parallel type='pty'><source path='/dev/pts/0'/>"
                                 "<target port='0'/></parallel>")),
        (["-r"], env.xml(devices="\n    <parallel type='pipe'><source path='"
                                 f"{base}/parallel.pipe'/><target port='0'/></parallel>")),
        (["-r"], env.xml(devices="\n    <channel type='unix'><source mode='bind' path='"
                                 f"{base}/guestfwd'/><target type='virtio' name='x'/></channel>")),
        (["-r"], env.xml(devices="\n    <channel type='pty'><target type='virtio'/></channel>")),
        (["-r"], env.xml(os_extra=f"\n    <kernel>{base}/kernel</kernel>")),
        (["-r"], env.xml(os_extra=f"\n    <initrd>{base}/initrd</initrd>")),
        (["-r"], env.xml(os_extra="\n    <kernel>/boot/vmlinuz-test</kernel>")),
        (["-r"], env.xml(os_extra="\n    <initrd>/initrd.img</initrd>")),
        (["-r"], env.xml(os_extra="\n    <kernel>/vmlinuz</kernel>")),
        (["-r"], env.xml(os_extra="\n    <loader readonly='yes' type='pflash'>"
                                  "/usr/share/OVMF/OVMF_CODE.fd</loader>")),
        (["-r"], env.xml(os_extra="\n    <loader readonly='yes' type='pflash'>"
                                  "/usr/share/AAVMF/AAVMF_CODE.fd</loader>")),
        (["-r"], env.xml(os_extra="\n    <loader readonly='yes' type='pflash'>"
                                  "/usr/share/qemu-efi/QEMU_EFI.fd</loader>")),
        (["-r"], env.xml(devices=f"\n    <graphics type='vnc' socket='{base}/vnc.sock'/>")),
        (["-r", "-F", "/run/hugepages/kvm/x"], env.xml()),
        (["-r"], env.xml(devices="\n    <hostdev mode='subsystem' type='pci'><source>"
                                 "<address domain='0' bus='0x00' slot='0x19' function='0x0'/>"
                                 "</source></hostdev>")),
        (["-r"], env.xml(devices="\n    <hostdev mode='subsystem' type='usb'><source>"
                                 "<address bus='2' device='4'/></source></hostdev>")),
    ]
    for args, xml in cases:
        out = assert_ok(env, [*args, "-u", NAME], xml)
        assert f"{NAME}.files" in out


def test_help(env: Env) -> None:
    rc, out, err = env.run(["-h"], profile_dir=False)
    assert rc == 0 and "usage: vmconfine-aa-helper" in out and err == ""
