"""Lifecycle events, fanned out to every subscriber (``vmconfine event``).

Each subscriber has a bounded queue; one that does not read fast enough is dropped (its stream
ends) rather than slowing the daemon or growing its memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

QUEUE_LIMIT = 1024

#: libvirt's lifecycle event types (virDomainEventType) and the details vmconfine emits
EVENT_TYPES = ("defined", "undefined", "started", "suspended", "resumed", "stopped",
               "shutdown", "crashed")


@dataclass(frozen=True)
class Event:
    domain: str
    event: str  #: one of EVENT_TYPES
    detail: str  #: e.g. "booted", "paused", "destroyed", "shutdown", "crashed", "failed"
    time: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()

    def emit(self, domain: str, event: str, detail: str) -> None:
        ev = Event(domain, event, detail, time.time())
        log.info("event: domain %s %s (%s)", domain, event, detail)
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                log.warning("an event subscriber does not keep up; dropping it")
                self._subscribers.discard(q)
                while not q.empty():  # its stream ends: what it missed is not queued
                    q.get_nowait()
                q.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        q: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(q)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
