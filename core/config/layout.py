"""Where an instance keeps its state: the directory layout of ``qemu:///system`` and of an
embed root, and the per-domain names inside it.

:mod:`vmconfine.config.instance` builds its :class:`~vmconfine.config.instance.Instance` from
these; vmconfine-aa-helper and the CLI's daemon client read them directly on their fast paths
(plain strings, nothing but ``os`` imported: the helper's start-up is part of every domain
start, the client's of every ``vmconfine list``). :func:`plain_uri` recognises the plain
spellings of the two privileged URIs without ``urllib``; anything else is left to
:func:`vmconfine.config.instance.parse_uri`.
"""

from __future__ import annotations

import os

#: qemu:///system: (config file, run, lib, cache, log directory)
SYSTEM_DIRS = ("/etc/vmconfine/qemu.conf", "/run/vmconfine/qemu", "/var/lib/vmconfine/qemu",
               "/var/cache/vmconfine/qemu", "/var/log/vmconfine/qemu")
#: below an embed root, in the same order
EMBED_DIRS = ("etc/qemu.conf", "run/qemu", "lib/qemu", "cache/qemu", "log/qemu")
#: the daemon's read-write and read-only API sockets, in the parent of the run directory
#: (libvirt: libvirt-sock, libvirt-sock-ro)
DAEMON_SOCKETS = ("vmconfine-sock", "vmconfine-sock-ro")
#: the environment variable naming the URI used when none is given
DEFAULT_URI_ENV = "VMCONFINE_DEFAULT_URI"
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


def default_uri() -> str:
    """$VMCONFINE_DEFAULT_URI, else ``qemu:///system`` for root and ``qemu:///session``
    otherwise."""
    env = os.environ.get(DEFAULT_URI_ENV)
    if env:
        return env
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def daemon_socket(run_dir: str, *, readonly: bool) -> str:
    """The path of the daemon's API socket of the instance whose run directory is
    ``run_dir``."""
    return os.path.join(os.path.dirname(run_dir), DAEMON_SOCKETS[1 if readonly else 0])


def xdg_dir(var: str, fallback: str) -> str:
    """An XDG base directory: ``$VAR`` when absolute, else ``~/FALLBACK``."""
    value = os.environ.get(var)
    if value and os.path.isabs(value):
        return value
    return os.path.join(os.path.expanduser("~"), fallback)


def session_run_dir() -> str:
    """``qemu:///session``'s run directory: ``$XDG_RUNTIME_DIR/vmconfine/qemu``, else
    ``run`` in its cache directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "vmconfine", "qemu")
    return os.path.join(xdg_dir("XDG_CACHE_HOME", ".cache"), "vmconfine", "qemu", "run")


#: the plain spellings of the session URI (:func:`plain_daemon_socket`)
SESSION_URIS = ("qemu:///session", "qemu:///session/", "qemu+unix:///session",
                "qemu+unix:///session/")


def plain_daemon_socket(uri: str, *, readonly: bool) -> tuple[str, str] | None:
    """``(kind, socket path)`` of the daemon for a plain URI (:func:`plain_uri`, or
    :data:`SESSION_URIS`) the caller may open (``qemu:///system`` only as root); None
    otherwise, for :func:`vmconfine.config.instance.open_instance` to resolve or refuse."""
    if uri in SESSION_URIS:
        return "session", daemon_socket(session_run_dir(), readonly=readonly)
    plain = plain_uri(uri)
    if plain is None:
        return None
    kind, root = plain
    if root is None:
        if os.geteuid() != 0:
            return None
        return kind, daemon_socket(SYSTEM_DIRS[1], readonly=readonly)
    return kind, daemon_socket(embed_dirs(root)[1], readonly=readonly)
