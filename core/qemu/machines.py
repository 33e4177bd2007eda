"""Machine type names as the emulator resolves them: ``q35`` → ``pc-q35-7.2``.

libvirt matches firmware descriptors' machine globs (``pc-q35-*``) against the versioned name
the alias stands for; vmconfine asks the emulator (``EMULATOR -machine help``, run through
:mod:`vmconfine.qemu.probe` as QEMU's account, cached by the binary's identity).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmconfine.qemu.probe import EmulatorProbe

_ALIAS = re.compile(r"^(\S+)\s.*\(alias of (\S+)\)\s*$")


def parse_aliases(help_text: str) -> dict[str, str]:
    """``alias → machine`` from ``-machine help`` output."""
    out: dict[str, str] = {}
    for line in help_text.splitlines():
        m = _ALIAS.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def canonical(emulator: str, machine: str, probe: EmulatorProbe) -> str:
    """The versioned machine type ``machine`` stands for (itself when it is no alias).
    Raises :class:`vmconfine.qemu.probe.ProbeError` when the emulator cannot answer."""
    out = probe.run([emulator, "-machine", "help"], emulator=emulator)
    return parse_aliases(out).get(machine, machine)
