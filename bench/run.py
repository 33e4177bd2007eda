"""Run every vmconfine benchmark (P1-P6) and print their tables.

usage (from the repository root, as root)::

    .venv/bin/python -m bench.run            # full run (~10 min on 2 cores)
    .venv/bin/python -m bench.run --quick    # CI: small sizes, few runs (~2 min)
    .venv/bin/python -m bench.run --only p1,p3

Each benchmark runs in its own process (``python -m bench.<module>``). libvirt's QEMU
capabilities cache is shared between them for the run (then deleted), so its first probe is
paid once. Benchmarks report, they never fail on a number: the exit status is non-zero only
when a benchmark crashed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, REPO, SCRATCH_BASE
from bench.libvirt_peer import CACHE_ENV

BENCHMARKS = {
    "p1": "bench.p1_start",
    "p2": "bench.p2_apparmor",
    "p3": "bench.p3_mcs",
    "p4": "bench.p4_relabel",
    "p5": "bench.p5_concurrency",
    "p6": "bench.p6_memory",
    "p7": "bench.p7_daemon",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: small and fast")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. p1,p3")
    args = parser.parse_args(argv)
    chosen = [b.strip().lower() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    SCRATCH_BASE.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="libvirt-cache-", dir=SCRATCH_BASE)
    env = dict(os.environ, PYTHONPATH=str(REPO), **{CACHE_ENV: cache})
    failed = []
    t0 = time.monotonic()
    try:
        for key in chosen:
            started = time.monotonic()
            cmd = [PYTHON, "-m", BENCHMARKS[key], *(["--quick"] if args.quick else [])]
            rc = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
            if rc != 0:
                failed.append(f"{key} (exit {rc})")
            sys.stdout.write(f"[{key} finished in {time.monotonic() - started:.1f} s]\n\n")
            sys.stdout.flush()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        try:
            SCRATCH_BASE.rmdir()
        except OSError:
            pass
    total = time.monotonic() - t0
    sys.stdout.write(f"all benchmarks: {total:.1f} s"
                     f"{'; FAILED: ' + ', '.join(failed) if failed else ''}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
