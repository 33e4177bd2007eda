"""What the emulator binary itself needs to run, from its resolved files (not a kept list).

Shared by the drivers that must know the emulator's files: Landlock (its ruleset) and the
namespaces driver (the per-domain root view, which also reproduces the symlinks on the way,
:attr:`EmulatorFiles.names`).

* the executable and its ELF interpreter (``PT_INTERP``), which need execute;
* its shared libraries, exactly as the dynamic loader resolves them
  (``INTERPRETER --list EMULATOR``, the mechanism behind ``ldd``);
* the loader's cache (``/etc/ld.so.cache``) when the loader uses one;
* QEMU's firmware/data directories, as the emulator itself reports them (``EMULATOR -L help``,
  which prints the search path compiled into the package, e.g. /usr/share/qemu,
  /usr/share/seabios, /usr/lib/ipxe/qemu);
* QEMU's module directory (accelerators, UIs, devices loaded with dlopen), found as the
  directory path compiled into the binary that holds ``*.so`` modules, plus every module's own
  libraries (resolved the same way).

Nothing here runs a program itself: the emulator and its loader run through
:mod:`vmconfine.qemu.probe` (as QEMU's account, without privileges, cached there).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vmconfine.qemu.argv import find_emulator
from vmconfine.qemu.probe import EmulatorProbe, ProbeError, identity, regular_file
from vmconfine.sanitize import one_line

if TYPE_CHECKING:
    from vmconfine.plugin.context import DomainContext

log = logging.getLogger(__name__)

LOADER_CACHE = "/etc/ld.so.cache"
SCAN_MAX = 512 << 20  #: largest binary scanned for module directories
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
    #: the paths as the loader names them before symlinks are resolved (``PT_INTERP``, the
    #: loader's library paths): a view holding only the resolved files must reproduce the
    #: symlinks on these paths
    names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def paths(self) -> list[str]:
        """Every file and directory named, the executable first."""
        out = [self.executable, *([self.interpreter] if self.interpreter else []),
               *self.libraries, *([self.loader_cache] if self.loader_cache else []),
               *self.data_dirs, *self.module_dirs, *self.module_libraries]
        return list(dict.fromkeys(out))


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


def loader_list(interpreter: str, target: str, probe: EmulatorProbe, emulator: str) -> list[str]:
    """Libraries of ``target`` as ``interpreter --list`` resolves them (real paths, in order),
    run through ``probe`` (the interpreter is named by the emulator's ELF header, so it is as
    untrusted as the emulator). Raises ProbeError / OSError when they cannot be resolved."""
    libs: list[str] = []
    for _name, real in loader_entries(interpreter, target, probe, emulator):
        if real not in libs:
            libs.append(real)
    return libs


def loader_entries(interpreter: str, target: str, probe: EmulatorProbe,
                   emulator: str) -> list[tuple[str, str]]:
    """``(path as the loader names it, real path)`` per library of ``target`` (see
    :func:`loader_list`)."""
    out = probe.run([interpreter, "--list", target], emulator=emulator,
                    depends=[target, LOADER_CACHE])
    entries: list[tuple[str, str]] = []
    for line in out.splitlines():
        if "not found" in line:
            raise OSError(f"{target}: the dynamic loader cannot find {one_line(line.split()[0])}")
        m = _LIST_LINE.match(line)
        if not m:
            continue
        path = m.group(2)
        if not path.startswith("/"):
            continue  # linux-vdso.so.1: in memory, no file
        entries.append((path, os.path.realpath(path)))
    return entries


def data_dirs(executable: str, probe: EmulatorProbe) -> list[str]:
    """QEMU's firmware search path (``EMULATOR -L help`` run through ``probe``), real existing
    directories, in order. Raises ProbeError when the emulator cannot answer."""
    out = probe.run([executable, "-L", "help"], emulator=executable)
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
    :func:`modules`). Only a regular file of at most :data:`SCAN_MAX` bytes is read.
    """
    try:
        with open(executable, "rb", buffering=0, opener=_open_nonblock) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > SCAN_MAX:
                return [], set()
            data = f.read()
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


def _open_nonblock(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


def _resolve(exe: str, probe: EmulatorProbe) -> EmulatorFiles:
    notes: list[str] = []
    # the emulator answers first, as QEMU's account: a file that is no QEMU fails here
    dirs = data_dirs(exe, probe)
    interp = elf_interpreter(exe)
    libs: list[str] = []
    names: list[str] = []
    if interp:
        names.append(interp)
        interp = os.path.realpath(interp)
        try:
            entries = loader_entries(interp, exe, probe, exe)
        except (OSError, ProbeError) as exc:
            raise ProbeError(f"cannot list the libraries of {one_line(exe)}: {exc}") from None
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
                for lib_name, lib in loader_entries(interp, os.path.join(d, name), probe, exe):
                    if lib != interp and lib not in libs and lib not in mod_libs:
                        mod_libs.append(lib)
                    if lib_name != lib and lib_name not in names:
                        # the loader opens a module's library by this name too (a root view
                        # must have the symlink: libspice-server.so.1, libgbm.so.1...)
                        names.append(lib_name)
            except (OSError, ProbeError) as exc:
                # a module whose libraries are not installed cannot be loaded by QEMU either
                notes.append(f"module {name} skipped: {exc}")
    return EmulatorFiles(
        executable=exe, interpreter=interp, libraries=tuple(libs), loader_cache=cache,
        data_dirs=tuple(dirs), module_dirs=tuple(mdirs),
        module_libraries=tuple(mod_libs), names=tuple(names), notes=tuple(notes),
    )


def _to_json(files: EmulatorFiles) -> dict[str, Any]:
    value = asdict(files)
    value["stamps"] = [identity(p) for p in files.paths()]
    return value


def _from_json(value: dict[str, Any]) -> EmulatorFiles:
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in value.items() if k != "stamps"}
    return EmulatorFiles(**fields)


def _fresh(value: Any) -> bool:
    """A cached answer still describes the host: every file and directory it names is
    unchanged (a module package installed, a library upgraded...)."""
    try:
        return all(identity(p[0]) == p for p in value["stamps"])
    except (KeyError, TypeError, IndexError):
        return False


def emulator_files(executable: str, probe: EmulatorProbe) -> EmulatorFiles:
    """The resolved files ``executable`` needs; every run of the emulator or its loader goes
    through ``probe`` (QEMU's account, no privileges). Cached by the identity of the binary,
    its loader cache and every file of the answer (in memory and in the instance's cache).

    Raises ProbeError when the binary is not a regular file, cannot be run by QEMU's account or
    its libraries cannot be resolved.
    """
    exe = regular_file(executable)
    # "/2": module libraries' loader names are part of the answer (older caches lack them)
    key = probe.key("emulator-files/2", exe, [exe, LOADER_CACHE])
    return _from_json(probe.cached(key, lambda: _to_json(_resolve(exe, probe)), valid=_fresh))


def domain_emulator(ctx: DomainContext) -> str:
    """The binary a domain's QEMU runs: the one in the argv the pipeline built for this start
    (``ctx.command``), else the one ``find_emulator`` resolves (reports
    made before any start)."""
    command = getattr(ctx, "command", None)
    if command is not None and command.emulator:
        return str(command.emulator)
    return find_emulator(ctx.domain, ctx.config)
