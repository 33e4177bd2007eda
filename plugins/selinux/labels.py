"""Which context each resource of a domain gets: libvirt's per-resource SELinux rules.

Input: the domain's ``<seclabel model='selinux'>`` (after label generation), the policy
contexts and :class:`vmconfine.plugin.resources.Resource` objects. Output: one :class:`Plan`
per path
to relabel. Rules (``security_selinux.c``):

* nothing at all when the domain has no selinux seclabel or ``relabel='no'``;
* a source ``<seclabel relabel='no'>`` skips the path; a source ``<label>`` replaces the rule
  (backing layers inherit the top image's source seclabel);
* disk top layer: ``<shareable/>`` → the image context at its own level (``svirt_image_t:s0``,
  every domain may use it), ``<readonly/>`` → the content context (``virt_content_t``), else
  the domain's image label; backing layers → the content context;
* kernel, initrd, dtb → the content context; nvram, chardev files/devices/pipes/sockets and
  chardev logs (also those QEMU only gets as fds: the kernel checks a descriptor's use against
  the file's label; the bind sockets vmconfine creates exist by then), USB and VFIO group
  nodes, QEMU's HOME → the image label;
* not relabelled: the firmware loader, the VNC socket (its listening socket gets the domain's
  context from ``set_socket_label``), ``/dev/vfio/vfio`` and the device nodes every QEMU
  opens (the policy labels those).

``remember`` says whether the original context is counted in the remembered-label xattrs
(vmconfine counts every file it relabels, so files several domains share are restored by the
last one; libvirt remembers only writable top images). ``restore_without_record`` says what to
do when no record exists (``remember_owner = 0`` or a file system without xattrs): libvirt's
rule, restore the policy default except for shared, read-only and backing images, which other
domains may still be using.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vmconfine.domain import Chardev, DeviceSecLabel, Disk, Hostdev, SecLabel
from vmconfine.plugin.resources import Resource, Role, usb_device_path, vfio_group_path
from vmconfine.plugin.resources import chardev_resources as core_chardev_resources
from vmconfine_selinux.contexts import PolicyContexts

log = logging.getLogger(__name__)

MODEL = "selinux"
VFIO_CONTAINER = "/dev/vfio/vfio"
NOT_RELABELLED = frozenset({"loader", "graphics", "devnode", "socket"})


@dataclass(frozen=True)
class Plan:
    """One path to relabel."""

    path: str
    label: str
    role: str
    group: str  #: what the path belongs to, for hot-unplug: "disk:vda", "hostdev:N", ...
    remember: bool = True
    restore_without_record: bool = True


def _group(res: Resource) -> str:
    if res.disk is not None:
        return f"disk:{res.disk.target}"
    if res.role == "hostdev" and res.hostdev is not None:
        return hostdev_group(res.hostdev)
    if res.role == "chardev" and isinstance(res.source, Chardev):
        return f"chardev:{res.source.path}"
    return res.role


def hostdev_group(hostdev: Hostdev) -> str:
    """The journal group of one host device's nodes."""
    if hostdev.type == "usb":
        return f"hostdev:usb:{hostdev.vendor}:{hostdev.product}:{hostdev.bus}:{hostdev.device}"
    return f"hostdev:pci:{hostdev.domain or 0}:{hostdev.bus}:{hostdev.slot}:{hostdev.function}"


def _device_label(res: Resource) -> DeviceSecLabel | None:
    return res.seclabel(MODEL)


def plan_resource(res: Resource, sec: SecLabel | None, contexts: PolicyContexts) -> Plan | None:
    """The plan for one resource, or None when libvirt's rules leave it alone."""
    if sec is None or sec.type == "none" or not sec.relabel or not res.path:
        return None
    if res.role in NOT_RELABELLED:
        return None
    image = sec.imagelabel
    if image is None:
        return None
    if (res.create or res.passed) and not os.path.lexists(res.path):
        return None  # the pipeline creates it: bind sockets, chardev files and logs, run dirs
    group = _group(res)
    if res.role in ("disk", "backing"):
        dev = _device_label(res)
        if dev is not None and (not dev.relabel or dev.labelskip):
            return None
        if dev is not None and dev.label:
            label = dev.label
        elif res.role == "backing":
            label = contexts.content
        elif res.shared:
            label = contexts.file
        elif res.readonly:
            label = contexts.content
        else:
            label = image
        keep = res.role == "disk" and not res.shared and not res.readonly
        return Plan(res.path, label, res.role, group, restore_without_record=keep)
    if res.role in ("kernel", "initrd", "dtb"):
        return Plan(res.path, contexts.content, res.role, group)
    if res.role == "nvram":
        return Plan(res.path, image, res.role, group)
    if res.role in ("chardev", "chardev_log"):
        # also the files and sockets QEMU only gets as fds: SELinux checks the use of a
        # descriptor against the file's label (libvirt labels bind sockets it passes, too)
        dev = _device_label(res)
        if dev is not None and not dev.relabel:
            return None
        return Plan(res.path, dev.label if dev is not None and dev.label else image, res.role,
                    group)
    if res.role == "hostdev":
        if res.path == VFIO_CONTAINER:
            return None
        vfio_group = res.path.startswith("/dev/vfio/")
        return Plan(res.path, image, res.role, group, remember=not vfio_group)
    if res.role == "runtime_dir":
        return Plan(res.path, image, res.role, group)
    log.debug("selinux: no rule for resource role %s (%s); leaving it alone", res.role, res.path)
    return None


def plan_all(resources: list[Resource], sec: SecLabel | None,
             contexts: PolicyContexts) -> list[Plan]:
    """Plans for every resource, in resource order."""
    out = []
    for res in resources:
        plan = plan_resource(res, sec, contexts)
        if plan is not None:
            out.append(plan)
    return out


# ---- resources of one device (hotplug) ---------------------------------------------------------


def disk_resources(disk: Disk) -> list[Resource]:
    """The top image and backing layers of ``disk`` (backing layers inherit the top's source
    seclabels, as in libvirt)."""
    if disk.source is None or disk.type not in ("file", "block"):
        return []
    chain = disk.chain()
    top_labels = list(chain[0].seclabels) if chain else []
    out = []
    for depth, src in enumerate(chain):
        if not src.path:
            continue
        top = depth == 0
        out.append(Resource(
            path=src.path, role=Role.DISK if top else Role.BACKING,
            access="rw" if top and not disk.readonly else "ro", chain_top=top,
            readonly=disk.readonly or not top, shared=disk.shareable, disk=disk, source=src,
            seclabels=list(src.seclabels) or top_labels,
        ))
    return out


def hostdev_resources(hostdev: Hostdev) -> list[Resource]:
    """The device nodes of one host device."""
    if hostdev.type == "usb":
        path = usb_device_path(hostdev)
        return [Resource(path, Role.HOSTDEV, "rw", hostdev=hostdev)] if path else []
    if hostdev.type == "pci":
        group = vfio_group_path(hostdev)
        return [Resource(group, Role.HOSTDEV, "rw", hostdev=hostdev)] if group else []
    return []


def chardev_resources(chardev: Chardev) -> list[Resource]:
    """The paths of one character device source and its log (pipes: ``.in``/``.out`` when
    both exist), as the resource model lists them."""
    return core_chardev_resources([chardev])


def tree_paths(roots: tuple[str, ...]) -> list[str]:
    """Every directory and file under ``roots`` (the roots first), never through a symlink:
    a helper's state (swtpm's ``tpm2/``) relabelled as a whole."""
    out: list[str] = []
    for root in roots:
        if not os.path.isdir(root) or os.path.islink(root):
            continue
        for top, dirs, files in os.walk(root, followlinks=False):
            out.append(top)
            out += [os.path.join(top, f) for f in sorted(files)
                    if not os.path.islink(os.path.join(top, f))]
            dirs.sort()
    return out
