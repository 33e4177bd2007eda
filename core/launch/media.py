"""``change-media``: eject, insert or update the medium of a CD-ROM or floppy drive of a
running domain, through the stack's image hooks (virsh's ``change-media``).

Eject: ``blockdev-open-tray`` → ``blockdev-remove-medium`` → the old medium's nodes deleted
(``blockdev-del``) and its fd sets removed → ``restore_image_label`` of the old medium (DAC
gives the remembered owner back, the cgroup rule goes, the AppArmor profile is regenerated
without it). Insert: ``set_image_label`` of the new medium on every driver (one transaction)
→ vmconfine opens the image and passes it in an fd set (``add-fd``; a QEMU confined by
Landlock at exec needs no new path) → ``blockdev-add`` per node → ``blockdev-insert-medium``
→ ``blockdev-close-tray``. Update is eject then insert. Before anything changes the new
image is resolved and opened once (a missing file or a non-image is refused with nothing
changed); a failure while inserting undoes the insert (the drive is then empty, as the
error says).

Each step is journaled (group ``media``): :func:`reconcile` finishes a change a crash
interrupted, from what QEMU's ``query-block`` shows.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from lxml import etree
from qemu.qmp import QMPClient

from vmconfine.domain import Disk, Domain, parse_domain
from vmconfine.domain.chain import resolve_chain
from vmconfine.errors import LaunchError, VmconfineError
from vmconfine.launch import pipeline
from vmconfine.launch.hotplug import (
    JOURNAL,
    _has_device,
    _next_node,
    add_nodes,
    call,
    undo_nodes,
)
from vmconfine.qemu.argv_devices import UnsupportedConfigError
from vmconfine.qemu.hotplug import DiskPlan, plan_drive

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection
    from vmconfine.launch.pipeline import Launched

MEDIA = "media"
ACTIONS = ("eject", "insert", "update")
REMOVABLE = ("cdrom", "floppy")
DONE = {"eject": "Successfully ejected media.", "insert": "Successfully inserted media.",
        "update": "Successfully updated media."}


def find_drive(domain: Domain, target: str) -> Disk:
    """The removable drive ``target`` names (its ``<target dev>`` or its medium's path)."""
    disk = next((d for d in domain.disks if d.target == target), None) or next(
        (d for d in domain.disks if d.source is not None and d.source.path == target), None)
    if disk is None:
        raise UnsupportedConfigError(f"No disk found whose source path or target is {target}")
    if disk.device not in REMOVABLE:
        raise UnsupportedConfigError(f"The disk device '{disk.target}' is not removable "
                                     "(change-media takes a cdrom or floppy drive)")
    return disk


def with_source(domain: Domain, disk: Disk, source: str | None, *,
                live: bool = True) -> tuple[Domain, Disk]:
    """``domain`` with the medium of ``disk`` replaced by ``source`` (None: an empty drive)."""
    tree = etree.fromstring(domain.to_xml(live=live).encode())
    assert disk.element is not None
    el = tree.getroottree().xpath(domain.tree.getpath(disk.element))[0]
    for old in el.findall("source") + el.findall("backingStore"):
        el.remove(old)
    if source is not None:
        if not os.path.isabs(source):
            raise UnsupportedConfigError(f"medium {source!r} is not an absolute path")
        block = os.path.exists(source) and stat.S_ISBLK(os.stat(source).st_mode)
        el.set("type", "block" if block else "file")
        src = etree.Element("source")
        src.set("dev" if block else "file", source)
        driver = el.find("driver")
        el.insert(el.index(driver) + 1 if driver is not None else 0, src)
    new = parse_domain(etree.tostring(tree).decode(), source="<change-media>", live=live)
    return new, next(d for d in new.disks if d.target == disk.target)


def _check_image(path: str) -> None:
    """Open the new medium once, as :func:`_pass_fds` will: refuse early, changing nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VmconfineError(f"cannot open {path} for the guest: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise VmconfineError(f"{path} is neither a regular file nor a block device")


async def _medium(client: QMPClient, device_id: str) -> str | None:
    """The top node of the medium QEMU has in the drive, or None when it is empty."""
    for b in await call(client, "query-block"):
        if _has_device([b], device_id):
            inserted = b.get("inserted")
            return str(inserted["node-name"]) if inserted else None
    raise VmconfineError(f"QEMU has no drive {device_id}")


async def _chain(client: QMPClient, top: str) -> list[str]:
    """``top`` and every node below it, parents first (the order ``blockdev-del`` needs)."""
    graph = await call(client, "x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"] if n.get("type") == "block-driver"}
    ids = {v: k for k, v in names.items()}
    out, queue = [], [ids[top]] if top in ids else []
    while queue:
        node = queue.pop(0)
        if names[node] in out:
            continue
        out.append(names[node])
        queue += [e["child"] for e in graph["edges"] if e["parent"] == node
                  and e["child"] in names]
    return out


def _fdsets(ctx: Any, target: str) -> list[int]:
    """The fd sets of the medium in drive ``target`` (passed by change-media or attach)."""
    for group, op in ((MEDIA, "changed"), (JOURNAL, "attached")):
        rec = next((r for r in reversed(ctx.journal.records(group, op))
                    if r.get("target") == target), None)
        if rec is not None:
            return list(rec.get("fdsets", []))
    return []


async def change_media(conn: Connection, launched: Launched, target: str,
                       source: str | None, action: str, *, force: bool = False) -> str:
    """Change the medium of drive ``target``; return virsh's line for what was done."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    disk = find_drive(ctx.domain, target)
    action, has = _validate(disk, source, action)
    empty, _ = with_source(ctx.domain, disk, None)
    device_id = str(plan_drive(ctx.domain, conn.instance.config, disk, 0).device.get("id"))
    plan: DiskPlan | None = None
    new: tuple[Domain, Disk] | None = None
    if action != "eject":
        assert source is not None
        new = with_source(ctx.domain, disk, source)
        resolve_chain(new[1].source)
        _check_image(source)
        plan = plan_drive(new[0], conn.instance.config, new[1], await _next_node(client))
    ctx.journal.record(MEDIA, "change", target=disk.target, device=device_id,
                       old=ctx.domain.to_xml(live=True),
                       new=new[0].to_xml(live=True) if new else None,
                       nodes=plan.node_names if plan else [])
    if has:
        await _eject(conn, launched, disk, device_id, empty, force=force)
    fdsets: list[int] = []
    if new is not None and plan is not None:
        fdsets = await _insert(conn, launched, new, plan, device_id, empty, force=force)
    ctx.journal.record(MEDIA, "changed", target=disk.target, fdsets=fdsets)
    return DONE[action]


def _validate(disk: Disk, source: str | None, action: str) -> tuple[str, bool]:
    if action not in ACTIONS:
        raise UnsupportedConfigError(f"unknown media action '{action}'; use --eject, --insert "
                                     "or --update")
    has = disk.source is not None and bool(disk.source.path)
    if action == "update" and not source:
        action = "eject"  # virsh: --update without a source ejects
    if action == "eject" and not has:
        raise UnsupportedConfigError(f"The disk device '{disk.target}' doesn't have media")
    if action == "insert" and has:
        raise UnsupportedConfigError(f"The disk device '{disk.target}' already has media")
    if action == "insert" and not source:
        raise UnsupportedConfigError("No source is given for inserting media")
    return action, has


async def _eject(conn: Connection, launched: Launched, disk: Disk, device_id: str,
                 empty: Domain, *, force: bool) -> None:
    client, ctx = launched.client, launched.ctx
    assert client is not None
    top = await _medium(client, device_id)
    await call(client, "blockdev-open-tray", {"id": device_id, "force": force})
    try:
        await call(client, "blockdev-remove-medium", {"id": device_id})
    except LaunchError as exc:
        raise VmconfineError(f"the guest keeps the tray of {disk.target} locked ({exc}); "
                             "use --force to open it anyway") from None
    await undo_nodes(client, list(reversed(await _chain(client, top))) if top else [],
                     _fdsets(ctx, disk.target))
    ctx.domain = empty
    conn.stack.restore("restore_image_label", ctx, disk=disk)
    ctx.journal.record(MEDIA, "ejected", target=disk.target)
    pipeline.write_status(conn, launched)


async def _insert(conn: Connection, launched: Launched, new: tuple[Domain, Disk],
                  plan: DiskPlan, device_id: str, empty: Domain, *, force: bool) -> list[int]:
    client, ctx = launched.client, launched.ctx
    assert client is not None
    domain, disk = new
    ctx.journal.record(MEDIA, "labelling", target=disk.target)
    ctx.domain = domain  # the drivers see the new medium in the domain (AppArmor's profile)
    try:
        conn.stack.set("set_image_label", ctx, disk=disk)
    except BaseException:
        ctx.domain = empty
        pipeline.write_status(conn, launched)
        ctx.journal.record(MEDIA, "change-undone", target=disk.target)
        raise
    pipeline.checkpoint("media-labelled")
    fdsets: list[int] = []
    added: list[str] = []
    try:
        await add_nodes(client, plan, fdsets, added)
        await call(client, "blockdev-open-tray", {"id": device_id, "force": force})
        await call(client, "blockdev-insert-medium",
                   {"id": device_id, "node-name": plan.node_names[-1]})
        await call(client, "blockdev-close-tray", {"id": device_id})
    except BaseException:
        await undo_nodes(client, added, fdsets)
        conn.stack.restore("restore_image_label", ctx, disk=disk)
        ctx.domain = empty
        pipeline.write_status(conn, launched)
        ctx.journal.record(MEDIA, "change-undone", target=disk.target)
        raise
    pipeline.write_status(conn, launched)
    return fdsets


async def reconcile(conn: Connection, launched: Launched) -> list[str]:
    """After a crash of the daemon: finish each media change the journal shows unfinished."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    last: dict[str, dict[str, Any]] = {}
    first: dict[str, dict[str, Any]] = {}
    for rec in ctx.journal.records(MEDIA):
        last[str(rec["target"])] = rec
        if rec["op"] == "change":
            first[str(rec["target"])] = rec
    done = []
    for target, rec in last.items():
        if rec["op"] in ("changed", "change-undone"):
            continue
        intent = first[target]
        old_domain = parse_domain(intent["old"], source=str(ctx.journal.path), live=True)
        old = find_drive(old_domain, target)
        empty, _ = with_source(old_domain, old, None)
        top = await _medium(client, str(intent["device"]))
        nodes = list(intent.get("nodes", []))
        if rec["op"] == "labelling" and nodes and top == nodes[-1]:
            ctx.domain = parse_domain(intent["new"], source=str(ctx.journal.path), live=True)
            ctx.journal.record(MEDIA, "changed", target=target, fdsets=[])
            done.append(f"media change of {target} completed")
            continue
        if rec["op"] == "labelling":
            await undo_nodes(client, nodes, [])
            new = find_drive(parse_domain(intent["new"], source=str(ctx.journal.path),
                                          live=True), target)
            conn.stack.restore("restore_image_label", ctx, disk=new)
        elif rec["op"] == "change" and top is not None:
            continue  # nothing was changed yet
        elif rec["op"] == "change":
            conn.stack.restore("restore_image_label", ctx, disk=old)
        ctx.domain = empty
        ctx.journal.record(MEDIA, "change-undone", target=target)
        done.append(f"media change of {target} rolled back: the drive is empty")
    if done:
        pipeline.write_status(conn, launched)
    return done


def config_with_media(definition: Domain, target: str, source: str | None) -> Domain:
    """The inactive definition with drive ``target``'s medium replaced (``--config``)."""
    disk = find_drive(definition, target)
    new, _disk = with_source(definition, disk, source, live=False)
    return new
