"""P7: the daemon, side by side with libvirtd: memory with 1 and 32 domains, the CLI's
``list`` and ``start`` (whole client process), concurrent starts, and reconnect after a restart.

vmconfine: ``vmconfine daemon`` on an embed instance (stack ``none, dac, cgroups``, the same
work as libvirt's default DAC + cgroups), driven by the CLI (a thin client). libvirt: libvirtd
+ virtlogd in their private namespace (bench/libvirt_peer.py), driven by virsh. Guests are
paused TCG domains with one disk; QEMU itself is not counted in memory.

usage: python -m bench.p7_daemon [--quick]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    VMCONFINE,
    Options,
    Stats,
    Table,
    bench_main,
    domain_xml,
    embed_root,
    is_root,
    make_disks,
    now,
    ratio,
    rss_kib,
    scratch,
    verdict,
)
from bench.libvirt_peer import LibvirtPeer, PeerUnavailable

MEMORY_TARGET_MIB = 40
LIST_TARGET = 2.0
START_TARGET = 0.5
CONCURRENT_TARGET = 0.5


class DaemonUnderTest:
    def __init__(self, uri: str, root: Path) -> None:
        self.uri = uri
        self.sock = root / "run" / "vmconfine-sock"
        self.pid_file = root / "run" / "vmconfined.pid"
        self.pid = 0

    def start(self) -> float:
        """Start the daemon; return the time until it answers (reconnects included)."""
        t0 = now()
        self.cli("daemon", "--daemon")
        self.pid = int(self.pid_file.read_text())
        return now() - t0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def cli(self, *args: str) -> float:
        t0 = now()
        out = subprocess.run([VMCONFINE, "-c", self.uri, *args], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"vmconfine {' '.join(args)}: {out.stderr.strip()}")
        return now() - t0


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def run(opts: Options) -> list[Table]:
    count = 4 if opts.quick else 32  # domains started at once (P5's 32), then measured
    runs = opts.runs
    mem = Table("P7a: daemon memory (QEMU not counted)",
                ["domains", "vmconfine daemon", "libvirtd + virtlogd", "ratio", "target"])
    cli = Table("P7b: CLI through the daemon (whole client process)",
                ["operation", "vmconfine", "virsh", "ratio", "target"])
    conc = Table(f"P7c: {count - 1} concurrent starts through the daemon, until all run",
                 ["", "vmconfine", "libvirt", "ratio", "target"])
    rec = Table("P7d: daemon restart with running domains until all are managed again",
                ["domains", "vmconfine", "libvirt", "ratio", "target"])
    tables = [mem, cli, conc, rec]
    if not is_root():
        for t in tables:
            t.unavailable("all", "needs root")
        return tables
    with scratch("p7") as d:
        root = d / "instance"
        uri = embed_root(root)
        names = [f"p7-{i:02d}" for i in range(count)]
        xmls = []
        for name in names:
            xml = d / f"{name}.xml"
            xml.write_text(domain_xml(name, make_disks(d, name, 1)))
            xmls.append(xml)
        ours = DaemonUnderTest(uri, root)
        ours.start()
        try:
            for xml in xmls:
                ours.cli("define", str(xml))
            our_list, our_start, our_mem, floor = Stats(), Stats(), {}, Stats()
            for _ in range(runs):
                our_list.add(ours.cli("list", "--all"))
                t0 = now()
                subprocess.run([str(Path(VMCONFINE).with_name("python")), "-c", "pass"],
                               check=True)
                floor.add(now() - t0)
            for _ in range(runs):
                our_start.add(ours.cli("start", "--paused", names[0]))
                ours.cli("destroy", names[0])
            our_mem[0] = rss_kib(ours.pid)
            ours.cli("start", "--paused", names[0])
            our_mem[1] = rss_kib(ours.pid)
            t0 = now()
            with ThreadPoolExecutor(len(names)) as pool:
                list(pool.map(lambda n: ours.cli("start", "--paused", n), names[1:]))
            our_conc = now() - t0
            time.sleep(0.5)
            our_mem[count] = rss_kib(ours.pid)
            ours.stop(signal.SIGKILL)
            our_reconnect = ours.start()
        finally:
            for name in names:
                with contextlib.suppress(RuntimeError):
                    ours.cli("destroy", name)
            ours.stop()
        peer_error = ""
        lv: dict[str, object] = {}
        try:
            with LibvirtPeer() as peer:
                for xml, name in zip(xmls, names, strict=True):
                    peer.define(xml, name)
                lv_list, lv_start = Stats(), Stats()
                for _ in range(runs):
                    lv_list.add(peer.timed_virsh("list", "--all"))
                for _ in range(runs):
                    lv_start.add(peer.timed_virsh("start", "--paused", names[0]))
                    peer.virsh("destroy", names[0])
                peer.timed_virsh("start", "--paused", names[0])
                lv["mem1"] = [rss_kib(p) for p in peer.daemon_pids()]
                t0 = now()
                with ThreadPoolExecutor(len(names)) as pool:
                    list(pool.map(lambda n: peer.timed_virsh("start", "--paused", n),
                                  names[1:]))
                lv["conc"] = now() - t0
                time.sleep(0.5)
                lv["memN"] = [rss_kib(p) for p in peer.daemon_pids()]
                lv["list"], lv["start"] = lv_list, lv_start
        except PeerUnavailable as exc:
            peer_error = str(exc)
    na = f"n/a ({peer_error})" if peer_error else "n/a"
    for k, key in ((1, "mem1"), (count, "memN")):
        rss, pss = our_mem[k]
        theirs = lv.get(key)
        t_rss = sum(r for r, _ in theirs) if isinstance(theirs, list) else None
        t_pss = sum(p for _, p in theirs) if isinstance(theirs, list) else None
        mem.add(f"{k}: RSS", mib(rss), mib(t_rss) if t_rss else na, ratio(rss, t_rss),
                verdict(rss / 1024 <= MEMORY_TARGET_MIB, f"<= {MEMORY_TARGET_MIB} MiB"))
        mem.add(f"{k}: PSS", mib(pss), mib(t_pss) if t_pss else na, ratio(pss, t_pss),
                verdict(pss / 1024 <= MEMORY_TARGET_MIB, f"<= {MEMORY_TARGET_MIB} MiB"))
    mem.add("0: idle RSS / PSS", f"{mib(our_mem[0][0])} / {mib(our_mem[0][1])}", "-", "n/a",
            "-")
    for label, mine, key, target in (("list --all", our_list, "list", LIST_TARGET),
                                     ("start --paused (1 disk)", our_start, "start",
                                      START_TARGET)):
        theirs = lv.get(key)
        peer_median = theirs.median if isinstance(theirs, Stats) else None
        r = mine.median / peer_median if peer_median else None
        cli.add(label, mine.fmt(), theirs.fmt() if isinstance(theirs, Stats) else na,
                ratio(mine.median, peer_median),
                verdict(None if r is None else r <= target, f"<= {target}x"))
    lv_list = lv.get("list")
    cli.add("floor: the venv's python -c pass", floor.fmt(),
            lv_list.fmt() if isinstance(lv_list, Stats) else na,
            ratio(floor.median, lv_list.median if isinstance(lv_list, Stats) else None),
            "report: the interpreter alone")
    t_conc = lv.get("conc")
    conc_ratio = our_conc / t_conc if isinstance(t_conc, float) else None
    conc.add(f"{count - 1} starts at once", f"{our_conc * 1000:.0f} ms",
             f"{t_conc * 1000:.0f} ms" if isinstance(t_conc, float) else na,
             ratio(our_conc, t_conc if isinstance(t_conc, float) else None),
             verdict(None if conc_ratio is None else conc_ratio <= CONCURRENT_TARGET,
                     f"<= {CONCURRENT_TARGET}x"))
    rec.add(f"{count} running, daemon killed -9", f"{our_reconnect * 1000:.0f} ms "
            "(start until its sockets listen, every domain re-verified)",
            "n/a (libvirtd reconnects in the background)", "n/a", "report")
    for t in tables:
        t.notes.append("vmconfine: the daemon and its CLI on an embed root, stack none, dac, "
                       "cgroups; libvirt: libvirtd + virtlogd and virsh; paused TCG guests")
    return tables


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, "P7 daemon", run, argv, full_runs=10, quick_runs=2)


if __name__ == "__main__":
    sys.exit(main())
