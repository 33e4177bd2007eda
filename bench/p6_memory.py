"""P6: memory of the vmconfine processes supervising 1 and 16 running domains, vs libvirt.

vmconfine: one ``vmconfine run --paused`` process per domain (the foreground supervisor, like
libvirt's virt-qemu-run), stack ``none, dac, cgroups`` on an embed instance. libvirt: one
libvirtd (+ virtlogd) holding the same domains, started with ``virsh start --paused``.
Measured once every domain is up: RSS and PSS (``/proc/PID/smaps_rollup``; PSS divides shared
pages between the processes that map them, so the sum of PSS is the real total) of the
supervising processes only — QEMU itself is the same on both sides and not counted.

This is the foreground model (``vmconfine run``, one supervisor per domain); the daemon, one
process for every domain, is measured by P7 (bench/p7_daemon.py).

usage: python -m bench.p6_memory [--quick]
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    VMCONFINE,
    Options,
    Stats,
    Table,
    bench_main,
    domain_xml,
    embed_root,
    finish_teardowns,
    is_root,
    make_disks,
    ratio,
    rss_kib,
    scratch,
)
from bench.libvirt_peer import LibvirtPeer, PeerUnavailable

STARTED_RE = re.compile(r"started \(id \d+, pid (\d+)\)")


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def vmconfine_memory(uri: str, xmls: list[Path]) -> tuple[list[tuple[int, int]], str]:
    """Start one ``vmconfine run --paused`` per XML; [(rss, pss)] of each once all are up."""
    procs: list[subprocess.Popen[str]] = []
    qemu_pids: list[int] = []
    error = ""
    try:
        for xml in xmls:
            p = subprocess.Popen([VMCONFINE, "-c", uri, "run", "--paused", str(xml)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            assert p.stdout is not None
            for line in p.stdout:
                m = STARTED_RE.search(line)
                if m:
                    qemu_pids.append(int(m.group(1)))
                    break
            else:
                error = (p.stderr.read() if p.stderr else "").strip()
                raise RuntimeError(f"vmconfine run {xml.name} did not start: {error}")
        time.sleep(0.5)  # let every supervisor settle in its wait loop
        return [rss_kib(p.pid) for p in procs], ""
    except RuntimeError as exc:
        return [], str(exc)
    finally:
        for pid in qemu_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def libvirt_memory(peer: LibvirtPeer, xmls: list[Path], names: list[str]) -> list[tuple[int, int]]:
    """libvirtd + virtlogd (RSS, PSS) with these domains running (paused)."""
    for xml, name in zip(xmls, names, strict=True):
        if name not in peer.defined:
            peer.define(xml, name)
        peer.timed_virsh("start", "--paused", name)
    time.sleep(0.5)
    out = [rss_kib(pid) for pid in peer.daemon_pids()]
    for name in names:
        peer.virsh("destroy", name)
    return out


def run(opts: Options) -> list[Table]:
    counts = (1, 4) if opts.quick else (1, 16)
    table = Table("P6: memory of the supervising processes (QEMU not counted)",
                  ["domains", "vmconfine", "libvirt (libvirtd + virtlogd)", "ratio", "target"])
    if not is_root():
        table.unavailable(", ".join(map(str, counts)), "needs root")
        return [table]
    with scratch("p6") as d:
        uri = embed_root(d / "instance")
        names = [f"p6-{i:02d}" for i in range(max(counts))]
        xmls = []
        for name in names:
            disks = make_disks(d, name, 1)
            xml = d / f"{name}.xml"
            xml.write_text(domain_xml(name, disks))
            xmls.append(xml)
        ours = {k: vmconfine_memory(uri, xmls[:k]) for k in counts}
        finish_teardowns(uri)
        theirs: dict[int, list[tuple[int, int]]] = {}
        peer_error = ""
        try:
            with LibvirtPeer() as peer:
                idle = [rss_kib(pid) for pid in peer.daemon_pids()]
                for k in counts:
                    theirs[k] = libvirt_memory(peer, xmls[:k], names[:k])
        except PeerUnavailable as exc:
            peer_error, idle = str(exc), []
    for k in counts:
        mine, error = ours[k]
        if not mine:
            table.unavailable(str(k), error)
            continue
        rss, pss = sum(r for r, _ in mine), sum(p for _, p in mine)
        per = Stats([r / 1024 for r, _ in mine])
        lv = theirs.get(k)
        lv_rss = sum(r for r, _ in lv) if lv else None
        lv_pss = sum(p for _, p in lv) if lv else None
        target = "report (the daemon: P7)" if k >= 16 else "report"
        table.add(f"{k}: total RSS ({k} process{'es' if k > 1 else ''})", mib(rss),
                  mib(lv_rss) if lv_rss else f"n/a ({peer_error})", ratio(rss, lv_rss), target)
        table.add(f"{k}: total PSS (shared pages counted once)", mib(pss),
                  mib(lv_pss) if lv_pss else "n/a", ratio(pss, lv_pss), "report")
        table.add(f"{k}: RSS per supervising process", f"{per.median:.1f} MiB", "-", "n/a",
                  "-")
    if idle:
        table.add("0: libvirt daemons idle (RSS / PSS)", "-",
                  f"{mib(sum(r for r, _ in idle))} / {mib(sum(p for _, p in idle))}", "n/a",
                  "-")
    table.notes += [
        "vmconfine: 'vmconfine run --paused' per domain (stack none, dac, cgroups); libvirt: "
        "'virsh start --paused'; guests are paused, which changes neither side's supervisor",
        "RSS/PSS from /proc/PID/smaps_rollup once every domain is up",
    ]
    return [table]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, "P6 memory", run, argv, full_runs=1, quick_runs=1)


if __name__ == "__main__":
    sys.exit(main())
