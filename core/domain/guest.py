"""Guest platform views of libvirt domain XML: ``<cpu>``, ``<clock>`` and ``<memoryBacking>``
(part of :mod:`vmconfine.domain`).

Values are checked against libvirt's enums at parse time (one ``XMLError`` line naming the
element); which values the QEMU command line can express is decided by
:mod:`vmconfine.qemu.argv` (e.g. ``host-passthrough`` needs KVM, as in libvirt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.xml import (
    ParseContext,
    child,
    child_text,
    children,
    int_attr,
    memory_to_kib,
    one_line,
)

CPU_MODES = ("custom", "host-model", "host-passthrough", "maximum")
CPU_FEATURE_POLICIES = ("force", "require", "optional", "disable", "forbid")
CLOCK_OFFSETS = ("utc", "localtime", "timezone", "variable", "absolute")
TOPOLOGY = ("sockets", "dies", "cores", "threads")


@dataclass
class Cpu:
    """``<cpu>``: ``mode`` (custom when a model is given without one), the named ``model``,
    ``features`` as (name, policy) in document order, and ``topology`` (sockets, dies, cores,
    threads) when given."""

    mode: str = "custom"
    model: str | None = None
    features: list[tuple[str, str]] = field(default_factory=list)
    topology: dict[str, int] = field(default_factory=dict)
    element: etree._Element | None = field(default=None, repr=False, compare=False)


TIMER_NAMES = ("platform", "pit", "rtc", "hpet", "tsc", "kvmclock", "hypervclock", "armvtimer")
TICK_POLICIES = ("delay", "catchup", "merge", "discard")
TIMER_TRACKS = ("boot", "guest", "wall", "realtime")


@dataclass
class Timer:
    """A ``<clock><timer name=...>`` (None = not given)."""

    name: str
    tickpolicy: str | None = None
    present: bool | None = None
    track: str | None = None


@dataclass
class Clock:
    """``<clock offset=...>`` (libvirt's default: utc) and its ``<timer>``s."""

    offset: str = "utc"
    timers: list[Timer] = field(default_factory=list)
    element: etree._Element | None = field(default=None, repr=False, compare=False)


@dataclass
class MemoryBacking:
    """``<memoryBacking>``: ``hugepages`` when guest RAM comes from hugetlbfs, with the page
    size in KiB (None = the host's default huge page size)."""

    hugepages: bool = False
    page_size_kib: int | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


def _enum(ctx: ParseContext, el: etree._Element, name: str, allowed: tuple[str, ...],
          default: str) -> str:
    value = el.get(name, default)
    if value not in allowed:
        raise ctx.error(el, f"Invalid {name} value '{one_line(value, 40)}' on <{el.tag}>; use "
                            f"one of {', '.join(allowed)}")
    return value


def parse_cpu(ctx: ParseContext, root: etree._Element) -> Cpu | None:
    """``<cpu>``, or None when the domain has none."""
    el = child(root, "cpu")
    if el is None:
        return None
    cpu = Cpu(mode=_enum(ctx, el, "mode", CPU_MODES, "custom"), element=el,
              model=child_text(el, "model"))
    if cpu.model is not None:
        cpu.model = cpu.model.strip()
        if not cpu.model:
            raise ctx.error(child(el, "model"), "<cpu><model> is empty; name a CPU model such "
                                                "as Westmere, or remove <model>")
    for feat in children(el, "feature"):
        name = feat.get("name")
        if not name:
            raise ctx.error(feat, "Missing CPU feature name; use <feature name='...'/>")
        cpu.features.append((name, _enum(ctx, feat, "policy", CPU_FEATURE_POLICIES,
                                         "require")))
    topo = child(el, "topology")
    if topo is not None:
        for name in TOPOLOGY:
            value = int_attr(ctx, topo, name, f"CPU topology {name}")
            if value == 0:
                raise ctx.error(topo, f"Invalid CPU topology: {name} must be 1 or more")
            if value is not None:
                cpu.topology[name] = value
        missing = [n for n in ("sockets", "cores", "threads") if n not in cpu.topology]
        if missing:
            raise ctx.error(topo, f"Missing '{missing[0]}' attribute in CPU topology")
    return cpu


def parse_clock(ctx: ParseContext, root: etree._Element) -> Clock:
    """``<clock>`` (utc when absent)."""
    el = child(root, "clock")
    if el is None:
        return Clock()
    clock = Clock(offset=_enum(ctx, el, "offset", CLOCK_OFFSETS, "utc"), element=el)
    for t in children(el, "timer"):
        if t.get("name") is None:
            raise ctx.error(t, "missing timer name; use e.g. <timer name='rtc'/>")
        name = _enum(ctx, t, "name", TIMER_NAMES, "")
        present = t.get("present")
        if present not in (None, "yes", "no"):
            raise ctx.error(t, f"Invalid present value '{one_line(present, 20)}' on <timer>; "
                               "use yes or no")
        clock.timers.append(Timer(
            name=name, present=None if present is None else present == "yes",
            tickpolicy=_enum(ctx, t, "tickpolicy", TICK_POLICIES, "")
            if t.get("tickpolicy") is not None else None,
            track=_enum(ctx, t, "track", TIMER_TRACKS, "") if t.get("track") is not None
            else None))
    return clock


def parse_memory_backing(ctx: ParseContext, root: etree._Element) -> MemoryBacking | None:
    """``<memoryBacking>``, or None when the domain has none."""
    el = child(root, "memoryBacking")
    if el is None:
        return None
    out = MemoryBacking(element=el)
    huge = child(el, "hugepages")
    if huge is not None:
        out.hugepages = True
        pages = children(huge, "page")
        if len(pages) > 1 or (pages and pages[0].get("nodeset")):
            raise ctx.error(pages[-1], "per-NUMA-node huge page sizes are not supported; give "
                                       "one <page size=...> without nodeset")
        if pages:
            size = pages[0].get("size")
            if size is None:
                raise ctx.error(pages[0], "Missing page size on <page>; use e.g. "
                                          "<page size='2' unit='MiB'/>")
            try:
                out.page_size_kib = memory_to_kib(size, pages[0].get("unit"))
            except ValueError as exc:
                raise ctx.error(pages[0], f"huge page size: {exc}") from None
    return out
