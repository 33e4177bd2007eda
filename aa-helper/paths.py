"""Path checks of vmconfine-aa-helper: what a generated AppArmor rule may name.

Every path that ends up in a profile goes through :func:`canonical_path`, which mirrors the
checks of libvirt's virt-aa-helper (``valid_path`` / ``vah_add_path``) and adds a few of its own:

* the path must be absolute and free of ``"``, backslashes, control characters (a newline would
  start a new rule) and AppArmor glob / variable characters (``* ? [ ] { } ^``), so a rule
  can never match more than the one file it names;
* it is resolved like ``realpath`` along its longest existing prefix (symlinks are followed
  before any check, so a link into /etc is judged as the /etc path it points to); the
  not-yet-existing rest may not contain ``..``;
* the resolved path may not lie under a restricted host prefix (``/etc/``, ``/usr/bin/``,
  ``/proc/``, ``/sys/``...). Firmware and boot directories (``/boot/``, ``/usr/share/qemu/``,
  OVMF...) may be granted read-only, never writable. The match is a plain string-prefix match,
  as in libvirt (``/lib`` also covers ``/library``);
* unlike libvirt's ``valid_path`` (whose prefixes end in ``/``, so ``/etc`` itself passes and
  ``<filesystem><source dir='/etc'/>`` becomes ``"/etc/**" rwl``), a restricted directory
  itself, every ancestor of a restricted prefix (``/usr`` holds ``/usr/bin/``) and ``/`` are
  refused as well: a rule on a directory is a rule on the tree below it once it is granted
  recursively, and nothing QEMU needs is a host system directory or one of its parents. The
  same holds for the read-only prefixes: ``/boot`` itself is read-only, its parent refused
  for writing.

A refused path raises :class:`Refusal` with a one-line reason.
"""

from __future__ import annotations

import os

#: Never granted (libvirt's ``restricted`` list).
RESTRICTED = (
    "/bin/",
    "/etc/",
    "/lib",
    "/lost+found/",
    "/proc/",
    "/sbin/",
    "/selinux/",
    "/sys/",
    "/usr/bin/",
    "/usr/lib",
    "/usr/sbin/",
    "/usr/share/",
    "/usr/local/bin/",
    "/usr/local/etc/",
    "/usr/local/lib",
    "/usr/local/sbin/",
)

#: Granted read-only, never writable (libvirt's ``restricted_rw`` list: firmware and boot).
READ_ONLY = (
    "/boot/",
    "/vmlinuz",
    "/initrd",
    "/initrd.img",
    "/usr/share/edk2/",
    "/usr/share/OVMF/",
    "/usr/share/ovmf/",
    "/usr/share/AAVMF/",
    "/usr/share/qemu-efi/",
    "/usr/share/qemu-efi-aarch64/",
    "/usr/share/qemu/",
    "/usr/share/seabios/",
    "/usr/lib/u-boot/",
    "/usr/lib/riscv64-linux-gnu/opensbi",
)

#: Always allowed although under a restricted prefix (PCI device sysfs files, vhost-scsi).
ALWAYS_ALLOWED = (
    "/sys/devices/pci",
    "/sys/kernel/config/target/vhost",
)

_FORBIDDEN = '"\\*?[]{}^'


class Refusal(Exception):
    """The helper refuses the request; ``str(exc)`` is the one-line reason."""


def check_text(path: str, what: str = "path") -> None:
    """Refuse characters that could break out of, or widen, a quoted AppArmor rule."""
    if any(c < " " or c == "\x7f" for c in path):
        raise Refusal(f"{what} {path!r} contains a control character (newline?); rename it")
    for ch in _FORBIDDEN:
        if ch in path:
            raise Refusal(
                f"{what} {path!r} contains {ch!r}, which AppArmor would read as a quote, escape "
                "or glob; rename it"
            )
    if not path.startswith("/"):
        raise Refusal(f"{what} {path!r} is not absolute; give the full path")


def resolve(path: str) -> str:
    """``realpath`` of the longest existing prefix plus the normalised missing rest.

    ``..`` below a missing directory is refused: the kernel would resolve it against a
    directory that does not exist yet, so the rule could not mean what it says.
    """
    if os.path.lexists(path):
        return os.path.realpath(path)
    head, rest = path, []
    while not os.path.lexists(head):
        head, tail = os.path.split(head)
        if tail:
            rest.append(tail)
        if head == "/":
            break
    parts = []
    for part in reversed(rest):
        if part in ("", "."):
            continue
        if part == "..":
            raise Refusal(
                f"path {path!r} uses '..' below a directory that does not exist; "
                "give the resolved path"
            )
        parts.append(part)
    base = os.path.realpath(head)
    return os.path.join(base, *parts) if parts else base


def _starts(path: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if path.startswith(prefix):
            return prefix
    return None


def _within(path: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix ``path`` lies under, or names itself (``/etc`` for ``/etc/``)."""
    for prefix in prefixes:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return prefix
    return None


def _holds(path: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix that lies strictly below directory ``path`` (``/usr`` holds ``/usr/bin/``)."""
    base = path.rstrip("/") + "/"
    for prefix in prefixes:
        if prefix.startswith(base) and prefix.rstrip("/") != path:
            return prefix
    return None


def check_allowed(resolved: str, *, writable: bool, original: str) -> None:
    """Refuse restricted host locations (``resolved`` is the canonical path)."""
    if _starts(resolved, ALWAYS_ALLOWED):
        return
    shown = original if original == resolved else f"{original} (resolves to {resolved})"
    if resolved.rstrip("/") == "":
        raise Refusal(
            f"path {shown} is the root directory, which holds every host system file; "
            "give a directory of the guest's own"
        )
    ro = _within(resolved, READ_ONLY)
    if ro and not writable:
        return
    if ro:
        raise Refusal(
            f"path {shown} lies under {ro}, which may only be granted read-only; "
            "copy the file elsewhere or mark the device readonly"
        )
    prefix = _within(resolved, RESTRICTED)
    if prefix:
        where = "is" if resolved == prefix.rstrip("/") else "lies under"
        raise Refusal(
            f"path {shown} {where} the restricted host directory {prefix}; "
            "a guest may not be given host system files, use a copy outside it"
        )
    held = _holds(resolved, RESTRICTED) or (_holds(resolved, READ_ONLY) if writable else None)
    if held:
        raise Refusal(
            f"path {shown} contains the restricted host directory {held}; "
            "a guest may not be given host system files, use a directory of its own"
        )


def canonical_path(path: str, *, writable: bool, what: str = "path") -> str:
    """The checked, resolved form of ``path`` for a rule; raise :class:`Refusal` otherwise."""
    check_text(path, what)
    resolved = resolve(path)
    # the resolved form may differ from the text (a symlink target): check it again
    check_text(resolved, what)
    check_allowed(resolved, writable=writable, original=path)
    if len(resolved) > 1 and resolved.endswith("/"):
        resolved = resolved.rstrip("/")
    return resolved
