"""What vmconfine implements of libvirt's domain XML, declared in one place, and the check that
finds everything else in a domain.

:data:`IMPLEMENTED` is a tree mirroring the XML: for each element the attributes vmconfine acts
on (with the values it implements, where only some are) and the child elements it knows. An
element or attribute that is not in the tree is *not implemented*: QEMU would run without it.
:func:`unsupported` lists every such element and attribute of a parsed domain (one finding per
element or attribute, with its line); :func:`enforce` warns about each (qemu.conf
``unsupported_xml = "warn"``, the default) or refuses the domain (``"error"``).

Values the command line cannot express at all (an unknown disk bus, a ``dump`` watchdog...) are
refused by :mod:`vmconfine.qemu.argv` with their own message; this tree is about what would be
silently left out. ``<metadata>`` is free-form (libvirt keeps it for applications), and
vmconfine's live state lives there. docs/domain-xml.md lists the same tree for people; a unit
test keeps the two in step.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxml import etree

from vmconfine.domain.xml import child, one_line, xml_error

if TYPE_CHECKING:
    from vmconfine.domain.model import Domain

log = logging.getLogger("vmconfine")

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
MODES = ("warn", "error")
#: ``<graphics>`` attributes and child elements only a SPICE display implements
SPICE_ATTRS = ("tlsPort", "passwd", "defaultMode")
SPICE_CHILDREN = ("channel", "image", "jpeg", "zlib", "playback", "streaming", "clipboard",
                  "filetransfer", "mouse", "gl")


@dataclass
class Node:
    """One element: ``attrs`` maps each implemented attribute to the implemented values (None
    = any value); ``children`` the known child elements; ``text`` the implemented text values
    (None = any); ``free`` = anything below is accepted (``<metadata>``)."""

    attrs: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)
    text: frozenset[str] | None = None
    free: bool = False


def E(attrs: str = "", children: dict[str, Node] | None = None, *,
      values: Mapping[str, str] | None = None, text: str | None = None) -> Node:
    """A :class:`Node` from ``"attr attr"``; ``values={"attr": "v1 v2"}`` limits values."""
    spec: dict[str, frozenset[str] | None] = dict.fromkeys(attrs.split())
    for name, vals in (values or {}).items():
        spec[name] = frozenset(vals.split())
    return Node(spec, children or {}, frozenset(text.split()) if text is not None else None)


def _seclabel() -> Node:
    return E("model relabel labelskip", {"label": E()})


def _storage() -> dict[str, Node]:
    """A disk's source and its backing chain (``<backingStore>`` nests)."""
    source = E("file dev index", {"seclabel": _seclabel()})
    backing = E("type index", {"format": E("type"), "source": source})
    backing.children["backingStore"] = backing
    return {"source": source, "backingStore": backing}


def _chardev(target: str, attrs: str = "type",
             target_children: dict[str, Node] | None = None) -> Node:
    return E(attrs, {
        "source": E("path mode host service", {"seclabel": _seclabel()}),
        "target": E(target, target_children),
        "log": E("file append"),
        "protocol": E("type", values={"type": "raw"}),
        "address": _ADDRESS,
    })


#: a device's PCI address (honoured on Q35, see vmconfine.qemu.pci)
_ADDRESS = E("type domain bus slot function multifunction")

_DEVICES = E("", {
    "emulator": E(),
    "disk": E("type device", {
        "driver": E("name type cache discard io detect_zeroes"),
        **_storage(),
        "target": E("dev bus"),
        "readonly": E(), "shareable": E(), "transient": E(), "serial": E(),
        "boot": E("order"), "address": _ADDRESS,
    }),
    "controller": E("type index model ports", {"model": E("name"), "target": E("chassis port"),
                                         "address": _ADDRESS}),
    "interface": E("type", {"mac": E("address"), "model": E("type"),
                            "source": E("network bridge dev mode"),
                            "target": E("dev managed"), "driver": E("name queues"),
                            "mtu": E("size"), "boot": E("order"), "address": _ADDRESS}),
    "serial": _chardev("type port", target_children={
        "model": E("name", values={"name": "isa-serial"})}),
    "console": _chardev("type port", "type tty"),
    "parallel": _chardev("port"),
    "channel": _chardev("type name"),
    "graphics": E("type port autoport listen socket websocket keymap " + " ".join(SPICE_ATTRS), {
        "listen": E("type address socket network"),
        "channel": E("name mode"),
        "image": E("compression"), "jpeg": E("compression"), "zlib": E("compression"),
        "playback": E("compression"), "streaming": E("mode"), "clipboard": E("copypaste"),
        "filetransfer": E("enable"), "mouse": E("mode"),
        "gl": E("enable", values={"enable": "no"}),
    }),
    "video": E("", {"model": E("type ram vram vram64 vgamem heads primary"),
                    "address": _ADDRESS}),
    "sound": E("model", {"audio": E("id"), "address": _ADDRESS},
               values={"model": "ich6 ich9 ac97"}),
    "audio": E("id type", values={"type": "spice none"}),
    "redirdev": E("bus type", values={"bus": "usb", "type": "spicevmc"}),
    "input": E("type bus", {"source": E("evdev dev"), "address": _ADDRESS}),
    "hostdev": E("mode type managed", {
        "driver": E("name"),
        "source": E("", {"address": E("domain bus slot function device"),
                         "vendor": E("id"), "product": E("id")}),
        "boot": E("order"), "address": _ADDRESS,
    }),
    "memballoon": E("model", {"address": _ADDRESS}),
    "rng": E("model", {"backend": E("model"), "address": _ADDRESS}),
    "watchdog": E("model action", {"address": _ADDRESS}),
    "tpm": E("model", {"backend": E("type version", values={"type": "emulator"})},
             values={"model": "tpm-tis tpm-crb"}),
})

#: Everything vmconfine implements, as a tree under ``<domain>``.
IMPLEMENTED = E("type id", {
    "name": E(), "uuid": E(), "title": E(), "description": E(),
    "metadata": Node(free=True),
    "memory": E("unit"), "currentMemory": E("unit"),
    "vcpu": E("current placement", values={"placement": "static"}),
    "os": E("firmware", {
        "type": E("arch machine"), "boot": E("dev"), "kernel": E(), "initrd": E(),
        "cmdline": E(), "dtb": E(),
        "firmware": E("", {"feature": E("enabled name")}),
        "loader": E("readonly type secure"),
        "nvram": E("template", {"source": E("file")}),
    }, values={"firmware": "efi bios"}),
    "features": E("", {"acpi": E(), "apic": E(), "pae": E(), "vmport": E("state"),
                       "smm": E("state"), "hyperv": E("mode", {
                           "relaxed": E("state"), "vapic": E("state"),
                           "spinlocks": E("state retries"), "vpindex": E("state"),
                           "runtime": E("state"), "synic": E("state"), "stimer": E("state"),
                           "reset": E("state"), "vendor_id": E("state value"),
                           "frequencies": E("state"), "reenlightenment": E("state"),
                           "tlbflush": E("state"), "ipi": E("state"), "evmcs": E("state"),
                       }, values={"mode": "custom"})}),
    "pm": E("", {"suspend-to-mem": E("enabled"), "suspend-to-disk": E("enabled")}),
    "cpu": E("mode match check migratable", {
        "model": E("fallback"),
        "feature": E("policy name"),
        "topology": E("sockets dies cores threads"),
    }, values={"migratable": "on"}),
    "clock": E("offset", {"timer": E("name tickpolicy present track", values={
        "name": "rtc pit hpet hypervclock", "tickpolicy": "delay catchup discard",
        "track": "guest wall realtime"})}),
    "memoryBacking": E("", {"hugepages": E("", {"page": E("size unit")})}),
    "on_poweroff": E(text="destroy"),
    "on_reboot": E(text="restart destroy"),
    "on_crash": E(text="destroy"),
    "devices": _DEVICES,
    "seclabel": E("type model relabel", {"label": E(), "imagelabel": E(),
                                         "baselabel": E()}),
    f"{{{QEMU_NS}}}commandline": E("", {f"{{{QEMU_NS}}}arg": E("value"),
                                        f"{{{QEMU_NS}}}env": E("name value")}),
})


@dataclass(frozen=True)
class Finding:
    """One element or attribute vmconfine does not implement."""

    line: int
    what: str

    def message(self, source: str) -> str:
        return (f"{one_line(source, 200)}: line {self.line}: {self.what} is not implemented "
                "by vmconfine; the guest would run without it")


def _name(tag: str) -> str:
    if tag.startswith(f"{{{QEMU_NS}}}"):
        return "qemu:" + tag.split("}", 1)[1]
    return tag


#: Checks the tree cannot express: (element path, why it is not implemented) when they fail.
_EXTRA: tuple[Callable[[Domain], Finding | None], ...] = (
    lambda d: Finding(getattr(child(d.root, "currentMemory"), "sourceline", 1) or 1,
                      "<currentMemory> below <memory> (a balloon target)")
    if d.current_memory_kib < d.memory_kib else None,
)


def _spice_only(domain: Domain) -> list[Finding]:
    """SPICE settings on another display type (the tree is per element, not per type)."""
    out = []
    for g in domain.graphics:
        el = g.element
        if g.type == "spice" or el is None:
            continue
        line = el.sourceline or 1
        out += [Finding(line, f"attribute {name}= of <devices/graphics>")
                for name in SPICE_ATTRS if el.get(name) is not None]
        out += [Finding(sub.sourceline or line, f"<devices/graphics/{sub.tag}>")
                for sub in el if sub.tag in SPICE_CHILDREN]
    return out


def _walk(el: etree._Element, node: Node, path: str, out: list[Finding]) -> None:
    line = el.sourceline or 1
    for name, value in el.attrib.items():
        allowed = node.attrs.get(name)
        if name not in node.attrs:
            out.append(Finding(line, f"attribute {_name(str(name))}= of <{path}>"))
        elif allowed is not None and value not in allowed:
            out.append(Finding(line, f"{_name(str(name))}='{one_line(value, 40)}' of <{path}>"))
    if node.text is not None:
        text = (el.text or "").strip()
        if text not in node.text:
            out.append(Finding(line, f"<{path}>{one_line(text, 40)}</{el.tag}>"))
    for sub in el:
        if not isinstance(sub.tag, str):
            continue  # comments, processing instructions
        spec = node.children.get(sub.tag)
        sub_path = f"{path}/{_name(sub.tag)}" if path != "domain" else _name(sub.tag)
        if spec is None:
            near = difflib.get_close_matches(sub.tag, list(node.children), n=1, cutoff=0.75)
            hint = f" (did you mean <{_name(near[0])}>?)" if near else ""
            out.append(Finding(sub.sourceline or line, f"<{sub_path}>{hint}"))
        elif not spec.free:
            _walk(sub, spec, sub_path, out)


def unsupported(domain: Domain) -> list[Finding]:
    """Every element and attribute of ``domain`` that vmconfine does not implement, in
    document order (then the checks the tree cannot express)."""
    out: list[Finding] = []
    _walk(domain.root, IMPLEMENTED, "domain", out)
    out.extend(_spice_only(domain))
    out.sort(key=lambda f: f.line)
    out.extend(f for check in _EXTRA if (f := check(domain)) is not None)
    return out


def enforce(domain: Domain, mode: str) -> list[Finding]:
    """Warn about (``mode="warn"``) or refuse (``"error"``, an ``XMLError`` naming the first and
    counting the rest) what vmconfine does not implement; returns the findings."""
    if mode not in MODES:
        raise ValueError(f"unsupported_xml mode must be one of {MODES}, not {mode!r}")
    found = unsupported(domain)
    if mode == "error" and found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        first = found[0]
        raise xml_error(domain.source, first.line,
                        f"{first.what} is not implemented by vmconfine{more}; remove it, or "
                        'set unsupported_xml = "warn" in qemu.conf to run the guest without it')
    for f in found:
        log.warning("%s", f.message(domain.source))
    return found


def describe(node: Node = IMPLEMENTED, tag: str = "domain", depth: int = 0,
             seen: frozenset[int] = frozenset()) -> list[str]:
    """The tree as indented lines (``disk type device``; ``vcpu placement=static``), the form
    docs/domain-xml.md shows; a nesting element (``<backingStore>``) is shown once."""
    attrs = [name if vals is None else f"{name}={'|'.join(sorted(vals))}"
             for name, vals in node.attrs.items()]
    if node.text is not None:
        attrs.append(f"(text: {'|'.join(sorted(node.text))})")
    if node.free:
        attrs.append("(anything)")
    if id(node) in seen:
        attrs.append("(nests)")
    lines = ["  " * depth + " ".join([_name(tag), *attrs])]
    if id(node) not in seen:
        for name, sub in node.children.items():
            lines += describe(sub, name, depth + 1, seen | {id(node)})
    return lines
