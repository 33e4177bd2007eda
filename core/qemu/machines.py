"""Machine types canonicalised as libvirt does: ``pc`` → the emulator's current versioned
``pc-i440fx-X.Y``, ``q35`` → ``pc-q35-X.Y`` (any alias QEMU lists), and no machine → the
emulator's default, so the guest's ABI stays the same when QEMU is upgraded.

The emulator answers ``EMULATOR -machine help`` (lines ``NAME  DESCRIPTION (alias of TARGET)``
and ``NAME  DESCRIPTION (default)``) through :mod:`vmconfine.qemu.probe`: as QEMU's account,
without privileges, cached by the binary's identity like every probe (libvirt reads the same
list from ``query-machines`` and caches it in its capabilities cache).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from vmconfine.qemu.probe import EmulatorProbe

_LINE = re.compile(r"^(\S+)\s+.*?(?:\(alias of (\S+)\))?\s*(\(default\))?\s*(?:\(deprecated\))?$")


@dataclass(frozen=True)
class Machines:
    """An emulator's machine types: aliases (``pc`` → ``pc-i440fx-7.2``) and its default."""

    aliases: dict[str, str] = field(default_factory=dict)
    names: frozenset[str] = frozenset()
    default: str | None = None

    def canonical(self, machine: str | None) -> str | None:
        """The versioned name of ``machine`` (the default when None); unknown names are
        returned as they are (QEMU will say what it thinks of them)."""
        if machine is None:
            return self.default
        return self.aliases.get(machine, machine)


@functools.lru_cache(maxsize=8)
def parse_machine_help(text: str) -> Machines:
    """:class:`Machines` from ``-machine help`` output (remembered: every start of a domain
    asks for the same cached output, ~60 lines of regular expressions; treat as read-only)."""
    aliases: dict[str, str] = {}
    names: set[str] = set()
    default = None
    for line in text.splitlines()[1:]:
        m = _LINE.match(line.strip())
        if not m:
            continue
        name, target, is_default = m.group(1), m.group(2), m.group(3)
        names.add(name)
        if target:
            aliases[name] = target
        if is_default:
            default = target or name
    return Machines(aliases, frozenset(names), default)


def machines(emulator: str, probe: EmulatorProbe) -> Machines:
    """The machine types of ``emulator`` (run through ``probe``; raises ProbeError)."""
    return parse_machine_help(probe.run([emulator, "-machine", "help"], emulator=emulator))
