"""Hotplug of disks into a running domain, through the stack's per-device hooks.

attach: plan (argv builder) → journal intent → ``set_image_label`` of every driver (DAC chown,
SELinux image label, AppArmor profile update, cgroup device rule: one transaction, rolled back
in reverse on failure) → fds opened by vmconfine and passed (``add-fd``) → ``blockdev-add`` per
node → ``device_add`` → live XML. detach: ``device_del`` → QEMU's ``DEVICE_DELETED`` →
``blockdev-del`` → ``remove-fd`` → ``restore_image_label`` → live XML. A failure at any step
undoes the steps before it. Each step is journaled, so a crash mid-way is finished when the
daemon reconnects (:func:`reconcile`): what the QEMU does not have is rolled back, what it has
is recorded in the live XML.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from typing import TYPE_CHECKING, Any

from lxml import etree
from qemu.qmp import QMPClient

from vmconfine.domain import Disk, Domain, parse_domain
from vmconfine.domain.chain import resolve_chain
from vmconfine.errors import LaunchError, VmconfineError, XMLError
from vmconfine.launch import pipeline
from vmconfine.qemu.hotplug import DiskPlan, plan_disk, with_device, without_disk

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection
    from vmconfine.launch.pipeline import Launched

log = logging.getLogger(__name__)

JOURNAL = "hotplug"
UNPLUG_WAIT = 10.0
_NODE = re.compile(r"^vmc-(\d+)-")


async def call(client: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await client.execute(command, args)
    except Exception as exc:
        raise LaunchError(f"QMP {command} failed: {exc}") from None


async def _next_node(client: QMPClient) -> int:
    nodes = await call(client, "query-named-block-nodes")
    numbers = [int(m.group(1)) for n in nodes if (m := _NODE.match(str(n.get("node-name"))))]
    return max(numbers, default=0) + 100


async def _pass_fds(client: QMPClient, plan: DiskPlan, fdsets: list[int]) -> None:
    """Open each image (no symlink in the last component, regular file or block device only)
    and give QEMU the descriptors in an fd set (each set in ``fdsets`` as soon as it exists,
    for the caller's undo); point the storage node at ``/dev/fdset/N``."""
    for node in plan.storage_nodes:
        path = node["filename"]
        readonly = any(n.get("file") == node["node-name"] and n.get("read-only")
                       for n in plan.blockdevs)
        # QEMU takes from a set the descriptor whose access mode it asks for: read-only first
        # (auto-read-only), read-write when the node is writable
        modes = [os.O_RDONLY] if readonly else [os.O_RDONLY, os.O_RDWR]
        fdset: int | None = None
        for mode in modes:
            try:
                fd = os.open(path, mode | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise VmconfineError(f"cannot open {path} for the guest: "
                                     f"{exc.strerror}") from None
            try:
                st_mode = os.fstat(fd).st_mode
                if not (stat.S_ISREG(st_mode) or stat.S_ISBLK(st_mode)):
                    raise VmconfineError(f"{path} is neither a regular file nor a block device")
                client.send_fd_scm(fd)
                args: dict[str, Any] = {"opaque": f"vmconfine:{plan.disk.target}"}
                if fdset is not None:
                    args["fdset-id"] = fdset
                reply = await call(client, "add-fd", args)
            finally:
                os.close(fd)
            if fdset is None:
                fdset = int(reply["fdset-id"])
                fdsets.append(fdset)
        node["filename"] = f"/dev/fdset/{fdset}"


async def add_nodes(client: QMPClient, plan: DiskPlan, fdsets: list[int],
                    added: list[str]) -> None:
    """Pass the images (fd sets) and ``blockdev-add`` every node of ``plan``, bottom first;
    what exists is in ``fdsets`` and ``added`` as soon as it does (for the caller's undo)."""
    await _pass_fds(client, plan, fdsets)
    for node in plan.blockdevs:
        await call(client, "blockdev-add", node)
        added.append(node["node-name"])


async def attach_disk(conn: Connection, launched: Launched, device_xml: str) -> Disk:
    """Attach one ``<disk>`` to the running domain; return it. All or nothing."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    domain, disk = with_device(ctx.domain, device_xml)
    if disk.source is not None and disk.type in ("file", "block"):
        resolve_chain(disk.source)
    plan = plan_disk(domain, conn.instance.config, disk, await _next_node(client))
    await _check_bus(client, plan)
    ctx.journal.record(JOURNAL, "attach", target=disk.target, xml=domain.to_xml(live=True),
                       nodes=plan.node_names, device=plan.device.get("id"))
    conn.stack.set("set_image_label", ctx, disk=disk)
    pipeline.checkpoint("hotplug-labelled")
    fdsets: list[int] = []
    added: list[str] = []
    try:
        await add_nodes(client, plan, fdsets, added)
        await call(client, "device_add", plan.device)
    except BaseException:
        await undo_nodes(client, added, fdsets)
        conn.stack.restore("restore_image_label", ctx, disk=disk)
        ctx.journal.record(JOURNAL, "attach-undone", target=disk.target)
        raise
    ctx.domain = domain
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "attached", target=disk.target, fdsets=fdsets)
    return disk


async def _check_bus(client: QMPClient, plan: DiskPlan) -> None:
    bus = plan.device.get("bus")
    if not bus:
        return
    # a PCI bus is its controller's id (pci.N, a pcie-root-port); others are "ID.N"
    controller = str(bus) if str(bus).startswith("pci.") else str(bus).split(".")[0]
    children = await call(client, "qom-list", {"path": "/machine/peripheral"})
    if not any(c.get("name") == controller for c in children):
        raise VmconfineError(f"disk {plan.disk.target}: the domain has no controller "
                             f"'{controller}' (controllers are not hotplugged: add it to the "
                             "definition and restart the domain)")


async def undo_nodes(client: QMPClient, nodes: list[str], fdsets: list[int]) -> None:
    """Delete block ``nodes`` (given bottom first; deleted top first) and remove ``fdsets``,
    ignoring what QEMU no longer has."""
    for name in reversed(nodes):
        with contextlib.suppress(LaunchError):
            await call(client, "blockdev-del", {"node-name": name})
    for fdset in fdsets:
        with contextlib.suppress(LaunchError):
            await call(client, "remove-fd", {"fdset-id": fdset})


async def detach_disk(conn: Connection, launched: Launched, target: str,
                      deleted: asyncio.Future[None]) -> Disk:
    """Detach disk ``target``: ask QEMU to unplug the device, wait for ``deleted`` (resolved by
    the caller on QEMU's DEVICE_DELETED event), then free its nodes and give back labels."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    domain, disk = without_disk(ctx.domain, target)
    plan = plan_disk(ctx.domain, conn.instance.config, disk, 0)
    device_id = plan.device.get("id")
    if not device_id:
        raise VmconfineError(f"disk {target} has no device id to unplug")
    ctx.journal.record(JOURNAL, "detach", target=target)
    await call(client, "device_del", {"id": device_id})
    try:
        await asyncio.wait_for(asyncio.shield(deleted), UNPLUG_WAIT)
    except TimeoutError:
        raise VmconfineError(f"disk {target}: the guest did not release the device within "
                             f"{UNPLUG_WAIT:g}s (it may ignore the unplug request; it stays "
                             "attached)") from None
    if _has_device(await call(client, "query-block"), device_id):
        raise VmconfineError(f"disk {target}: QEMU still has the device")
    nodes = await _disk_nodes(client, ctx, target)
    await undo_nodes(client, nodes, _fdsets(ctx, target))
    conn.stack.restore("restore_image_label", ctx, disk=disk)
    ctx.domain = domain
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "detached", target=target)
    return disk


def _has_device(block: list[dict[str, Any]], device_id: str) -> bool:
    """Whether query-block lists the device (``ID``, or ``/machine/peripheral/ID/...`` for
    virtio devices)."""
    return any(q == device_id or q.endswith(f"/{device_id}") or f"/{device_id}/" in q
               for q in (str(b.get("qdev", "")) for b in block))


async def _disk_nodes(client: QMPClient, ctx: Any, target: str) -> list[str]:
    """The node names of a disk attached by hotplug (from the journal), or of the start (by
    following the device's block graph)."""
    rec = next((r for r in reversed(ctx.journal.records(JOURNAL, "attach"))
                if r.get("target") == target), None)
    if rec is not None:
        return list(rec.get("nodes", []))
    return []


def _fdsets(ctx: Any, target: str) -> list[int]:
    rec = next((r for r in reversed(ctx.journal.records(JOURNAL, "attached"))
                if r.get("target") == target), None)
    return list(rec.get("fdsets", [])) if rec is not None else []


async def reconcile(conn: Connection, launched: Launched) -> list[str]:
    """After a crash of the daemon: finish each hotplug the journal shows unfinished. An attach
    QEMU completed is recorded in the live XML, one it did not is rolled back (labels given
    back); a detach whose device QEMU removed is finished, one it did not is left attached.
    Returns what was done, for the log."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    last: dict[str, dict[str, Any]] = {}
    for rec in ctx.journal.records(JOURNAL):
        if rec.get("kind", "disk") == "disk":  # chardevs, hostdevs: hotplug_devices
            last[str(rec.get("target"))] = rec
    block = await call(client, "query-block")

    def present(device_id: object) -> bool:
        return _has_device(block, str(device_id))

    done = []
    for target, rec in last.items():
        if rec["op"] == "attach":
            domain = parse_domain(rec["xml"], source=str(ctx.journal.path), live=True)
            disk = next(d for d in domain.disks if d.target == target)
            if present(rec.get("device")):
                ctx.domain = domain
                ctx.journal.record(JOURNAL, "attached", target=target, fdsets=[])
                done.append(f"attach of {target} completed")
            else:
                await undo_nodes(client, list(rec.get("nodes", [])), [])
                conn.stack.restore("restore_image_label", ctx, disk=disk)
                ctx.journal.record(JOURNAL, "attach-undone", target=target)
                done.append(f"attach of {target} rolled back")
        elif rec["op"] == "detach":
            domain, disk = without_disk(ctx.domain, target)
            device_id = plan_disk(ctx.domain, conn.instance.config, disk, 0).device.get("id")
            if present(device_id):
                ctx.journal.record(JOURNAL, "detach-undone", target=target)
                done.append(f"detach of {target} not done by QEMU: still attached")
                continue
            await undo_nodes(client, await _disk_nodes(client, ctx, target),
                              _fdsets(ctx, target))
            conn.stack.restore("restore_image_label", ctx, disk=disk)
            ctx.domain = domain
            ctx.journal.record(JOURNAL, "detached", target=target)
            done.append(f"detach of {target} completed")
    if done:
        pipeline.write_status(conn, launched)
    return done


def device_target(device_xml: str) -> str:
    """The ``<target dev>`` of a ``<disk>`` given to detach-device."""
    try:
        el = etree.fromstring(device_xml.encode(),
                              etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise XMLError(f"device XML: {exc}") from None
    target = el.find("target") if el.tag == "disk" else None
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise XMLError("device XML: give the <disk> with its <target dev='...'/>")
    return dev


def device_id(conn: Connection, domain: Domain, disk: Disk) -> str:
    """The QEMU device id of ``disk`` (the command line's alias)."""
    return str(plan_disk(domain, conn.instance.config, disk, 0).device.get("id", ""))


def config_with_device(definition: Domain, device_xml: str) -> Domain:
    """The inactive definition with the disk added (``--config``)."""
    new, _disk = with_device(definition, device_xml)
    return parse_domain(new.to_xml(live=False), live=False)


def config_without_disk(definition: Domain, target: str) -> Domain:
    new, _disk = without_disk(definition, target)
    return parse_domain(new.to_xml(live=False), live=False)
