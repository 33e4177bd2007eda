"""The shared remembered-label scheme (vmconfine.remember) with both kinds of accessor.

Every behaviour test runs twice on a real file with real ``trusted.`` xattrs (root): once
through :class:`vmconfine.remember.PathXattrs` (by path, as the SELinux driver works) and once
through the DAC driver's fd-based ``FileHandle``. Error paths use an in-memory accessor that
fails on demand.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_dac_support import make_file, scratch, xattrs
from vmconfine import remember
from vmconfine.errors import LabelError
from vmconfine_dac.fsops import FileHandle, resolve

PREFIX = "trusted.vmconfine.security"
LOG = logging.getLogger("tests.remember")
SCHEME = remember.Scheme("demo", LOG, what="the remembered demo label",
                         unsupported_note="cannot remember its demo label (%s); falling back",
                         dated="remembered demo labels")
NAMES = SCHEME.names(PREFIX)

Opener = Callable[[Path], AbstractContextManager[remember.Xattrs]]


def _by_path(path: Path) -> AbstractContextManager[remember.Xattrs]:
    return nullcontext(remember.PathXattrs(str(path)))


def _by_fd(path: Path) -> AbstractContextManager[remember.Xattrs]:
    return FileHandle.open(resolve(str(path)), want_lock=True)


@pytest.fixture(params=[_by_path, _by_fd], ids=["path", "fd"])
def opener(request: pytest.FixtureRequest) -> Opener:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def f() -> Iterator[Path]:
    with scratch() as d:
        yield make_file(d / "img", 1234, 2345)


class FakeXattrs:
    """In-memory accessor; ``fail`` maps an operation ('get', 'set', 'remove') to an errno."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.name = "/fake/file"
        self.data: dict[str, bytes] = {}
        self.fail = fail or {}

    def _check(self, op: str) -> None:
        if op in self.fail:
            raise OSError(self.fail[op], os.strerror(self.fail[op]))

    def getxattr(self, name: str) -> bytes | None:
        self._check("get")
        return self.data.get(name)

    def setxattr(self, name: str, value: bytes) -> None:
        self._check("set")
        self.data[name] = value

    def removexattr(self, name: str) -> None:
        self._check("remove")
        self.data.pop(name, None)


def test_names_follow_prefix_and_driver() -> None:
    n = remember.Names.of("trusted.example.sec", "selinux")
    assert (n.label, n.ref, n.timestamp) == (
        "trusted.example.sec.selinux", "trusted.example.sec.ref_selinux",
        "trusted.example.sec.timestamp_selinux")
    assert SCHEME.names("p") == remember.Names("p.demo", "p.ref_demo", "p.timestamp_demo")


def test_first_remember_stores_label_ref_and_boot_time(f: Path, opener: Opener) -> None:
    with opener(f) as x:
        assert SCHEME.remember(x, NAMES, "orig-label") == 1
    assert xattrs(f) == {
        f"{PREFIX}.demo": b"orig-label",
        f"{PREFIX}.ref_demo": b"1",
        f"{PREFIX}.timestamp_demo": str(remember.boot_time()).encode(),
    }


def test_refcount_keeps_first_label_and_gives_it_back_last(f: Path, opener: Opener) -> None:
    with opener(f) as x:
        assert SCHEME.remember(x, NAMES, "first") == 1
        assert SCHEME.remember(x, NAMES, "second") == 2
        assert SCHEME.peek_ref(x, NAMES) == 2
        assert xattrs(f)[NAMES.label] == b"first"
        one = SCHEME.recall(x, NAMES)
        assert one == remember.Recalled(label=None, in_use=True, remaining=1)
        assert xattrs(f)[NAMES.ref] == b"1"
        last = SCHEME.recall(x, NAMES)
        assert last == remember.Recalled(label="first")
    assert xattrs(f) == {}


def test_empty_label_is_handed_back_as_empty(f: Path, opener: Opener) -> None:
    with opener(f) as x:
        SCHEME.remember(x, NAMES, "")
        assert SCHEME.recall(x, NAMES) == remember.Recalled(label="")


def test_recall_without_record_means_fall_back(f: Path, opener: Opener) -> None:
    with opener(f) as x:
        assert SCHEME.recall(x, NAMES) == remember.Recalled()
        assert SCHEME.peek_ref(x, NAMES) == 0
    assert xattrs(f) == {}


def test_stale_record_is_discarded_with_warning(f: Path, opener: Opener,
                                                caplog: pytest.LogCaptureFixture) -> None:
    os.setxattr(f, NAMES.label, b"old")
    os.setxattr(f, NAMES.ref, b"3")
    os.setxattr(f, NAMES.timestamp, str(remember.boot_time() - 1000).encode())
    with caplog.at_level(logging.WARNING, logger=LOG.name), opener(f) as x:
        assert SCHEME.remember(x, NAMES, "new") == 1
    warnings = [r for r in caplog.records if r.name == LOG.name]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        f"Invalid XATTR timestamp detected on {f} secdriver=demo (a record from an earlier "
        "boot or a crash); discarding it")
    assert xattrs(f) == {NAMES.label: b"new", NAMES.ref: b"1",
                         NAMES.timestamp: str(remember.boot_time()).encode()}


def test_stale_record_on_recall_falls_back_and_cleans(f: Path, opener: Opener) -> None:
    os.setxattr(f, NAMES.label, b"old")
    os.setxattr(f, NAMES.ref, b"1")  # no timestamp at all: stale too
    with opener(f) as x:
        assert SCHEME.recall(x, NAMES) == remember.Recalled()
    assert xattrs(f) == {}


def test_garbage_refcount_is_stale(f: Path, opener: Opener) -> None:
    os.setxattr(f, NAMES.ref, b"many")
    os.setxattr(f, NAMES.timestamp, str(remember.boot_time()).encode())
    with opener(f) as x:
        assert remember.read(x, NAMES) == remember.Record(-1, None, remember.boot_time())
        assert SCHEME.peek_ref(x, NAMES) == 0
    assert xattrs(f) == {}


def test_other_drivers_and_prefixes_are_left_alone(f: Path, opener: Opener) -> None:
    os.setxattr(f, f"{PREFIX}.dac", b"+0:+0")
    os.setxattr(f, "trusted.libvirt.security.demo", b"x")
    with opener(f) as x:
        SCHEME.remember(x, NAMES, "label")
        SCHEME.recall(x, NAMES)
    assert xattrs(f) == {f"{PREFIX}.dac": b"+0:+0", "trusted.libvirt.security.demo": b"x"}


def test_path_accessor_does_not_follow_a_final_symlink(f: Path) -> None:
    link = f.parent / "link"
    link.symlink_to(f)
    SCHEME.remember(remember.PathXattrs(str(f)), NAMES, "label")
    assert remember.read(remember.PathXattrs(str(link)), NAMES) == remember.Record(0, None, None)
    remember.clear(remember.PathXattrs(str(link)), NAMES)  # absent there: not an error
    assert xattrs(f)[NAMES.ref] == b"1"


@pytest.mark.parametrize("code", sorted(remember.UNSUPPORTED))
def test_unsupported_file_system_means_fall_back(code: int,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    x = FakeXattrs({"set": code})
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert SCHEME.remember(x, NAMES, "label") is None
    assert f"/fake/file: cannot remember its demo label ({os.strerror(code)}); falling back" \
        in caplog.text
    assert SCHEME.recall(FakeXattrs({"get": code}), NAMES) == remember.Recalled()
    assert SCHEME.peek_ref(FakeXattrs({"get": code}), NAMES) is None


def test_unsupported_on_real_files_with_both_accessors(f: Path, opener: Opener,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(os, "setxattr", refuse)
    with opener(f) as x:
        assert SCHEME.remember(x, NAMES, "label") is None
    assert xattrs(f) == {}


def test_other_errors_raise_one_clear_label_error() -> None:
    with pytest.raises(LabelError, match=r"^/fake/file: cannot update the remembered demo "
                                         r"label: No space left on device$"):
        SCHEME.remember(FakeXattrs({"set": errno.ENOSPC}), NAMES, "label")
    x = FakeXattrs()
    SCHEME.remember(x, NAMES, "label")
    x.fail["remove"] = errno.EIO
    with pytest.raises(LabelError, match="cannot update the remembered demo label"):
        SCHEME.recall(x, NAMES)
    assert SCHEME.peek_ref(x, NAMES) == 1  # nothing was counted down


def test_fake_accessor_round_trip_without_root() -> None:
    x = FakeXattrs()
    assert SCHEME.remember(x, NAMES, "a") == 1
    assert SCHEME.remember(x, NAMES, "b") == 2
    assert SCHEME.recall(x, NAMES).in_use
    assert SCHEME.recall(x, NAMES) == remember.Recalled(label="a")
    assert x.data == {}


def test_a_record_seen_a_moment_ago_is_not_read_again(f: Path, opener: Opener) -> None:
    """remember/recall take the record peek()/read() returned under the same lock: the
    outcome is the same as reading it again, with no second round of getxattr calls."""
    reads: list[str] = []

    class Counting:  # the handle, its getxattr calls counted (a slotted handle has no dict)
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def getxattr(self, name: str) -> bytes | None:
            reads.append(name)
            return self.inner.getxattr(name)  # type: ignore[no-any-return]

    with opener(f) as handle:
        x: Any = Counting(handle)
        seen = SCHEME.peek(x, NAMES)
        assert seen == remember.Record(0, None, None)
        reads.clear()  # peek's own reads are not what this test counts
        assert SCHEME.remember(x, NAMES, "first", seen) == 1
        assert SCHEME.remember(x, NAMES, "second") == 2  # reads: nothing passed
        assert len(reads) == 3
        reads.clear()
        raw = remember.read(x, NAMES)
        assert SCHEME.recall(x, NAMES, raw) == remember.Recalled(in_use=True, remaining=1)
        assert len(reads) == 3  # read() only
    assert xattrs(f)[NAMES.ref] == b"1" and xattrs(f)[NAMES.label] == b"first"


def test_a_stale_record_seen_is_discarded_like_a_read_one(f: Path, opener: Opener) -> None:
    os.setxattr(f, NAMES.label, b"old")
    os.setxattr(f, NAMES.ref, b"2")
    os.setxattr(f, NAMES.timestamp, b"12")
    with opener(f) as x:
        raw = remember.read(x, NAMES)
        assert raw.ref == 2
        assert SCHEME.recall(x, NAMES, raw) == remember.Recalled()
    assert xattrs(f) == {}
    with opener(f) as x:
        assert SCHEME.peek(x, NAMES) == remember.Record(0, None, None)


def test_listed_names_spare_the_reads_of_absent_xattrs(f: Path, opener: Opener) -> None:
    """With the file's xattr names listed a moment ago, only the present ones are read: a file
    without a record costs no getxattr at all, and a record is read in full as before."""
    reads: list[str] = []

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def getxattr(self, name: str) -> bytes | None:
            reads.append(name)
            return self.inner.getxattr(name)  # type: ignore[no-any-return]

    with opener(f) as handle:
        x: Any = Counting(handle)
        assert SCHEME.peek(x, NAMES, listed=os.listxattr(f)) == remember.Record(0, None, None)
        assert reads == []
        assert SCHEME.remember(x, NAMES, "first") == 1
        reads.clear()
        seen = SCHEME.peek(x, NAMES, listed=os.listxattr(f))
        assert seen is not None and (seen.ref, seen.label) == (1, "first")
        assert sorted(reads) == sorted([NAMES.ref, NAMES.label, NAMES.timestamp])
        os.removexattr(f, NAMES.timestamp)  # a torn record: the missing part is not read
        reads.clear()
        assert SCHEME.peek(x, NAMES, listed=os.listxattr(f)) == remember.Record(0, None, None)
        assert NAMES.timestamp not in reads
    assert xattrs(f) == {}  # the stale (torn) record was discarded
