"""vmconfine's runtime state in live domain XML (``<metadata><vmconfine:state>``).

Live XML (status files, journal copies) carries the domain id and a ``<vmconfine:state>``
element in vmconfine's namespace under ``<metadata>``: scalars as attributes, lists as one
``<vmconfine:KEY value=.../>`` child per item. Its presence is how a parse tells live XML from a
configuration.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lxml import etree

from vmconfine.domain.xml import child, insert_element, is_blank, remove_element

VMCONFINE_NS = "https://vmconfine.dev/xmlns/1.0"
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")


def _metadata(root: etree._Element, create: bool) -> etree._Element | None:
    meta = child(root, "metadata")
    if meta is None and create:
        meta = etree.Element("metadata")
        anchors = [i for i, c in enumerate(root)
                   if c.tag in ("name", "uuid", "genid", "title", "description")]
        insert_element(root, anchors[-1] + 1 if anchors else 0, meta)
    return meta


def drop_state(root: etree._Element) -> None:
    """Remove vmconfine's runtime state (and a ``<metadata>`` left empty by that)."""
    meta = _metadata(root, create=False)
    if meta is None:
        return
    states = meta.findall(f"{{{VMCONFINE_NS}}}state")
    for st in states:
        remove_element(st)
    if states and len(meta) == 0 and is_blank(meta.text):
        remove_element(meta)


def _state_text(key: str, value: object) -> str:
    if not _NCNAME.fullmatch(key):
        raise ValueError(f"to_xml extra key {key!r} is not a valid XML name")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"to_xml extra[{key!r}] must be a str, int, bool or list of them")


def apply_live(root: etree._Element, extra: Mapping[str, object]) -> None:
    """Write the live-only parts of ``extra`` into ``root``: ``id`` as ``<domain id=>`` and
    every other key as ``<metadata><vmconfine:state>`` (see ``Domain.to_xml``)."""
    dom_id = extra.get("id")
    if dom_id is not None:
        if isinstance(dom_id, bool) or not isinstance(dom_id, int) or dom_id < 0:
            raise ValueError(f"to_xml extra['id'] must be a non-negative int, not {dom_id!r}")
        attrs = dict(root.attrib)
        root.attrib.clear()
        root.set("type", attrs.pop("type", "kvm"))
        root.set("id", str(dom_id))
        attrs.pop("id", None)
        for key, value in attrs.items():
            root.set(key, value)
    state: dict[str, object] = {}
    for key, value in extra.items():
        if key == "state" and isinstance(value, Mapping):
            state.update(value)
        elif key != "id":
            state[key] = value
    state = {k: v for k, v in state.items() if v is not None}
    if not state and find_state(root) is not None:
        return
    st = etree.Element(f"{{{VMCONFINE_NS}}}state", nsmap={"vmconfine": VMCONFINE_NS})
    items: list[etree._Element] = []
    for key, value in state.items():
        if isinstance(value, list | tuple):
            for item in value:
                sub = etree.Element(f"{{{VMCONFINE_NS}}}{key}")
                sub.set("value", _state_text(key, item))
                items.append(sub)
        else:
            st.set(key, _state_text(key, value))
    drop_state(root)
    meta = _metadata(root, create=True)
    assert meta is not None
    insert_element(meta, len(meta), st)
    for sub in items:
        insert_element(st, len(st), sub)


def find_state(root: etree._Element) -> etree._Element | None:
    """The ``<metadata><vmconfine:state>`` element, or None (it marks live XML)."""
    meta = child(root, "metadata")
    return meta.find(f"{{{VMCONFINE_NS}}}state") if meta is not None else None


def read_state(root: etree._Element) -> dict[str, str | list[str]]:
    """The runtime state written by :func:`apply_live`: attributes as str, items as lists."""
    st = find_state(root)
    if st is None:
        return {}
    out: dict[str, str | list[str]] = dict(st.attrib)
    for sub in st:
        if isinstance(sub.tag, str) and sub.tag.startswith(f"{{{VMCONFINE_NS}}}"):
            key = etree.QName(sub).localname
            values = out.setdefault(key, [])
            if isinstance(values, list):
                values.append(sub.get("value", ""))
    return out
