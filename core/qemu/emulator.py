"""What the emulator binary itself needs to run, from its resolved files (not a kept list).

Shared by the drivers that must know the emulator's files: Landlock (its ruleset) and the
namespaces driver (the per-domain root view, which also reproduces the symlinks on the way,
:attr:`EmulatorFiles.names`).

* the executable and its ELF interpreter (``PT_INTERP``), which need execute;
* its shared libraries, exactly as the dynamic loader resolves them
  (``INTERPRETER --list EMULATOR``, the mechanism behind ``ldd``; the emulator is not run);
* the loader's cache (``/etc/ld.so.cache``) when the loader uses one;
* QEMU's firmware/data directories, as the emulator itself reports them (``EMULATOR -L help``,
  which prints the search path compiled into the package, e.g. /usr/share/qemu,
  /usr/share/seabios, /usr/lib/ipxe/qemu);
* QEMU's module directory (accelerators, UIs, devices loaded with dlopen), found as the
  directory path compiled into the binary that holds ``*.so`` modules, plus every module's own
  libraries (resolved the same way).

Results are cached per process, keyed by the binary's identity (device, inode, size, mtime).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.qemu.argv import find_emulator

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext

log = logging.getLogger(__name__)

LOADER_CACHE = "/etc/ld.so.cache"
_TIMEOUT = 20
_LIST_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-f]+\)\s*$")


@dataclass(frozen=True)
class EmulatorFiles:
    """The resolved (symlink-free) paths an emulator binary needs, by kind."""

    executable: str
    interpreter: str | None = None
    libraries: tuple[str, ...] = ()
    loader_cache: str | None = None
    data_dirs: tuple[str, ...] = ()
    module_dirs: tuple[str, ...] = ()
    module_libraries: tuple[str, ...] = ()
    #: the paths as the binary and the loader name them before symlinks are resolved (the
    #: executable as given, ``PT_INTERP``, the loader's library paths): a filesystem view
    #: holding only the resolved files must reproduce the symlinks on these paths
    names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)


def elf_interpreter(path: str) -> str | None:
    """The ``PT_INTERP`` of an ELF file (None for static binaries or non-ELF files)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF":
                return None
            is64 = ident[4] == 2
            endian = "<" if ident[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(endian + "Q", ident, 0x20)
                phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
            else:
                phoff, = struct.unpack_from(endian + "I", ident, 0x1C)
                phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x2A)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                p_type, = struct.unpack_from(endian + "I", ph, 0)
                if p_type != 3:  # PT_INTERP
                    continue
                if is64:
                    off, = struct.unpack_from(endian + "Q", ph, 8)
                    size, = struct.unpack_from(endian + "Q", ph, 32)
                else:
                    off, = struct.unpack_from(endian + "I", ph, 4)
                    size, = struct.unpack_from(endian + "I", ph, 16)
                f.seek(off)
                return f.read(size).rstrip(b"\x00").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def _clean_env() -> dict[str, str]:
    """The loader must resolve as it will for QEMU: no LD_* from the caller."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def loader_list(interpreter: str, target: str) -> list[str]:
    """Libraries of ``target`` as ``interpreter --list`` resolves them (real paths, in order).

    Raises OSError / subprocess.CalledProcessError when the loader cannot resolve them.
    """
    libs: list[str] = []
    for _name, real in loader_entries(interpreter, target):
        if real not in libs:
            libs.append(real)
    return libs


def loader_entries(interpreter: str, target: str) -> list[tuple[str, str]]:
    """``(path as the loader names it, real path)`` for each library of ``target``."""
    out = subprocess.run(
        [interpreter, "--list", target], capture_output=True, text=True, check=True,
        env=_clean_env(), timeout=_TIMEOUT,
    ).stdout
    entries: list[tuple[str, str]] = []
    for line in out.splitlines():
        if "not found" in line:
            raise OSError(f"{target}: the dynamic loader cannot find {line.split()[0]}")
        m = _LIST_LINE.match(line)
        if not m:
            continue
        path = m.group(2)
        if not path.startswith("/"):
            continue  # linux-vdso.so.1: in memory, no file
        entries.append((path, os.path.realpath(path)))
    return entries


def data_dirs(executable: str) -> list[str]:
    """QEMU's firmware search path (``-L help``), real existing directories, in order."""
    try:
        out = subprocess.run(
            [executable, "-L", "help"], capture_output=True, text=True, check=True,
            env=_clean_env(), timeout=_TIMEOUT, stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s -L help failed (%s); using <prefix>/share/qemu", executable, exc)
        out = str(Path(executable).resolve().parent.parent / "share" / "qemu")
    dirs: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("/") and os.path.isdir(line):
            real = os.path.realpath(line)
            if real not in dirs:
                dirs.append(real)
    return dirs


_WORDS = re.compile(rb"\x00([A-Za-z0-9_.+-]{3,80})(?=\x00)")
_PATHS = re.compile(rb"\x00(/[A-Za-z0-9_./+-]{2,200})(?=\x00)")


def _binary_strings(data: bytes) -> tuple[set[str], list[str]]:
    """NUL-delimited strings of the binary: plain words (QEMU's module table names its
    modules) and absolute paths (sorted)."""
    words = {w.decode() for w in _WORDS.findall(data)}
    paths = sorted({p.decode() for p in _PATHS.findall(data)})
    return words, paths


def module_dirs(executable: str) -> tuple[list[str], set[str]]:
    """QEMU's module directories: absolute directory paths compiled into the binary that hold
    ``NAME.so`` files whose NAME is a module the binary knows (its modinfo table, e.g.
    ``accel-tcg-x86_64``). Returns the real paths and the binary's known words (for
    :func:`modules`).
    """
    try:
        data = Path(executable).read_bytes()
    except OSError:
        return [], set()
    words, paths = _binary_strings(data)
    found: list[str] = []
    for cand in paths:
        if not os.path.isdir(cand):
            continue
        real = os.path.realpath(cand)
        if real not in found and modules(real, words):
            found.append(real)
    return found, words


def modules(directory: str, known: set[str]) -> list[str]:
    """Files ``NAME.so`` in ``directory`` whose NAME is in ``known`` (sorted)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(".so") and n[:-3] in known)


def _resolve(executable: str) -> EmulatorFiles:
    exe = os.path.realpath(executable)
    notes: list[str] = []
    interp = elf_interpreter(exe)
    names: list[str] = [executable]
    libs: list[str] = []
    if interp:
        names.append(interp)
        interp = os.path.realpath(interp)
        try:
            entries = loader_entries(interp, exe)
        except (OSError, subprocess.SubprocessError) as exc:
            raise OSError(f"cannot list the libraries of {exe}: {exc}") from exc
        for name, real in entries:
            if real != interp and real not in libs:
                libs.append(real)
            if name != real and name not in names:
                names.append(name)
    else:
        notes.append(f"{exe} has no ELF interpreter (static): no libraries")
    cache = LOADER_CACHE if interp and os.path.isfile(LOADER_CACHE) else None
    mdirs, known = module_dirs(exe)
    mod_libs: list[str] = []
    for d in mdirs:
        for name in modules(d, known) if interp else []:
            try:
                for lib in loader_list(interp, os.path.join(d, name)):
                    if lib != interp and lib not in libs and lib not in mod_libs:
                        mod_libs.append(lib)
            except (OSError, subprocess.SubprocessError) as exc:
                # a module whose libraries are not installed cannot be loaded by QEMU either
                notes.append(f"module {name} skipped: {exc}")
    return EmulatorFiles(
        executable=exe, interpreter=interp, libraries=tuple(libs), loader_cache=cache,
        data_dirs=tuple(data_dirs(exe)), module_dirs=tuple(mdirs),
        module_libraries=tuple(mod_libs), names=tuple(names), notes=tuple(notes),
    )


_CACHE: dict[tuple[str, int, int, int, int], EmulatorFiles] = {}


def emulator_files(executable: str) -> EmulatorFiles:
    """The resolved files ``executable`` needs (cached per binary identity).

    Raises OSError when the binary is missing or its libraries cannot be resolved.
    """
    exe = os.path.realpath(executable)
    st = os.stat(exe)
    key = (exe, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = _resolve(exe)
    return found


def domain_emulator(ctx: DomainContext) -> str:
    """The binary a domain's QEMU runs: the one in the argv the pipeline built for this start
    (``ctx.state["pipeline"]["command"]``), else the one ``find_emulator`` resolves (reports
    made before any start)."""
    command = ctx.state.get("pipeline", {}).get("command")
    path = getattr(command, "emulator", None)
    if path:
        return str(path)
    return find_emulator(ctx.domain, ctx.config)
