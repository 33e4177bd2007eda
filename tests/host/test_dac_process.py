"""The DAC child hooks for real: a forked child switches identity, drops capabilities, sets
no_new_privs (as the pipeline does) and execs a helper; the kernel's view and file access are
checked from the helper itself."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_dac_support import domain_xml, host_for, make_file, prepared, qemu_ids, scratch
from vmconfine.errors import VmconfineError

pytestmark = pytest.mark.host

PR_SET_NO_NEW_PRIVS = 38
HELPER = """
for f in "$@"; do
  if cat "$f" >/dev/null 2>&1; then echo "read $f"; else echo "denied $f"; fi
done
grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|NoNewPrivs):' /proc/self/status
"""


@pytest.fixture
def d() -> Iterator[Path]:
    with scratch() as path:
        yield path


def run_confined(d: Path, config: str | None, files: list[Path]) -> tuple[dict[str, str],
                                                                           list[str], object]:
    """Fork; in the child run the DAC child hooks in the pipeline's order and exec /bin/sh
    with HELPER. Returns (status fields, per-file results, ctx)."""
    drv, ctx = prepared(host_for(d, config), domain_xml("proc"))
    drv.preflight(ctx)  # computes the identity in the parent
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            drv.child_identity(ctx)
            drv.child_capabilities(ctx)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl")
            os.execv("/bin/sh", ["/bin/sh", "-c", HELPER, "helper", *map(str, files)])
        except BaseException as exc:
            os.write(w, f"child failed: {exc}\n".encode())
        os._exit(127)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, rc = os.waitpid(pid, 0)
    text = out.decode()
    assert os.waitstatus_to_exitcode(rc) == 0, text
    status, results = {}, []
    for line in text.splitlines():
        if line.startswith(("read ", "denied ")):
            results.append(line)
        else:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status, results, ctx


def test_qemu_identity_and_no_capabilities(d: Path) -> None:
    import grp

    uid, gid = qemu_ids()
    foreign = make_file(d / "other-user-secret", 1234, 1234, 0o600)
    own = make_file(d / "qemu-file", uid, gid, 0o600)
    status, results, _ = run_confined(d, None, [foreign, own])
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert set(status["Groups"].split()) == {str(gid), str(grp.getgrnam("kvm").gr_gid)}
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert status["NoNewPrivs"] == "1"
    assert results == [f"denied {foreign}", f"read {own}"]


def test_numeric_ids_without_account_get_no_groups(d: Path) -> None:
    import pwd

    free = next(u for u in range(54321, 60000) if not _has_pw(pwd, u))
    status, _, _ = run_confined(d, f'user = "+{free}"\ngroup = "+{free}"\n', [])
    assert status["Uid"].split() == [str(free)] * 4
    assert status["Groups"] == ""


def test_root_without_capabilities_cannot_read_other_users_files(d: Path) -> None:
    foreign = make_file(d / "other-user-secret", 1234, 1234, 0o600)
    rootfile = make_file(d / "root-secret", 0, 0, 0o600)
    status, results, ctx = run_confined(d, 'user = "+0"\ngroup = "+0"\n', [foreign, rootfile])
    assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
    assert results == [f"denied {foreign}", f"read {rootfile}"]
    assert "high-privileges" in ctx.taints  # type: ignore[attr-defined]


def test_kept_capabilities_are_tainted(d: Path) -> None:
    foreign = make_file(d / "other-user-secret", 1234, 1234, 0o600)
    status, results, ctx = run_confined(
        d, 'user = "+0"\ngroup = "+0"\nclear_emulator_capabilities = 0\n', [foreign])
    assert int(status["CapEff"], 16) != 0
    assert results == [f"read {foreign}"]
    assert "high-privileges" in ctx.taints  # type: ignore[attr-defined]


def test_child_hooks_refuse_without_parent_identity(d: Path) -> None:
    from tests.support import make_ctx
    from vmconfine_dac.driver import DacDriver

    host = host_for(d)
    ctx = make_ctx(host, domain_xml("noprep"))
    with pytest.raises(VmconfineError, match="not computed before fork"):
        DacDriver(host).child_identity(ctx)


def _has_pw(pwd: object, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)  # type: ignore[attr-defined]
        return True
    except KeyError:
        return False
