"""Resolving the emulator's own files (vmconfine.qemu.emulator) without a kept list."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support import require
from vmconfine.qemu import emulator, probe
from vmconfine.qemu.probe import DiskCache, EmulatorProbe, ProbeUser

LIST_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007ffd4b1f5000)
\tlibz.so.1 => {lib} (0x00007f1c6f2a0000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f1c6f2e0000)
"""


def test_elf_interpreter_of_python() -> None:
    interp = emulator.elf_interpreter(os.path.realpath(sys.executable))
    require(interp is not None, "this python is statically linked")
    assert interp is not None
    assert os.path.isabs(interp) and os.path.exists(interp)


def test_elf_interpreter_non_elf(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert emulator.elf_interpreter(str(script)) is None
    assert emulator.elf_interpreter(str(tmp_path / "missing")) is None


class FakeProbe:
    """Records what would run and answers with canned output."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, emulator: str, depends: list[str] = ()) -> str:
        self.calls.append([*argv])
        return self.out


def test_loader_list_parses_resolved_paths(tmp_path: Path) -> None:
    real = tmp_path / "libz.so.1.2.13"
    real.write_bytes(b"")
    link = tmp_path / "libz.so.1"
    link.symlink_to(real.name)
    probe = FakeProbe(LIST_OUTPUT.format(lib=link))
    libs = emulator.loader_list("/lib64/ld-linux-x86-64.so.2", "/usr/bin/qemu",
                                probe, "/usr/bin/qemu")  # type: ignore[arg-type]
    assert probe.calls == [["/lib64/ld-linux-x86-64.so.2", "--list", "/usr/bin/qemu"]]
    # the vdso has no file; symlinks are resolved (rules attach to the real inode)
    assert libs[0] == str(real)
    assert all(os.path.isabs(p) for p in libs)


def test_loader_list_missing_library_is_an_error() -> None:
    probe = FakeProbe("\tlibfoo.so.1 => not found\n")
    with pytest.raises(OSError, match=r"cannot find libfoo\.so\.1"):
        emulator.loader_list("/ld.so", "/usr/bin/qemu", probe, "/usr/bin/qemu")  # type: ignore[arg-type]


def test_module_dirs_from_the_binary(tmp_path: Path) -> None:
    mods = tmp_path / "lib" / "qemu"
    mods.mkdir(parents=True)
    (mods / "accel-tcg-x86_64.so").write_bytes(b"")
    libdir = tmp_path / "lib" / "general"
    libdir.mkdir()
    (libdir / "libglib.so").write_bytes(b"")
    (libdir / "unknown-module.so").write_bytes(b"")
    binary = tmp_path / "qemu"
    binary.write_bytes(b"\x7fELF\x00" + f"{mods}\x00{libdir}\x00accel-tcg-x86_64\x00".encode()
                       + b"\x00/nonexistent/dir\x00")
    dirs, words = emulator.module_dirs(str(binary))
    # only the directory holding modules the binary names; never a general library dir
    assert dirs == [str(mods)]
    assert emulator.modules(str(mods), words) == ["accel-tcg-x86_64.so"]
    assert emulator.modules(str(libdir), words) == []


def test_real_qemu_resolution(tmp_path: Path) -> None:
    qemu = "/usr/bin/qemu-system-x86_64"
    require(os.path.exists(qemu), "qemu-system-x86_64 is not installed (run scripts/setup.sh)")
    user = ProbeUser(os.getuid(), os.getgid(), tuple(os.getgroups()))
    files = emulator.emulator_files(qemu, EmulatorProbe(user, DiskCache(tmp_path)))
    assert files.executable == os.path.realpath(qemu)
    assert files.interpreter and os.path.exists(files.interpreter)
    names = {os.path.basename(p) for p in files.libraries}
    assert any(n.startswith("libglib-2.0.so") for n in names)
    assert any(n.startswith("libc.so") or n.startswith("libc-") for n in names)
    assert all(os.path.isfile(p) and not os.path.islink(p) for p in files.libraries)
    assert files.data_dirs and all(os.path.isdir(d) for d in files.data_dirs)
    # the firmware QEMU loads for machine pc is in one of the reported data dirs
    assert any(os.path.exists(os.path.join(d, "bios-256k.bin")) for d in files.data_dirs)
    # the on-disk cache answers a fresh process the same (nothing is run again)
    probe._MEMORY.clear()
    cached = emulator.emulator_files(qemu, EmulatorProbe(user, DiskCache(tmp_path)))
    assert cached == files and cached.paths() == files.paths()
    assert list((tmp_path / probe.CACHE_SUBDIR).iterdir())
