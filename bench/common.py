"""Shared pieces of vmconfine's benchmarks: options, timing statistics, tables, scratch dirs,
disk images and domain XML.

Every benchmark prints one or more tables. Each table has a ``ratio`` column: vmconfine's
figure divided by the peer's (libvirt, or the floor) measured in the same run. Benchmarks
report; they never fail because of a number (a missed target is shown in the ``target``
column as ``MISS``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
VMCONFINE = str(VENV_BIN / "vmconfine")
AA_HELPER = str(VENV_BIN / "vmconfine-aa-helper")
QEMU = "/usr/bin/qemu-system-x86_64"
#: scratch files live here (world-searchable: the QEMU account must reach the images)
SCRATCH_BASE = Path("/var/tmp/vmconfine-bench")
#: a tmpfs, where a normal host keeps /run (the system instance's state and journals)
TMPFS_BASE = Path("/dev/shm")


# ---- options ------------------------------------------------------------------------------------


@dataclass
class Options:
    """Command-line options every benchmark understands."""

    quick: bool
    runs: int


def parse_options(description: str, argv: list[str] | None = None, *, full_runs: int = 10,
                  quick_runs: int = 2) -> Options:
    """``--quick`` (CI: small sizes, few runs) and ``--runs N``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few runs (CI runs this once so nothing rots)")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"counted runs per measurement (default {full_runs}, quick "
                             f"{quick_runs})")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (quick_runs if args.quick else full_runs)
    return Options(quick=args.quick, runs=max(1, runs))


def is_root() -> bool:
    return os.geteuid() == 0


# ---- statistics ---------------------------------------------------------------------------------


@dataclass
class Stats:
    """Median, min and max of a list of samples (seconds unless said otherwise)."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def fmt(self, unit: str = "ms") -> str:
        """``12.3 [11.0-14.2] ms`` (median [min-max])."""
        if not self.samples:
            return "-"
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        if self.n == 1:
            return f"{_num(self.median * scale)} {unit}"
        return (f"{_num(self.median * scale)} [{_num(self.low * scale)}-"
                f"{_num(self.high * scale)}] {unit}")


def _num(x: float) -> str:
    if x != x:  # nan
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(ours: float | None, peer: float | None) -> str:
    """``0.42x``; ``n/a`` when either side is missing."""
    if ours is None or peer is None or peer != peer or ours != ours or peer <= 0:
        return "n/a"
    return f"{ours / peer:.2f}x"


def verdict(ok: bool | None, target: str) -> str:
    """The target column: ``<= 0.5x: ok`` / ``<= 0.5x: MISS`` / the target alone."""
    if ok is None:
        return target
    return f"{target}: {'ok' if ok else 'MISS'}"


def now() -> float:
    return time.perf_counter()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- tables -------------------------------------------------------------------------------------


@dataclass
class Table:
    """A plain-text table; the benchmark contract is that it has a ``ratio`` column."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "ratio" not in self.columns:
            raise ValueError(f"table {self.title!r} has no ratio column")

    def add(self, *cells: object) -> None:
        # one line per row, and no cell may open a column of its own
        row = [" ".join(str(c).split()).replace("|", "/") for c in cells]
        row += ["-"] * (len(self.columns) - len(row))
        self.rows.append(row)

    def unavailable(self, what: str, reason: str) -> None:
        """A row saying a measurement could not be made here, and why."""
        self.add(what, f"not available: {reason}", *(["n/a"] * (len(self.columns) - 2)))

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        line = "| " + " | ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))
        out = [f"## {self.title}", "", line + " |",
               "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        for row in self.rows:
            out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                       + " |")
        out.append("")
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def print(self) -> None:
        sys.stdout.write(self.render() + "\n")
        sys.stdout.flush()


def header(name: str, opts: Options, extra: str = "") -> None:
    """The first line of a benchmark's output: what, mode, machine."""
    mode = "quick" if opts.quick else "full"
    sys.stdout.write(f"# {name} ({mode} mode, {opts.runs} counted runs per measurement, "
                     f"{os.cpu_count()} CPUs){' ' + extra if extra else ''}\n\n")
    sys.stdout.flush()


# ---- scratch space ------------------------------------------------------------------------------


@contextmanager
def scratch(prefix: str, *, base: Path = SCRATCH_BASE) -> Iterator[Path]:
    """A fresh world-searchable directory, removed (with everything in it) afterwards."""
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=base))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if base == SCRATCH_BASE:
            try:
                base.rmdir()  # only when nothing else uses it
            except OSError:
                pass


def make_disks(directory: Path, prefix: str, count: int, *, boot: bool = True) -> list[Path]:
    """``count`` raw 1 MiB images; the first one boots a guest that prints a line and halts
    (so a running guest idles instead of spinning in the firmware)."""
    paths = []
    for i in range(count):
        p = directory / f"{prefix}-d{i}.img"
        if i == 0 and boot:
            from examples.mkbootimg import write_image

            write_image(str(p), f"vmconfine bench {prefix}", poweroff=False)
        else:
            with open(p, "wb") as fh:
                fh.truncate(1024 * 1024)
        paths.append(p)
    return paths


def target_name(i: int) -> str:
    """vda, vdb, ..., vdz, vdaa, ... (libvirt's disk naming)."""
    name = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        name = chr(ord("a") + rem) + name
    return "vd" + name


def disk_xml(path: Path | str, index: int, backing: str = "") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{path}'/>{backing}<target dev='{target_name(index)}' bus='virtio'/>"
            f"</disk>")


def domain_xml(name: str, disks: list[Path] | list[str], *, uuid: str | None = None,
               memory_mib: int = 32, disk_elements: str | None = None, extra: str = "") -> str:
    """A TCG domain like libvirt's baseline one: virtio disks, no USB, no balloon, no
    graphics (libvirt then passes ``-display none``)."""
    body = disk_elements if disk_elements is not None else "".join(
        disk_xml(p, i) for i, p in enumerate(disks))
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid or uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{QEMU}</emulator>
    {body}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    {extra}
  </devices>
</domain>
"""


def embed_root(directory: Path, qemu_conf: str = 'security_driver = "none"\n') -> str:
    """An embed instance under ``directory`` with ``qemu_conf``; returns its URI."""
    (directory / "etc").mkdir(parents=True, exist_ok=True)
    (directory / "etc" / "qemu.conf").write_text(qemu_conf)
    return f"qemu:///embed?root={directory}"


def finish_teardowns(uri: str) -> None:
    """Let vmconfine finish any teardown a run left unfinished (its journal kept): any command
    on the instance does (``list`` here). Call it before the scratch root goes: removing it
    removes the journals too, and what they list (cgroups) would stay on the host with nothing
    left to finish it."""
    subprocess.run([VMCONFINE, "-c", uri, "list"], capture_output=True, check=False,
                   stdin=subprocess.DEVNULL, timeout=120)


def rss_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB (PSS counts shared pages once across processes)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def compile_sources() -> None:
    """Byte-compile vmconfine's sources, as an installed vmconfine is: the venv's editable
    install runs them from the tree, and with PYTHONDONTWRITEBYTECODE set (or after an edit)
    every timed process would otherwise compile them again."""
    import compileall

    for sub in ("core", "plugins", "aa-helper"):
        compileall.compile_dir(REPO / sub, quiet=2)


def bench_main(doc: str, title: str, run: Callable[[Options], list[Table]],
               argv: list[str] | None, *, full_runs: int, quick_runs: int) -> int:
    """A benchmark module's ``main``: options, header, its tables, and how long it took."""
    opts = parse_options(doc.splitlines()[0], argv, full_runs=full_runs, quick_runs=quick_runs)
    compile_sources()
    header(title, opts)
    t0 = time.monotonic()
    for table in run(opts):
        table.print()
    short = title.split()[0]
    sys.stdout.write(f"({short} took {time.monotonic() - t0:.1f} s)\n")
    return 0
