"""``vmconfine-aa-helper``: create, replace, load, unload and delete per-domain AppArmor profiles.

The only vmconfine code that writes AppArmor profiles or runs apparmor_parser. The AppArmor
driver runs it with the domain XML on stdin. Its command line follows libvirt's virt-aa-helper::

    vmconfine-aa-helper -c -u NAME [-f FILE] < domain.xml     create and load
    vmconfine-aa-helper -r -u NAME [-f FILE|-F FILE] < domain.xml   regenerate and reload
    vmconfine-aa-helper -a|-R|-D -u NAME                      load | unload | unload + delete
    vmconfine-aa-helper -c|-r -u NAME --cached KEY            load a cached compiled policy

Compiled policies are cached by content (:mod:`vmconfine_aa_helper.cache`): a profile whose
key is in the cache is loaded from its binary instead of being compiled again.

Every refusal (bad name or UUID, hostile path, malformed XML...) exits 1 with one line on
stderr and changes nothing. See docs/apparmor.md.

Start-up is part of every domain start and stop, so the XML parser, the domain model and the
rule generator are imported only by the commands that read XML (-c/-r without --cached).
"""

from __future__ import annotations

import os
import sys

from vmconfine_aa_helper import files as pf
from vmconfine_aa_helper.options import PROG, USAGE, Options, parse_args, validate_name
from vmconfine_aa_helper.paths import Refusal, check_text, resolve

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import IO

    from vmconfine_aa_helper.cache import Cache

MAX_XML_BYTES = 10 * 1024 * 1024
SAFE_PATH = "/sbin:/usr/sbin"
CACHE_SUBDIR = "apparmor"

__all__ = ["MAX_XML_BYTES", "PROG", "USAGE", "Helper", "Options", "main", "parse_args", "run",
           "validate_name"]


class Helper:
    """One run of the helper: ``execute`` does the command, collecting warnings."""

    def __init__(self, o: Options, stdin: IO[bytes], out: IO[str]) -> None:
        self.o = o
        self.stdin = stdin
        self.out = out
        self.warnings: list[str] = []
        self._cache: Cache | None = None
        self._cache_checked = False

    @property
    def profile(self) -> str:
        return os.path.join(self.o.profile_dir, self.o.name)

    @property
    def files(self) -> str:
        return os.path.join(self.o.profile_dir, f"{self.o.name}.files")

    @property
    def hashfile(self) -> str:
        return os.path.join(self.o.profile_dir, f"{self.o.name}.hash")

    @property
    def parser(self) -> pf.Parser:
        return pf.Parser(self.o.parser, self.o.compile_only)

    def execute(self) -> None:
        cmd = self.o.cmd
        if cmd in "cr":
            if self.o.cached is not None:
                self.load_cached(self.o.cached)
            else:
                self.generate()
        elif cmd == "a":
            self.add()
        else:
            self.remove(delete=cmd == "D")

    # ---- -c / -r -----------------------------------------------------------------------------
    def read_xml(self) -> bytes:
        """The domain XML from stdin (≤ 10 MiB, not blank)."""
        data = self.stdin.read(MAX_XML_BYTES + 1)
        if len(data) > MAX_XML_BYTES:
            raise Refusal("the domain XML on stdin is larger than 10 MiB; pass a real domain "
                          "definition")
        if not data.strip():
            raise Refusal("no domain XML on stdin; pipe the domain definition in")
        return data

    def check_identity(self, name: str, uuid: str, generated: bool = False) -> None:
        from vmconfine_aa_helper.rules import check_domain_name

        check_domain_name(name)
        if generated:
            raise Refusal("the domain XML has no <uuid>; the profile name needs it")
        if uuid != self.o.uuid:
            raise Refusal(f"given profile name {self.o.name} does not match the XML's uuid "
                          f"{uuid}")

    def read_domain(self, data: bytes):  # type: ignore[no-untyped-def]
        """Parse and check the domain XML with the shared domain model."""
        from vmconfine.domain import parse_domain
        from vmconfine.errors import VmconfineError

        try:
            domain = parse_domain(data, "<stdin>", live=True)
        except VmconfineError as exc:
            raise Refusal(f"invalid domain XML: {exc}") from None
        self.check_identity(domain.name, domain.uuid, domain.uuid_generated)
        for disk in domain.disks:
            src = disk.source
            if src is None or disk.type not in ("file", "block") or not src.path:
                continue
            if src.backing is None and (src.format or "raw") in ("raw", "iso"):
                continue  # a raw image has no backing chain (resolve_chain would stop here)
            from vmconfine.domain.chain import resolve_chain

            try:
                resolve_chain(src)
            except VmconfineError as exc:
                raise Refusal(str(exc)) from None
        return domain

    def instance(self):  # type: ignore[no-untyped-def]
        from vmconfine.config.instance import open_instance, parse_uri
        from vmconfine.errors import VmconfineError

        try:
            if parse_uri(self.o.uri).kind == "session":
                raise Refusal(f"--uri {self.o.uri}: AppArmor profiles are only managed for "
                              "privileged instances (qemu:///system or an embed root)")
            return open_instance(self.o.uri)
        except VmconfineError as exc:
            raise Refusal(str(exc)) from None

    def instance_paths(self, name: str) -> tuple[str, tuple[str, str, str]]:
        """(cache directory, (QEMU log, home, runtime directory of ``name``)) of the
        instance; the plain URIs without the instance module (start-up)."""
        from vmconfine.config.layout import (
            DOMAIN_DIR,
            LOG_FILE,
            SYSTEM_DIRS,
            embed_dirs,
            plain_uri,
        )

        plain = plain_uri(self.o.uri)
        if plain is not None and (plain[0] == "embed" or os.geteuid() == 0):
            _, run, lib, cache, log = SYSTEM_DIRS if plain[1] is None else embed_dirs(plain[1])
            home = os.path.join(lib, DOMAIN_DIR.format(name=name))
            return cache, (os.path.join(log, LOG_FILE.format(name=name)), home,
                           os.path.join(run, DOMAIN_DIR.format(name=name)))
        inst = self.instance()
        return str(inst.cache_dir), (str(inst.log_path(name)), str(inst.domain_lib_dir(name)),
                                     str(inst.domain_run_dir(name)))

    def rules_text(self) -> str:
        from vmconfine_aa_helper.domxml import Fallback, read
        from vmconfine_aa_helper.rules import HEADER, RuleSet

        data = self.read_xml()
        try:
            view = read(data)
        except Fallback:
            view = None
        if view is not None:  # the common case: no lxml, no domain model
            self.check_identity(view.name, view.uuid)
            cache_dir, dirs = self.instance_paths(view.name)
        else:
            domain = self.read_domain(data)
            instance = self.instance()
            cache_dir = str(instance.cache_dir)
        if self.o.cache_dir is None and not self.o.no_cache:
            self.o.cache_dir = os.path.join(cache_dir, CACHE_SUBDIR)
        if self.o.append:
            existing = pf.read_text(self.files)
            if existing:
                extra = RuleSet()
                extra.add(self.o.add_file or "", "rwk", what="appended file")
                lines = extra.render()[len(HEADER):]
                return existing if lines in existing else existing + lines
        extra_files = [self.o.add_file] if self.o.add_file else []
        if view is not None:
            from vmconfine_aa_helper.rules import view_rules

            return view_rules(view, dirs, extra_files).render()
        from vmconfine_aa_helper.rules import domain_rules

        return domain_rules(domain, instance, extra_files).render()

    def _resolve_profile_dir(self) -> str:
        profile_dir = resolve(self.o.profile_dir)
        check_text(profile_dir, "profile directory")
        self.o.profile_dir = profile_dir
        return profile_dir

    def generate(self) -> None:
        o = self.o
        profile_dir = self._resolve_profile_dir()
        size = pf.size_of(self.profile)
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
        os.makedirs(profile_dir, mode=0o755, exist_ok=True)
        loaded = pf.loaded_profiles()
        if purge:
            self.warnings.append(f"profile {self.profile} has 0 bytes (corrupt); "
                                 "it is unloaded, removed and created again")
            if not o.compile_only and (loaded is None or o.name in loaded):
                try:
                    warn = pf.kernel_unload(o.name)
                except Refusal:
                    if loaded is not None:
                        raise
                    warn = None  # no securityfs: nothing can be loaded
                if warn and loaded is not None:
                    self.warnings.append(warn)
            pf.unlink(self.profile, self.hashfile)
        old_files = pf.read_text(self.files)
        pf.write_if_changed(self.files, files_text)
        if create:
            pf.create_exclusive(self.profile, new_profile)
        profile_text = pf.read_text(self.profile) or ""
        key = self.policy_key(profile_text, files_text)
        is_loaded = o.compile_only or (loaded is not None and o.name in loaded)
        if not create and is_loaded and key and pf.read_text(self.hashfile) == key + "\n":
            return
        pf.unlink(self.hashfile)
        op = "-r" if (loaded is not None and o.name in loaded) or not create else "-a"
        try:
            self.load(op, profile_text, files_text, key)
        except Refusal:
            self._roll_back(create, old_files)
            raise
        if key:
            pf.write_if_changed(self.hashfile, key + "\n")

    def _roll_back(self, created: bool, old_files: str | None) -> None:
        """After a failed load: remove a new profile, or put the previous rules back."""
        if created:
            pf.unlink(self.profile, self.files)
        elif old_files is None:
            pf.unlink(self.files)
        else:
            pf.write_if_changed(self.files, old_files)

    def load_cached(self, key: str) -> None:
        """``--cached KEY``: the caller generated the rules in-process with this helper's own
        code (same checks) and found them in the cache. Load that entry without reading XML,
        after checking it is current (template, includes, parser and kernel unchanged) and
        intact (binary digest). Anything else is refused; the caller then runs -c/-r with XML.
        """
        o = self.o
        profile_dir = self._resolve_profile_dir()
        if o.cache_dir is None:
            o.cache_dir = os.path.join(str(self.instance().cache_dir), CACHE_SUBDIR)
        cache = self.cache(create=False)
        entry = cache.texts(o.name, key) if cache is not None else None
        if entry is None:
            raise Refusal(f"no usable policy cache entry {key} for {o.name}; run {PROG} "
                          "without --cached")
        profile_text, files_text = entry
        template = pf.template_path(profile_dir)
        if profile_text != pf.profile_from_template(template, o.name, self.files):
            raise Refusal(f"policy cache entry {key} was made for another template or profile "
                          f"directory; run {PROG} without --cached")
        if self.policy_key(profile_text, files_text) != key:
            raise Refusal(f"policy cache entry {key} is out of date (includes, parser or kernel "
                          f"changed); run {PROG} without --cached")
        size = pf.size_of(self.profile)
        if size is not None and o.cmd == "c":
            raise Refusal(f"profile {self.profile} exists; replace it with -r or delete it "
                          "with -D")
        if size is not None and pf.read_text(self.profile) != profile_text:
            raise Refusal(f"profile {self.profile} differs from policy cache entry {key}; run "
                          f"{PROG} without --cached")
        create = size is None
        loaded = pf.loaded_profiles()
        in_kernel = loaded is not None and o.name in loaded
        if (not create and (o.compile_only or in_kernel) and pf.read_text(self.files) ==
                files_text and pf.read_text(self.hashfile) == key + "\n"):
            return
        assert cache is not None
        policy = cache.policy(o.name, key)
        self._take_warnings(cache)
        if policy is None:
            raise Refusal(f"policy cache entry {key} for {o.name} is damaged; run {PROG} "
                          "without --cached")
        os.makedirs(profile_dir, mode=0o755, exist_ok=True)
        old_files = pf.read_text(self.files)
        pf.write_if_changed(self.files, files_text)
        if create:
            pf.create_exclusive(self.profile, profile_text)
        pf.unlink(self.hashfile)
        try:
            self.load_policy("-r" if in_kernel else "-a", policy)
        except Refusal:
            self._roll_back(create, old_files)
            raise
        cache.touch(o.name, key)
        pf.write_if_changed(self.hashfile, key + "\n")

    # ---- loading through the cache -----------------------------------------------------------
    def policy_key(self, profile_text: str, files_text: str) -> str | None:
        from vmconfine_aa_helper.cache import policy_key

        return policy_key(profile_text, files_text, self.files,
                          pf.include_dirs(self.o.profile_dir), self.o.parser)

    def cache(self, *, create: bool) -> Cache | None:
        """The compiled-policy cache, or None (disabled, or not usable: a warning says why)."""
        if self._cache_checked:
            return self._cache
        self._cache_checked = True
        if self.o.no_cache or not self.o.cache_dir:
            return None
        from vmconfine_aa_helper.cache import Cache

        cache = Cache(self.o.cache_dir)
        try:
            usable = cache.usable(create=create)
        except OSError as exc:
            usable = False
            cache.warnings.append(f"policy cache {cache.root} cannot be made "
                                  f"({exc.strerror}); the profile is compiled without it")
        self._take_warnings(cache)
        self._cache = cache if usable else None
        return self._cache

    def _take_warnings(self, cache: Cache) -> None:
        self.warnings += cache.warnings
        cache.warnings = []

    def load_policy(self, op: str, policy: bytes) -> None:
        """Give a compiled policy to the kernel (compile-only mode: nothing to do, the
        compile was the check)."""
        if not self.o.compile_only:
            pf.kernel_load(op, policy, self.profile)

    def load(self, op: str, profile_text: str, files_text: str, key: str | None) -> None:
        """Load the profile: from the cache when its key is there, else compile (into a new
        cache entry when the profile is cacheable) and load."""
        o, parser = self.o, self.parser
        cache = self.cache(create=True) if key else None
        if cache is None or key is None:
            parser.load(op, self.profile, o.profile_dir)
            return
        policy = cache.policy(o.name, key)
        self._take_warnings(cache)
        if policy is not None:
            try:
                self.load_policy(op, policy)
            except Refusal as exc:
                self.warnings.append(f"the cached policy of {o.name} was refused ({exc}); "
                                     "it is compiled again")
                cache.discard(o.name, key)
            else:
                cache.touch(o.name, key)
                return
        from vmconfine_aa_helper.cache import BINARY, remove_entry

        try:
            staging = cache.stage(o.name)
        except OSError as exc:
            self.warnings.append(f"policy cache {cache.root} is not writable ({exc.strerror}); "
                                 "the profile is compiled without it")
            parser.load(op, self.profile, o.profile_dir)
            return
        try:
            binary = os.path.join(staging, BINARY)
            parser.compile(self.profile, o.profile_dir, binary)
            with open(binary, "rb") as fh:
                policy = fh.read()
            self.load_policy(op, policy)
            try:
                cache.commit(staging, o.name, key, profile_text, files_text, policy)
            except OSError as exc:
                self.warnings.append(f"the compiled policy of {o.name} could not be cached "
                                     f"({exc.strerror}); it is loaded")
        finally:
            remove_entry(staging)  # gone already when committed

    # ---- -a / -R / -D ------------------------------------------------------------------------
    def add(self) -> None:
        size = pf.size_of(self.profile)
        if not size:
            raise Refusal(f"profile {self.profile} does not exist or is empty; create it "
                          "with -c")
        if self.o.dryrun:
            self.out.write(f"would load {self.profile}\n")
            return
        loaded = pf.loaded_profiles()
        op = "-r" if loaded is not None and self.o.name in loaded else "-a"
        profile_text = pf.read_text(self.profile) or ""
        files_text = pf.read_text(self.files) or ""
        key = self.policy_key(profile_text, files_text)
        self.load(op, profile_text, files_text, key)
        if key:
            pf.write_if_changed(self.hashfile, key + "\n")
        else:
            pf.unlink(self.hashfile)

    def remove(self, *, delete: bool) -> None:
        o = self.o
        size = pf.size_of(self.profile)
        if size is None and not delete:
            raise Refusal(f"profile {self.profile} does not exist; nothing to unload")
        loaded = pf.loaded_profiles()
        need_unload = not o.compile_only and (loaded is None or o.name in loaded)
        if delete and loaded is None:
            need_unload = False  # AppArmor is off: nothing can be loaded
            if not o.compile_only:  # that mode never loads anything anyway
                self.warnings.append("AppArmor is not enabled; only the files are deleted")
        if o.dryrun:
            if need_unload:
                self.out.write(f"would unload {o.name}\n")
            if delete:
                for p in (self.profile, self.files, self.hashfile):
                    if os.path.lexists(p):
                        self.out.write(f"would delete {p}\n")
            return
        if need_unload:
            warn = pf.kernel_unload(o.name)
            if warn:
                self.warnings.append(warn)
        elif not o.compile_only and loaded is not None:
            self.warnings.append(f"unable to unload already unloaded profile {o.name}")
        pf.unlink(self.hashfile)
        if delete:
            pf.unlink(self.profile, self.files)


def run(argv: list[str], stdin: IO[bytes], out: IO[str], err: IO[str]) -> int:
    """The helper without process-wide side effects (tests call this); returns the exit code."""
    helper: Helper | None = None
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
    """virt-aa-helper's process hygiene: empty environment, fixed PATH and IFS, umask 022; and
    no inherited descriptor beyond 0-2 reaches apparmor_parser (all made close-on-exec)."""
    os.environ.clear()
    os.environ["PATH"] = SAFE_PATH
    os.environ["IFS"] = " \t\n"
    os.umask(0o022)
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = []
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the descriptor of the listing itself, closed meanwhile


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
