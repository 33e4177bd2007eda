"""Security labels of domain XML: the domain ``<seclabel>`` and per-source overrides.

:class:`SecLabel` is backed by its element (setting a field updates the tree, so generated
labels show up in the live XML); :class:`DeviceSecLabel` is a plain view of a ``<source>``'s
``<seclabel>``. Parsing follows libvirt's rules, including the inactive (configuration) rules
that drop generated values; :func:`normalise_live_seclabel` and :func:`inactive_seclabel` give a
label its live or inactive form when :meth:`vmconfine.domain.Domain.to_xml` serialises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.xml import (
    ParseContext,
    child,
    child_text,
    children,
    insert_element,
    remove_element,
    yes_no,
)

SECLABEL_TYPES = ("dynamic", "static", "none")
_LABEL_ORDER = ("label", "imagelabel", "baselabel")


# --------------------------------------------------------------------------- domain seclabels


class SecLabel:
    """A domain ``<seclabel>``, backed by its element: setting a field updates the tree.

    Fields: ``model``, ``type`` ('dynamic'|'static'|'none'; model 'none' is always type none),
    ``relabel`` (libvirt defaults: dynamic → True, static/none → False), ``label``,
    ``imagelabel``, ``baselabel`` (None = element absent) and ``implicit`` (added by the stack,
    not by the user; left out of the inactive XML).
    """

    def __init__(self, element: etree._Element, implicit: bool = False) -> None:
        self.element = element
        self.implicit = implicit

    def __repr__(self) -> str:
        return (f"SecLabel(model={self.model!r}, type={self.type!r}, relabel={self.relabel!r}, "
                f"label={self.label!r}, imagelabel={self.imagelabel!r}, "
                f"baselabel={self.baselabel!r}, implicit={self.implicit!r})")

    @property
    def model(self) -> str | None:
        return self.element.get("model")

    @model.setter
    def model(self, value: str | None) -> None:
        self._set_attr("model", value)

    @property
    def type(self) -> str:
        if self.model == "none":
            return "none"
        return self.element.get("type", "dynamic")

    @type.setter
    def type(self, value: str) -> None:
        if value not in SECLABEL_TYPES:
            raise ValueError(f"seclabel type must be one of {SECLABEL_TYPES}, not {value!r}")
        self.element.set("type", value)
        if value == "dynamic":
            self.relabel = True
        elif value == "none":
            self._set_attr("relabel", None)

    @property
    def relabel(self) -> bool:
        raw = self.element.get("relabel")
        if raw is None or self.type == "none":
            return self.type == "dynamic"
        return raw == "yes"

    @relabel.setter
    def relabel(self, value: bool) -> None:
        self.element.set("relabel", "yes" if value else "no")

    @property
    def label(self) -> str | None:
        return child_text(self.element, "label")

    @label.setter
    def label(self, value: str | None) -> None:
        self._set_child("label", value)

    @property
    def imagelabel(self) -> str | None:
        return child_text(self.element, "imagelabel")

    @imagelabel.setter
    def imagelabel(self, value: str | None) -> None:
        self._set_child("imagelabel", value)

    @property
    def baselabel(self) -> str | None:
        return child_text(self.element, "baselabel")

    @baselabel.setter
    def baselabel(self, value: str | None) -> None:
        self._set_child("baselabel", value)

    def _set_attr(self, name: str, value: str | None) -> None:
        if value is None:
            self.element.attrib.pop(name, None)
        else:
            self.element.set(name, value)

    def _set_child(self, tag: str, value: str | None) -> None:
        existing = child(self.element, tag)
        if value is None:
            if existing is not None:
                remove_element(existing)
            return
        if existing is not None:
            for sub in list(existing):
                existing.remove(sub)
            existing.text = value
            return
        new = etree.Element(tag)
        new.text = value
        rank = _LABEL_ORDER.index(tag)
        index = 0
        for i, sub in enumerate(self.element):
            if sub.tag in _LABEL_ORDER and _LABEL_ORDER.index(sub.tag) < rank:
                index = i + 1
        insert_element(self.element, index, new)


def parse_seclabels(ctx: ParseContext, root: etree._Element) -> list[SecLabel]:
    """Domain ``<seclabel>``s with libvirt's rules (virSecurityLabelDefParseXML)."""
    out: list[SecLabel] = []
    for el in children(root, "seclabel"):
        model, raw_type = el.get("model"), el.get("type")
        if raw_type is not None and raw_type not in SECLABEL_TYPES:
            raise ctx.error(el, f"invalid security type '{raw_type}'; use dynamic, static or none")
        if model == "none" and ctx.live and (raw_type or "dynamic") != "none":
            raise ctx.error(el, f"unsupported type='{raw_type or 'dynamic'}' to model 'none'")
        sec = SecLabel(el)
        relabel = yes_no(ctx, el, "relabel", sec.type == "dynamic")
        name = f"seclabel (model {model or 'unset'})"
        if sec.type == "dynamic" and not relabel:
            raise ctx.error(el, f"{name}: dynamic label type must use resource relabeling; "
                                "remove relabel='no' or use type='static'/'none'")
        if sec.type == "none" and relabel and model != "none":
            raise ctx.error(el, f"{name}: resource relabeling is not compatible with 'none' "
                                "label type; remove relabel='yes'")
        if model is not None and any(o.model == model for o in out):
            raise ctx.error(el, f"seclabel for model '{model}' is already provided; keep one")
        if sec.type == "static" and sec.label is None:
            raise ctx.error(el, f"{name}: missing <label> for static label type; add "
                                "<label>...</label> or use type='dynamic'")
        if sec.baselabel is not None and sec.type != "dynamic":
            raise ctx.error(el, f"{name}: <baselabel> is only valid with type='dynamic'")
        if model is None and not (sec.type == "none" or
                                  (sec.type == "dynamic" and sec.baselabel is None)):
            raise ctx.error(el, "missing security model in domain seclabel; add model=...")
        if not ctx.live:  # generated values: libvirt's inactive parser ignores them
            drop = ("imagelabel",) if sec.type == "static" else ("label", "imagelabel")
            for tag in drop:
                for sub in children(el, tag):
                    remove_element(sub)
        out.append(sec)
    if len(out) > 1 and any(s.model is None for s in out):
        missing = next(s for s in out if s.model is None)
        raise ctx.error(missing.element, "missing security model when using multiple labels; "
                                         "add model=... to every <seclabel>")
    return out


def normalise_live_seclabel(el: etree._Element, sec: SecLabel) -> None:
    """libvirt's live attribute order and an explicit relabel for non-none labels."""
    attrs = dict(el.attrib)
    el.attrib.clear()
    el.set("type", sec.type)
    if sec.model is not None:
        el.set("model", sec.model)
    if sec.type != "none":
        el.set("relabel", "yes" if sec.relabel else "no")
    for key, value in attrs.items():
        if key not in ("type", "model", "relabel"):
            el.set(key, value)


def inactive_seclabel(el: etree._Element, sec: SecLabel) -> None:
    """libvirt's inactive form of ``el`` (a copy of ``sec``'s element): an implicit label is
    removed; generated values (a dynamic label's ``<label>``, every ``<imagelabel>``) are
    dropped."""
    if sec.implicit:
        remove_element(el)
        return
    drop = ("label", "imagelabel") if sec.type == "dynamic" else ("imagelabel",)
    for tag in drop:
        for sub in children(el, tag):
            remove_element(sub)


def drop_device_labelskip(root: etree._Element) -> None:
    """Remove the live-only ``labelskip`` attribute from every device ``<seclabel>``."""
    for el in list(root.iter("seclabel")):
        if el.getparent() is not root:
            el.attrib.pop("labelskip", None)


# --------------------------------------------------------------------------- device seclabels


@dataclass
class DeviceSecLabel:
    """Per-source ``<seclabel>`` override: ``model``, ``relabel`` (libvirt's default: True),
    ``label`` (owner/context to use instead of the domain's image label)."""

    model: str | None
    relabel: bool
    label: str | None
    labelskip: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def find_device_seclabel(labels: list[DeviceSecLabel], model: str) -> DeviceSecLabel | None:
    """The override for ``model``: an exact model match, else one without a model."""
    for sl in labels:
        if sl.model == model:
            return sl
    for sl in labels:
        if sl.model is None:
            return sl
    return None


def parse_device_seclabels(ctx: ParseContext, source: etree._Element | None,
                           ) -> list[DeviceSecLabel]:
    """``<seclabel>`` children of a ``<source>`` (libvirt virSecurityDeviceLabelDefParseXML)."""
    if source is None:
        return []
    out: list[DeviceSecLabel] = []
    for el in children(source, "seclabel"):
        model = el.get("model")
        if model is not None and any(o.model == model for o in out):
            raise ctx.error(el, f"seclabel for model '{model}' is already provided; "
                                "keep one <seclabel> per model")
        relabel = yes_no(ctx, el, "relabel", True)
        label = child_text(el, "label")
        if label is not None and not relabel:
            raise ctx.error(el, "cannot specify a <label> when relabel='no' "
                                f"(model {model or 'unset'}); drop one of them")
        skip = ctx.live and yes_no(ctx, el, "labelskip", False)
        out.append(DeviceSecLabel(model, relabel, label, skip, el))
    return out
