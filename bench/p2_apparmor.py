"""P2: AppArmor profile generation, and what a start and a restart cost; vs virt-aa-helper.

1. Generation alone, whole process: ``vmconfine-aa-helper -d -r`` vs ``virt-aa-helper -d -r``
   (dry run: parse the XML, resolve every path, print the rules; nothing written), for domains
   with 1, 8 and 64 disks, alternating. vmconfine's helper is run both as the console script
   and the way the AppArmor driver runs it (``python -I -S``, only the helper's packages:
   :mod:`vmconfine_aa_helper.launch`).
2. End to end (root), what each start and stop does for AppArmor:

   - vmconfine: the AppArmor driver's hooks in this process (as in a running vmconfine):
     first start = ``gen_label`` + ``set_all_labels`` with an empty policy cache (generate,
     compile, load, cache the binary); stop = ``restore_all_labels`` (helper ``-D``: unload,
     delete profile and rules; the cache stays); restart = the same start again, now a cache
     hit (rules generated and keyed in-process, helper ``--cached``: no XML, no compile).
   - libvirt: ``virt-aa-helper -c`` (first start), ``-D`` (stop: deletes the rules, keeps the
     profile file), ``-r`` (restart: the profile exists, so it regenerates and compiles again).

   This kernel has no AppArmor, so both sides compile without loading: virt-aa-helper runs in
   a private mount namespace where ``apparmor_parser`` is a wrapper turning loads into ``-Q``
   (see :mod:`bench._aa_ns`); vmconfine's helper runs with ``--compile-only`` and the same
   wrapper as ``--parser``, so every parser run costs both sides the same shell exec. What
   neither side does here is the kernel's part: libvirt's parser would write the policy it
   compiled to securityfs, vmconfine's helper writes the cached binary there (one write, no
   process); unloading is a parser run (-R) for libvirt, a write of the name for vmconfine.

libvirt's ``TEMPLATE.qemu`` and ``abstractions/libvirt-qemu`` come from the installed
``libvirt-daemon-system`` package when present, else from that package's .deb fetched with
``apt-get download`` into a scratch directory (nothing is installed).

usage: python -m bench.p2_apparmor [--quick] [--runs N]
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any

from bench.common import (
    AA_HELPER,
    PYTHON,
    Options,
    Stats,
    Table,
    bench_main,
    domain_xml,
    is_root,
    make_disks,
    now,
    ratio,
    scratch,
    verdict,
)

VIRT_AA_HELPER = "/usr/lib/libvirt/virt-aa-helper"
PARSER = "/usr/sbin/apparmor_parser"
SYSTEM_PYTHON = "/usr/bin/python3"
BENCH_DIR = Path(__file__).resolve().parent
GEN_TARGET = 1.5
RESTART_TARGET = 0.3
WRAPPER = """#!/bin/sh
# apparmor_parser stand-in for a kernel without AppArmor: loads become compile-only, unloads
# succeed, the parser's own cache is never used.
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
#: libvirt's side of the end-to-end measurement, inside ``unshare -m`` (system Python, stdlib
#: only): the bind mounts of bench/_aa_ns.py, then one timed operation per line on stdin
NS_RUNNER = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from _aa_ns import run
spec = json.loads(sys.argv[2])
for source, target in ((spec["parser"], spec["real_parser"]), (spec["wrapper"], spec["parser"]),
                       (spec["apparmor_d"], "/etc/apparmor.d")):
    subprocess.run(["mount", "--bind", source, target], check=True)
helper = "/usr/lib/libvirt/virt-aa-helper"
print("ready", flush=True)
for line in sys.stdin:
    op, uuid, xml = line.split()
    name = "libvirt-" + uuid
    profile = "/etc/apparmor.d/libvirt/" + name
    out = {}
    if op == "first":
        if os.path.exists(profile):
            os.unlink(profile)
        out["t"] = run([helper, "-c", "-u", name], xml)
        out["compile"] = run([spec["real_parser"], "-Q", "-K", profile])
    elif op == "stop":
        out["t"] = run([helper, "-D", "-u", name])
    elif op == "start":
        out["t"] = run([helper, "-r", "-u", name], xml)
    elif op == "cleanup":
        run([helper, "-D", "-u", name])
        if os.path.exists(profile):
            os.unlink(profile)
    print(json.dumps(out), flush=True)
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


def isolated_helper() -> list[str] | None:
    """The command the AppArmor driver runs the helper with (None: it uses the console
    script)."""
    try:
        from vmconfine_aa_helper.launch import command
    except ImportError:
        return None
    return command(PYTHON)


MODEL_FLOOR = "python -I -S, importing the domain model only (ratio: vs virt-aa-helper, 1 disk)"


def model_floor(launched: list[str] | None) -> list[str] | None:
    """The driver's helper command, but importing only what the rules are derived from (the
    domain model with lxml, the resource list, the instance paths) and doing nothing: the
    start-up no helper built on vmconfine's shared domain model can go below."""
    if launched is None:
        return None
    boot = launched[-1]
    tail = "from vmconfine_aa_helper.main import main\nsys.exit(main())\n"
    if not boot.endswith(tail):
        return None
    imports = ("import vmconfine.domain, vmconfine.plugin.resources, vmconfine.config.instance, "
               "vmconfine.errors\n")
    return [*launched[:-1], boot[:-len(tail)] + imports]


def spawn(argv: list[str], stdin_path: Path) -> float:
    """Whole-process wall time of ``argv`` with stdin from a file (output discarded)."""
    with open(stdin_path, "rb") as fh:
        t0 = now()
        proc = subprocess.run(argv, stdin=fh, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        elapsed = now() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}...: exit {proc.returncode}: "
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
    launched = isolated_helper()
    first_peer: Stats | None = None
    floors = {"venv python -c pass": ([PYTHON, "-c", "pass"], Stats()),
              "python -I -S -c pass": ([PYTHON, "-I", "-S", "-c", "pass"], Stats())}
    model = model_floor(launched)
    if model is not None:
        floors[MODEL_FLOOR] = (model, Stats())
    for n in sizes:
        disks = make_disks(d, f"gen{n}", n, boot=False)
        uid = str(uuidlib.uuid4())
        xml = d / f"gen{n}.xml"
        xml.write_text(domain_xml(f"gen{n}", disks, uuid=uid))
        args = ["-d", "-r", "-u", f"vmconfine-{uid}", "-P", str(profiles)]
        ours = {"console script": ([AA_HELPER, *args], Stats())}
        if launched:
            ours["as the driver runs it (python -I -S)"] = ([*launched, *args], Stats())
        lv = [VIRT_AA_HELPER, "-d", "-r", "-u", f"libvirt-{uid}"]
        theirs = Stats()
        if n == sizes[0]:
            first_peer = theirs
        for i in range(opts.runs + 1):
            samples = [(stats, spawn(argv, xml)) for argv, stats in ours.values()]
            samples.append((theirs, spawn(lv, xml)))
            if n == sizes[0]:
                samples += [(stats, spawn(argv, xml)) for argv, stats in floors.values()]
            if i:  # round 0 warms the page cache
                for stats, t in samples:
                    stats.add(t)
        for how, (_, stats) in ours.items():
            target = verdict(stats.median <= GEN_TARGET * theirs.median, f"<= {GEN_TARGET}x")
            if launched and how == "console script":
                target = "report: the driver runs it isolated (below)"
            table.add(f"{n}: {how}", stats.fmt(), theirs.fmt(),
                      ratio(stats.median, theirs.median), target)
    first = first_peer.median if first_peer is not None and first_peer.n else None
    for what, (_, stats) in floors.items():
        if what == MODEL_FLOOR:
            table.add(f"floor: {what}", stats.fmt(), "-", ratio(stats.median, first),
                      "only XML the fast reader leaves to the model pays this")
        else:
            table.add(f"floor: {what}", stats.fmt(), "-", "n/a", "any Python helper pays this")
    table.notes += [
        f"n = {opts.runs} per cell, alternating; raw 1 MiB disk images; the profile directory "
        "is a scratch directory (-P)",
        "vmconfine-aa-helper prints the rules on stdout, virt-aa-helper on stderr; both are "
        "discarded",
        "'as the driver runs it': python -I -S -c BOOT (vmconfine_aa_helper.launch): no site, "
        "no .pth files, only the helper's packages importable",
        "these domains are read by the helper's pyexpat reader (vmconfine_aa_helper.domxml): "
        "no lxml, no domain model; the console script pays the venv's site (floor row)",
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


class LibvirtSide:
    """virt-aa-helper in its private mount namespace, one timed operation per request."""

    def __init__(self, d: Path, real: Path, wrapper: Path) -> None:
        spec = {"parser": PARSER, "real_parser": str(real), "wrapper": str(wrapper),
                "apparmor_d": str(d / "apparmor.d")}
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", SYSTEM_PYTHON, "-I", "-c", NS_RUNNER,
             str(BENCH_DIR), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the namespace runner did not start: {self.stderr()}")

    def stderr(self) -> str:
        self.close()
        return (self.proc.stderr.read() if self.proc.stderr else "").strip()[-300:]

    def do(self, op: str, uuid: str, xml: Path) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{op} {uuid} {xml}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"virt-aa-helper {op} failed: {self.stderr()}")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class VmconfineSide:
    """The AppArmor driver's hooks, as a running vmconfine calls them, for one domain."""

    def __init__(self, d: Path, key: str, xml: str, parser_wrapper: Path) -> None:
        import vmconfine_apparmor
        from vmconfine.config.instance import open_instance
        from vmconfine.plugin.context import HostContext
        from vmconfine.plugin.registry import collect_drivers, make_plugin_manager
        from vmconfine_apparmor.driver import AppArmorDriver

        root = d / f"inst{key}"
        self.profiles = d / f"profiles{key}"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "qemu.conf").write_text(f'apparmor_profile_dir = "{self.profiles}"\n')
        inst = open_instance(f"qemu:///embed?root={root}")
        inst.ensure_dirs()
        pm = make_plugin_manager(autoload=False, plugins=[vmconfine_apparmor])
        self.host = HostContext(inst, pm, collect_drivers(pm))
        self.driver = AppArmorDriver(self.host)
        self.driver.helper_extra = ["--compile-only", "--parser", str(parser_wrapper)]
        logging.getLogger("vmconfine_apparmor").setLevel(logging.ERROR)  # helper warnings
        self.xml = xml
        self.ctx: Any = None
        self.round = 0

    def _fresh_ctx(self) -> Any:
        """A domain context as a new start makes it (config XML, new journal)."""
        from vmconfine.domain import parse_domain
        from vmconfine.launch.journal import Journal
        from vmconfine.plugin.context import DomainContext

        domain = parse_domain(self.xml)
        domain.add_seclabel("apparmor", "dynamic", implicit=True)
        self.round += 1
        journal = self.host.instance.run_dir / f"bench-{self.round}.journal"
        return DomainContext(self.host, domain, Journal(journal))

    def start(self, *, empty_cache: bool) -> float:
        ctx = self.ctx = self._fresh_ctx()
        if empty_cache:
            shutil.rmtree(self.driver.cache_dir(ctx), ignore_errors=True)
        t0 = now()
        self.driver.gen_label(ctx, ctx.domain.seclabel("apparmor"))
        self.driver.set_all_labels(ctx)
        return now() - t0

    def stop(self) -> float:
        t0 = now()
        self.driver.restore_all_labels(self.ctx)
        elapsed = now() - t0
        self.ctx.journal.close()
        return elapsed

    def compile_alone(self, real: str) -> float:
        from vmconfine_aa_helper.files import shipped_dir

        profile = next(p for p in self.profiles.iterdir() if "." not in p.name)
        t0 = now()
        subprocess.run([real, "-Q", "-K", "-I", str(self.profiles), "-I", shipped_dir(),
                        str(profile)], check=True, capture_output=True)
        return now() - t0


def end_to_end(opts: Options, d: Path, sizes: list[int], missing: str | None) -> Table:
    table = Table("P2b: AppArmor work of a first start, a stop and a restart (end to end)",
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
    real = d / "real_parser"
    real.touch()
    wrapper = d / "apparmor_parser"  # bind-mounted over the parser in libvirt's namespace
    wrapper.write_text(WRAPPER.replace("@REAL@", str(real)))
    our_wrapper = d / "apparmor_parser_vmconfine"  # the same script, for --parser
    our_wrapper.write_text(WRAPPER.replace("@REAL@", PARSER))
    for w in (wrapper, our_wrapper):
        w.chmod(0o755)
    try:
        lv = LibvirtSide(d, real, wrapper)
    except RuntimeError as exc:
        table.unavailable("first start / restart", str(exc))
        return table
    stats: dict[str, Stats] = {}

    def add(key: str, value: float, keep: bool) -> None:
        if keep:
            stats.setdefault(key, Stats()).add(value)

    try:
        cases = []
        for n in sizes:
            disks = make_disks(d, f"e2e{n}", n, boot=False)
            uid = str(uuidlib.uuid4())
            xml = d / f"e2e{n}.xml"
            xml.write_text(domain_xml(f"e2e{n}", disks, uuid=uid))
            cases.append((str(n), uid, xml, VmconfineSide(d, str(n), xml.read_text(),
                                                          our_wrapper)))
        for i in range(opts.runs + 1):  # round 0 warms the page cache, not counted
            keep = i > 0
            for key, uid, xml, vm in cases:
                # first start (vmconfine: empty cache), stop, restart, stop; alternating
                r = lv.do("first", uid, xml)
                add(f"{key}/lv/first", r["t"], keep)
                add(f"{key}/lv/compile", r["compile"], keep)
                add(f"{key}/vm/first", vm.start(empty_cache=True), keep)
                add(f"{key}/vm/compile", vm.compile_alone(str(PARSER)), keep)
                add(f"{key}/lv/stop", lv.do("stop", uid, xml)["t"], keep)
                add(f"{key}/vm/stop", vm.stop(), keep)
                add(f"{key}/lv/start", lv.do("start", uid, xml)["t"], keep)
                add(f"{key}/vm/start", vm.start(empty_cache=False), keep)
                add(f"{key}/lv/stop", lv.do("stop", uid, xml)["t"], keep)
                add(f"{key}/vm/stop", vm.stop(), keep)
        for _key, uid, xml, _vm in cases:
            lv.do("cleanup", uid, xml)
    except RuntimeError as exc:
        table.unavailable("first start / restart", str(exc))
        return table
    finally:
        lv.close()
    for n in sizes:
        k = str(n)
        disks = f"{n} disk{'s' if n > 1 else ''}"

        def row(what: str, ours: Stats, theirs: Stats, target: str, disks: str = disks) -> None:
            ok = ours.median <= RESTART_TARGET * theirs.median if target != "report" else None
            table.add(f"{what}, {disks}", ours.fmt(), theirs.fmt(),
                      ratio(ours.median, theirs.median), verdict(ok, target))

        vs, ls = stats[f"{k}/vm/start"], stats[f"{k}/lv/start"]
        vt, lt = stats[f"{k}/vm/stop"], stats[f"{k}/lv/stop"]
        both_vm = Stats([a + b for a, b in zip(vs.samples, vt.samples[1::2], strict=True)])
        both_lv = Stats([a + b for a, b in zip(ls.samples, lt.samples[1::2], strict=True)])
        row("first start (vmconfine: empty cache, compiles)", stats[f"{k}/vm/first"],
            stats[f"{k}/lv/first"], "report")
        row("restart, unchanged content: start (vmconfine: cache hit; libvirt: compiles)",
            vs, ls, f"<= {RESTART_TARGET}x")
        row("restart: stop (profile unloaded, rules deleted)", vt, lt, "report")
        row("restart: stop + start", both_vm, both_lv, f"<= {RESTART_TARGET}x")
        row("compile alone: apparmor_parser -Q -K on the generated profile",
            stats[f"{k}/vm/compile"], stats[f"{k}/lv/compile"], "report")
    table.notes += [
        f"n = {opts.runs} per cell, alternating libvirt / vmconfine; both compile without "
        "loading (-Q, no parser cache): this kernel has no AppArmor",
        "vmconfine: the driver's gen_label + set_all_labels / restore_all_labels in this "
        "process (as in a running vmconfine), helper --compile-only with the parser wrapper; "
        "a cache hit starts no parser (the load is one write of the cached binary to "
        "securityfs, left out here like libvirt's load)",
        "libvirt: virt-aa-helper -c / -D / -r in a private mount namespace (its "
        "/etc/apparmor.d and apparmor_parser are compiled in); libvirtd's own share (fork, "
        "XML) is not counted",
        "stop: virt-aa-helper -D runs apparmor_parser -R (the wrapper exits at once, so its "
        "parse of the profile is not counted); vmconfine's -D unloads with one write of the "
        "name to securityfs .remove (no process; left out here, nothing is loaded)",
    ]
    return table


def run(opts: Options) -> list[Table]:
    missing = helper_missing()
    with scratch("p2") as d:
        gen = generation(opts, d, [1, 8] if opts.quick else [1, 8, 64], missing)
        e2e = end_to_end(opts, d, [1] if opts.quick else [1, 8], missing)
    return [gen, e2e]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, "P2 AppArmor profiles", run, argv, full_runs=10, quick_runs=2)


if __name__ == "__main__":
    sys.exit(main())
