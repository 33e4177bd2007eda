"""P2: AppArmor profile generation, and generate + compile end to end; vs virt-aa-helper.

1. Generation alone, whole process: ``vmconfine-aa-helper -d -r`` vs ``virt-aa-helper -d -r``
   (dry run: parse the XML, resolve every path, print the rules; nothing written), for domains
   with 1, 8 and 64 disks, alternating.
2. End to end (root): a first start — ``vmconfine-aa-helper -c --compile-only`` vs
   ``virt-aa-helper -c`` (write the profile from the template, compile it) — and a restart with
   unchanged content: ``vmconfine-aa-helper -r`` finds the content hash unchanged and skips
   the compiler; libvirt compiles again on every start (its stop runs ``-D``, which deletes the
   rules file; its next start runs ``-r``). This kernel has no AppArmor, so both compile
   without loading (``-Q``): see :mod:`bench._aa_ns` for the private mount namespace
   virt-aa-helper runs in.

libvirt's ``TEMPLATE.qemu`` and ``abstractions/libvirt-qemu`` come from the installed
``libvirt-daemon-system`` package when present, else from that package's .deb fetched with
``apt-get download`` into a scratch directory (nothing is installed).

usage: python -m bench.p2_apparmor [--quick] [--runs N]
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

from bench.common import (
    AA_HELPER,
    PYTHON,
    Options,
    Stats,
    Table,
    domain_xml,
    header,
    is_root,
    make_disks,
    now,
    parse_options,
    ratio,
    scratch,
    verdict,
)

VIRT_AA_HELPER = "/usr/lib/libvirt/virt-aa-helper"
PARSER = "/usr/sbin/apparmor_parser"
SYSTEM_PYTHON = "/usr/bin/python3"
NS_SCRIPT = Path(__file__).with_name("_aa_ns.py")
GEN_TARGET = 1.5
RESTART_TARGET = 0.3
WRAPPER = """#!/bin/sh
# apparmor_parser stand-in for the benchmark's private mount namespace (no AppArmor in this
# kernel): loads become compile-only, unloads succeed, the cache is never used.
first=1
for a in "$@"; do
  if [ "$first" = 1 ]; then set --; first=0; fi
  case "$a" in
    -R|--remove) exit 0 ;;
    -a|--add|-r|--replace) set -- "$@" -Q ;;
    *) set -- "$@" "$a" ;;
  esac
done
exec @REAL@ -K "$@"
"""


def helper_missing() -> str | None:
    """None when vmconfine-aa-helper can run, else what is missing."""
    if importlib.util.find_spec("vmconfine_aa_helper.main") is None:
        return "not available yet: aa-helper/main.py (vmconfine_aa_helper) is not there"
    if importlib.util.find_spec("vmconfine_apparmor") is None:
        return "not available yet: plugins/apparmor (vmconfine_apparmor) is not there"
    if not os.access(AA_HELPER, os.X_OK):
        return f"{AA_HELPER} is missing (pip install -e . in the venv)"
    return None


def spawn(argv: list[str], stdin_path: Path) -> float:
    """Whole-process wall time of ``argv`` with stdin from a file (output discarded)."""
    with open(stdin_path, "rb") as fh:
        t0 = now()
        proc = subprocess.run(argv, stdin=fh, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        elapsed = now() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return elapsed


# ---- 1. generation ------------------------------------------------------------------------------


def generation(opts: Options, d: Path, sizes: list[int], missing: str | None) -> Table:
    table = Table("P2a: profile generation alone, whole process (dry run -d -r)",
                  ["disks", "vmconfine-aa-helper", "virt-aa-helper", "ratio", "target"])
    if missing:
        table.unavailable("1 / 8 / 64", missing)
        return table
    if not os.access(VIRT_AA_HELPER, os.X_OK):
        table.unavailable("1 / 8 / 64", f"{VIRT_AA_HELPER} is missing (apt-get install "
                                        "libvirt-daemon)")
        return table
    profiles = d / "gen-profiles"
    profiles.mkdir()
    py_floor = Stats()
    for n in sizes:
        disks = make_disks(d, f"gen{n}", n, boot=False)
        uid = str(uuidlib.uuid4())
        xml = d / f"gen{n}.xml"
        xml.write_text(domain_xml(f"gen{n}", disks, uuid=uid))
        ours, theirs = Stats(), Stats()
        vm = [AA_HELPER, "-d", "-r", "-u", f"vmconfine-{uid}", "-P", str(profiles)]
        lv = [VIRT_AA_HELPER, "-d", "-r", "-u", f"libvirt-{uid}"]
        for i in range(opts.runs + 1):
            a, b = spawn(vm, xml), spawn(lv, xml)
            if i:
                ours.add(a)
                theirs.add(b)
        if n == sizes[0]:
            for i in range(opts.runs + 1):
                t = spawn([PYTHON, "-c", "pass"], xml)
                if i:
                    py_floor.add(t)
        table.add(str(n), ours.fmt(), theirs.fmt(), ratio(ours.median, theirs.median),
                  verdict(ours.median <= GEN_TARGET * theirs.median, f"<= {GEN_TARGET}x"))
    table.add("-", f"{py_floor.fmt()} (venv python -c pass)", "-", "n/a",
              "floor of any Python helper")
    table.notes += [
        f"n = {opts.runs} per cell, alternating; raw 1 MiB disk images; the profile directory "
        "is a scratch directory (-P)",
        "vmconfine-aa-helper prints the rules on stdout, virt-aa-helper on stderr; both are "
        "discarded",
    ]
    return table


# ---- 2. end to end ------------------------------------------------------------------------------


def libvirt_apparmor_files(dest: Path) -> str | None:
    """Put libvirt's TEMPLATE.qemu and abstractions/libvirt-qemu under ``dest`` (a copy of
    /etc/apparmor.d); None on success, else why it failed."""
    shutil.copytree("/etc/apparmor.d", dest, symlinks=True)
    wanted = ("libvirt/TEMPLATE.qemu", "abstractions/libvirt-qemu")
    local = dest / "local" / "abstractions" / "libvirt-qemu"
    if all((dest / w).is_file() for w in wanted):
        if not local.exists():  # the package's postinst creates it empty
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
        return None
    work = dest.parent / "deb"
    work.mkdir()
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libvirt-daemon"],
                             capture_output=True, text=True, check=False).stdout.strip()
    pkg = f"libvirt-daemon-system={version}" if version else "libvirt-daemon-system"
    got = subprocess.run(["apt-get", "download", "-q", pkg], cwd=work, capture_output=True,
                         text=True, timeout=120, check=False)
    debs = list(work.glob("libvirt-daemon-system_*.deb"))
    if got.returncode != 0 or not debs:
        return (f"libvirt's AppArmor template is not installed and 'apt-get download {pkg}' "
                f"failed: {(got.stderr or got.stdout).strip()[-200:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], check=True)
    for w in wanted:
        (dest / w).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "x" / "etc" / "apparmor.d" / w, dest / w)
    shutil.rmtree(work)
    if not local.exists():  # the package's postinst creates it empty
        local.parent.mkdir(parents=True, exist_ok=True)
        local.touch()
    return None


def end_to_end(opts: Options, d: Path, sizes: list[int], missing: str | None) -> Table:
    table = Table("P2b: generate + compile end to end, first start and restart (whole process)",
                  ["case", "vmconfine", "libvirt", "ratio", "target"])
    if missing:
        table.unavailable("first start / restart", missing)
        return table
    why = None
    if not is_root():
        why = "needs root (private mount namespace)"
    elif not os.access(VIRT_AA_HELPER, os.X_OK) or not os.access(PARSER, os.X_OK):
        why = f"{VIRT_AA_HELPER} or {PARSER} is missing"
    elif not os.access(SYSTEM_PYTHON, os.X_OK) or not shutil.which("unshare"):
        why = "unshare or /usr/bin/python3 is missing"
    if why is None:
        why = libvirt_apparmor_files(d / "apparmor.d")
    if why:
        table.unavailable("first start / restart", why)
        return table
    from vmconfine_aa_helper.files import shipped_dir

    real = d / "real_parser"
    real.touch()
    wrapper = d / "apparmor_parser"
    wrapper.write_text(WRAPPER.replace("@REAL@", str(real)))
    wrapper.chmod(0o755)
    cases = []
    for n in sizes:
        disks = make_disks(d, f"e2e{n}", n, boot=False)
        uid = str(uuidlib.uuid4())
        xml = d / f"e2e{n}.xml"
        xml.write_text(domain_xml(f"e2e{n}", disks, uuid=uid))
        pdir = d / f"profiles{n}"
        pdir.mkdir()
        cases.append({"key": str(n), "xml": str(xml), "uuid": uid, "profile_dir": str(pdir)})
    spec = {"runs": opts.runs, "cases": cases, "parser": PARSER, "real_parser": str(real),
            "wrapper": str(wrapper), "apparmor_d": str(d / "apparmor.d"),
            "aa_helper": AA_HELPER, "shipped_dir": str(shipped_dir())}
    (d / "spec.json").write_text(json.dumps(spec))
    out = d / "result.json"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", SYSTEM_PYTHON, "-I",
                           str(NS_SCRIPT), str(d / "spec.json"), str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        table.unavailable("first start / restart",
                          f"the namespace runner failed: {proc.stderr.strip()[-300:]}")
        return table
    res = {k: Stats(v) for k, v in json.loads(out.read_text()).items()}
    for n in sizes:
        k = str(n)
        disks = f"{n} disk{'s' if n > 1 else ''}"
        vc, lc = res[f"{k}/vmconfine/create"], res[f"{k}/libvirt/create"]
        vr, lr = res[f"{k}/vmconfine/restart"], res[f"{k}/libvirt/restart"]
        table.add(f"first start, {disks}: -c (template, rules, compile)", vc.fmt(), lc.fmt(),
                  ratio(vc.median, lc.median), "report")
        table.add(f"restart, unchanged content, {disks}: -r (vmconfine: hash hit, no "
                  "compile; libvirt: compiles)", vr.fmt(), lr.fmt(),
                  ratio(vr.median, lr.median),
                  verdict(vr.median <= RESTART_TARGET * lr.median, f"<= {RESTART_TARGET}x"))
        vp, lp = res[f"{k}/vmconfine/compile"], res[f"{k}/libvirt/compile"]
        table.add(f"compile alone, {disks}: apparmor_parser -Q -K on each generated profile",
                  vp.fmt(), lp.fmt(), ratio(vp.median, lp.median), "report")
    table.notes += [
        f"n = {opts.runs} per cell, alternating libvirt / vmconfine; both compile without "
        "loading (-Q, no cache): this kernel has no AppArmor",
        "libvirt: virt-aa-helper -c in a private mount namespace (its /etc/apparmor.d and "
        "apparmor_parser are compiled in); vmconfine: vmconfine-aa-helper -c/-r "
        "--compile-only -P <scratch>",
        "vmconfine's driver today runs -D when a domain stops (profile, rules and hash "
        "deleted), so a real restart takes the first-start path; the restart row is what the "
        "helper does when the profile and its hash are still there",
    ]
    return table


def run(opts: Options) -> list[Table]:
    missing = helper_missing()
    with scratch("p2") as d:
        gen = generation(opts, d, [1, 8] if opts.quick else [1, 8, 64], missing)
        e2e = end_to_end(opts, d, [1] if opts.quick else [1, 8], missing)
    return [gen, e2e]


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(__doc__.splitlines()[0], argv, full_runs=10, quick_runs=2)
    header("P2 AppArmor profiles", opts)
    t0 = time.monotonic()
    for t in run(opts):
        t.print()
    sys.stdout.write(f"(P2 took {time.monotonic() - t0:.1f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
