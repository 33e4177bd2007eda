"""Generic domain XML plumbing shared by :mod:`vmconfine.domain` and its device/seclabel views.

The hardened parser (:func:`safe_tree`: 10 MiB cap, NUL bytes, DOCTYPE/ENTITY declarations
refused, no network), one-line error messages (``XMLError("<source>: line N: <what>")``),
libvirt's number, yes/no and memory-unit rules, element lookups, and indentation-keeping
insert/remove so edited trees still serialise the way they were written.
"""

from __future__ import annotations

import re

from lxml import etree

from vmconfine.errors import XMLError

MAX_XML_BYTES = 10 * 1024 * 1024
BLANK = " \t\r\n"
"""The characters XML (and libvirt) treat as blanks."""
_LLONG_MAX = 2**63 - 1
_NO_DTD = ("DOCTYPE and ENTITY declarations are refused in domain XML (no DTDs, no "
           "entities); remove them")


# --------------------------------------------------------------------------- messages, lookups


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with control characters escaped (so a message stays on one line), cut at
    ``limit`` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def xml_error(source: str, line: int, what: str) -> XMLError:
    """``XMLError("<source>: line N: <what>")``, always a single line."""
    return XMLError(f"{one_line(source, 200)}: line {line}: {one_line(what, 500)}")


class ParseContext:
    """Where a parse is: the source name (for messages) and live vs inactive rules."""

    def __init__(self, source: str, live: bool) -> None:
        self.source = source
        self.live = live

    def error(self, elem: etree._Element | None, what: str) -> XMLError:
        """``XMLError("<source>: line N: <what>")`` pointing at ``elem``."""
        return xml_error(self.source, getattr(elem, "sourceline", None) or 1, what)


def children(elem: etree._Element, tag: str) -> list[etree._Element]:
    """Direct element children named ``tag`` (no namespace)."""
    return [c for c in elem if c.tag == tag]


def child(elem: etree._Element, tag: str) -> etree._Element | None:
    """First direct element child named ``tag``."""
    for c in elem:
        if c.tag == tag:
            return c
    return None


def child_text(elem: etree._Element, tag: str) -> str | None:
    """Text of the first ``tag`` child; None when absent or empty (libvirt's virXPathString)."""
    c = child(elem, tag)
    if c is None:
        return None
    text = "".join(c.itertext())
    return text or None


def attr(elem: etree._Element | None, name: str) -> str | None:
    """Attribute value, or None when the element or attribute is absent."""
    return None if elem is None else elem.get(name)


_C_UINT = re.compile(r"[ \t\r\n]*\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|0(?P<oct>[0-7]*)"
                     r"|(?P<dec>[1-9][0-9]*))[ \t\r\n]*")
_DEC_INT = re.compile(r"[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*")


def parse_c_uint(text: str) -> int | None:
    """Parse like C ``strtoul(s, &end, 0)`` with a full match: 0x = hex, leading 0 = octal."""
    m = _C_UINT.fullmatch(text)
    if m is None:
        return None
    if m["hex"] is not None:
        return int(m["hex"], 16)
    if m["oct"] is not None:
        return int(m["oct"] or "0", 8)
    return int(m["dec"], 10)


def parse_dec_int(text: str) -> int | None:
    """A plain decimal integer (ASCII digits, optional sign and surrounding blanks)."""
    return int(text) if _DEC_INT.fullmatch(text) else None


INT_MIN, INT_MAX = -(2**31), 2**31 - 1
UINT_MAX = 2**32 - 1


def int_attr(ctx: ParseContext, elem: etree._Element, name: str, what: str, *,
             base0: bool = False, signed: bool = False, maximum: int | None = None,
             too_large: str | None = None) -> int | None:
    """Integer attribute (None when absent); a clear error when it is not a number.

    Values are bounded like libvirt's C types: ``int`` when ``signed``, else ``unsigned int``
    (libvirt's "Invalid value for attribute ... Expected (non-negative) integer value"), or
    ``maximum`` when given; ``too_large`` is then the message (``{value}`` is filled in).
    """
    raw = elem.get(name)
    if raw is None:
        return None
    value: int | None
    if base0:
        value = parse_c_uint(raw)
    else:
        value = parse_dec_int(raw)
        if value is not None and value < 0 and not signed:
            value = None
    if value is None:
        kind = "an integer" if signed else "a non-negative integer"
        raise ctx.error(elem, f"{what} '{one_line(raw, 40)}' is not {kind}; fix the {name}= "
                              "attribute")
    low, high = (INT_MIN, INT_MAX) if signed else (0, UINT_MAX)
    if not low <= value <= high:
        kind = "integer" if signed else "non-negative integer"
        raise ctx.error(elem, f"Invalid value for attribute '{name}' in element '{elem.tag}': "
                              f"'{one_line(raw, 40)}'. Expected {kind} value (from {low} to "
                              f"{high}); fix the {what}")
    if maximum is not None and value > maximum:
        raise ctx.error(elem, (too_large or "{what} {value} is too large; the maximum is "
                               "{maximum}").format(what=what, value=value, maximum=maximum))
    return value


def yes_no(ctx: ParseContext, elem: etree._Element, name: str, default: bool) -> bool:
    """A yes/no attribute (libvirt's virStringParseYesNo)."""
    raw = elem.get(name)
    if raw is None:
        return default
    if raw not in ("yes", "no"):
        raise ctx.error(elem, f"invalid {name} value '{one_line(raw, 40)}' on <{elem.tag}>; "
                              "use 'yes' or 'no'")
    return raw == "yes"


# --------------------------------------------------------------------------- units


def unit_scale(unit: str | None) -> int | None:
    """Bytes per unit with libvirt's rules (virScaleInteger), None for an unknown unit.

    Case-insensitive; no unit = KiB; ``b``/``byte``/``bytes`` = 1; a bare letter or
    letter+``iB`` (k, m, g, t, p, e) is a power of 1024; letter+``B`` is a power of 1000.
    """
    if not unit:
        return 1024
    u = unit.lower()
    if u in ("b", "byte", "bytes"):
        return 1
    power = "kmgtpe".find(u[0]) + 1
    if power == 0 or not u.isascii():
        return None
    if len(u) == 1 or u[1:] == "ib":
        return 1024**power
    if u[1:] == "b":
        return 1000**power
    return None


def memory_to_kib(value: str, unit: str | None) -> int:
    """``"2" GiB`` → 2097152: scale to bytes, cap at 2^63-1, round up to KiB (libvirt)."""
    number = parse_dec_int(value)
    if number is None or number < 0 or value.strip().startswith("-"):
        raise ValueError(f"value '{one_line(value.strip(), 40)}' is not a non-negative integer")
    scale = unit_scale(unit)
    if scale is None:
        raise ValueError(f"unknown unit '{one_line(unit or '', 20)}'; use b, KiB, MiB, GiB, "
                         "TiB, KB, MB, GB or TB")
    if number > _LLONG_MAX // scale:
        raise ValueError(f"value {number} {unit or 'KiB'} is too large")
    return -(-(number * scale) // 1024)


# --------------------------------------------------------------------------- tree helpers


def is_blank(text: str | None) -> bool:
    """True for None or text made only of XML blanks (space, tab, CR, LF)."""
    return text is None or text.strip(BLANK) == ""


def _indent_before(elem: etree._Element) -> str | None:
    """Indentation of ``elem``'s line when the document is pretty-printed, else None."""
    parent = elem.getparent()
    if parent is None:
        return ""
    idx = parent.index(elem)
    before = parent.text if idx == 0 else parent[idx - 1].tail
    if before is None or not is_blank(before) or "\n" not in before:
        return None
    return before[before.rfind("\n") + 1:]


def insert_element(parent: etree._Element, index: int, elem: etree._Element) -> None:
    """Insert ``elem`` at ``index`` keeping the surrounding indentation style."""
    n = len(parent)
    index = max(0, min(index, n))
    if n == 0:
        indent = _indent_before(parent)
        parent.insert(0, elem)
        if indent is not None and is_blank(parent.text):
            parent.text, elem.tail = "\n" + indent + "  ", "\n" + indent
        return
    if index < n:
        before = parent.text if index == 0 else parent[index - 1].tail
        parent.insert(index, elem)
        elem.tail = before if is_blank(before) else None
        return
    last = parent[n - 1]
    inner = parent.text if n == 1 else parent[n - 2].tail
    closing = last.tail
    parent.append(elem)
    if is_blank(inner) and is_blank(closing):
        last.tail, elem.tail = inner, closing


def remove_element(elem: etree._Element) -> None:
    """Remove ``elem`` keeping the surrounding indentation (and any real tail text)."""
    parent = elem.getparent()
    if parent is None:
        return
    idx = parent.index(elem)
    tail = elem.tail
    last = idx == len(parent) - 1
    parent.remove(elem)
    if not is_blank(tail):
        if idx == 0:
            parent.text = (parent.text or "") + (tail or "")
        else:
            parent[idx - 1].tail = (parent[idx - 1].tail or "") + (tail or "")
    elif last:
        if idx == 0:
            parent.text = None
        else:
            parent[idx - 1].tail = tail


# --------------------------------------------------------------------------- safe parser


def line_of(raw: bytes, offset: int) -> int:
    """1-based line number of byte ``offset`` in ``raw``."""
    return raw.count(b"\n", 0, offset) + 1


def safe_tree(data: bytes | str, source: str) -> etree._ElementTree:
    """Parse untrusted XML: size cap, NUL bytes, DOCTYPE/entities refused, no network."""
    forced: str | None = None
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            line = data.count("\n", 0, exc.start) + 1
            raise xml_error(source, line, "domain XML contains an unencodable character "
                                          "(a lone surrogate); pass valid text") from None
        forced = "utf-8"
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise TypeError(f"parse_domain needs bytes or str, not {type(data).__name__}")
    if len(raw) > MAX_XML_BYTES:
        raise xml_error(source, line_of(raw, MAX_XML_BYTES), f"domain XML is {len(raw)} "
                        "bytes, over the 10 MiB limit; a domain definition is never this "
                        "large, check the file")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise xml_error(source, line_of(raw, nul), "NUL byte in domain XML; the file is "
                                                   "binary or not UTF-8 text")
    for marker in (b"<!DOCTYPE", b"<!ENTITY"):
        pos = raw.find(marker)
        if pos >= 0:
            raise xml_error(source, line_of(raw, pos), _NO_DTD)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, dtd_validation=False, attribute_defaults=False,
                             remove_comments=False, remove_pis=False,
                             remove_blank_text=False, encoding=forced)
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as exc:
        msg = re.sub(r",? line \d+, column \d+$", "", exc.msg or "syntax error").strip()
        raise xml_error(source, exc.lineno or 1, f"malformed XML: {msg}") from None
    if root is None:
        raise xml_error(source, 1, "malformed XML: document is empty")
    tree = root.getroottree()
    info = tree.docinfo
    if (info.internalDTD is not None or info.externalDTD is not None or info.system_url
            or info.public_id or any(True for _ in root.iter(etree.Entity))):
        raise xml_error(source, 1, _NO_DTD)
    return tree


#: ``<graphics>`` attributes libvirt writes only with VIR_DOMAIN_XML_SECURE (``virsh dumpxml
#: --security-info``, refused on read-only connections)
SECURE_GRAPHICS_ATTRS = ("passwd", "passwdValidTo")


def without_secrets(text: str, source: str) -> str:
    """The domain XML ``text`` without what libvirt shows only on request with
    ``--security-info``: the ``passwd`` and ``passwdValidTo`` of every ``<graphics>``.
    Unchanged (byte for byte) when there is nothing to take out."""
    if "passwd" not in text:
        return text
    root = safe_tree(text, source).getroot()
    removed = False
    for graphics in root.iter("graphics"):
        for name in SECURE_GRAPHICS_ATTRS:
            if graphics.attrib.pop(name, None) is not None:
                removed = True
    if not removed:
        return text
    out = etree.tostring(root, encoding="unicode")
    return out + "\n" if text.endswith("\n") and not out.endswith("\n") else out
