"""Shared pieces of ``domxml-from-native``: errors, QEMU option-value syntax, and the small
device model the command line is read into (see :mod:`vmconfine.qemu.fromnative.convert`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vmconfine.errors import VmconfineError


class NativeArgsError(VmconfineError):
    """A QEMU command line that cannot be read (bad quoting, missing value, bad binary...)."""


class Unconvertible(Exception):
    """An option vmconfine cannot express as domain XML (it is kept as ``<qemu:arg>``)."""


# --------------------------------------------------------------------------- option values


def split_commas(text: str) -> list[str]:
    """Split QEMU's ``a=b,c=d`` syntax; ``,,`` is a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """``key=value,...`` → dict. A first item without ``=`` is the ``implied`` key's value;
    a later bare ``key`` means ``key=on`` (``nowait``/``noserver``: ``off``)."""
    out: dict[str, str] = {}
    for n, part in enumerate(split_commas(text)):
        if part == "" and n > 0:
            continue
        key, eq, value = part.partition("=")
        if eq:
            out[key] = value
        elif n == 0 and implied:
            out[implied] = part
        elif part in ("nowait", "noserver"):
            out[part[2:]] = "off"
        else:
            out[part] = "on"
    return out


def escape(value: str) -> str:
    """Escape a value for QEMU's option syntax (``,`` → ``,,``)."""
    return value.replace(",", ",,")


def join_opts(opts: dict[str, str]) -> str:
    """The inverse of :func:`parse_opts` (without an implied key)."""
    return ",".join(f"{k}={escape(v)}" for k, v in opts.items())


def parse_props(text: str, implied: str) -> dict[str, Any]:
    """``-device``/``-blockdev``/``-object``/``-netdev`` value: JSON or keyval (dotted keys
    nest, as QEMU's keyval parser does)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NativeArgsError(f"malformed JSON option value {text[:60]!r}: {exc.msg} at "
                                  f"column {exc.colno}; fix the JSON") from None
        if not isinstance(value, dict):
            raise NativeArgsError(f"JSON option value {text[:60]!r} is not an object")
        return value
    out: dict[str, Any] = {}
    for key, value in parse_opts(text, implied).items():
        cur = out
        *path, last = key.split(".")
        for part in path:
            nxt = cur.setdefault(part, {})
            cur = nxt if isinstance(nxt, dict) else {}
        cur[last] = value
    return out


def as_bool(value: Any) -> bool:
    """QEMU's boolean spellings (and JSON booleans)."""
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("on", "yes", "true", "1", "y")


def as_int(value: Any) -> int | None:
    """An integer in any base QEMU accepts (``0x0627``, ``3``), None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def disk_letters(index: int) -> str:
    """0 → a, 25 → z, 26 → aa (inverse of libvirt's virDiskNameToIndex)."""
    out = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def alias_index(ident: Any, prefix: str) -> int | None:
    """N from a libvirt alias such as ``virtio-disk3`` or ``console2``."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", str(ident or ""))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the model


@dataclass
class Opt:
    """One option of the command line: ``status`` is pass (kept as ``<qemu:arg>``), used
    (converted), drop (vmconfine adds its own), rest (only the unconverted sub-options left
    in ``value`` are kept) or later (a ``-net`` part waiting to be paired); ``why`` says
    why it was not converted."""

    raw: str
    name: str
    value: str | None
    pos: int
    status: str = "pass"
    why: str = ""

    def words(self) -> list[str]:
        return [self.raw] if self.value is None else [self.raw, self.value]

    def text(self) -> str:
        return " ".join(self.words())


@dataclass
class Monitor:
    """A QEMU monitor found on the command line (vmconfine adds its own; these are dropped).

    ``protocol`` qmp|hmp; ``kind`` unix|tcp|fd|pty|stdio|other; ``server``: QEMU listens."""

    protocol: str
    kind: str
    path: str | None
    server: bool
    option: str


@dataclass
class Layer:
    """One image of a disk chain; ``end``: the command line says it has no backing file."""

    path: str
    type: str
    format: str
    backing: Layer | None = None
    end: bool = False


@dataclass
class NDisk:
    device: str
    bus: str
    index: int
    top: Layer | None
    readonly: bool = False
    shareable: bool = False
    serial: str | None = None
    boot: int | None = None
    controller_model: str | None = None

    @property
    def target(self) -> str:
        prefix = {"ide": "hd", "sata": "sd", "scsi": "sd", "virtio": "vd", "fdc": "fd"}
        return prefix[self.bus] + disk_letters(self.index)


@dataclass
class CharSrc:
    """The host side of a character device."""

    type: str
    path: str | None = None
    mode: str | None = None
    host: str | None = None
    service: str | None = None


@dataclass
class NChar:
    kind: str
    src: CharSrc
    port: int | None = None
    target_type: str | None = None
    name: str | None = None
    alias: int | None = None


@dataclass
class NNic:
    type: str
    model: str
    mac: str | None = None
    boot: int | None = None
    ifname: str | None = None
    script: str | None = None
    bridge: str | None = None


@dataclass
class NHostdev:
    type: str
    ids: dict[str, int]
    boot: int | None = None


@dataclass
class Guest:
    """Everything read from the command line so far."""

    arch: str = "x86_64"
    machine: str | None = None
    defs: dict[str, dict[str, Opt]] = field(default_factory=dict)
    props: dict[int, dict[str, Any]] = field(default_factory=dict)
    disks: list[NDisk] = field(default_factory=list)
    nics: list[NNic] = field(default_factory=list)
    chars: list[NChar] = field(default_factory=list)
    hostdevs: list[NHostdev] = field(default_factory=list)
    inputs: list[tuple[str, str, str | None]] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    rngs: list[str] = field(default_factory=list)
    controllers: dict[tuple[str, int], str | None] = field(default_factory=dict)
    scsi_ids: dict[str, int] = field(default_factory=dict)
    sata_ids: dict[str, int] = field(default_factory=dict)
    usb_wanted: bool = False
    balloon: bool = False
    loader: tuple[str, str, bool] | None = None
    nvram: str | None = None
    clock_offset: str = "utc"  #: -rtc base=
    monitors: list[Monitor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def q35(self) -> bool:
        return "q35" in (self.machine or "")

    def note(self, text: str) -> None:
        """Record something vmconfine drops from a converted option (for the warning)."""
        if text not in self.notes:
            self.notes.append(text)

    def define(self, kind: str, ident: str, opt: Opt, props: dict[str, Any]) -> None:
        self.defs.setdefault(kind, {})[ident] = opt
        self.props[id(opt)] = props

    def lookup(self, kind: str, ident: Any) -> tuple[Opt, dict[str, Any]]:
        opt = self.defs.get(kind, {}).get(str(ident))
        if opt is None:
            raise Unconvertible(f"{kind} '{ident}' is not defined")
        return opt, self.props[id(opt)]

    def free_index(self, bus: str, start: int = 0) -> int:
        taken = {d.index for d in self.disks if d.bus == bus}
        if bus in ("sata", "scsi"):
            taken |= {d.index for d in self.disks if d.bus in ("sata", "scsi")}
        idx = start
        while idx in taken:
            idx += 1
        return idx


#: the note for PCI addresses and PCI controllers of a command line (docs/fromnative.md)
PCI_PLACEMENT = ("PCI placement (bus=, addr=, pcie-root-port): vmconfine assigns it (QEMU on "
                 "i440FX, libvirt's layout on Q35)")


def note_extra(g: Guest, what: str, props: dict[str, Any], known: set[str]) -> None:
    """Note every property of ``props`` outside ``known`` (PCI addresses in one note)."""
    for key, value in props.items():
        if key in known:
            continue
        if key in ("addr", "multifunction", "bus"):
            g.note(PCI_PLACEMENT)
            continue
        shown = json.dumps(value) if not isinstance(value, str) else value
        g.note(f"{what}: {key}={shown}")
