"""P2's end-to-end timings, run inside a private mount namespace.

Started by :mod:`bench.p2_apparmor` as
``unshare -m --propagation private python3 -I _aa_ns.py SPEC.json RESULT.json``.

This kernel has no AppArmor, and virt-aa-helper writes to ``/etc/apparmor.d/libvirt`` and runs
``/sbin/apparmor_parser`` (both compiled in). In this namespace only:

- ``/etc/apparmor.d`` is a scratch copy holding libvirt's ``TEMPLATE.qemu`` and
  ``abstractions/libvirt-qemu``;
- ``/usr/sbin/apparmor_parser`` is a small wrapper that compiles without loading: ``-a``/``-r``
  become ``-Q`` (``--skip-kernel-load``), ``-R`` (unload) succeeds at once, ``-K`` (no cache)
  is always added. The real parser stays reachable at ``SPEC.real_parser``.

Both helpers (vmconfine-aa-helper with ``--compile-only``, which runs ``-Q -K`` itself) go
through the same wrapper, so each pays the same ~1 ms. Stdlib only (runs under the system
Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any


def run(argv: list[str], stdin_path: str | None = None) -> float:
    """Run ``argv`` (stdin from a file), return its wall time; raise on failure."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, check=False)
        elapsed = time.perf_counter() - t0
    finally:
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[-400:]}")
    return elapsed


def main() -> int:
    with open(sys.argv[1]) as fh:
        spec: dict[str, Any] = json.load(fh)
    for source, target in ((spec["parser"], spec["real_parser"]),
                           (spec["wrapper"], spec["parser"]),
                           (spec["apparmor_d"], "/etc/apparmor.d")):
        subprocess.run(["mount", "--bind", source, target], check=True)
    results: dict[str, list[float]] = {}

    def add(key: str, value: float, keep: bool) -> None:
        if keep:
            results.setdefault(key, []).append(value)

    real = spec["real_parser"]
    for i in range(spec["runs"] + 1):  # round 0 warms the page cache, not counted
        keep = i > 0
        for case in spec["cases"]:
            key, xml, uuid = case["key"], case["xml"], case["uuid"]
            lv = ["/usr/lib/libvirt/virt-aa-helper"]
            lv_name = f"libvirt-{uuid}"
            profile = f"/etc/apparmor.d/libvirt/{lv_name}"
            # libvirt's start runs -c when the profile file is missing, else -r; its stop
            # runs -D, which deletes the .files only: so a restart is -r, which compiles again
            add(f"{key}/libvirt/create", run([*lv, "-c", "-u", lv_name], xml), keep)
            add(f"{key}/libvirt/compile", run([real, "-Q", "-K", profile]), keep)
            run([*lv, "-D", "-u", lv_name])
            add(f"{key}/libvirt/restart", run([*lv, "-r", "-u", lv_name], xml), keep)
            run([*lv, "-D", "-u", lv_name])
            os.unlink(profile)
            vm = [spec["aa_helper"], "-P", case["profile_dir"], "--compile-only"]
            vm_name = f"vmconfine-{uuid}"
            run([*vm, "-D", "-u", vm_name])
            add(f"{key}/vmconfine/create", run([*vm, "-c", "-u", vm_name], xml), keep)
            add(f"{key}/vmconfine/restart", run([*vm, "-r", "-u", vm_name], xml), keep)
            inc = [x for d in (case["profile_dir"], spec["shipped_dir"]) for x in ("-I", d)]
            add(f"{key}/vmconfine/compile", run(
                [real, "-Q", "-K", *inc, f"{case['profile_dir']}/{vm_name}"]), keep)
            run([*vm, "-D", "-u", vm_name])
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
