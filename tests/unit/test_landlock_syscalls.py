"""Landlock ABI tables, struct layouts and probe reasons (vmconfine_landlock.syscalls)."""

from __future__ import annotations

import ctypes
import errno
import re
from pathlib import Path

import pytest

from tests.support import require
from vmconfine_landlock import syscalls

HEADER = Path("/usr/include/linux/landlock.h")


def test_rights_per_abi() -> None:
    base = {"execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file",
            "make_char", "make_dir", "make_reg", "make_sock", "make_fifo", "make_block",
            "make_sym"}
    assert syscalls.fs_rights(1) == base
    assert syscalls.fs_rights(2) == base | {"refer"}
    assert syscalls.fs_rights(3) == syscalls.fs_rights(4) == base | {"refer", "truncate"}
    assert syscalls.fs_rights(5) == base | {"refer", "truncate", "ioctl_dev"}
    assert syscalls.fs_rights(7) == syscalls.fs_rights(5)
    assert syscalls.net_rights(3) == set()
    assert syscalls.net_rights(4) == {"bind_tcp", "connect_tcp"}
    assert syscalls.scopes(5) == set()
    assert syscalls.scopes(6) == {"abstract_unix_socket", "signal"}
    assert syscalls.restrict_flags(6) == set()
    assert "log_new_exec_on" in syscalls.restrict_flags(7)


def test_bits_and_masks() -> None:
    assert syscalls.fs_mask(["execute"]) == 1
    assert syscalls.fs_mask(["read_file", "read_dir"]) == 0b1100
    assert syscalls.fs_mask(["ioctl_dev"]) == 1 << 15
    assert syscalls.fs_mask(syscalls.fs_rights(5)) == (1 << 16) - 1
    assert syscalls.net_mask(["bind_tcp", "connect_tcp"]) == 3
    assert syscalls.scope_mask(["signal"]) == 2
    assert syscalls.flags_mask(["log_same_exec_off", "log_new_exec_on"]) == 3
    with pytest.raises(ValueError, match="unknown Landlock right"):
        syscalls.fs_mask(["read_everything"])


def test_struct_layouts() -> None:
    assert ctypes.sizeof(syscalls.RulesetAttr) == 24
    assert ctypes.sizeof(syscalls.PathBeneathAttr) == 12  # packed
    assert ctypes.sizeof(syscalls.NetPortAttr) == 16
    assert [syscalls.attr_size(a) for a in range(1, 8)] == [8, 8, 8, 16, 16, 24, 24]


def test_bits_match_the_installed_kernel_header() -> None:
    require(HEADER.exists(), "linux/landlock.h is not installed (apt-get install linux-libc-dev)")
    text = HEADER.read_text()
    found = dict(re.findall(r"#define LANDLOCK_ACCESS_FS_(\w+)\s+\(1ULL << (\d+)\)", text))
    assert found, "no LANDLOCK_ACCESS_FS_* in the header"
    for name, shift in found.items():
        assert syscalls.FS_ACCESS[name.lower()][0] == 1 << int(shift), name


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOSYS, "CONFIG_SECURITY_LANDLOCK"),
    (errno.EOPNOTSUPP, "lsm= kernel parameter"),
    (errno.EINVAL, "landlock_create_ruleset failed"),
])
def test_unavailable_reason(err: int, words: str) -> None:
    assert words in syscalls.unavailable_reason(OSError(err, "x"))


def test_probe_abi_reports_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(syscalls, "abi_version", boom)
    abi, why = syscalls.probe_abi()
    assert abi == 0 and "disabled at boot" in why
    monkeypatch.setattr(syscalls, "abi_version", lambda: 3)
    assert syscalls.probe_abi() == (3, "")
