"""``vmconfine domxml-from-native qemu-argv``: a QEMU command line back to domain XML.

The input is what ``domxml-to-native`` prints (and libvirt's seed format): one command,
environment variables first, then the QEMU binary and its arguments, with shell quoting and
backslash-newline continuations. :func:`from_native` reads it, :func:`from_argv` takes an
already split command (``qemu-attach`` reads ``/proc/PID/cmdline``).

What is converted, and how, is described in docs/fromnative.md. In short: every option
vmconfine models becomes XML (legacy ``-hda``/``-drive``/``-net``/``-serial`` forms and the
modern ``-blockdev``/``-device``/``-netdev``/``-chardev`` graph); options vmconfine always adds
itself (``-S``, ``-no-user-config``, ``-nodefaults``, ``-msg``, ``-sandbox``, the QMP monitors,
``-display none``) are dropped; everything else is kept verbatim as ``<qemu:arg>`` (so nothing
is silently lost) and named in :attr:`NativeResult.warning`. The XML is built with lxml and
parsed back with :func:`vmconfine.domain.parse_domain`, so the output is valid for vmconfine.
The conversion inverts :func:`vmconfine.qemu.argv.build_command`: for every domain of its golden
corpus, to-native then from-native gives a domain with the same command line.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from vmconfine.domain import parse_domain
from vmconfine.domain.devices import one_line
from vmconfine.inputs import read_bounded
from vmconfine.qemu.fromnative.model import Guest, Monitor, NativeArgsError, NChar, NDisk
from vmconfine.qemu.fromnative.options import Converter

if TYPE_CHECKING:
    from vmconfine.domain import Domain

__all__ = [
    "Monitor",
    "NativeArgsError",
    "NativeResult",
    "from_argv",
    "from_native",
    "read_native_file",
    "split_command",
    "tokenize",
]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_NAME = "unnamed"
#: environment vmconfine sets itself for every QEMU (see vmconfine.qemu.argv)
STANDARD_ENV = ("LC_ALL", "PATH", "HOME", "USER", "LOGNAME")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

@dataclass
class NativeResult:
    """A converted command line: the XML text, its parsed domain, what was kept as
    ``<qemu:arg>`` (``passthrough``), what was dropped from converted options (``notes``) and
    the monitors QEMU was started with (``qemu-attach`` needs a QMP one)."""

    xml: str
    domain: Domain
    passthrough: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    monitors: list[Monitor] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        """One line naming everything not converted, or None."""
        parts = []
        if self.kept:
            parts.append("kept as <qemu:arg> (not modelled by vmconfine): " +
                         ", ".join(one_line(k, 100) for k in self.kept))
        if self.notes:
            parts.append("not carried over: " + "; ".join(one_line(n, 120) for n in self.notes))
        return one_line("; ".join(parts), 4000) if parts else None


# --------------------------------------------------------------------------- reading


def read_native_file(path: str) -> tuple[str, str]:
    """The text of ``path`` (``-`` = stdin) and its name for messages."""
    data, source = read_bounded(
        path, expected="a file holding a QEMU command line", error=NativeArgsError,
        too_large_hint="; a QEMU command line is never this large, check the file")
    nul = data.find(b"\x00")
    if nul >= 0:
        start = max(data.rfind(b" ", 0, nul), data.rfind(b"\n", 0, nul)) + 1
        ends = [i for i in (data.find(b" ", nul), data.find(b"\n", nul)) if i >= 0]
        word = data[start:min(ends) if ends else len(data)].decode(errors="replace")
        raise NativeArgsError(f"{source}: NUL byte at offset {nul} in the argument "
                              f"'{one_line(word, 60)}'; give the command line as text (for a "
                              "running QEMU use qemu-attach PID)")
    try:
        return data.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        raise NativeArgsError(f"{source}: not UTF-8 text (byte {exc.start})") from None


def tokenize(text: str, source: str = "<stdin>") -> list[str]:
    """Split a shell-quoted command (single and double quotes, backslash escapes,
    backslash-newline continuations; no variable expansion)."""
    words: list[str] = []
    cur: list[str] = []
    start: int | None = None
    i, n = 0, len(text)

    def unbalanced(quote: str, at: int) -> NativeArgsError:
        line = text.count("\n", 0, at) + 1
        word = text[start if start is not None else at:][:40]
        return NativeArgsError(f"{source}: line {line}: unbalanced {quote} quote in the "
                               f"argument starting {one_line(word)!r}; close the quote")

    while i < n:
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1:i + 3]
            if nxt.startswith("\n") or nxt == "\r\n":
                i += 2 if nxt.startswith("\n") else 3
                continue
            start = i if start is None else start
            cur.append(text[i + 1] if i + 1 < n else "\\")
            i += 2
        elif ch == "'":
            start = i if start is None else start
            end = text.find("'", i + 1)
            if end < 0:
                raise unbalanced("'", i)
            cur.append(text[i + 1:end])
            i = end + 1
        elif ch == '"':
            start = i if start is None else start
            j = i + 1
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n and text[j + 1] in '"\\$`\n':
                    if text[j + 1] != "\n":
                        cur.append(text[j + 1])
                    j += 2
                    continue
                cur.append(text[j])
                j += 1
            if j >= n:
                raise unbalanced('"', i)
            i = j + 1
        elif ch in " \t\r\n":
            if start is not None:
                words.append("".join(cur))
                cur, start = [], None
            i += 1
        else:
            start = i if start is None else start
            cur.append(ch)
            i += 1
    if start is not None:
        words.append("".join(cur))
    return words


def split_command(words: list[str], source: str = "<stdin>"
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """Leading ``NAME=VALUE`` words are the environment, the rest the command."""
    env: list[tuple[str, str]] = []
    i = 0
    while i < len(words) and "=" in words[i] and not words[i].startswith(("/", "-", ".")):
        name, _, value = words[i].partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise NativeArgsError(f"{source}: '{one_line(words[i], 60)}' is not an "
                                  f"environment variable: '{one_line(name)}' is not a valid "
                                  "name (letters, digits and _)")
        env.append((name, value))
        i += 1
    if i >= len(words):
        raise NativeArgsError(f"{source}: no QEMU command found"
                              + (" after the environment variables" if env else "")
                              + "; give a line such as 'qemu-system-x86_64 -m 512 ...'")
    return env, words[i:]


# --------------------------------------------------------------------------- XML


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, tag, {k.replace("_", "-"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _boot_devs(g: Guest) -> list[str] | None:
    """``<os><boot dev>`` equivalent to the devices' bootindex values, or None when only
    per-device ``<boot order>`` can express them."""
    firsts: dict[str, object] = {}
    classes = {"disk": "hd", "cdrom": "cdrom", "floppy": "fd"}
    for disk in g.disks:
        firsts.setdefault(classes[disk.device], disk)
    if g.nics:
        firsts.setdefault("network", g.nics[0])
    entries = [(d.boot, classes[d.device], d) for d in g.disks if d.boot]
    entries += [(n.boot, "network", n) for n in g.nics if n.boot]
    if any(h.boot for h in g.hostdevs):
        return None
    entries.sort(key=lambda e: e[0] or 0)
    if [e[0] for e in entries] != list(range(1, len(entries) + 1)):
        return None
    if any(firsts.get(cls) is not obj for _b, cls, obj in entries):
        return None
    return [cls for _b, cls, _obj in entries]


def _char_xml(devices: etree._Element, char: NChar) -> None:
    el = _sub(devices, char.kind, type=char.src.type)
    src = char.src
    if src.type in ("unix",):
        _sub(el, "source", mode=src.mode or "connect", path=src.path or "")
    elif src.type in ("tcp", "udp"):
        attrs = {"host": src.host or "", "service": src.service or ""}
        if src.mode:
            attrs["mode"] = src.mode
        _sub(el, "source", **attrs)
    elif src.path:
        _sub(el, "source", path=src.path)
    target: dict[str, str] = {}
    if char.target_type:
        target["type"] = char.target_type
    if char.name:
        target["name"] = char.name
    if char.port is not None:
        target["port"] = str(char.port)
    _sub(el, "target", **target)


def _disk_xml(devices: etree._Element, disk: NDisk, per_device: bool) -> None:
    top = disk.top
    el = _sub(devices, "disk", type=top.type if top else "file", device=disk.device)
    attr = {"file": "file", "block": "dev"}
    if top is not None:
        _sub(el, "driver", name="qemu", type=top.format)
        _sub(el, "source", **{attr[top.type]: top.path})
        parent, layer = el, top
        while layer.backing is not None:
            layer = layer.backing
            parent = _sub(parent, "backingStore", type=layer.type)
            _sub(parent, "format", type=layer.format)
            _sub(parent, "source", **{attr[layer.type]: layer.path})
        if layer.end:
            _sub(parent, "backingStore")
    _sub(el, "target", dev=disk.target, bus=disk.bus)
    if disk.boot and per_device:
        _sub(el, "boot", order=str(disk.boot))
    if disk.readonly:
        _sub(el, "readonly")
    if disk.shareable:
        _sub(el, "shareable")
    if disk.serial is not None:
        _sub(el, "serial", disk.serial)


def _devices_xml(root: etree._Element, c: Converter, per_device: bool) -> None:
    g, s = c.g, c.s
    devices = _sub(root, "devices")
    if c.emulator.startswith("/"):
        _sub(devices, "emulator", c.emulator)
    for disk in g.disks:
        _disk_xml(devices, disk, per_device)
    i440fx = g.arch in ("x86_64", "i686") and (g.machine or "pc").startswith("pc") and not g.q35
    usb = {idx: model for (kind, idx), model in g.controllers.items() if kind == "usb"}
    default_usb = "piix3-uhci" if i440fx else "qemu-xhci"
    if not usb and not g.usb_wanted:
        usb = {0: "none"}
    elif usb == {0: default_usb}:
        usb = {}
    for idx, model in sorted(usb.items()):
        _sub(devices, "controller", type="usb", index=str(idx), model=model or "none")
    for (kind, idx), model in sorted(g.controllers.items()):
        if kind != "usb" and not (kind == "sata" and idx == 0 and g.q35):
            attrs = {"model": model} if model else {}
            _sub(devices, "controller", type=kind, index=str(idx), **attrs)
    for nic in g.nics:
        el = _sub(devices, "interface", type=nic.type)
        if nic.mac:
            _sub(el, "mac", address=nic.mac)
        if nic.bridge:
            _sub(el, "source", bridge=nic.bridge)
        if nic.ifname:
            _sub(el, "target", dev=nic.ifname)
        if nic.script:
            _sub(el, "script", path=nic.script)
        _sub(el, "model", type=nic.model)
        if nic.boot and per_device:
            _sub(el, "boot", order=str(nic.boot))
    chars = sorted(g.chars, key=lambda ch: ["serial", "parallel", "console",
                                             "channel"].index(ch.kind))
    serials = [ch for ch in chars if ch.kind == "serial"]
    consoles = [ch for ch in chars if ch.kind == "console"]
    for char in chars:
        if char.kind == "console" and char is consoles[0] and serials and not any(
                con.alias == 0 for con in consoles):
            _char_xml(devices, NChar("console", serials[0].src, port=0, target_type="serial"))
        _char_xml(devices, char)
    if serials and not consoles:
        _char_xml(devices, NChar("console", serials[0].src, port=0, target_type="serial"))
    for itype, bus, evdev in g.inputs:
        el = _sub(devices, "input", type=itype, bus=bus)
        if evdev:
            _sub(el, "source", evdev=evdev)
    videos = list(g.videos)
    if s.graphics is not None:
        el = _sub(devices, "graphics", type="vnc", **{k: v for k, v in s.graphics.items()
                                                       if k != "listen_type"})
        if s.graphics.get("listen_type") == "none":
            _sub(el, "listen", type="none")
        if not videos:
            videos = ["none"] if s.nodefaults else ["vga"]
    for model in videos:
        _sub(_sub(devices, "video"), "model", type=model)
    for h in g.hostdevs:
        el = _sub(devices, "hostdev", mode="subsystem", type=h.type, managed="no")
        if h.type == "pci":
            _sub(el, "driver", name="vfio")
        src = _sub(el, "source")
        if h.type == "pci":
            _sub(src, "address", domain=f"0x{h.ids['domain']:04x}", bus=f"0x{h.ids['bus']:02x}",
                 slot=f"0x{h.ids['slot']:02x}", function=f"0x{h.ids['function']:x}")
        else:
            if "vendor" in h.ids:
                _sub(src, "vendor", id=f"0x{h.ids['vendor']:04x}")
                _sub(src, "product", id=f"0x{h.ids['product']:04x}")
            if "bus" in h.ids:
                _sub(src, "address", bus=str(h.ids["bus"]), device=str(h.ids["device"]))
        if h.boot:
            _sub(el, "boot", order=str(h.boot))
    for path in g.rngs:
        _sub(_sub(devices, "rng", model="virtio"), "backend", path, model="random")
    if not g.balloon:
        _sub(devices, "memballoon", model="none")


def build_xml(c: Converter, env: list[tuple[str, str]], args: list[str]) -> str:
    """The domain XML for a finished conversion."""
    g, s = c.g, c.s
    nsmap = {"qemu": QEMU_NS} if args or env else None
    root = etree.Element("domain", {"type": s.virt_type}, nsmap=nsmap)
    _sub(root, "name", s.name)
    _sub(root, "uuid", s.uuid)
    _sub(root, "memory", str(s.memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(s.memory_kib), unit="KiB")
    _sub(root, "vcpu", str(s.vcpus))
    os_el = _sub(root, "os")
    type_attrs = {"arch": g.arch}
    if g.machine:
        type_attrs["machine"] = g.machine
    _sub(os_el, "type", "hvm", **type_attrs)
    if g.loader is not None:
        path, ltype, readonly = g.loader
        attrs = {"type": ltype, **({"readonly": "yes"} if readonly else {})}
        _sub(os_el, "loader", path, **attrs)
    if g.nvram:
        _sub(os_el, "nvram", g.nvram)
    per_device = False
    if any(d.boot for d in g.disks) or any(n.boot for n in g.nics) or any(
            h.boot for h in g.hostdevs):
        devs = _boot_devs(g)
        per_device = devs is None
        for dev in devs or []:
            _sub(os_el, "boot", dev=dev)
    else:
        for dev in s.boot_devs:
            _sub(os_el, "boot", dev=dev)
    for tag, value in (("kernel", s.kernel), ("initrd", s.initrd), ("cmdline", s.cmdline),
                       ("dtb", s.dtb)):
        if value is not None:
            _sub(os_el, tag, value)
    if s.acpi and g.arch in ("x86_64", "i686"):
        _sub(_sub(root, "features"), "acpi")
    _sub(root, "clock", offset=g.clock_offset)
    for tag, value in (("on_poweroff", "destroy"), ("on_reboot", s.on_reboot),
                       ("on_crash", "destroy")):
        _sub(root, tag, value)
    _devices_xml(root, c, per_device)
    if args or env:
        cmd = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in args:
            etree.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
        for name, value in env:
            etree.SubElement(cmd, f"{{{QEMU_NS}}}env", name=name, value=value)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


# --------------------------------------------------------------------------- API


def _check_text(words: list[str], env: list[tuple[str, str]], source: str) -> None:
    for n, word in enumerate([*words, *(f"{k}={v}" for k, v in env)]):
        m = _XML_BAD.search(word)
        if m:
            raise NativeArgsError(
                f"{source}: argument {n + 1} ({one_line(word, 60)!r}) contains the "
                f"control character {ord(m.group()):#04x}, which domain XML cannot carry; "
                "remove it")


def from_argv(env: list[tuple[str, str]], argv: list[str], *, source: str = "<stdin>",
              name: str = DEFAULT_NAME, uuid: str | None = None,
              skip_bad_env: bool = False) -> NativeResult:
    """Convert an environment and ``argv`` (``argv[0]`` = the QEMU binary).

    ``name``/``uuid``: used when the command line has no ``-name``/``-uuid``; without
    ``uuid`` a fresh random one (libvirt's from-native gives an all-zero UUID, so two
    converted guests could not run side by side; vmconfine needs a name, so "unnamed").
    ``skip_bad_env``: environment entries the XML cannot hold are noted instead of refused
    (for ``/proc/PID/environ``).
    """
    if not argv:
        raise NativeArgsError(f"{source}: no QEMU command found")
    qemu_env: list[tuple[str, str]] = []
    notes: list[str] = []
    for key, value in env:
        if key in STANDARD_ENV:
            continue
        bad = not _ENV_NAME.fullmatch(key) or _XML_BAD.search(value)
        if bad and skip_bad_env:
            notes.append(f"environment variable {one_line(key, 40)}")
            continue
        if not _ENV_NAME.fullmatch(key):
            raise NativeArgsError(f"{source}: '{one_line(key)}' is not a valid environment "
                                  "variable name (letters, digits and _)")
        qemu_env.append((key, value))
    _check_text(argv, qemu_env, source)
    conv = Converter(argv, source, name, uuid or str(uuidlib.uuid4()))
    conv.run()
    args: list[str] = []
    kept: list[str] = []
    for opt in conv.opts:
        if opt.status in ("pass", "rest"):
            args.extend(opt.words())
            kept.append(opt.text())
    xml = build_xml(conv, qemu_env, args)
    domain = parse_domain(xml, source=f"{source} (converted)", live=False)
    return NativeResult(xml=xml, domain=domain, passthrough=args, notes=conv.g.notes + notes,
                        monitors=conv.g.monitors, kept=kept)


def from_native(text: str, source: str = "<stdin>") -> NativeResult:
    """Convert the text of a ``qemu-argv`` file (see the module docstring)."""
    words = tokenize(text, source)
    if not words:
        raise NativeArgsError(f"{source}: empty; give a QEMU command line such as "
                              "'qemu-system-x86_64 -m 512 -hda disk.img'")
    env, argv = split_command(words, source)
    return from_argv(env, argv, source=source)


def convert_file(path: str | Path) -> NativeResult:
    """:func:`from_native` of a file (``-`` = stdin)."""
    text, source = read_native_file(str(path))
    return from_native(text, source)

