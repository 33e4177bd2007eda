"""Helpers shared by the DAC driver tests (no tests here).

The DAC tests run as root on real files (CI is root): ``require_root`` skips them elsewhere.
Scratch directories live under /var/tmp with mode 0755, because QEMU's account must be able to
search them (pytest's own tmp dirs are 0700).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import vmconfine_dac
from tests.support import make_ctx, make_host, require_root
from vmconfine_dac.driver import DacDriver

SCRATCH_PARENT = "/var/tmp"  #: each scratch dir is a fresh mkdtemp there
QEMU_USER = "vmconfine-qemu"


def qemu_ids() -> tuple[int, int]:
    """uid and gid of the default QEMU account (scripts/setup.sh creates it)."""
    from tests.support import require

    try:
        return pwd.getpwnam(QEMU_USER).pw_uid, grp.getgrnam(QEMU_USER).gr_gid
    except KeyError:
        require(False, f"user {QEMU_USER} is missing (run scripts/setup.sh)")
        raise


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh 0755 directory QEMU's account can search; removed afterwards."""
    require_root()
    d = Path(tempfile.mkdtemp(prefix="vmconfine-unit-", dir=SCRATCH_PARENT))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def domain_xml(name: str, devices: str = "", *, os_extra: str = "", extra: str = "",
               virt_type: str = "qemu") -> str:
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>
  <devices>
    {devices}
  </devices>
  {extra}
</domain>"""


def disk(path: Path | str, target: str = "vda", *, fmt: str = "raw", extra: str = "",
         source_extra: str = "", backing: str = "") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'>{source_extra}</source>{backing}"
            f"<target dev='{target}' bus='virtio'/>{extra}</disk>")


def host_for(root: Path, config: str | None = None) -> Any:
    return make_host(root / "inst", [vmconfine_dac], config=config)


def prepared(host: Any, xml: str) -> tuple[DacDriver, Any]:
    """The DAC driver and a context whose DAC label was generated as the stack would."""
    drv = DacDriver(host)
    ctx = make_ctx(host, xml)
    sec = ctx.domain.seclabel("dac")
    if sec is None:
        sec = ctx.domain.add_seclabel("dac", "dynamic", implicit=True)
    if sec.type != "none":
        drv.gen_label(ctx, sec)
    return drv, ctx


def make_file(path: Path, uid: int, gid: int, mode: int = 0o640, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def owner(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def xattrs(path: Path | str) -> dict[str, bytes]:
    return {k: os.getxattr(path, k) for k in os.listxattr(path)}


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int, int, dict[str, bytes]]]:
    """(uid, gid, mode, xattrs) per path."""
    out = {}
    for p in paths:
        st = os.lstat(p)
        xa = xattrs(p) if not os.path.islink(p) else {}
        out[str(p)] = (st.st_uid, st.st_gid, st.st_mode, xa)
    return out


def ops(ctx: Any, op: str) -> list[dict[str, Any]]:
    return ctx.journal.records("dac", op)
