"""Host tier: the SELinux driver with the REAL libselinux binding on real files.

This host does not run SELinux, but the kernel still stores ``security.selinux`` xattrs, and
libselinux's ``lsetfilecon``/``lgetfilecon`` work on them. The driver runs with
:class:`RealBackend`, told vmconfine's own context (``getcon`` needs the LSM), and the policy's
real context files from selinux-policy-default. Every check reads the labels back with
libselinux itself, and the remembered originals from the real ``trusted.`` xattrs.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmconfine_selinux
from tests.support import make_ctx, make_host, require, require_root
from vmconfine.errors import LabelError
from vmconfine_selinux.backend import RealBackend
from vmconfine_selinux.driver import SELinuxDriver

pytestmark = pytest.mark.host

try:
    import selinux  # Debian's python3-selinux
except ImportError:  # the autouse fixture below turns this into a require() skip
    selinux = None


@pytest.fixture(autouse=True)
def _binding() -> None:
    require(selinux is not None, "python3-selinux is not installed (run scripts/setup.sh)")

VIRTD = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
ORIGINAL = "system_u:object_r:user_home_t:s0"
PREFIX = "trusted.vmconfine.security"


@pytest.fixture
def scratch() -> Iterator[Path]:
    require_root()
    d = Path(tempfile.mkdtemp(prefix="vmconfine-selinux-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend() -> RealBackend:
    be = RealBackend(process_context=VIRTD, assume_mcs=True)
    for path in (be.domain_context_path(), be.image_context_path()):
        require(os.path.exists(path), f"{path} is missing (apt-get install selinux-policy-default)")
    return be


def getfilecon(path: Path) -> str | None:
    try:
        return str(selinux.lgetfilecon_raw(str(path))[1])
    except OSError:
        return None


def trusted(path: Path) -> dict[str, str]:
    return {n[len(PREFIX) + 1:]: os.getxattr(path, n).decode()
            for n in os.listxattr(path) if n.startswith(PREFIX + ".")}


def domain(name: str, uuid: str, d: Path) -> str:
    def disk(f: str, target: str, extra: str = "") -> str:
        return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{d / f}'/><target dev='{target}' bus='virtio'/>{extra}</disk>")

    return f"""<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{d / 'vmlinuz'}</kernel></os>
  <devices>
    {disk(f'{name}.raw', 'vda')}
    {disk('shared.raw', 'vdb', '<shareable/>')}
    {disk('cdrom.iso', 'vdc', '<readonly/>')}
    <serial type='file'><source path='{d / (name + '.log')}'/></serial>
  </devices></domain>"""


def setup(scratch: Path, backend: RealBackend, config: str = "") -> tuple[Any, SELinuxDriver]:
    host = make_host(scratch / "inst", [vmconfine_selinux], config=config)  # its qemu.conf keys
    return host, SELinuxDriver(host, backend)


def make_files(d: Path, names: list[str]) -> dict[Path, str | None]:
    originals: dict[Path, str | None] = {}
    for i, name in enumerate(names):
        f = d / name
        if not f.exists():
            f.write_bytes(b"data")
            if i % 2 == 0:
                selinux.lsetfilecon_raw(str(f), ORIGINAL)
        originals[f] = getfilecon(f)
    return originals


def test_set_and_restore_real_security_selinux_xattrs(scratch: Path, backend: RealBackend) -> None:
    host, drv = setup(scratch, backend)
    originals = make_files(scratch, ["vm1.raw", "shared.raw", "cdrom.iso", "vm1.log", "vmlinuz"])
    ctx = make_ctx(host, domain("vm1", "6f7c2a0e-3c1b-4f5e-9a7d-111111111111", scratch))
    sec = ctx.domain.add_seclabel("selinux", "dynamic")
    drv.gen_label(ctx, sec)
    assert sec.label and sec.label.startswith("system_u:system_r:svirt_t:s0:c")
    drv.set_all_labels(ctx)
    assert getfilecon(scratch / "vm1.raw") == sec.imagelabel
    assert getfilecon(scratch / "vm1.log") == sec.imagelabel
    assert getfilecon(scratch / "shared.raw") == "system_u:object_r:svirt_image_t:s0"
    assert getfilecon(scratch / "cdrom.iso") == "system_u:object_r:virt_content_t:s0"
    assert getfilecon(scratch / "vmlinuz") == "system_u:object_r:virt_content_t:s0"
    assert trusted(scratch / "vm1.raw")["selinux"] == ORIGINAL
    assert trusted(scratch / "vm1.raw")["ref_selinux"] == "1"
    assert trusted(scratch / "vm1.log")["selinux"] == ""  # it had no context at all
    drv.restore_all_labels(ctx)
    drv.release_label(ctx, sec)
    assert {f: getfilecon(f) for f in originals} == originals
    assert all(trusted(f) == {} for f in originals)


def test_two_domains_share_and_conflict_on_real_files(scratch: Path,
                                                      backend: RealBackend) -> None:
    host, drv = setup(scratch, backend)
    originals = make_files(scratch, ["vm1.raw", "vm2.raw", "shared.raw", "cdrom.iso",
                                     "vm1.log", "vm2.log", "vmlinuz"])
    a = make_ctx(host, domain("vm1", "6f7c2a0e-3c1b-4f5e-9a7d-111111111111", scratch))
    b = make_ctx(host, domain("vm2", "6f7c2a0e-3c1b-4f5e-9a7d-222222222222", scratch))
    sa = a.domain.add_seclabel("selinux", "dynamic")
    sb = b.domain.add_seclabel("selinux", "dynamic")
    drv.gen_label(a, sa)
    drv.gen_label(b, sb)
    assert sa.label != sb.label
    drv.set_all_labels(a)
    drv.set_all_labels(b)
    assert trusted(scratch / "shared.raw")["ref_selinux"] == "2"
    drv.restore_all_labels(a)
    assert getfilecon(scratch / "shared.raw") == "system_u:object_r:svirt_image_t:s0"
    assert getfilecon(scratch / "vm1.raw") == originals[scratch / "vm1.raw"]
    # a third domain wanting vm2's writable image is refused while vm2 runs
    c = make_ctx(host, domain("vm2", "6f7c2a0e-3c1b-4f5e-9a7d-333333333333", scratch)
                 .replace("<name>vm2</name>", "<name>vm3</name>"))
    sc = c.domain.add_seclabel("selinux", "dynamic")
    drv.gen_label(c, sc)
    with pytest.raises(LabelError, match=r"Setting different SELinux label on .*vm2\.raw "
                                         r"which is already in use"):
        drv.set_all_labels(c)
    drv.restore_all_labels(c)
    assert getfilecon(scratch / "vm2.raw") == sb.imagelabel
    drv.restore_all_labels(b)
    assert {f: getfilecon(f) for f in originals} == originals


def test_remember_off_restores_the_previous_label_without_a_policy_default(
        scratch: Path, backend: RealBackend) -> None:
    host, drv = setup(scratch, backend, config="remember_owner = 0\n")
    originals = make_files(scratch, ["vm1.raw", "shared.raw", "cdrom.iso", "vm1.log", "vmlinuz"])
    ctx = make_ctx(host, domain("vm1", "6f7c2a0e-3c1b-4f5e-9a7d-111111111111", scratch))
    sec = ctx.domain.add_seclabel("selinux", "dynamic")
    drv.gen_label(ctx, sec)
    drv.set_all_labels(ctx)
    assert trusted(scratch / "vm1.raw") == {}
    drv.restore_all_labels(ctx)
    # /var/tmp has no file-context default in the policy: the journal's previous label is used
    assert getfilecon(scratch / "vm1.raw") == originals[scratch / "vm1.raw"]
    assert getfilecon(scratch / "vmlinuz") == originals[scratch / "vmlinuz"]
    # libvirt's rule: shared and read-only images are left for the other domains
    assert getfilecon(scratch / "cdrom.iso") == "system_u:object_r:virt_content_t:s0"


def test_policy_defaults_come_from_the_real_file_contexts(backend: RealBackend,
                                                         scratch: Path) -> None:
    found = backend.default_context("/var/lib/libvirt/images/guest.img", stat.S_IFREG)
    assert found is not None and ":virt_image_t:" in found
    assert backend.default_context(str(scratch / "no-default" / "x"), stat.S_IFREG) is None


def test_real_binding_reports_selinux_disabled_here() -> None:
    ok, why = RealBackend().available()
    require(not selinux.is_selinux_enabled(), "SELinux is enabled on this host")
    assert not ok and "SELinux is not enabled on this host" in why
