"""The command line of vmconfine-aa-helper (libvirt's virt-aa-helper's, plus a few options).

Parsed like ``getopt.gnu_getopt`` (clustered short options, ``-uNAME`` and ``-u NAME``,
``--long=value`` and ``--long value``, unique prefixes of long options, ``--``), without
importing ``getopt``: it pulls in ``gettext``, ``locale`` and ``re``, which the helper's
teardown and cached-load runs do not otherwise need.
"""

from __future__ import annotations

from vmconfine_aa_helper.files import DEFAULT_PARSER
from vmconfine_aa_helper.paths import Refusal, check_text

PROG = "vmconfine-aa-helper"
DEFAULT_DIR = "/etc/apparmor.d/vmconfine"
DEFAULT_PREFIX = "vmconfine-"
DEFAULT_URI = "qemu:///system"
COMMANDS = {"a": "add", "c": "create", "r": "replace", "R": "remove", "D": "delete"}
_HEX = "0123456789abcdef"
_PREFIX_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"

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
      --cache-dir DIR     compiled-policy cache (default: the instance's cache
                          directory + /apparmor)
      --no-cache          compile every time; neither read nor write the cache
      --cached KEY        -c/-r without XML: load the cache entry KEY, whose rules the
                          caller generated and checked with this helper's code
      --compile-only      check with apparmor_parser -Q instead of loading; skip unloading
      --parser PATH       apparmor_parser to run (tests only; default {DEFAULT_PARSER})
  -h, --help              show this help
"""

_SHORT_FLAGS = "acdDhrR"
_SHORT_VALUES = "ufFP"
_LONG_FLAGS = ("add", "create", "dryrun", "delete", "help", "replace", "remove",
               "compile-only", "no-cache")
_LONG_VALUES = ("uuid", "add-file", "append-file", "profile-dir", "prefix", "uri", "parser",
                "cache-dir", "cached")
_SHORT_OF = {"uuid": "u", "add-file": "f", "append-file": "F", "profile-dir": "P",
             "dryrun": "d", "help": "h", **{v: k for k, v in COMMANDS.items()}}


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.cmd = ""
        self.name = ""
        self.uuid = ""
        self.dryrun = False
        self.add_file: str | None = None
        self.append = False
        self.profile_dir = DEFAULT_DIR
        self.prefix = DEFAULT_PREFIX
        self.uri = DEFAULT_URI
        self.cache_dir: str | None = None
        self.no_cache = False
        self.cached: str | None = None
        self.compile_only = False
        self.parser = DEFAULT_PARSER
        self.help = False


def _long(arg: str, args: list[str], i: int) -> tuple[str, str | None, int]:
    """(option, value, next index) for ``--name[=value]`` at ``args[i]``."""
    name, eq, value = arg[2:].partition("=")
    every = _LONG_FLAGS + _LONG_VALUES
    found = [o for o in every if o.startswith(name)] if name else []
    if name in every:
        found = [name]
    if not found:
        raise Refusal(f"option --{name} not recognized; see {PROG} -h")
    if len(found) > 1:
        raise Refusal(f"option --{name} not a unique prefix; see {PROG} -h")
    opt = found[0]
    if opt in _LONG_FLAGS:
        if eq:
            raise Refusal(f"option --{opt} must not have an argument; see {PROG} -h")
        return opt, None, i + 1
    if eq:
        return opt, value, i + 1
    if i + 1 >= len(args):
        raise Refusal(f"option --{opt} requires argument; see {PROG} -h")
    return opt, args[i + 1], i + 2


def split_args(args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """gnu_getopt-style: ((option, value) pairs with long names, remaining arguments)."""
    pairs: list[tuple[str, str | None]] = []
    rest: list[str] = []
    long_of = {v: k for k, v in _SHORT_OF.items()}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i + 1:]
            break
        if arg.startswith("--"):
            opt, value, i = _long(arg, args, i)
            pairs.append((opt, value))
            continue
        if not arg.startswith("-") or arg == "-":
            rest.append(arg)
            i += 1
            continue
        j = 1
        i += 1
        while j < len(arg):
            ch = arg[j]
            if ch in _SHORT_FLAGS:
                pairs.append((long_of[ch], None))
                j += 1
                continue
            if ch not in _SHORT_VALUES:
                raise Refusal(f"option -{ch} not recognized; see {PROG} -h")
            value = arg[j + 1:]
            if not value:
                if i >= len(args):
                    raise Refusal(f"option -{ch} requires argument; see {PROG} -h")
                value = args[i]
                i += 1
            pairs.append((long_of[ch], value))
            break
    return pairs, rest


def parse_args(argv: list[str]) -> Options:
    """The command line as virt-aa-helper reads it; any problem is a :class:`Refusal`."""
    pairs, rest = split_args(argv)
    if rest:
        raise Refusal(f"unexpected argument {rest[0]!r}; the domain XML goes on stdin")
    o = Options()
    name: str | None = None
    for opt, val in pairs:
        if opt == "help":
            o.help = True
        elif opt in COMMANDS.values():
            cmd = _SHORT_OF[opt]
            if o.cmd and o.cmd != cmd:
                raise Refusal(f"give exactly one command, not both -{o.cmd} and -{cmd}")
            o.cmd = cmd
        elif opt == "dryrun":
            o.dryrun = True
        elif opt == "uuid":
            name = val
        elif opt in ("add-file", "append-file"):
            if o.add_file is not None:
                raise Refusal("give at most one -f/-F file")
            o.add_file, o.append = val, opt == "append-file"
        elif opt == "profile-dir":
            o.profile_dir = val or ""
        elif opt == "prefix":
            o.prefix = val or ""
        elif opt == "uri":
            o.uri = val or ""
        elif opt == "cache-dir":
            o.cache_dir = val or ""
        elif opt == "no-cache":
            o.no_cache = True
        elif opt == "cached":
            o.cached = val or ""
        elif opt == "compile-only":
            o.compile_only = True
        elif opt == "parser":
            o.parser = val or ""
    if o.help:
        return o
    _check(o, name)
    return o


def _check(o: Options, name: str | None) -> None:
    if not o.cmd:
        raise Refusal(f"bad command: give one of -c, -r, -a, -R, -D; see {PROG} -h")
    if name is None:
        raise Refusal("missing -u NAME (the profile name: prefix + domain UUID)")
    if not o.prefix or o.prefix[0] in "_.-" or any(c not in _PREFIX_CHARS for c in o.prefix):
        raise Refusal(f"invalid prefix {o.prefix!r}: use letters, digits, '.', '_' and '-'")
    o.uuid = validate_name(name, o.prefix)
    o.name = name
    if o.add_file is not None and o.cmd not in "cr":
        raise Refusal("-f/-F only go with -c or -r")
    if o.append and o.cmd != "r":
        raise Refusal("-F appends to an existing profile: use it with -r (or -f with -c)")
    check_text(o.profile_dir, "profile directory")
    if not o.parser.startswith("/"):
        raise Refusal(f"--parser {o.parser!r} must be an absolute path")
    if o.cache_dir is not None:
        check_text(o.cache_dir, "cache directory")
    if o.cached is not None:
        if o.cmd not in "cr" or o.add_file is not None or o.dryrun or o.no_cache:
            raise Refusal("--cached only goes with -c or -r, without -d, -f, -F or --no-cache")
        if len(o.cached) != 64 or any(c not in _HEX for c in o.cached):
            raise Refusal(f"--cached {o.cached!r}: a key is 64 lowercase hex digits")


def validate_name(name: str, prefix: str) -> str:
    """The UUID part of ``name``; refuse anything but ``prefix`` + a canonical UUID."""
    if len(name) != len(prefix) + 36:
        raise Refusal(f"invalid UUID in profile name {name!r}: expected {prefix} followed by "
                      "a 36-character UUID")
    if not name.startswith(prefix):
        raise Refusal(f"invalid profile name {name!r}: it must start with {prefix!r}")
    uuid = name[len(prefix):]
    groups = uuid.split("-")
    if [len(g) for g in groups] != [8, 4, 4, 4, 12] or any(c not in _HEX for c in
                                                           "".join(groups)):
        raise Refusal(f"invalid UUID {uuid!r} in profile name: use lowercase "
                      "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    return uuid
