"""Where guest RAM lives for ``<memoryBacking><hugepages/>``: a per-domain directory on a
hugetlbfs mount, as libvirt does (``<mount>/libvirt/qemu/<id>-<name>``).

The mounts are qemu.conf's ``hugetlbfs_mount`` when set (libvirt's key), else every hugetlbfs
in ``/proc/self/mounts``; each serves its ``pagesize=`` (the host's default huge page size when
the mount does not say). The domain's directory is ``<mount>/vmconfine/<uuid>``: the pipeline
creates it with the runtime directories (journaled, removed at teardown), it is a
``runtime_dir`` resource so every driver grants QEMU that directory and nothing else of the
mount, and QEMU creates and unlinks its RAM file inside (``memory-backend-file``,
``prealloc``). With no usable mount the domain is refused before anything is changed, with
the fix.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from vmconfine.errors import LaunchError

if TYPE_CHECKING:
    from vmconfine.domain import Domain

MOUNTS = "/proc/self/mounts"
MEMINFO = "/proc/meminfo"
SUBDIR = "vmconfine"


class HugepagesError(LaunchError):
    """No hugetlbfs mount serves the domain's huge pages."""


def default_page_kib(meminfo: str = MEMINFO) -> int | None:
    """The host's default huge page size (``Hugepagesize:`` in /proc/meminfo), in KiB."""
    try:
        with open(meminfo) as fh:
            text = fh.read()
    except OSError:
        return None
    m = re.search(r"^Hugepagesize:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _page_kib(options: str, default: int | None) -> int | None:
    for opt in options.split(","):
        if opt.startswith("pagesize="):
            value = opt[len("pagesize="):].upper()
            scale = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(value[-1:], None)
            try:
                return int(value[:-1]) * scale if scale else int(value) // 1024
            except ValueError:
                return None
    return default


def hugetlbfs_mounts(config: Any = None, mounts: str = MOUNTS,
                     meminfo: str = MEMINFO) -> dict[int, str]:
    """Page size (KiB) → hugetlbfs mount point, first mount of each size winning."""
    default = default_page_kib(meminfo)
    wanted = getattr(config, "hugetlbfs_mount", None)
    out: dict[int, str] = {}
    try:
        with open(mounts) as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        point = fields[1].replace("\\040", " ")
        if wanted is not None and os.path.normpath(point) not in map(os.path.normpath, wanted):
            continue
        size = _page_kib(fields[3], default)
        if size is not None:
            out.setdefault(size, point)
    return out


def hugepage_dir(domain: Domain, config: Any, mounts: str = MOUNTS,
                 meminfo: str = MEMINFO) -> str | None:
    """The directory guest RAM lives in (None when the domain has no ``<hugepages/>``)."""
    backing = domain.memory_backing
    if backing is None or not backing.hugepages:
        return None
    found = hugetlbfs_mounts(config, mounts, meminfo)
    size = backing.page_size_kib or default_page_kib(meminfo)
    where = ("hugetlbfs_mount in qemu.conf names no such mount"
             if getattr(config, "hugetlbfs_mount", None) is not None
             else "none is mounted")
    if not found:
        raise HugepagesError(
            f"domain '{domain.name}' asks for <hugepages/>, but hugetlbfs is not mounted or "
            f"disabled by administrator config ({where}); mount one (mount -t hugetlbfs "
            f"hugetlbfs /dev/hugepages), reserve pages (sysctl vm.nr_hugepages=N) or remove "
            f"<memoryBacking>"
        )
    if size not in found:
        sizes = ", ".join(f"{k} KiB" for k in sorted(found))
        raise HugepagesError(
            f"domain '{domain.name}' asks for {size} KiB huge pages, but the hugetlbfs mounts "
            f"serve {sizes}; mount one with -o pagesize={size}K or change <page size=...>"
        )
    memory = domain.memory_kib
    if memory % size:
        raise HugepagesError(
            f"domain '{domain.name}': memory {memory} KiB is not a multiple of the "
            f"{size} KiB huge page size; round <memory> to whole pages"
        )
    return os.path.join(found[size], SUBDIR, domain.uuid)
