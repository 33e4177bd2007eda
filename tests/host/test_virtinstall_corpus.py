"""Domains as virt-install writes them run as they are (issue 22's "done when").

Every ready domain of the corpus (tests/virtinstall.py, tests/data/virtinstall/) goes through
what ``vmconfine domxml-to-native`` and ``vmconfine run --paused`` do, in this process (the
same functions, without a Python start-up per domain): every element must be implemented
(``unsupported_xml = "error"``), firmware auto-selection, the start pipeline with the
instance's default stack, QEMU paused under TCG; QMP is read once it is up and the domain is
torn down at once. One embed instance, one QEMU at a time.

Then the same XML goes through libvirt 9.0's ``domxml-to-native`` (its NICs removed: libvirt
turns them into tap devices) and QEMU started from libvirt's line must show the same VM over
QMP (tests/host/test_argv_libvirt.py's comparison, with our NIC and second monitor left out)
and the same flags (disks' block graphs, machine options, CPU, boot order, ``-global``s, the
audio backend).

Domains in ``waiting.json`` need a feature still being built; tests/unit/test_virtinstall_xml.py
checks that they fail today for exactly that feature. vmconfine's side runs in a network
namespace of the test's own holding the bridges the corpus names (``network='default'`` is
``virbr0`` through a network definition); libvirt's TPM line gets swtpm as libvirt starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

from tests import virtinstall
from tests.host.test_argv_libvirt import (
    LibvirtEmbed,
    comparable,
    flags,
    libvirt,  # noqa: F401 (fixture)
    options,
    run_libvirt,
    split_native,
)
from tests.host.test_argv_qmp import fake_bzimage, qemu_binary, qemu_img, read_view
from tests.support import require_root
from vmconfine.domain import Domain, parse_domain
from vmconfine.domain.support import enforce
from vmconfine.launch import pipeline
from vmconfine.launch.connection import Connection
from vmconfine.qemu import qmp

CONF = 'unsupported_xml = "error"\n'
#: the bridges the corpus names (``network=default`` is ``virbr0``, as libvirt's default network)
BRIDGES = ("br0", "virbr0", "virbr1")
DEFAULT_NETWORK = ("<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/>"
                   "</network>")
#: QEMU device types of guest NICs (left out of our view: libvirt's side has no NICs)
NIC_TYPES = {"virtio-net-pci", "e1000e", "e1000", "rtl8139"}


class Corpus:
    def __init__(self, root: Path, ns: str) -> None:
        self.root = root
        self.ns = ns
        self.scratch = root / "images"
        self.scratch.mkdir()
        (root / "i" / "etc" / "qemu" / "networks").mkdir(parents=True)
        (root / "i" / "etc" / "qemu.conf").write_text(CONF)
        (root / "i" / "etc" / "qemu" / "networks" / "default.xml").write_text(DEFAULT_NETWORK)
        self.conn = Connection.open(f"qemu:///embed?root={root / 'i'}")

    @contextlib.contextmanager
    def in_netns(self) -> Iterator[None]:
        """vmconfine's part runs in the test's network namespace, where the bridges are."""
        netns.pushns(self.ns)
        try:
            yield
        finally:
            netns.popns()


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    require_root()
    qemu_binary()
    # short: generated channel sockets live under the instance root (107-byte socket paths)
    root = Path(tempfile.mkdtemp(prefix="vi", dir="/tmp"))
    os.chmod(root, 0o755)
    ns = f"vmc-vi-{os.getpid()}-{root.name[-6:]}"
    netns.create(ns)  # the host's interfaces are never touched
    try:
        with NetNS(ns) as ipr:
            for bridge in BRIDGES:
                ipr.link("add", ifname=bridge, kind="bridge")
            for dev in ("lo", *BRIDGES):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
            # libvirt's default network address: with no IPv4 address but loopback's,
            # getaddrinfo(AI_ADDRCONFIG) refuses 127.0.0.1, where SPICE listens
            ipr.addr("add", index=ipr.link_lookup(ifname="virbr0")[0], address="192.168.122.1",
                     prefixlen=24)
        yield Corpus(root, ns)
    finally:
        netns.remove(ns)
        shutil.rmtree(root, ignore_errors=True)


def create_files(domain: Domain, scratch: Path) -> None:
    """The images, ISOs, kernel and initrd the domain names (all in ``scratch``)."""
    for disk in domain.disks:
        path = disk.source.path if disk.source is not None else None
        if path and not os.path.exists(path):
            fmt = "qcow2" if disk.source is not None and disk.source.format == "qcow2" else "raw"
            subprocess.run([qemu_img(), "create", "-q", "-f", fmt, path, "16M"], check=True)
    if domain.os.kernel and not os.path.exists(domain.os.kernel):
        fake_bzimage(Path(domain.os.kernel))
    if domain.os.initrd and not os.path.exists(domain.os.initrd):
        Path(domain.os.initrd).write_bytes(bytes(4096))
    for path in (scratch,):
        os.chmod(path, 0o755)


async def run_paused(conn: Connection, domain: Domain) -> dict[str, Any]:
    """Start as ``run --paused`` does, read QMP, destroy; return the view."""
    launched = await pipeline.start(conn, domain, paused=True)
    try:
        assert launched.client is not None
        return await read_view(launched.client)
    finally:
        if launched.client is not None:
            await qmp.disconnect(launched.client)
            launched.client = None
        launched.process.kill()
        await asyncio.wait_for(launched.process.exited.wait(), 30)
        assert pipeline.finish(conn, launched) == []


def ours_only(view: dict[str, Any]) -> dict[str, Any]:
    """Our view without what libvirt's side cannot have: the NIC, the second monitor."""
    nics = {k for k, v in view["peripheral"].items() if v in NIC_TYPES}
    view = dict(view)
    view["peripheral"] = {k: v for k, v in view["peripheral"].items() if k not in nics}
    view["pci"] = [(qid, cls) for qid, cls in view["pci"] if qid not in nics]
    view["chardev"] = {k: v for k, v in view["chardev"].items() if k != "charusermonitor"}
    return view


def replaced(value: Any, old: str, new: str) -> Any:
    """``value`` (a QMP view) with the string ``old`` replaced by ``new`` everywhere."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {replaced(k, old, new): replaced(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(replaced(v, old, new) for v in value)
    return value


def audio(argv: list[str]) -> list[str]:
    return [json.loads(v)["driver"] for v in options(argv, "-audiodev")]


def test_corpus_is_big_enough() -> None:
    assert len(virtinstall.CASES) >= 30
    assert len(virtinstall.READY) >= 30


@pytest.fixture(scope="module")
def libvirt_lines(corpus: Corpus, libvirt: LibvirtEmbed) -> dict[str, str]:  # noqa: F811
    """libvirt's command line of every ready domain (its NICs removed), in one virsh."""
    return libvirt.domxml_to_native_many({
        case: virtinstall.without_interfaces(
            virtinstall.for_host(virtinstall.text(case), corpus.scratch))
        for case in virtinstall.READY})


@pytest.mark.parametrize("case", virtinstall.READY)
def test_runs_as_written_and_as_libvirt_builds_it(case: str, corpus: Corpus,
                                                  libvirt_lines: dict[str, str]) -> None:
    xml = virtinstall.for_host(virtinstall.text(case), corpus.scratch)
    domain = parse_domain(xml, f"{case}.xml")
    assert enforce(domain, "error") == []
    create_files(domain, corpus.scratch)
    with corpus.in_netns():
        ours = pipeline.native_command(corpus.conn, parse_domain(xml, f"{case}.xml"))
        view = ours_only(asyncio.run(run_paused(corpus.conn, domain)))
    assert view["status"] == "prelaunch"
    assert (view["name"], view["uuid"]) == (domain.name, domain.uuid)
    assert corpus.conn.running() == []

    # libvirt 9.0, the same XML without NICs
    native = libvirt_lines[case]
    assert not native.startswith("error"), f"libvirt refused {case}: {native}"
    env, theirs = split_native(native)
    view_libvirt, nvram_theirs = run_libvirt(theirs, env, domain.os.nvram_template)
    if nvram_theirs is not None:  # each side has its own NVRAM file, made from one template
        view_libvirt = replaced(view_libvirt, nvram_theirs, str(domain.os.nvram))
        view_libvirt["nodes"] = sorted(view_libvirt["nodes"])
    assert comparable(view) == comparable(view_libvirt)
    mine = [ours.emulator, *ours.args]
    topology = bool(domain.cpu and domain.cpu.topology)
    assert flags(mine, topology) == flags(theirs, topology)
    assert options(mine, "-global") == options(theirs, "-global")
    if "<sound " in xml:  # libvirt 9.0 adds an unused "none" backend to every domain
        assert audio(mine) == audio(theirs)
