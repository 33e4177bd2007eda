"""Backing-chain discovery for disk images, without ever probing a format.

A disk's chain is taken from the domain XML when it is given there (``<backingStore>``
elements; an empty ``<backingStore/>`` ends the chain). Otherwise the chain is read from the
images one layer at a time, and only under these rules (libvirt's lessons from CVE-2010-2237
and CVE-2010-2238):

- the format of the top image is the one the XML declares (``<driver type=...>``); a disk
  without a declared format is raw, and raw images have no backing file;
- an image is only opened as the declared format (``qemu-img info -f FMT``), and only formats
  that can record a backing file (qcow, qcow2, qed, vmdk) are read at all;
- a backing file is followed only when the image also records the backing file's format;
  a backing file without a recorded format is an error, never a guess;
- the chain is capped (``max_depth``, libvirt's 200) and a loop is an error.

:func:`resolve_chain` fills the ``backing`` links of the :class:`~vmconfine.domain.StorageSource`
objects, so ``Disk.chain()`` and everything built from it (argv, resources, labels) agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from typing import Any

from vmconfine.domain.devices import StorageSource
from vmconfine.errors import VmconfineError

#: formats that can record a backing file (QEMU's "generic COW" formats)
BACKING_FORMATS = frozenset({"qcow", "qcow2", "qed", "vmdk"})

#: image formats vmconfine passes to QEMU; "iso" is raw (libvirt's alias)
KNOWN_FORMATS = frozenset(
    {
        "raw", "iso", "qcow", "qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc", "dmg", "bochs",
        "cloop", "parallels", "luks",
    }
)

#: libvirt's limit: deeper chains break the status XML (libxml2 nesting)
DEFAULT_MAX_DEPTH = 200

_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def path_exists(path: str) -> bool:
    """Whether an image exists (a seam for tests that describe images without files)."""
    return os.path.exists(path)


class BackingChainError(VmconfineError):
    """A disk image's backing chain cannot be used safely."""


def qemu_format(fmt: str | None) -> str:
    """The QEMU block driver for a declared image format (absent and ``iso`` are raw)."""
    if not fmt or fmt == "iso":
        return "raw"
    return fmt


def _new_source(path: str, fmt: str) -> StorageSource:
    """A StorageSource for a backing layer found in an image header."""
    kind = "file"
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            kind = "block"
    except OSError:
        pass
    return StorageSource(path=path, type=kind, format=fmt, format_given=True)


def _identity(path: str) -> tuple[Any, ...]:
    """Key used for loop detection: (dev, inode) when the file exists, else its realpath."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def read_image_header(path: str, fmt: str, *, qemu_img: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` of ONE image, opened strictly as ``fmt`` (never probed).

    ``-U`` (force-share) lets this read an image a running QEMU holds; qemu-img info never
    opens the backing file itself.
    """
    tool = qemu_img or shutil.which("qemu-img") or "/usr/bin/qemu-img"
    if not os.path.isabs(path):
        raise BackingChainError(
            f"disk image path {path!r} is not absolute; give the full path in the domain XML"
        )
    if not path_exists(path):
        raise BackingChainError(
            f"disk image {path} does not exist (its {fmt} header names the backing chain); "
            f"create the image or fix <source file=...>"
        )
    cmd = [tool, "info", "--output=json", "-U", "-f", fmt, path]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
            check=False,
        )
    except FileNotFoundError as exc:
        raise BackingChainError(
            f"cannot read the backing chain of {path}: {tool} is missing; install qemu-utils"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BackingChainError(f"cannot read image {path}: qemu-img info timed out") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["qemu-img failed"])[-1]
        raise BackingChainError(
            f"cannot read image {path} as format {fmt!r}: {detail}; check the path and the "
            f"<driver type=...> of the disk"
        )
    try:
        info = json.loads(proc.stdout)
    except ValueError as exc:
        raise BackingChainError(f"cannot read image {path}: qemu-img printed no JSON") from exc
    if not isinstance(info, dict):
        raise BackingChainError(f"cannot read image {path}: unexpected qemu-img output")
    return info


def _backing_of(src: StorageSource, fmt: str, qemu_img: str | None) -> tuple[str, str] | None:
    """(path, format) of the backing file recorded in ``src``'s header, or None."""
    info = read_image_header(src.path, fmt, qemu_img=qemu_img)
    name = info.get("backing-filename")
    if not name:
        return None
    backing_fmt = info.get("backing-filename-format")
    if not os.path.isabs(name) and _PROTOCOL_RE.match(name):
        raise BackingChainError(
            f"image {src.path} names backing {name!r}, a protocol/JSON backing that vmconfine "
            f"does not follow; give the chain with <backingStore> in the domain XML"
        )
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(src.path), name)
    path = os.path.normpath(path)
    if not backing_fmt:
        raise BackingChainError(
            f"image {src.path} names backing file {path} but records no backing format, and "
            f"vmconfine never probes formats; record it with: qemu-img rebase -u -F <fmt> "
            f"-b {path} {src.path}"
        )
    backing_fmt = str(backing_fmt)
    if not path_exists(path):
        raise BackingChainError(
            f"image {src.path} names backing file {path}, which does not exist; restore it or "
            f"fix the image with: qemu-img rebase -u -F {backing_fmt} -b <backing> {src.path}"
        )
    if backing_fmt not in KNOWN_FORMATS:
        raise BackingChainError(
            f"image {src.path} records backing file {path} with unknown format "
            f"{backing_fmt!r}; fix it with: qemu-img rebase -u -F <fmt> -b {path} {src.path}"
        )
    return path, backing_fmt


def resolve_chain(
    src: StorageSource,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    qemu_img: str | None = None,
    missing_ok: bool = False,
) -> list[StorageSource]:
    """The backing chain of ``src``, top first, filling the ``backing`` links.

    Layers given in the XML are used as they are; below the last XML layer (unless it ends
    with an empty ``<backingStore/>``) the images themselves are read, one layer at a time,
    as described in the module docstring. Raises :class:`BackingChainError` for a chain
    deeper than ``max_depth`` backing layers, a loop, an unreadable image or a backing file
    without a recorded format. ``missing_ok``: an image that does not exist ends the chain
    instead (``domxml-to-native``, which, like libvirt's, prints the top node and leaves
    the chain to the start).
    """
    chain: list[StorageSource] = []
    seen: dict[tuple[Any, ...], str] = {}
    node: StorageSource | None = src
    while node is not None:
        if len(chain) > max_depth:
            raise BackingChainError(
                f"the backing chain of {src.path} is deeper than {max_depth} images; "
                f"flatten it with: qemu-img convert"
            )
        fmt = qemu_format(getattr(node, "format", None))
        if fmt not in KNOWN_FORMATS:
            raise BackingChainError(
                f"image {node.path} has unsupported format {fmt!r}; use one of "
                f"{', '.join(sorted(KNOWN_FORMATS))} in <driver type=...>"
            )
        if node.path:
            key = _identity(node.path)
            if key in seen:
                raise BackingChainError(
                    f"the backing chain of {src.path} loops: {node.path} appears twice "
                    f"(first as {seen[key]}); fix the backing file with qemu-img rebase -u"
                )
            seen[key] = node.path
        chain.append(node)
        if node.backing is not None:
            node = node.backing
            continue
        if (
            node.backing_declared
            or fmt not in BACKING_FORMATS
            or not node.path
            or getattr(node, "type", "file") not in ("file", "block")
        ):
            break
        if missing_ok and not path_exists(node.path):
            break
        found = _backing_of(node, fmt, qemu_img)
        if found is None:
            break
        node.backing = _new_source(found[0], found[1])
        node = node.backing
    return chain
