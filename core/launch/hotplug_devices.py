"""Hotplug of character devices and USB host devices into a running domain.

chardev attach: alias → journal intent → the listening socket created by vmconfine (socket
label through the stack, ``0600``, journaled like the start's sockets) → ``set_chardev_label``
on every driver → ``getfd`` (the socket goes over SCM_RIGHTS) → ``chardev-add`` with an
fd-backed socket backend → ``device_add`` → live XML (the alias as ``<alias name>``, a
generated path as in a start). detach: ``device_del`` → ``DEVICE_DELETED`` →
``chardev-remove`` → ``restore_chardev_label`` → the socket file removed → live XML.

USB hostdev attach: the node ``/dev/bus/usb/BBB/DDD`` (by address, or found by vendor/product
in sysfs) → journal → ``set_hostdev_label`` on every driver (DAC chown with the remembered
owner, cgroup device rule, the node in QEMU's private /dev, MAC labels) → vmconfine opens the
node and passes it in an fd set → ``device_add usb-host hostdevice=/dev/fdset/N``. detach
reverses it. A failure at any step undoes the steps before it; a crash is finished by
:func:`reconcile` when the daemon reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import TYPE_CHECKING, Any

from lxml import etree

from vmconfine.domain import Chardev, Domain, Hostdev, parse_domain
from vmconfine.errors import VmconfineError
from vmconfine.launch import hotplug, pipeline, preopen
from vmconfine.launch.hotplug import JOURNAL, UNPLUG_WAIT, call
from vmconfine.plugin.resources import usb_device_path
from vmconfine.qemu.argv_devices import UnsupportedConfigError
from vmconfine.qemu.hotplug import with_element, without_element
from vmconfine.qemu.hotplug_devices import (
    CHARDEV_ALIAS,
    free_alias,
    needs_controller,
    plan_chardev,
    plan_usb_hostdev,
)

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from vmconfine.launch.connection import Connection
    from vmconfine.launch.pipeline import Launched
    from vmconfine.plugin.context import DomainContext


# ---- aliases --------------------------------------------------------------------------------

def alias_of(el: etree._Element | None) -> str | None:
    """The ``<alias name>`` vmconfine gives a hotplugged device in the live XML."""
    found = el.find("alias") if el is not None else None
    return found.get("name") if found is not None else None


def _set_alias(el: etree._Element, alias: str) -> None:
    etree.SubElement(el, "alias").set("name", alias)


def chardev_alias(domain: Domain, chardev: Chardev) -> str:
    """A chardev's QEMU id: its ``<alias>``, else the one the command line gave it."""
    alias = alias_of(chardev.element)
    if alias:
        return alias
    if chardev.kind == "console" and (chardev.target_type or "serial") == "serial":
        return "serial0"  # the serial console is serial port 0 (libvirt's alias too)
    same = [c for c in domain.chardevs if c.kind == chardev.kind]
    return f"{CHARDEV_ALIAS.get(chardev.kind, chardev.kind)}{same.index(chardev)}"


def hostdev_alias(domain: Domain, hostdev: Hostdev) -> str:
    return alias_of(hostdev.element) or f"hostdev{domain.hostdevs.index(hostdev)}"


def stamp_aliases(domain: Domain) -> None:
    """Write the command line's alias into every chardev and hostdev of the live domain that
    has none, before the first chardev or hostdev hotplug changes the order they were
    numbered in (a later detach then finds the device QEMU has under that id)."""
    names = [(c.element, chardev_alias(domain, c)) for c in domain.chardevs
             if c.kind in CHARDEV_ALIAS]
    names += [(h.element, hostdev_alias(domain, h)) for h in domain.hostdevs]
    for el, alias in names:
        if el is not None and alias_of(el) is None:
            _set_alias(el, alias)


async def _taken(client: QMPClient) -> set[str]:
    """Device ids and chardev ids QEMU has."""
    devices = await call(client, "qom-list", {"path": "/machine/peripheral"})
    chardevs = await call(client, "query-chardev")
    return {str(d.get("name")) for d in devices} | {str(c.get("label")) for c in chardevs}


async def _has_controller(client: QMPClient, name: str, what: str) -> None:
    devices = await call(client, "qom-list", {"path": "/machine/peripheral"})
    if not any(d.get("name") == name for d in devices):
        raise VmconfineError(f"{what}: the domain has no controller '{name}' (controllers are "
                             "not hotplugged: add it to the definition and restart the domain)")


async def _unplug(client: QMPClient, alias: str, what: str,
                  unplugged: dict[str, asyncio.Future[None]]) -> None:
    """``device_del`` and wait for QEMU's DEVICE_DELETED (resolved by the daemon's reader)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    unplugged[alias] = future
    try:
        await call(client, "device_del", {"id": alias})
        try:
            await asyncio.wait_for(asyncio.shield(future), UNPLUG_WAIT)
        except TimeoutError:
            raise VmconfineError(f"{what}: the guest did not release the device within "
                                 f"{UNPLUG_WAIT:g}s (it stays attached)") from None
    finally:
        unplugged.pop(alias, None)


# ---- chardevs -------------------------------------------------------------------------------

def _new_chardev(domain: Domain, el: etree._Element) -> Chardev:
    return next(c for c in domain.chardevs if c.element is el)


def _generate_path(ctx: DomainContext, domain: Domain, chardev: Chardev, alias: str) -> None:
    """A virtio channel without a path gets one in the domain's channel directory (created
    ``0700``, vmconfine's own, journaled so that teardown removes it), in ``mode='bind'``."""
    directory = ctx.instance.channel_dir(ctx.domain.name)
    name = chardev.target_name if chardev.target_name and "/" not in chardev.target_name \
        and chardev.target_name not in (".", "..") else f"{alias}.sock"
    if not directory.exists():
        ctx.journal.record("pipeline", "mkdir", path=str(directory))
        directory.mkdir(mode=0o700, parents=True)
    path = str(directory / name)
    chardev.path, chardev.mode = path, "bind"
    assert chardev.element is not None
    src = chardev.element.find("source")
    if src is None:
        src = etree.Element("source")
        chardev.element.insert(0, src)
    src.set("mode", "bind")
    src.set("path", path)
    domain.generated_paths.append(path)


def _remove_socket(ctx: DomainContext, path: str | None) -> list[str]:
    if not path:
        return []
    return preopen.remove_sockets(
        [r for r in ctx.journal.records("pipeline", "socket") if r.get("path") == path],
        [r for r in ctx.journal.records("pipeline", "socket-inode") if r.get("path") == path])


def _begin_attach(launched: Launched, el: etree._Element,
                  ) -> tuple[QMPClient, DomainContext, Domain, etree._Element]:
    """The QMP client, the context, and the live domain with the device added (the start's
    aliases written first)."""
    assert launched.client is not None
    stamp_aliases(launched.ctx.domain)
    domain, new_el = with_element(launched.ctx.domain, el)
    return launched.client, launched.ctx, domain, new_el


async def attach_chardev(conn: Connection, launched: Launched, el: etree._Element) -> Chardev:
    """Attach one ``<serial>``/``<console>``/``<channel>``; all or nothing."""
    client, ctx, domain, new_el = _begin_attach(launched, el)
    chardev = _new_chardev(domain, new_el)
    if chardev.path and any(c.path == chardev.path for c in ctx.domain.chardevs):
        raise UnsupportedConfigError(f"domain '{ctx.domain.name}' already has a chardev at "
                                     f"{chardev.path}")
    alias = free_alias(CHARDEV_ALIAS.get(chardev.kind, chardev.kind), await _taken(client))
    if chardev.type == "unix" and not chardev.path:
        _generate_path(ctx, domain, chardev, alias)
    plan = plan_chardev(chardev, alias)
    controller = needs_controller(plan)
    if controller:
        await _has_controller(client, controller, f"<{chardev.kind}>")
    _set_alias(new_el, alias)
    ctx.journal.record(JOURNAL, "attach", kind="chardev", target=alias,
                       xml=domain.to_xml(live=True))
    sock = None
    if plan.listens:
        assert chardev.path is not None
        conn.stack.set("set_socket_label", ctx)
        try:
            sock = preopen.listen(ctx.journal, chardev.path)
        finally:
            conn.stack.restore("clear_socket_label", ctx)
    added = False
    try:
        conn.stack.set("set_chardev_label", ctx, chardev=chardev)
        pipeline.checkpoint("hotplug-labelled")
        try:
            if sock is not None:
                client.send_fd_scm(sock.fileno())
                await call(client, "getfd", {"fdname": plan.chardev_id})
            try:
                await call(client, "chardev-add", plan.backend)
            except VmconfineError as exc:
                if chardev.type == "pty" and "Permission denied" in str(exc):
                    raise VmconfineError(
                        f"<{chardev.kind} type='pty'>: QEMU may not open /dev/ptmx (its "
                        "confinement, fixed at start, grants it only to a domain started "
                        "with a pty chardev); use type='unix' with mode='bind'") from None
                raise
            added = True
            await call(client, "device_add", plan.device)
        except BaseException:
            with contextlib.suppress(VmconfineError):
                if added:
                    await call(client, "chardev-remove", {"id": plan.chardev_id})
                elif sock is not None:
                    await call(client, "closefd", {"fdname": plan.chardev_id})
            conn.stack.restore("restore_chardev_label", ctx, chardev=chardev)
            raise
    except BaseException:
        if sock is not None:
            sock.close()
            sock = None
        _remove_socket(ctx, chardev.path)
        ctx.journal.record(JOURNAL, "attach-undone", kind="chardev", target=alias)
        raise
    finally:
        if sock is not None:
            sock.close()  # QEMU holds its own copy
    ctx.domain = domain
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "attached", kind="chardev", target=alias)
    return chardev


def find_chardev(domain: Domain, el: etree._Element) -> Chardev:
    """The domain's chardev that ``el`` (detach-device's XML) names: same kind, type and target,
    and the same source path when one is given."""
    probe, new_el = with_element(domain, el)
    want = _new_chardev(probe, new_el)
    for c in domain.chardevs:
        if (c.kind, c.type, c.target_type or None, c.target_name) == \
                (want.kind, want.type, want.target_type or None, want.target_name) and \
                (not want.path or c.path == want.path):
            return c
    raise UnsupportedConfigError(f"domain '{domain.name}' has no matching <{want.kind}>")


async def detach_chardev(conn: Connection, launched: Launched, el: etree._Element,
                         unplugged: dict[str, asyncio.Future[None]]) -> Chardev:
    client = launched.client
    assert client is not None
    stamp_aliases(launched.ctx.domain)
    chardev = find_chardev(launched.ctx.domain, el)
    alias = chardev_alias(launched.ctx.domain, chardev)
    if alias not in await _taken(client):
        raise VmconfineError(f"<{chardev.kind}> {alias}: QEMU has no such device")
    await _detach(conn, launched, chardev, alias, f"<{chardev.kind}> {alias}", unplugged)
    return chardev


async def _detach(conn: Connection, launched: Launched, dev: Chardev | Hostdev, alias: str,
                  what: str, unplugged: dict[str, asyncio.Future[None]]) -> None:
    """Journal, unplug, then give everything back (chardev or hostdev)."""
    assert launched.client is not None
    kind = "chardev" if isinstance(dev, Chardev) else "hostdev"
    launched.ctx.journal.record(JOURNAL, "detach", kind=kind, target=alias)
    await _unplug(launched.client, alias, what, unplugged)
    if isinstance(dev, Chardev):
        await _finish_chardev_detach(conn, launched, dev, alias)
    else:
        await _finish_hostdev_detach(conn, launched, dev, alias)


async def _finish_chardev_detach(conn: Connection, launched: Launched, chardev: Chardev,
                                 alias: str) -> None:
    client, ctx = launched.client, launched.ctx
    assert client is not None
    with contextlib.suppress(VmconfineError):
        await call(client, "chardev-remove", {"id": f"char{alias}"})
    conn.stack.restore("restore_chardev_label", ctx, chardev=chardev)
    _remove_socket(ctx, chardev.path)
    assert chardev.element is not None
    domain = without_element(ctx.domain, chardev.element)
    if chardev.path in domain.generated_paths:
        domain.generated_paths.remove(chardev.path)
    ctx.domain = domain
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "detached", kind="chardev", target=alias)


# ---- USB host devices -----------------------------------------------------------------------

def _usb_name(h: Hostdev) -> str:
    if h.bus is not None and h.device is not None:
        return f"bus {h.bus:03d} device {h.device:03d}"
    return f"{h.vendor or 0:04x}:{h.product or 0:04x}"


def _same_usb(a: Hostdev, b: Hostdev) -> bool:
    if a.type != "usb" or b.type != "usb":
        return False
    if a.vendor is not None and b.vendor is not None:
        return (a.vendor, a.product) == (b.vendor, b.product)
    return (a.bus, a.device) == (b.bus, b.device)


def _open_usb(h: Hostdev) -> tuple[str, int]:
    path = usb_device_path(h)
    fix = "plug it in, or check the ids with lsusb"
    if path is None or not os.path.exists(path):
        raise VmconfineError(f"USB device {_usb_name(h)} is not on this host; {fix}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VmconfineError(f"cannot open USB device {path}: {exc.strerror}") from None
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        raise VmconfineError(f"{path} is not a character device")
    return path, fd


async def attach_hostdev(conn: Connection, launched: Launched, el: etree._Element) -> Hostdev:
    """Attach one USB ``<hostdev>``; all or nothing."""
    client, ctx, domain, new_el = _begin_attach(launched, el)
    hostdev = next(h for h in domain.hostdevs if h.element is new_el)
    plan_usb_hostdev(domain, conn.instance.config, hostdev, "check", 0)  # refusals first
    if any(_same_usb(h, hostdev) for h in ctx.domain.hostdevs):
        raise UnsupportedConfigError(f"USB device {_usb_name(hostdev)} is already attached "
                                     f"to domain '{ctx.domain.name}'")
    alias = free_alias("hostdev", await _taken(client))
    device = plan_usb_hostdev(domain, conn.instance.config, hostdev, alias, 0)
    await _has_controller(client, str(device["bus"]).split(".")[0], "USB host device")
    _path, fd = _open_usb(hostdev)
    try:
        _set_alias(new_el, alias)
        ctx.journal.record(JOURNAL, "attach", kind="hostdev", target=alias,
                           xml=domain.to_xml(live=True))
        conn.stack.set("set_hostdev_label", ctx, hostdev=hostdev)
        pipeline.checkpoint("hotplug-labelled")
        fdsets: list[int] = []
        try:
            client.send_fd_scm(fd)
            reply = await call(client, "add-fd", {"opaque": f"vmconfine:{alias}"})
            fdsets.append(int(reply["fdset-id"]))
            device["hostdevice"] = f"/dev/fdset/{fdsets[0]}"
            await call(client, "device_add", device)
        except BaseException:
            await hotplug.undo_nodes(client, [], fdsets)
            conn.stack.restore("restore_hostdev_label", ctx, hostdev=hostdev)
            ctx.journal.record(JOURNAL, "attach-undone", kind="hostdev", target=alias)
            raise
    finally:
        os.close(fd)  # QEMU holds its own copy
    ctx.domain = domain
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "attached", kind="hostdev", target=alias, fdsets=fdsets)
    return hostdev


def find_hostdev(domain: Domain, el: etree._Element) -> Hostdev:
    probe, new_el = with_element(domain, el)
    want = next(h for h in probe.hostdevs if h.element is new_el)
    found = next((h for h in domain.hostdevs if _same_usb(h, want)), None)
    if found is None:
        raise UnsupportedConfigError(f"domain '{domain.name}' has no USB host device "
                                     f"{_usb_name(want)}")
    return found


def _fdsets(ctx: DomainContext, alias: str) -> list[int]:
    rec = next((r for r in reversed(ctx.journal.records(JOURNAL, "attached"))
                if r.get("target") == alias and r.get("kind") == "hostdev"), None)
    return list(rec.get("fdsets", [])) if rec is not None else []


async def detach_hostdev(conn: Connection, launched: Launched, el: etree._Element,
                         unplugged: dict[str, asyncio.Future[None]]) -> Hostdev:
    stamp_aliases(launched.ctx.domain)
    hostdev = find_hostdev(launched.ctx.domain, el)
    alias = hostdev_alias(launched.ctx.domain, hostdev)
    await _detach(conn, launched, hostdev, alias, f"USB device {_usb_name(hostdev)}",
                  unplugged)
    return hostdev


async def _finish_hostdev_detach(conn: Connection, launched: Launched, hostdev: Hostdev,
                                 alias: str) -> None:
    client, ctx = launched.client, launched.ctx
    assert client is not None
    await hotplug.undo_nodes(client, [], _fdsets(ctx, alias))
    conn.stack.restore("restore_hostdev_label", ctx, hostdev=hostdev)
    assert hostdev.element is not None
    ctx.domain = without_element(ctx.domain, hostdev.element)
    pipeline.write_status(conn, launched)
    ctx.journal.record(JOURNAL, "detached", kind="hostdev", target=alias)


# ---- the definition (--config) ----------------------------------------------------------------

def config_with_element(definition: Domain, el: etree._Element) -> Domain:
    """The inactive definition with the device added."""
    if el.tag == "disk":
        return hotplug.config_with_device(definition, etree.tostring(el).decode())
    new, _el = with_element(definition, el)
    return parse_domain(new.to_xml(live=False), live=False)


def config_without_element(definition: Domain, el: etree._Element) -> Domain:
    """The inactive definition without the device ``el`` names."""
    if el.tag == "disk":
        return hotplug.config_without_disk(definition,
                                           hotplug.device_target(etree.tostring(el).decode()))
    found = find_hostdev(definition, el) if el.tag == "hostdev" else \
        find_chardev(definition, el)
    assert found.element is not None
    new = without_element(definition, found.element)
    return parse_domain(new.to_xml(live=False), live=False)


# ---- crash recovery -------------------------------------------------------------------------

def _by_alias(domain: Domain, kind: str, alias: str) -> Chardev | Hostdev | None:
    if kind == "chardev":
        return next((c for c in domain.chardevs if chardev_alias(domain, c) == alias), None)
    return next((h for h in domain.hostdevs if hostdev_alias(domain, h) == alias), None)


async def reconcile(conn: Connection, launched: Launched) -> list[str]:
    """:func:`vmconfine.launch.hotplug.reconcile` for chardevs and hostdevs: an attach QEMU
    completed is kept, one it did not is rolled back (socket removed, labels given back); a
    detach QEMU completed is finished."""
    client = launched.client
    assert client is not None
    ctx = launched.ctx
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in ctx.journal.records(JOURNAL):
        if rec.get("kind") in ("chardev", "hostdev"):
            last[(rec["kind"], str(rec.get("target")))] = rec
    if not any(r["op"] in ("attach", "detach") for r in last.values()):
        return []
    taken = await _taken(client)
    done = []
    for (kind, alias), rec in last.items():
        if rec["op"] == "attach":
            domain = parse_domain(rec["xml"], source=str(ctx.journal.path), live=True)
            dev = _by_alias(domain, kind, alias)
            if alias in taken:
                ctx.domain = domain
                ctx.journal.record(JOURNAL, "attached", kind=kind, target=alias, fdsets=[])
                done.append(f"attach of {kind} {alias} completed")
                continue
            if isinstance(dev, Chardev):
                with contextlib.suppress(VmconfineError):
                    await call(client, "chardev-remove", {"id": f"char{alias}"})
                conn.stack.restore("restore_chardev_label", ctx, chardev=dev)
                _remove_socket(ctx, dev.path)
            elif isinstance(dev, Hostdev):
                conn.stack.restore("restore_hostdev_label", ctx, hostdev=dev)
            ctx.journal.record(JOURNAL, "attach-undone", kind=kind, target=alias)
            done.append(f"attach of {kind} {alias} rolled back")
        elif rec["op"] == "detach":
            dev = _by_alias(ctx.domain, kind, alias)
            if alias in taken or dev is None:
                ctx.journal.record(JOURNAL, "detach-undone", kind=kind, target=alias)
                done.append(f"detach of {kind} {alias} not done by QEMU: still attached")
                continue
            if isinstance(dev, Chardev):
                await _finish_chardev_detach(conn, launched, dev, alias)
            else:
                await _finish_hostdev_detach(conn, launched, dev, alias)
            done.append(f"detach of {kind} {alias} completed")
    if done:
        pipeline.write_status(conn, launched)
    return done
