"""vmconfine-aa-helper: the generated profile and rules for a corpus of domain XMLs.

Each ``tests/data/apparmor/NAME.xml`` is run through ``vmconfine-aa-helper --dryrun -c`` with
``@DIR@`` pointing at a scratch directory prepared as ``setup.json`` says; the output (the
``.files`` rules and the profile) must equal ``NAME.golden``. Regenerate the golden files with
``VMCONFINE_REGEN_GOLDEN=1``.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest

from vmconfine_aa_helper.main import run

DATA = Path(__file__).resolve().parent.parent / "data" / "apparmor"
CASES = sorted(p.stem for p in DATA.glob("*.xml"))
SETUP = json.loads((DATA / "setup.json").read_text())
REGEN = os.environ.get("VMCONFINE_REGEN_GOLDEN", "") not in ("", "0")
_REF = re.compile(r"@DIR@/([^'\"<]+)")


def prepare(case: str, base: Path) -> str:
    """Create the files case ``case`` refers to under ``base``; return its XML text."""
    text = (DATA / f"{case}.xml").read_text()
    spec = SETUP.get(case, {})
    special = set(spec.get("missing", [])) | set(spec.get("fifos", []))
    for rel in _REF.findall(text):
        if rel in special or rel in spec.get("dirs", []):
            continue
        path = Path(os.path.normpath(base / rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    for rel in spec.get("files", []):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).touch()
    for rel in spec.get("dirs", []):
        (base / rel).mkdir(parents=True, exist_ok=True)
    for rel in spec.get("fifos", []):
        os.mkfifo(base / rel)
    for rel, target in spec.get("symlinks", {}).items():
        (base / rel).symlink_to(base / target)
    return text.replace("@DIR@", str(base))


def uuid_of(xml: str) -> str:
    found = re.search(r"<uuid>([^<]+)</uuid>", xml)
    assert found
    return found.group(1)


def helper(args: list[str], xml: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run(args, io.BytesIO(xml.encode()), out, err)
    return rc, out.getvalue(), err.getvalue()


def dryrun(case: str, base: Path) -> str:
    xml = prepare(case, base)
    name = f"vmconfine-{uuid_of(xml)}"
    rc, out, err = helper(["--dryrun", "-c", "-u", name, "-P", str(base / "profiles"),
                           "--uri", f"qemu:///embed?root={base}/inst"], xml)
    assert rc == 0, err
    return out.replace(str(base), "@DIR@")


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_profile_matches_golden(case: str, tmp_path: Path) -> None:
    got = dryrun(case, tmp_path)
    golden = DATA / f"{case}.golden"
    if REGEN:
        golden.write_text(got)
    assert golden.exists(), f"no {golden.name}; run with VMCONFINE_REGEN_GOLDEN=1"
    assert got == golden.read_text()
    assert not (tmp_path / "profiles").exists(), "--dryrun must not write anything"


def rules_of(case: str, base: Path) -> list[str]:
    out = dryrun(case, base)
    files_part = out.split("\n# @DIR@/profiles/vmconfine-")[0]
    return [ln.strip() for ln in files_part.splitlines()[2:]]


def test_readonly_disk_gets_deny_write(tmp_path: Path) -> None:
    rules = rules_of("disk-readonly", tmp_path)
    assert '"@DIR@/ro.img" rk,' in rules
    assert 'deny "@DIR@/ro.img" w,' in rules


def test_backing_layers_are_read_only(tmp_path: Path) -> None:
    rules = rules_of("disk-backing-chain", tmp_path)
    assert '"@DIR@/top.qcow2" rwk,' in rules
    for layer in ("mid.qcow2", "base.img"):
        assert f'"@DIR@/{layer}" rk,' in rules
        assert f'deny "@DIR@/{layer}" w,' in rules
    assert 'deny "@DIR@/top.qcow2" w,' not in rules


def test_symlink_is_granted_as_its_target(tmp_path: Path) -> None:
    rules = rules_of("disk-symlink", tmp_path)
    assert '"@DIR@/store/real.img" rwk,' in rules
    assert not any("link.img" in r for r in rules)


def test_same_image_rw_and_ro_has_no_deny(tmp_path: Path) -> None:
    """A path granted rw by one device must not be write-denied by another."""
    rules = rules_of("disk-same-image-twice", tmp_path)
    assert rules.count('"@DIR@/twice.img" rwk,') == 1
    assert not any(r.startswith('deny "@DIR@/twice.img"') for r in rules)


def test_pipe_chardev_grants_both_ends(tmp_path: Path) -> None:
    rules = rules_of("serial-pipe", tmp_path)
    assert '"@DIR@/serial.pipe.in" rw,' in rules and '"@DIR@/serial.pipe.out" rw,' in rules


def test_instance_paths_and_devices(tmp_path: Path) -> None:
    rules = rules_of("net-virtio-kvm", tmp_path)
    assert '"@DIR@/inst/log/qemu/net-virtio-kvm.log" w,' in rules
    assert '"@DIR@/inst/run/qemu/domain-net-virtio-kvm/**" rwk,' in rules
    assert '"/dev/kvm" rw,' in rules and '"/dev/vhost-net" rw,' in rules
    (tmp_path / "u").mkdir()
    assert '"/dev/vhost-net" rw,' not in rules_of("net-user-qemu", tmp_path / "u")


def test_firmware_and_kernel_are_read_only(tmp_path: Path) -> None:
    rules = rules_of("firmware-pflash", tmp_path)
    assert '"@DIR@/OVMF_CODE.fd" rk,' in rules
    assert '"@DIR@/nvram/guest_VARS.fd" rwk,' in rules
    (tmp_path / "k").mkdir()
    kernel = rules_of("kernel-boot", tmp_path / "k")
    assert '"@DIR@/vmlinuz" r,' in kernel and 'deny "@DIR@/initrd.img" w,' in kernel
    (tmp_path / "rom").mkdir()
    rom = rules_of("firmware-shared-rom", tmp_path / "rom")
    assert '"/usr/share/seabios/bios-256k.bin" rk,' in rom
