"""Machine type canonicalisation (vmconfine.qemu.machines) from ``-machine help`` output."""

from __future__ import annotations

from vmconfine.qemu.machines import parse_machine_help

#: the head of QEMU 7.2's ``qemu-system-x86_64 -machine help``
HELP = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-1.4        Standard PC (i440FX + PIIX, 1996) (deprecated)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""


def test_aliases_become_the_versioned_type() -> None:
    m = parse_machine_help(HELP)
    assert m.canonical("pc") == "pc-i440fx-7.2"
    assert m.canonical("q35") == "pc-q35-7.2"
    assert m.canonical(None) == "pc-i440fx-7.2"  # no machine: the emulator's default


def test_versioned_and_unknown_names_are_kept() -> None:
    m = parse_machine_help(HELP)
    assert m.canonical("pc-q35-7.1") == "pc-q35-7.1"
    assert m.canonical("pc-i440fx-1.4") == "pc-i440fx-1.4"
    assert m.canonical("isapc") == "isapc"
    assert m.canonical("no-such-machine") == "no-such-machine"
    assert {"pc", "q35", "pc-q35-7.2", "none"} <= m.names
