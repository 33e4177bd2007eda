"""Where an instance keeps its state: the directory layout of ``qemu:///system`` and of an
embed root, and the per-domain names inside it.

:mod:`vmconfine.config.instance` builds its :class:`~vmconfine.config.instance.Instance` from
these; vmconfine-aa-helper reads them directly on its fast path (plain strings, nothing but
``os`` imported: the helper's start-up is part of every domain start). :func:`plain_uri`
recognises the plain spellings of the two privileged URIs without ``urllib``; anything else
is left to :func:`vmconfine.config.instance.parse_uri`.
"""

from __future__ import annotations

import os

#: qemu:///system: (config file, run, lib, cache, log directory)
SYSTEM_DIRS = ("/etc/vmconfine/qemu.conf", "/run/vmconfine/qemu", "/var/lib/vmconfine/qemu",
               "/var/cache/vmconfine/qemu", "/var/log/vmconfine/qemu")
#: below an embed root, in the same order
EMBED_DIRS = ("etc/qemu.conf", "run/qemu", "lib/qemu", "cache/qemu", "log/qemu")
#: per-domain names: runtime directory (below run), QEMU's home (below lib), QEMU log (below log)
DOMAIN_DIR = "domain-{name}"
LOG_FILE = "{name}.log"
#: characters that make an embed root something only the full URI parser reads correctly
_NOT_PLAIN = frozenset("%+&;#=?\\ \t\r\n")


def embed_dirs(root: str) -> tuple[str, str, str, str, str]:
    """The :data:`SYSTEM_DIRS` of an embed instance rooted at ``root``."""
    c, r, li, ca, lo = (os.path.join(root, d) for d in EMBED_DIRS)
    return c, r, li, ca, lo


def plain_uri(uri: str) -> tuple[str, str | None] | None:
    """``("system", None)`` or ``("embed", ROOT)`` (normalised) for the plain spellings
    ``qemu:///system`` and ``qemu:///embed?root=/ABS`` (also ``qemu+unix:``); None for any
    other URI, which :func:`vmconfine.config.instance.parse_uri` reads (or refuses)."""
    for scheme in ("qemu:///", "qemu+unix:///"):
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            break
    else:
        return None
    if rest in ("system", "system/"):
        return "system", None
    for path in ("embed?root=", "embed/?root="):
        if rest.startswith(path):
            root = rest[len(path):]
            if root.startswith("/") and not _NOT_PLAIN.intersection(root):
                return "embed", os.path.normpath(root)
    return None
