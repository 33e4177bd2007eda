"""The compiled-policy cache of vmconfine-aa-helper, and the key that says when it is valid.

libvirt compiles a domain's profile on every start. vmconfine compiles a given content once:
the binary policy apparmor_parser makes (``-Q -o``) is kept in
``<instance cache dir>/apparmor/<name>.<key>/`` and a later start whose content has the same
key loads that binary (one write to securityfs, as ``apparmor_parser -B`` does) instead of
compiling again.

**The key** (:func:`policy_key`) is a SHA-256 over everything the compiled policy depends on:

- the profile text and the generated rules (``.files``);
- every file the profile includes, transitively (``#include``/``include``, ``include if
  exists``, ``abi``; a directory include takes every file below it), looked up in EVERY
  directory apparmor_parser may search (profile directory, shipped directory, ``Include``
  directories of parser.conf, /etc/apparmor.d), so a file added in front of another one
  changes the key too;
- apparmor_parser itself (resolved path, device, inode, size, modification time), its
  configuration file /etc/apparmor/parser.conf and the files that configuration names
  (policy features), and the kernel (``uname``: release, version, machine).

An include the helper cannot follow (a variable in it, an unreadable or special file, more than
:data:`MAX_FILES` files) makes the profile uncacheable: :func:`policy_key` returns None and the
profile is compiled every time, as libvirt does.

**An entry** is a directory (0700) holding ``profile`` and ``files`` (the texts it was made
from), ``policy.bin`` (the compiled policy) and ``policy.sha256`` (its digest), all 0600. It is
built in a staging directory and renamed into place, so it appears whole or not at all; the
digest is checked before every use, so a binary damaged by a crash is a miss (and removed),
never a load. The cache directory and entries must be the helper's own (its effective uid) and
not writable by group or others; otherwise the cache is not used (a warning says why). Only the
helper writes here. Teardown (``-D``) leaves the cache alone; each profile keeps one entry (a
new one replaces the older), and the cache keeps at most :data:`MAX_ENTRIES` (least recently
used go first).

Imports stay minimal (``os``; SHA-256 from the interpreter's built-in module when it has one),
because the driver's restart path runs this in a freshly started helper.
"""

from __future__ import annotations

import os
import stat
import time

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from hashlib import _Hash

VERSION = b"vmconfine-aa-cache-1"
BASE_DIR = "/etc/apparmor.d"
PARSER_CONF = "/etc/apparmor/parser.conf"
#: more included files than this: the profile is not cached (compiled every time)
MAX_FILES = 2000
#: entries kept in one cache directory (one per profile name)
MAX_ENTRIES = 256
BINARY = "policy.bin"
DIGEST = "policy.sha256"
TEXTS = ("profile", "files")
STAGING = ".staging."
KEY_LENGTH = 64


def sha256(data: bytes = b"") -> _Hash:
    """A SHA-256 object; the built-in implementation when there is one (hashlib would load
    OpenSSL, a few milliseconds of start-up for a few kilobytes of input)."""
    try:
        from _sha256 import sha256 as impl  # type: ignore[import-not-found]  # CPython <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256 as impl  # type: ignore[import-not-found]  # CPython 3.12+
        except ImportError:
            from hashlib import sha256 as impl
    return impl(data)


def is_key(text: str) -> bool:
    """True for a well-formed key (64 lowercase hex digits)."""
    return len(text) == KEY_LENGTH and all(c in "0123456789abcdef" for c in text)


class Uncacheable(Exception):
    """The policy's inputs cannot all be followed; it is compiled every time."""


# ---- the key ------------------------------------------------------------------------------------


def _include_targets(text: str) -> list[tuple[str, str]]:
    """(kind, name) of every include-like statement: kind ``<`` (search path) or ``"``
    (a path). Comment lines and rule lines are skipped; anything that might name a file is
    taken (over-including only makes the key change more often)."""
    found = []
    for raw in text.splitlines():
        if "include" not in raw and "abi" not in raw:
            continue  # most lines: a cheap test first
        line = raw.strip()
        for word in ("#include", "include", "abi"):
            if line.startswith(word):
                rest = line[len(word):]
                break
        else:
            continue
        if not rest or not (rest[0].isspace() or rest[0] in '<"'):
            continue  # e.g. a rule for a path that starts with "include"
        rest = rest.strip()
        if rest.startswith("if"):
            words = rest.split(None, 2)
            if len(words) == 3 and words[1] == "exists":
                rest = words[2]
        if not rest or rest[0] not in '<"':
            if word == "abi" or rest.startswith("#"):
                continue
            raise Uncacheable(f"unrecognised include statement {line!r}")
        close = ">" if rest[0] == "<" else '"'
        end = rest.find(close, 1)
        if end < 0:
            raise Uncacheable(f"unterminated include statement {line!r}")
        name = rest[1:end]
        if not name or "@{" in name or "\0" in name:
            raise Uncacheable(f"include {name!r} cannot be followed")
        found.append((rest[0], name))
    return found


def _conf_values(text: str) -> list[tuple[str, str]]:
    """(option, value) pairs of parser.conf (``opt=value`` or ``opt value`` lines)."""
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            opt, _, value = line.partition("=")
        else:
            opt, _, value = line.partition(" ")
        pairs.append((opt.strip(), value.strip()))
    return pairs


class _KeyBuilder:
    """Feeds the key's inputs into one SHA-256, walking includes."""

    def __init__(self, search: list[str], substitutes: dict[str, bytes]) -> None:
        self.h = sha256(VERSION)
        self.search = search
        self.substitutes = substitutes
        self.seen: set[str] = set()
        self.files = 0

    def feed(self, tag: str, data: bytes) -> None:
        self.h.update(f"\0{tag}\0{len(data)}\0".encode())
        self.h.update(data)

    def text(self, text: str) -> None:
        """Follow the includes of ``text``."""
        for kind, name in _include_targets(text):
            if kind == '"':
                candidates = [name if name.startswith("/") else os.path.join(BASE_DIR, name)]
            else:
                candidates = [os.path.join(d, name) for d in self.search]
            for candidate in candidates:
                self.path(os.path.normpath(candidate))

    def path(self, path: str, *, follow: bool = True) -> None:
        """Feed a file (its includes too when ``follow``) or every file below a directory."""
        if path in self.seen:
            return
        self.seen.add(path)
        if path in self.substitutes:  # the .files include: its text is given
            return
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return  # absent: if it appears later, feeding it changes the key
        except OSError as exc:
            raise Uncacheable(f"{path}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise Uncacheable(f"{path}: {exc.strerror}") from None
            self.feed("dir", path.encode())
            for name in names:
                self.path(os.path.join(path, name), follow=follow)
            return
        if not stat.S_ISREG(st.st_mode):
            raise Uncacheable(f"{path} is not a regular file")
        self.files += 1
        if self.files > MAX_FILES:
            raise Uncacheable(f"more than {MAX_FILES} files are included")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise Uncacheable(f"{path}: {exc.strerror}") from None
        self.feed(f"file {path}", data)
        if follow:
            self.text(data.decode(errors="replace"))


def policy_key(profile_text: str, files_text: str, files_path: str, include_dirs: list[str],
               parser: str) -> str | None:
    """The cache key of a profile (see the module docstring), or None when it is uncacheable.

    ``files_path`` is the profile's ``.files`` include (its content is ``files_text``, which
    need not be on disk yet); ``include_dirs`` are the ``-I`` directories given to the parser.
    """
    try:
        return _policy_key(profile_text, files_text, files_path, include_dirs, parser)
    except Uncacheable:
        return None


def _policy_key(profile_text: str, files_text: str, files_path: str, include_dirs: list[str],
                parser: str) -> str:
    try:
        with open(PARSER_CONF, "rb") as fh:
            conf = fh.read()
    except FileNotFoundError:
        conf = b""
    except OSError as exc:
        raise Uncacheable(f"{PARSER_CONF}: {exc.strerror}") from None
    options = _conf_values(conf.decode(errors="replace"))
    conf_includes = [v for o, v in options if o in ("Include", "I") and v.startswith("/")]
    search = [*include_dirs, *conf_includes, BASE_DIR]
    k = _KeyBuilder([os.path.normpath(d) for d in search],
                    {os.path.normpath(files_path): files_text.encode()})
    k.feed("profile", profile_text.encode())
    k.feed("files", files_text.encode())
    k.feed("search", "\0".join(k.search).encode())
    k.feed("parser.conf", conf)
    for opt, value in options:  # feature files and the like that the configuration names
        if value.startswith("/") and opt not in ("Include", "I"):
            k.path(os.path.normpath(value), follow=False)
    try:
        real = os.path.realpath(parser)
        st = os.stat(real)
    except OSError as exc:
        raise Uncacheable(f"{parser}: {exc.strerror}") from None
    k.feed("parser", f"{real} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}".encode())
    k.feed("kernel", "\0".join(os.uname()[2:5]).encode())
    k.text(profile_text)
    return str(k.h.hexdigest())


# ---- the cache directory ------------------------------------------------------------------------


def _safe(st: os.stat_result, kind: Callable[[int], bool]) -> bool:
    """The helper's own, of the right kind, not writable by group or others."""
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def remove_entry(path: str) -> None:
    """Remove a (flat) entry or staging directory; missing is fine."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_private(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not _safe(st, stat.S_ISREG):
            raise OSError(0, "not a private regular file of this user")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Cache:
    """One cache directory. ``warnings`` collects why an entry or the directory was not used."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.warnings: list[str] = []

    def entry_path(self, name: str, key: str) -> str:
        return os.path.join(self.root, f"{name}.{key}")

    def has(self, name: str, key: str) -> bool:
        """Whether an entry for (name, key) exists (not checked; see :meth:`policy`)."""
        return os.path.isdir(self.entry_path(name, key))

    def usable(self, *, create: bool) -> bool:
        """Whether the directory can be trusted (made, 0700, when ``create``)."""
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            if not create:
                return False
            os.makedirs(os.path.dirname(self.root), mode=0o755, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(self.root)
        if not _safe(st, stat.S_ISDIR):
            self.warnings.append(f"policy cache {self.root} is not a directory of uid "
                                 f"{os.geteuid()} closed to group and others; it is not used "
                                 f"(fix: rm -r {self.root})")
            return False
        return True

    def _entry_ok(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not _safe(st, stat.S_ISDIR):
            self.warnings.append(f"policy cache entry {path} is not private; ignored")
            return False
        return True

    def policy(self, name: str, key: str) -> bytes | None:
        """The entry's compiled policy, checked against its digest; None when there is no
        usable entry (a damaged one is removed)."""
        path = self.entry_path(name, key)
        if not self._entry_ok(path):
            return None
        try:
            digest = _read_private(os.path.join(path, DIGEST)).decode().strip()
            data = _read_private(os.path.join(path, BINARY))
        except (OSError, UnicodeDecodeError):
            data, digest = b"", "-"
        if sha256(data).hexdigest() != digest:
            self.warnings.append(f"policy cache entry {path} was damaged; it is removed and "
                                 "the profile compiled again")
            remove_entry(path)
            return None
        return data

    def texts(self, name: str, key: str) -> tuple[str, str] | None:
        """(profile, files) texts of an entry, or None."""
        path = self.entry_path(name, key)
        if not self._entry_ok(path):
            return None
        try:
            profile, files = (_read_private(os.path.join(path, t)).decode() for t in TEXTS)
        except (OSError, UnicodeDecodeError):
            return None
        return profile, files

    def touch(self, name: str, key: str) -> None:
        """Mark an entry as just used (least-recently-used eviction)."""
        try:
            os.utime(self.entry_path(name, key))
        except OSError:
            pass

    def discard(self, name: str, key: str) -> None:
        remove_entry(self.entry_path(name, key))

    def stage(self, name: str) -> str:
        """A fresh private staging directory for a new entry of ``name``."""
        path = os.path.join(self.root, f"{STAGING}{name}.{os.getpid()}")
        remove_entry(path)
        os.mkdir(path, 0o700)
        return path

    def commit(self, staging: str, name: str, key: str, profile_text: str, files_text: str,
               data: bytes) -> None:
        """Turn a staging directory holding ``policy.bin`` (whose content is ``data``) into
        the entry (name, key)."""
        os.chmod(os.path.join(staging, BINARY), 0o600)
        for text_name, text in zip(TEXTS, (profile_text, files_text), strict=True):
            _write_private(os.path.join(staging, text_name), text.encode())
        _write_private(os.path.join(staging, DIGEST), sha256(data).hexdigest().encode() + b"\n")
        target = self.entry_path(name, key)
        try:
            os.rename(staging, target)
        except OSError:  # the same entry was made meanwhile (a concurrent start)
            remove_entry(staging)
        self.evict(keep=target, name=name)

    def evict(self, *, keep: str, name: str) -> None:
        """Drop the other entries of ``name``, stale staging directories, and the least
        recently used entries beyond :data:`MAX_ENTRIES`."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        entries = []
        now = time.time()
        for entry in names:
            path = os.path.join(self.root, entry)
            if entry.startswith(STAGING):
                try:
                    if now - os.lstat(path).st_mtime > 3600:
                        remove_entry(path)
                except OSError:
                    pass
                continue
            if path == keep:
                continue
            base, _, key = entry.rpartition(".")
            if not is_key(key):
                continue
            if base == name:
                remove_entry(path)
                continue
            try:
                entries.append((os.lstat(path).st_mtime, path))
            except OSError:
                continue
        entries.sort()
        for _, path in entries[: max(0, len(entries) + 1 - MAX_ENTRIES)]:
            remove_entry(path)
