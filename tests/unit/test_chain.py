"""Backing-chain discovery with real images made by qemu-img (vmconfine.domain.chain)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import require
from vmconfine.domain.chain import BackingChainError, read_image_header, resolve_chain
from vmconfine.domain.devices import StorageSource

QCOW2_BACKING_FORMAT_EXT = bytes.fromhex("e2792aca")


@pytest.fixture
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    require(path, "qemu-img is not installed (apt-get install qemu-utils)")
    assert path is not None
    return path


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def mkraw(path: Path, qemu_img: str) -> Path:
    run(qemu_img, "create", "-q", "-f", "raw", str(path), "1M")
    return path


def mkqcow2(path: Path, qemu_img: str, backing: str | None = None,
            backing_fmt: str | None = None) -> Path:
    cmd = [qemu_img, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-u", "-b", backing]
        if backing_fmt:
            cmd += ["-F", backing_fmt]
    run(*cmd, str(path), "1M")
    return path


def top(path: Path, fmt: str | None = None) -> StorageSource:
    """A disk's top layer as the domain parser builds it (no <backingStore> in the XML)."""
    return StorageSource(path=str(path), type="file", format=fmt or "raw",
                         format_given=fmt is not None)


def paths(chain: list[StorageSource]) -> list[tuple[str | None, str]]:
    return [(s.path, s.format) for s in chain]


def test_qcow2_chain_is_read_layer_by_layer(tmp_path: Path, qemu_img: str) -> None:
    base = mkraw(tmp_path / "base.img", qemu_img)
    mid = mkqcow2(tmp_path / "mid.qcow2", qemu_img, str(base), "raw")
    # relative backing name: resolved against the image's own directory
    sub = tmp_path / "sub"
    sub.mkdir()
    upper = mkqcow2(sub / "top.qcow2", qemu_img, "../mid.qcow2", "qcow2")
    src = top(upper, "qcow2")
    chain = resolve_chain(src)
    assert paths(chain) == [(str(upper), "qcow2"), (str(mid), "qcow2"), (str(base), "raw")]
    # the links are filled in, so Disk.chain() sees the same layers
    assert src.backing is chain[1] and chain[1].backing is chain[2]
    assert chain[2].backing is None
    assert all(s.type == "file" for s in chain)


def test_raw_image_with_qcow2_header_is_never_followed(tmp_path: Path, qemu_img: str) -> None:
    """CVE-2010-2237: a guest writes a qcow2 header naming /etc/shadow into its raw disk."""
    evil = mkqcow2(tmp_path / "guest-disk.img", qemu_img, "/etc/shadow", "raw")
    assert read_image_header(str(evil), "qcow2")["backing-filename"] == "/etc/shadow"
    declared_raw = top(evil, "raw")
    assert paths(resolve_chain(declared_raw)) == [(str(evil), "raw")]
    no_driver_type = top(evil)  # no <driver type=...>: raw, never probed
    assert paths(resolve_chain(no_driver_type)) == [(str(evil), "raw")]
    assert no_driver_type.backing is None


def test_qcow2_without_backing_is_a_single_layer(tmp_path: Path, qemu_img: str) -> None:
    img = mkqcow2(tmp_path / "plain.qcow2", qemu_img)
    assert paths(resolve_chain(top(img, "qcow2"))) == [(str(img), "qcow2")]


def test_missing_backing_format_is_an_error(tmp_path: Path, qemu_img: str) -> None:
    base = mkraw(tmp_path / "base.img", qemu_img)
    img = mkqcow2(tmp_path / "top.qcow2", qemu_img, str(base), "raw")
    # drop the backing-format header extension (what pre-6.1 qemu-img wrote without -F)
    data = bytearray(img.read_bytes())
    at = data.find(QCOW2_BACKING_FORMAT_EXT, 0, 4096)
    assert at > 0
    data[at:at + 4] = bytes.fromhex("7fffff01")  # an unknown extension: ignored by QEMU
    img.write_bytes(bytes(data))
    assert "backing-filename-format" not in read_image_header(str(img), "qcow2")
    with pytest.raises(BackingChainError) as err:
        resolve_chain(top(img, "qcow2"))
    msg = str(err.value)
    assert str(img) in msg and str(base) in msg
    assert f"qemu-img rebase -u -F <fmt> -b {base} {img}" in msg


def test_loop_is_an_error(tmp_path: Path, qemu_img: str) -> None:
    a = tmp_path / "a.qcow2"
    b = mkqcow2(tmp_path / "b.qcow2", qemu_img, str(a), "qcow2")
    mkqcow2(a, qemu_img, str(b), "qcow2")
    with pytest.raises(BackingChainError, match="loops"):
        resolve_chain(top(a, "qcow2"))


def test_loop_through_a_symlink_is_an_error(tmp_path: Path, qemu_img: str) -> None:
    a = mkqcow2(tmp_path / "a.qcow2", qemu_img, "alias.qcow2", "qcow2")
    os.symlink(a, tmp_path / "alias.qcow2")
    with pytest.raises(BackingChainError, match="appears twice"):
        resolve_chain(top(a, "qcow2"))


def test_depth_cap(tmp_path: Path, qemu_img: str) -> None:
    prev = mkraw(tmp_path / "l0.img", qemu_img)
    fmt = "raw"
    for i in range(1, 5):
        prev = mkqcow2(tmp_path / f"l{i}.qcow2", qemu_img, str(prev), fmt)
        fmt = "qcow2"
    assert len(resolve_chain(top(prev, "qcow2"), max_depth=4)) == 5
    with pytest.raises(BackingChainError, match="deeper than 3"):
        resolve_chain(top(prev, "qcow2"), max_depth=3)


def test_chain_from_xml_is_used_and_empty_backingstore_stops(tmp_path: Path,
                                                              qemu_img: str) -> None:
    base = mkraw(tmp_path / "base.img", qemu_img)
    img = mkqcow2(tmp_path / "top.qcow2", qemu_img, str(base), "raw")
    src = top(img, "qcow2")
    src.backing_declared = True  # <backingStore/>: no backing, whatever the header says
    assert paths(resolve_chain(src)) == [(str(img), "qcow2")]
    # an XML layer without its own <backingStore> is read from the image below it
    xml_mid = StorageSource(path=str(img), type="file", format="qcow2", format_given=True)
    head = StorageSource(path="/nonexistent/overlay.qcow2", type="file", format="qcow2",
                         format_given=True, backing=xml_mid, backing_declared=True)
    assert paths(resolve_chain(head)) == [
        ("/nonexistent/overlay.qcow2", "qcow2"), (str(img), "qcow2"), (str(base), "raw")]


def test_missing_image_names_the_path(tmp_path: Path, qemu_img: str) -> None:
    with pytest.raises(BackingChainError, match="does not exist") as err:
        resolve_chain(top(tmp_path / "missing.qcow2", "qcow2"))
    assert str(tmp_path / "missing.qcow2") in str(err.value)


def test_missing_backing_file_is_an_error(tmp_path: Path, qemu_img: str) -> None:
    img = mkqcow2(tmp_path / "top.qcow2", qemu_img, str(tmp_path / "gone.img"), "raw")
    with pytest.raises(BackingChainError, match=str(tmp_path / "gone.img")):
        resolve_chain(top(img, "qcow2"))


def test_wrong_declared_format_is_not_guessed(tmp_path: Path, qemu_img: str) -> None:
    raw = mkraw(tmp_path / "disk.img", qemu_img)
    with pytest.raises(BackingChainError, match="as format 'qcow2'"):
        resolve_chain(top(raw, "qcow2"))


def test_protocol_backing_is_refused(tmp_path: Path, qemu_img: str) -> None:
    img = mkqcow2(tmp_path / "top.qcow2", qemu_img, "nbd://example.org/export", "raw")
    with pytest.raises(BackingChainError, match="protocol"):
        resolve_chain(top(img, "qcow2"))
