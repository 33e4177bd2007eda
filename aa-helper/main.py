"""``vmconfine-aa-helper``: create, replace, load, unload and delete per-domain AppArmor profiles.

The only vmconfine code that writes AppArmor profiles or runs apparmor_parser. The AppArmor
driver runs it with the domain XML on stdin. Its command line follows libvirt's virt-aa-helper::

    vmconfine-aa-helper -c -u NAME [-f FILE] < domain.xml     create and load
    vmconfine-aa-helper -r -u NAME [-f FILE|-F FILE] < domain.xml   regenerate and reload
    vmconfine-aa-helper -a|-R|-D -u NAME                      load | unload | unload + delete

Every refusal (bad name or UUID, hostile path, malformed XML...) exits 1 with one line on
stderr and changes nothing. See docs/apparmor.md.
"""

from __future__ import annotations

import getopt
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from vmconfine_aa_helper import files as pf
from vmconfine_aa_helper.paths import Refusal, check_text, resolve
from vmconfine_aa_helper.rules import HEADER, RuleSet, check_domain_name, domain_rules

PROG = "vmconfine-aa-helper"
MAX_XML_BYTES = 10 * 1024 * 1024
DEFAULT_DIR = "/etc/apparmor.d/vmconfine"
DEFAULT_PREFIX = "vmconfine-"
DEFAULT_URI = "qemu:///system"
SAFE_PATH = "/sbin:/usr/sbin"
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COMMANDS = {"a": "add", "c": "create", "r": "replace", "R": "remove", "D": "delete"}

USAGE = f"""\
usage: {PROG} COMMAND -u NAME [OPTIONS] [< domain.xml]

Manage the AppArmor profile of one vmconfine domain (NAME = prefix + domain UUID).

commands (exactly one):
  -c, --create            create the profile from the template and load it (XML on stdin)
  -r, --replace           regenerate the rules and reload the profile (XML on stdin)
  -a, --add               load the existing profile
  -R, --remove            unload the profile (files stay)
  -D, --delete            unload the profile and delete its files

options:
  -u, --uuid NAME         profile name: the prefix followed by the domain's UUID (required)
  -d, --dryrun            print the profile and its rules on stdout, change nothing
  -f, --add-file FILE     also grant FILE (rwk) while generating the rules
  -F, --append-file FILE  append a rule granting FILE (rwk) to the existing rules
  -P, --profile-dir DIR   profile directory (default {DEFAULT_DIR})
      --prefix PREFIX     profile name prefix (default {DEFAULT_PREFIX})
      --uri URI           instance whose log and runtime paths the profile grants
                          (default {DEFAULT_URI}; qemu:///embed?root=DIR for embed)
      --compile-only      check with apparmor_parser -Q instead of loading; skip unloading
      --parser PATH       apparmor_parser to run (tests only; default {pf.DEFAULT_PARSER})
  -h, --help              show this help
"""

_SHORT = "acdDhrRu:f:F:P:"
_LONG = ["add", "create", "dryrun", "delete", "help", "replace", "remove", "uuid=",
         "add-file=", "append-file=", "profile-dir=", "prefix=", "uri=", "compile-only",
         "parser="]


@dataclass
class Options:
    """The parsed command line."""

    cmd: str = ""
    name: str = ""
    dryrun: bool = False
    add_file: str | None = None
    append: bool = False
    profile_dir: Path = Path(DEFAULT_DIR)
    prefix: str = DEFAULT_PREFIX
    uri: str = DEFAULT_URI
    compile_only: bool = False
    parser: str = pf.DEFAULT_PARSER
    help: bool = False
    uuid: str = ""


def parse_args(argv: list[str]) -> Options:
    """getopt-style parsing as virt-aa-helper; any problem is a :class:`Refusal`."""
    try:
        pairs, rest = getopt.gnu_getopt(argv, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise Refusal(f"{exc}; see {PROG} -h") from None
    if rest:
        raise Refusal(f"unexpected argument {rest[0]!r}; the domain XML goes on stdin")
    o = Options()
    name: str | None = None
    for opt, val in pairs:
        key = opt.lstrip("-")
        if key in ("h", "help"):
            o.help = True
        elif key in COMMANDS or key in COMMANDS.values():
            cmd = key if key in COMMANDS else next(k for k, v in COMMANDS.items() if v == key)
            if o.cmd and o.cmd != cmd:
                raise Refusal(f"give exactly one command, not both -{o.cmd} and -{cmd}")
            o.cmd = cmd
        elif key in ("d", "dryrun"):
            o.dryrun = True
        elif key in ("u", "uuid"):
            name = val
        elif key in ("f", "add-file", "F", "append-file"):
            if o.add_file is not None:
                raise Refusal("give at most one -f/-F file")
            o.add_file, o.append = val, key in ("F", "append-file")
        elif key in ("P", "profile-dir"):
            o.profile_dir = Path(val)
        elif key == "prefix":
            o.prefix = val
        elif key == "uri":
            o.uri = val
        elif key == "compile-only":
            o.compile_only = True
        elif key == "parser":
            o.parser = val
    if o.help:
        return o
    if not o.cmd:
        raise Refusal(f"bad command: give one of -c, -r, -a, -R, -D; see {PROG} -h")
    if name is None:
        raise Refusal("missing -u NAME (the profile name: prefix + domain UUID)")
    if not _PREFIX_RE.fullmatch(o.prefix):
        raise Refusal(f"invalid prefix {o.prefix!r}: use letters, digits, '.', '_' and '-'")
    o.uuid = validate_name(name, o.prefix)
    o.name = name
    if o.add_file is not None and o.cmd not in "cr":
        raise Refusal("-f/-F only go with -c or -r")
    if o.append and o.cmd != "r":
        raise Refusal("-F appends to an existing profile: use it with -r (or -f with -c)")
    check_text(str(o.profile_dir), "profile directory")
    if not o.parser.startswith("/"):
        raise Refusal(f"--parser {o.parser!r} must be an absolute path")
    return o


def validate_name(name: str, prefix: str) -> str:
    """The UUID part of ``name``; refuse anything but ``prefix`` + a canonical UUID."""
    if len(name) != len(prefix) + 36:
        raise Refusal(f"invalid UUID in profile name {name!r}: expected {prefix} followed by "
                      "a 36-character UUID")
    if not name.startswith(prefix):
        raise Refusal(f"invalid profile name {name!r}: it must start with {prefix!r}")
    uuid = name[len(prefix):]
    if not _UUID_RE.fullmatch(uuid):
        raise Refusal(f"invalid UUID {uuid!r} in profile name: use lowercase "
                      "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    return uuid


@dataclass
class Helper:
    """One run of the helper: ``execute`` does the command, collecting warnings."""

    o: Options
    stdin: IO[bytes]
    out: IO[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def profile(self) -> Path:
        return self.o.profile_dir / self.o.name

    @property
    def files(self) -> Path:
        return self.o.profile_dir / f"{self.o.name}.files"

    @property
    def hashfile(self) -> Path:
        return self.o.profile_dir / f"{self.o.name}.hash"

    @property
    def parser(self) -> pf.Parser:
        return pf.Parser(self.o.parser, self.o.compile_only)

    def execute(self) -> None:
        cmd = self.o.cmd
        if cmd in "cr":
            self.generate()
        elif cmd == "a":
            self.add()
        else:
            self.remove(delete=cmd == "D")

    # ---- -c / -r -----------------------------------------------------------------------------
    def read_domain(self):  # type: ignore[no-untyped-def]
        """Read (≤ 10 MiB), parse and check the domain XML from stdin."""
        from vmconfine.chain import resolve_chain
        from vmconfine.domain import parse_domain
        from vmconfine.errors import VmconfineError

        data = self.stdin.read(MAX_XML_BYTES + 1)
        if len(data) > MAX_XML_BYTES:
            raise Refusal("the domain XML on stdin is larger than 10 MiB; pass a real domain "
                          "definition")
        if not data.strip():
            raise Refusal("no domain XML on stdin; pipe the domain definition in")
        try:
            domain = parse_domain(data, "<stdin>", live=True)
        except VmconfineError as exc:
            raise Refusal(f"invalid domain XML: {exc}") from None
        check_domain_name(domain.name)
        if domain.uuid_generated:
            raise Refusal("the domain XML has no <uuid>; the profile name needs it")
        if domain.uuid != self.o.uuid:
            raise Refusal(f"given profile name {self.o.name} does not match the XML's uuid "
                          f"{domain.uuid}")
        for disk in domain.disks:
            if disk.source is not None and disk.type in ("file", "block") and disk.source.path:
                try:
                    resolve_chain(disk.source)
                except VmconfineError as exc:
                    raise Refusal(str(exc)) from None
        return domain

    def instance(self):  # type: ignore[no-untyped-def]
        from vmconfine.errors import VmconfineError
        from vmconfine.instance import open_instance, parse_uri

        try:
            if parse_uri(self.o.uri).kind == "session":
                raise Refusal(f"--uri {self.o.uri}: AppArmor profiles are only managed for "
                              "privileged instances (qemu:///system or an embed root)")
            return open_instance(self.o.uri)
        except VmconfineError as exc:
            raise Refusal(str(exc)) from None

    def rules_text(self) -> str:
        domain = self.read_domain()
        instance = self.instance()
        if self.o.append:
            existing = pf.read_text(self.files)
            if existing:
                extra = RuleSet()
                extra.add(self.o.add_file or "", "rwk", what="appended file")
                lines = extra.render()[len(HEADER):]
                return existing if lines in existing else existing + lines
        extra_files = [self.o.add_file] if self.o.add_file else []
        return domain_rules(domain, instance, extra_files).render()

    def generate(self) -> None:
        o = self.o
        profile_dir = Path(resolve(str(o.profile_dir)))
        check_text(str(profile_dir), "profile directory")
        o.profile_dir = profile_dir
        size = self.profile.stat().st_size if self.profile.is_file() else None
        if o.cmd == "c" and size:
            raise Refusal(f"profile {self.profile} exists; replace it with -r or delete it "
                          "with -D")
        files_text = self.rules_text()
        template = pf.template_path(profile_dir)
        new_profile = pf.profile_from_template(template, o.name, self.files)
        purge = size == 0
        create = o.cmd == "c" or purge or size is None
        if o.dryrun:
            current = new_profile if create else (pf.read_text(self.profile) or "")
            self.out.write(f"# {self.files}\n{files_text}# {self.profile}\n{current}")
            return
        profile_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        loaded = pf.loaded_profiles()
        if purge:
            self.warnings.append(f"profile {self.profile} has 0 bytes (corrupt); "
                                 "it is unloaded, removed and created again")
            if loaded is None or o.name in loaded:
                warn = self.parser.unload(o.name, None, profile_dir)
                if warn and loaded is not None:
                    self.warnings.append(warn)
            pf.unlink(self.profile, self.hashfile)
        old_files = pf.read_text(self.files)
        pf.write_if_changed(self.files, files_text)
        if create:
            pf.create_exclusive(self.profile, new_profile)
        profile_text = pf.read_text(self.profile) or ""
        digest = pf.content_hash(profile_text, files_text, profile_dir)
        is_loaded = o.compile_only or (loaded is not None and o.name in loaded)
        if not create and is_loaded and pf.read_text(self.hashfile) == digest + "\n":
            return
        pf.unlink(self.hashfile)
        op = "-r" if (loaded is not None and o.name in loaded) or not create else "-a"
        try:
            self.parser.load(op, self.profile, profile_dir)
        except Refusal:
            if create:
                pf.unlink(self.profile, self.files)
            elif old_files is None:
                pf.unlink(self.files)
            else:
                pf.write_if_changed(self.files, old_files)
            raise
        pf.write_if_changed(self.hashfile, digest + "\n")

    # ---- -a / -R / -D ------------------------------------------------------------------------
    def _existing(self) -> int | None:
        return self.profile.stat().st_size if self.profile.is_file() else None

    def add(self) -> None:
        size = self._existing()
        if not size:
            raise Refusal(f"profile {self.profile} does not exist or is empty; create it "
                          "with -c")
        if self.o.dryrun:
            self.out.write(f"would load {self.profile}\n")
            return
        loaded = pf.loaded_profiles()
        op = "-r" if loaded is not None and self.o.name in loaded else "-a"
        self.parser.load(op, self.profile, self.o.profile_dir)
        files_text = pf.read_text(self.files) or ""
        digest = pf.content_hash(pf.read_text(self.profile) or "", files_text,
                                 self.o.profile_dir)
        pf.write_if_changed(self.hashfile, digest + "\n")

    def remove(self, *, delete: bool) -> None:
        o = self.o
        size = self._existing()
        if size is None and not delete:
            raise Refusal(f"profile {self.profile} does not exist; nothing to unload")
        loaded = pf.loaded_profiles()
        need_unload = not o.compile_only and (loaded is None or o.name in loaded)
        if delete and loaded is None:
            need_unload = False  # AppArmor is off: nothing can be loaded
            self.warnings.append("AppArmor is not enabled; only the files are deleted")
        if o.dryrun:
            if need_unload:
                self.out.write(f"would unload {o.name}\n")
            if delete:
                for p in (self.profile, self.files, self.hashfile):
                    if p.exists():
                        self.out.write(f"would delete {p}\n")
            return
        if need_unload:
            warn = self.parser.unload(o.name, self.profile if size else None, o.profile_dir)
            if warn:
                self.warnings.append(warn)
        elif not o.compile_only and loaded is not None:
            self.warnings.append(f"unable to unload already unloaded profile {o.name}")
        pf.unlink(self.hashfile)
        if delete:
            pf.unlink(self.profile, self.files)


def run(argv: list[str], stdin: IO[bytes], out: IO[str], err: IO[str]) -> int:
    """The helper without process-wide side effects (tests call this); returns the exit code."""
    try:
        opts = parse_args(argv)
        if opts.help:
            out.write(USAGE)
            return 0
        helper = Helper(opts, stdin, out)
        helper.execute()
    except Refusal as exc:
        err.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        err.write(f"{PROG}: error: {_one_line(exc.strerror or str(exc))}{where}\n")
        return 1
    for warning in helper.warnings:
        err.write(f"{PROG}: warning: {_one_line(warning)}\n")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def harden_process() -> None:
    """virt-aa-helper's process hygiene: empty environment, fixed PATH and IFS, umask 022."""
    os.environ.clear()
    os.environ["PATH"] = SAFE_PATH
    os.environ["IFS"] = " \t\n"
    os.umask(0o022)


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    harden_process()
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer, sys.stdout,
                   sys.stderr)
    except Exception as exc:  # a bug: still one line and exit 1, never a traceback
        sys.stderr.write(f"{PROG}: error: internal error: {type(exc).__name__}: "
                         f"{_one_line(str(exc))}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
