"""Profile files and apparmor_parser runs of vmconfine-aa-helper.

Layout in the profile directory (default ``/etc/apparmor.d/vmconfine``), for profile NAME
(the configured prefix + the domain UUID):

* ``NAME`` — the profile, made once from ``TEMPLATE.qemu`` (the profile directory's own copy
  when the administrator put one there, else the one shipped with vmconfine's AppArmor
  plugin); it includes the shipped abstraction ``abstractions/vmconfine-qemu`` and ``NAME.files``;
* ``NAME.files`` — the generated per-domain rules, rewritten only when their text changes;
* ``NAME.hash`` — the policy key (:func:`vmconfine_aa_helper.cache.policy_key`) of what was
  last loaded, so an unchanged profile that is still loaded is not loaded again.

``apparmor_parser`` gets ``-I <profile dir> -I <shipped dir>`` so the abstraction is found
without installing it into /etc/apparmor.d (a copy in ``<profile dir>/abstractions/`` wins).
It compiles a profile into a binary policy (``-Q -o``); :func:`kernel_load` gives that binary
to the kernel the way ``apparmor_parser -B`` does (one write to securityfs ``.load`` or
``.replace``) and :func:`kernel_unload` removes a profile by name (``.remove``), so loading a
cached policy and unloading start no process.

Start-up cost matters here (the driver runs the helper on every start and stop), so this module
imports nothing beyond ``os`` at import time: paths are strings, apparmor_parser is started with
``os.posix_spawn`` (no ``subprocess``, which pulls in ``re`` and ``locale``).
"""

from __future__ import annotations

import os
import sys

from vmconfine_aa_helper.paths import Refusal

TEMPLATE_NAME = "TEMPLATE.qemu"
TEMPLATE_MARKER = "\nprofile VMCONFINE_TEMPLATE"
ABSTRACTION = "abstractions/vmconfine-qemu"
DEFAULT_PARSER = "/sbin/apparmor_parser"
#: AppArmor's securityfs directory: ``profiles`` (what is loaded), ``.load`` / ``.replace``
SECURITYFS = "/sys/kernel/security/apparmor"
PARSER_ENV = {"PATH": "/sbin:/usr/sbin", "IFS": " \t\n", "LC_ALL": "C"}
PARSER_TIMEOUT = 300.0
_SHIPPED_PACKAGE = "vmconfine_apparmor"


def shipped_dir() -> str:
    """The vmconfine_apparmor package directory (TEMPLATE.qemu, abstractions/), found through
    the import system without importing the plugin (which would pull in pluggy)."""
    module = sys.modules.get(_SHIPPED_PACKAGE)
    spec = getattr(module, "__spec__", None) if module is not None else None
    for finder in sys.meta_path if spec is None else ():
        find = getattr(finder, "find_spec", None)
        spec = find(_SHIPPED_PACKAGE, None) if find is not None else None
        if spec is not None:
            break
    locations = getattr(spec, "submodule_search_locations", None)
    if not locations:
        raise Refusal("the vmconfine_apparmor package is not installed; reinstall vmconfine")
    return str(next(iter(locations)))


def template_path(profile_dir: str) -> str:
    """The administrator's template in the profile directory, else the shipped one."""
    local = os.path.join(profile_dir, TEMPLATE_NAME)
    return local if os.path.isfile(local) else os.path.join(shipped_dir(), TEMPLATE_NAME)


def profile_from_template(template: str, name: str, files_path: str) -> str:
    """The profile text: the template with its name set and the ``.files`` include added."""
    try:
        text = read_text(template, missing_ok=False) or ""
    except OSError as exc:
        raise Refusal(f"cannot read the profile template {template}: {exc.strerror}") from None
    text = "\n" + text  # the profile line may be the first line
    if TEMPLATE_MARKER not in text:
        raise Refusal(f"template {template} has no 'profile VMCONFINE_TEMPLATE' line; "
                      "restore it from the shipped TEMPLATE.qemu")
    text = text.replace(TEMPLATE_MARKER, f"\nprofile {name}", 1)
    end = text.rfind("\n}")
    if end < 0:
        raise Refusal(f"template {template} has no closing '}}' line; "
                      "restore it from the shipped TEMPLATE.qemu")
    return f'{text[1:end]}\n  #include "{files_path}"{text[end:]}'


def include_dirs(profile_dir: str) -> list[str]:
    """Where apparmor_parser looks for ``<abstractions/...>`` first (before /etc/apparmor.d)."""
    return [profile_dir, shipped_dir()]


def read_text(path: str, *, missing_ok: bool = True) -> str | None:
    """The file's text; None when it does not exist (and ``missing_ok``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise


def size_of(path: str) -> int | None:
    """Size of a regular file, None when there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_size if (st.st_mode & 0o170000) == 0o100000 else None


def write_if_changed(path: str, text: str) -> bool:
    """Atomically replace ``path`` with ``text`` (mode 0644) unless it already holds it."""
    if read_text(path) == text:
        return False
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp")
    unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def create_exclusive(path: str, text: str) -> None:
    """Create ``path`` (0644); refuse to overwrite anything already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
    except FileExistsError:
        raise Refusal(f"profile {path} appeared while it was being created; retry") from None
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def loaded_profiles() -> set[str] | None:
    """Names of the profiles loaded in the kernel, or None when the list is unreadable
    (AppArmor not enabled, securityfs not mounted)."""
    try:
        with open(os.path.join(SECURITYFS, "profiles"), encoding="utf-8",
                  errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    names = set()
    for line in text.splitlines():
        name, _, mode = line.rpartition(" (")
        names.add(name if mode.endswith(")") else line)
    return names


def spawn(argv: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None,
          timeout: float = PARSER_TIMEOUT) -> tuple[int, str]:
    """Run ``argv`` (absolute program path) and return (exit status, stderr text).

    stdin is ``stdin`` (or /dev/null), stdout goes to /dev/null. The child gets ``env`` (default
    :data:`PARSER_ENV`), default SIGPIPE/SIGXFSZ handling and no descriptor but 0-2 (every
    other descriptor of this process is close-on-exec). Raises FileNotFoundError when the
    program is missing and TimeoutError after ``timeout`` seconds (the child is killed).
    """
    import select
    import time

    try:
        import _signal as signals  # the C module; ``signal`` would import enum
    except ImportError:  # pragma: no cover - other interpreters
        import signal as signals  # type: ignore[no-redef]

    err_r, err_w = os.pipe()
    in_r = in_w = -1
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    if stdin is None:
        actions.insert(0, (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0))
    else:
        in_r, in_w = os.pipe()
        actions.insert(0, (os.POSIX_SPAWN_DUP2, in_r, 0))
    try:
        pid = os.posix_spawn(argv[0], argv, PARSER_ENV if env is None else env,
                             file_actions=actions,
                             setsigdef=(signals.SIGPIPE, signals.SIGXFSZ))
    except BaseException:
        for fd in (err_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(err_w)
        if in_r >= 0:
            os.close(in_r)
    if in_w >= 0:
        try:
            os.write(in_w, stdin or b"")  # a few bytes (a stub profile): fits the pipe
        except BrokenPipeError:
            pass
        finally:
            os.close(in_w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([err_r], [], [], left)[0]:
                os.kill(pid, signals.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f} s")
            chunk = os.read(err_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _write_iface(iface: str, data: bytes, what: str) -> None:
    """One write of ``data`` to the securityfs file ``iface`` (``.load``, ``.replace``,
    ``.remove``); OSError from the write itself is the kernel's answer and propagates."""
    try:
        fd = os.open(os.path.join(SECURITYFS, iface), os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refusal(f"cannot {what}: {SECURITYFS}/{iface} is missing, AppArmor is not "
                      "enabled in this kernel; boot with 'apparmor=1 security=apparmor'") from None
    except OSError as exc:
        raise Refusal(f"cannot {what}: {SECURITYFS}/{iface}: {exc.strerror}") from None
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise Refusal(f"cannot {what}: the kernel took {written} of {len(data)} bytes")


def kernel_load(op: str, policy: bytes, profile: str) -> None:
    """Load (``-a``: securityfs ``.load``) or replace (``-r``: ``.replace``) a compiled policy,
    as ``apparmor_parser -B`` does: the whole binary in one write."""
    try:
        _write_iface(".replace" if op == "-r" else ".load", policy, f"load {profile}")
    except OSError as exc:
        raise Refusal(f"the kernel refused the compiled policy of {profile} ({op}): "
                      f"{exc.strerror}") from None


def kernel_unload(name: str) -> str | None:
    """Unload profile ``name`` (securityfs ``.remove``, what ``apparmor_parser -R`` does once
    it has parsed the profile for its name). Returns a warning when it was not loaded."""
    try:
        _write_iface(".remove", name.encode(), f"unload {name}")
    except FileNotFoundError:  # ENOENT from the kernel: no such profile
        return f"unable to unload already unloaded profile {name}"
    except OSError as exc:
        raise Refusal(f"the kernel refused to unload profile {name}: {exc.strerror}") from None
    return None


class Parser:
    """Runs apparmor_parser (``compile_only``: ``-Q`` compile and check, load nothing).

    With the compiled-policy cache a profile is compiled to a binary (:meth:`compile`) that
    :func:`kernel_load` loads; without it, :meth:`load` compiles and loads in one run.
    Unloading needs no parser (:func:`kernel_unload`).
    """

    def __init__(self, path: str = DEFAULT_PARSER, compile_only: bool = False) -> None:
        self.path = path
        self.compile_only = compile_only

    def run(self, args: list[str], stdin: bytes | None = None) -> tuple[int, str]:
        """Run ``apparmor_parser ARGS``: (exit status, its error message on one line)."""
        try:
            rc, stderr = spawn([self.path, *args], stdin=stdin)
        except FileNotFoundError:
            raise Refusal(f"{self.path} is missing; install the apparmor package") from None
        except TimeoutError:
            raise Refusal(f"{self.path} {args[0]} did not finish within "
                          f"{PARSER_TIMEOUT:.0f} s") from None
        lines = [ln for ln in stderr.splitlines()
                 if ln.strip() and not ln.startswith("Cache read/write disabled")]
        message = "; ".join(ln.strip() for ln in lines)
        return rc, (message if len(message) <= 400 else message[:397] + "...")

    def _includes(self, profile_dir: str) -> list[str]:
        return [x for d in include_dirs(profile_dir) for x in ("-I", d)]

    def load(self, op: str, profile: str, profile_dir: str) -> None:
        """Compile and load (``-a``) or replace (``-r``) the profile in one run."""
        head = ["-Q", "-K"] if self.compile_only else [op, "-K"]
        rc, err = self.run([*head, *self._includes(profile_dir), profile])
        if rc != 0:
            what = "compile" if self.compile_only else op
            raise Refusal(f"apparmor_parser {what} {profile} failed (exit {rc}): "
                          f"{err or 'no message'}")

    def compile(self, profile: str, profile_dir: str, output: str) -> None:
        """Compile the profile into the binary policy ``output`` (``-Q -o``); load nothing."""
        rc, err = self.run(["-Q", "-K", *self._includes(profile_dir), "-o", output, profile])
        if rc != 0:
            raise Refusal(f"apparmor_parser compile {profile} failed (exit {rc}): "
                          f"{err or 'no message'}")
        if size_of(output) is None:
            raise Refusal(f"apparmor_parser compile {profile} wrote no binary policy to "
                          f"{output}; check the apparmor_parser version")
