"""Profile files and apparmor_parser runs of vmconfine-aa-helper.

Layout in the profile directory (default ``/etc/apparmor.d/vmconfine``), for profile NAME
(the configured prefix + the domain UUID):

* ``NAME`` — the profile, made once from ``TEMPLATE.qemu`` (the profile directory's own copy
  when the administrator put one there, else the one shipped with vmconfine's AppArmor
  plugin); it includes the shipped abstraction ``abstractions/vmconfine-qemu`` and ``NAME.files``;
* ``NAME.files`` — the generated per-domain rules, rewritten only when their text changes;
* ``NAME.hash`` — SHA-256 of what was last given to ``apparmor_parser`` (profile, rules and the
  abstraction), so an unchanged profile that is still loaded is not compiled again.

``apparmor_parser`` gets ``-I <profile dir> -I <shipped dir>`` so the abstraction is found
without installing it into /etc/apparmor.d (a copy in ``<profile dir>/abstractions/`` wins).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmconfine_aa_helper.paths import Refusal

TEMPLATE_NAME = "TEMPLATE.qemu"
TEMPLATE_MARKER = "\nprofile VMCONFINE_TEMPLATE"
ABSTRACTION = "abstractions/vmconfine-qemu"
DEFAULT_PARSER = "/sbin/apparmor_parser"
KERNEL_PROFILES = Path("/sys/kernel/security/apparmor/profiles")
#: apparmor_parser -R exit status for a profile that is not loaded (libvirt's check)
ALREADY_UNLOADED = 234
PARSER_ENV = {"PATH": "/sbin:/usr/sbin", "IFS": " \t\n", "LC_ALL": "C"}


def shipped_dir() -> Path:
    """The vmconfine_apparmor package directory (TEMPLATE.qemu, abstractions/), found
    without importing the plugin (which would pull in pluggy)."""
    spec = importlib.util.find_spec("vmconfine_apparmor")
    if spec is None or not spec.submodule_search_locations:
        raise Refusal("the vmconfine_apparmor package is not installed; reinstall vmconfine")
    return Path(next(iter(spec.submodule_search_locations)))


def template_path(profile_dir: Path) -> Path:
    """The administrator's template in the profile directory, else the shipped one."""
    local = profile_dir / TEMPLATE_NAME
    return local if local.is_file() else shipped_dir() / TEMPLATE_NAME


def profile_from_template(template: Path, name: str, files_path: Path) -> str:
    """The profile text: the template with its name set and the ``.files`` include added."""
    try:
        text = template.read_text()
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


def include_dirs(profile_dir: Path) -> list[Path]:
    """Where apparmor_parser looks for ``<abstractions/...>`` first (before /etc/apparmor.d)."""
    return [profile_dir, shipped_dir()]


def content_hash(profile_text: str, files_text: str, profile_dir: Path) -> str:
    """SHA-256 over everything vmconfine controls that goes into the compiled profile."""
    h = hashlib.sha256()
    for part in (profile_text, files_text):
        h.update(part.encode())
        h.update(b"\0")
    for d in include_dirs(profile_dir):
        candidate = d / ABSTRACTION
        if candidate.is_file():
            h.update(candidate.read_bytes())
            break
    return h.hexdigest()


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace ``path`` with ``text`` (mode 0644) unless it already holds it."""
    if read_text(path) == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def create_exclusive(path: Path, text: str) -> None:
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


def unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def loaded_profiles() -> set[str] | None:
    """Names of the profiles loaded in the kernel, or None when the list is unreadable
    (AppArmor not enabled, securityfs not mounted)."""
    try:
        text = KERNEL_PROFILES.read_text()
    except OSError:
        return None
    names = set()
    for line in text.splitlines():
        name, _, mode = line.rpartition(" (")
        names.add(name if mode.endswith(")") else line)
    return names


@dataclass
class Parser:
    """Runs apparmor_parser (``compile_only``: ``-Q`` compile and check, load nothing)."""

    path: str = DEFAULT_PARSER
    compile_only: bool = False

    def run(self, op: str, profile: Path | None, profile_dir: Path,
            stdin: str | None = None) -> tuple[int, str]:
        """Run ``apparmor_parser OP`` (-a, -r or -R) on ``profile`` (or stdin)."""
        argv = [self.path]
        if self.compile_only:
            argv += ["-Q", "-K"]
        else:
            argv += [op, "-K"]
        for d in include_dirs(profile_dir):
            argv += ["-I", str(d)]
        if profile is not None:
            argv.append(str(profile))
        try:
            proc = subprocess.run(argv, input=stdin or "", capture_output=True, text=True,
                                  env=PARSER_ENV, timeout=300, check=False, close_fds=True)
        except FileNotFoundError:
            raise Refusal(f"{self.path} is missing; install the apparmor package") from None
        except subprocess.TimeoutExpired:
            raise Refusal(f"{self.path} {op} did not finish within 300 s") from None
        lines = [ln for ln in proc.stderr.splitlines()
                 if ln.strip() and not ln.startswith("Cache read/write disabled")]
        message = "; ".join(ln.strip() for ln in lines)
        return proc.returncode, (message if len(message) <= 400 else message[:397] + "...")

    def load(self, op: str, profile: Path, profile_dir: Path) -> None:
        """Load (``-a``) or replace (``-r``) the profile; raise Refusal on failure."""
        rc, err = self.run(op, profile, profile_dir)
        if rc != 0:
            what = "compile" if self.compile_only else f"{op}"
            raise Refusal(f"apparmor_parser {what} {profile} failed (exit {rc}): "
                          f"{err or 'no message'}")

    def unload(self, name: str, profile: Path | None, profile_dir: Path) -> str | None:
        """Unload profile ``name`` (by its file, or a stub naming it when the file is empty or
        missing). Returns a warning when it was not loaded."""
        if self.compile_only:
            return None
        usable = profile is not None and profile.is_file() and profile.stat().st_size > 0
        rc, err = self.run("-R", profile if usable else None, profile_dir,
                           stdin=None if usable else f"profile {name} {{}}\n")
        if rc == ALREADY_UNLOADED:
            return f"unable to unload already unloaded profile {name}"
        if rc != 0:
            raise Refusal(f"apparmor_parser -R {name} failed (exit {rc}): {err or 'no message'}")
        return None
