"""Remembered owners in trusted.* xattrs: remember / recall / refcount / boot timestamp."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_dac_support import make_file, scratch, xattrs
from vmconfine.errors import LabelError
from vmconfine_dac import owners
from vmconfine_dac.fsops import FileHandle, resolve

PREFIX = "trusted.vmconfine.security"
NAMES = owners.Names.for_prefix(PREFIX)


@pytest.fixture
def f() -> Iterator[Path]:
    with scratch() as d:
        yield make_file(d / "img", 1234, 2345)


def _open(path: Path) -> FileHandle:
    return FileHandle.open(resolve(str(path)), want_lock=True)


def test_names_follow_the_prefix() -> None:
    n = owners.Names.for_prefix("trusted.example.sec")
    assert (n.label, n.ref, n.timestamp) == (
        "trusted.example.sec.dac", "trusted.example.sec.ref_dac",
        "trusted.example.sec.timestamp_dac")


def test_first_remember_stores_owner_ref_and_boot_time(f: Path) -> None:
    with _open(f) as h:
        assert h.locked
        assert owners.remember(h, NAMES, 1234, 2345) == 1
    assert xattrs(f) == {
        f"{PREFIX}.dac": b"+1234:+2345",
        f"{PREFIX}.ref_dac": b"1",
        f"{PREFIX}.timestamp_dac": str(owners.boot_time()).encode(),
    }


def test_refcount_keeps_first_owner_and_gives_it_back_last(f: Path) -> None:
    with _open(f) as h:
        assert owners.remember(h, NAMES, 1234, 2345) == 1
        assert owners.remember(h, NAMES, 999, 994) == 2  # a second domain
        assert xattrs(f)[f"{PREFIX}.dac"] == b"+1234:+2345"
        first = owners.recall(h, NAMES)
        assert first.in_use and first.remaining == 1 and first.owner is None
        assert xattrs(f)[f"{PREFIX}.ref_dac"] == b"1"
        last = owners.recall(h, NAMES)
        assert last.owner == (1234, 2345) and not last.in_use
    assert xattrs(f) == {}


def test_recall_without_record_means_fall_back(f: Path) -> None:
    with _open(f) as h:
        r = owners.recall(h, NAMES)
    assert r.owner is None and not r.in_use
    assert xattrs(f) == {}


def test_stale_record_is_discarded_with_warning(f: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    os.setxattr(f, NAMES.label, b"+1:+1")
    os.setxattr(f, NAMES.ref, b"3")
    os.setxattr(f, NAMES.timestamp, str(owners.boot_time() - 1000).encode())
    with caplog.at_level(logging.WARNING), _open(f) as h:
        assert owners.remember(h, NAMES, 1234, 2345) == 1
    assert "Invalid XATTR timestamp detected on" in caplog.text and str(f) in caplog.text
    assert xattrs(f)[NAMES.label] == b"+1234:+2345"
    assert xattrs(f)[NAMES.ref] == b"1"


def test_stale_record_on_recall_falls_back_and_cleans(f: Path) -> None:
    os.setxattr(f, NAMES.label, b"+1:+1")
    os.setxattr(f, NAMES.ref, b"1")  # no timestamp at all: stale too
    with _open(f) as h:
        r = owners.recall(h, NAMES)
    assert r.owner is None and not r.in_use
    assert xattrs(f) == {}


def test_garbage_refcount_is_stale(f: Path) -> None:
    os.setxattr(f, NAMES.ref, b"many")
    os.setxattr(f, NAMES.timestamp, str(owners.boot_time()).encode())
    with _open(f) as h:
        assert owners.peek_ref(h, NAMES) == 0
    assert xattrs(f) == {}


def test_other_prefixes_are_left_alone(f: Path) -> None:
    os.setxattr(f, "trusted.libvirt.security.dac", b"+0:+0")
    with _open(f) as h:
        owners.remember(h, NAMES, 1234, 2345)
        owners.recall(h, NAMES)
    assert xattrs(f) == {"trusted.libvirt.security.dac": b"+0:+0"}


def test_unsupported_file_system_returns_none(f: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: FileHandle, name: str, value: bytes) -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(FileHandle, "setxattr", refuse)
    with _open(f) as h:
        assert owners.remember(h, NAMES, 1234, 2345) is None
        assert owners.recall(h, NAMES).owner is None


def test_parse_owner() -> None:
    assert owners.parse_owner("+12:+34") == (12, 34)
    with pytest.raises(Exception, match="not \\+UID:\\+GID"):
        owners.parse_owner("root:root")


def test_metadata_lock_held_by_another_process_is_reported(
        f: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from vmconfine.errors import LabelError
    from vmconfine_dac import fsops

    monkeypatch.setattr(fsops, "LOCK_WAIT", 0.05)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the other process
        fd = os.open(f, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)
        os.write(ready_w, b"x")
        os.read(done_r, 1)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        with pytest.raises(LabelError, match=f"unable to lock {f} for metadata change"):
            _open(f)
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    with _open(f) as h:  # free again
        assert h.locked


def test_owner_record_keeps_file_capabilities() -> None:
    caps = bytes.fromhex("0100000200200000000000000000000000000000")
    text = owners.format_owner(12, 34, caps)
    assert text == f"+12:+34;caps={caps.hex()}"
    assert owners.parse_record(text) == (12, 34, caps)
    assert owners.parse_record("+12:+34") == (12, 34, None)
    assert owners.parse_owner(text) == (12, 34)
    for bad in ("+12:+34;caps=zz", "+12:+34;other=1"):
        with pytest.raises(LabelError):
            owners.parse_record(bad)
