"""The per-domain journal: every host change is recorded here before it is made.

One JSON object per line, appended and fsynced; records written together with the same fields
share one line (``{"group": [field, ...], "rows": [[value, ...], ...]}``, read back as one
record per row; ``"same": {field: value, ...}``, when present, holds the fields every row of the
line shares, ``driver`` and ``op`` among them). The pipeline records its own stages
(``driver="pipeline"``); each driver records what it is about to change (a chown, a cgroup it
creates, a profile it loads) under its own name. Teardown, rollback and crash recovery read the
journal back, so a fresh process can undo exactly what a crashed one did.

Three ways to append:

* :meth:`Journal.record`: one record, durable (``fsync``) before the call returns;
* :meth:`Journal.record_many`: group commit: many records in one ``write`` and one ``fsync``.
  The caller makes none of the changes they describe before it returns, so every record of a
  batch is durable before any change of that batch;
* :meth:`Journal.record_rows`: group commit without a dict per record: the caller hands the
  rows of one group line (field names once, a list of values per record, the shared fields
  once) — the form a driver that journals hundreds of files at a time (DAC) builds cheapest;
* :meth:`Journal.note`: a marker for something already done (``restored``...), written at once
  (a crashed process's successor reads it) and made durable by the next ``record``,
  ``record_many``, :meth:`Journal.sync` or :meth:`Journal.close`. It never describes a change
  still to be made. :meth:`Journal.note_rows` is its form of :meth:`Journal.record_rows`.

Rows are turned into record dicts only when records are read (:meth:`Journal.records`), in
the order they were written.

:meth:`Journal.sync_ahead` starts an ``fsync`` of what is written so far in a thread of its
own and returns at once: the pipeline's ``begin`` record is a note followed by it, so the
journal file's creation is committed to disk while the start goes on (the first fsync of a new
file costs 2-4 ms on ext4; it precedes no change of its own). It is an early start only:
durability before a change still comes from the ``record``/``record_many`` in front of that
change, whose fsync covers everything written before it.

:meth:`Journal.deferred_syncs`: inside it, :meth:`Journal.sync` (a closing sync, which makes
notes of changes already made durable) only owes its fsync: the next durable record pays it,
or the end of the block does. A sync never precedes a change of its own (a change's record
does), so no change is made with an owed sync that its record does not pay first; the
pipeline wraps its ``set_all_labels`` in one, so a driver's closing sync is paid by the next
driver's record instead of costing an fsync of its own.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vmconfine.errors import LaunchError

#: one entry of :meth:`Journal.record_many`: (driver, op, data)
Entry = tuple[str, str, dict[str, Any]]
#: records appended but not yet read as dicts: a list of records, or the (shared fields,
#: field names, rows) of one group line
_Chunk = list[dict[str, Any]] | tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]



def _make_encode() -> Callable[[Any], str]:
    """``json.JSONEncoder(sort_keys=True).encode``, with the C encoder made once instead of
    on every call (what ``encode`` sets up each time costs more than a short line)."""
    encoder = json.JSONEncoder(sort_keys=True)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    chunks = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ": ",
                  ", ", True, False, True)
    return lambda obj: "".join(chunks(obj, 0))


_encode = _make_encode()


class Journal:
    """Append-only record of host changes for one domain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] | None = None
        #: appended after ``_records``, read as dicts on the next :meth:`records`
        self._tail: list[_Chunk] = []
        self._fd: int | None = None
        self._unsynced = False
        self._counts: Counter[tuple[Any, Any]] = Counter()
        self._counted = 0
        self._counted_list: list[dict[str, Any]] | None = None
        self._deferring = 0  #: nesting of :meth:`deferred_syncs`
        self._owed = False  #: a sync was asked for inside it and no fsync has followed yet

    def _open(self) -> int:
        if self._fd is None:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, flags, 0o600)
            if not _trim_torn_line(fd) and self._records is None:
                self._records, self._tail = [], []  # empty: nothing to read back
            self._fd = fd
        return self._fd

    def _overridden(self) -> bool:
        """True when a subclass keeps records its own way (it overrides :meth:`record`); the
        batch calls then go through its ``record``."""
        return type(self).record is not Journal.record

    def _append(self, entries: list[dict[str, Any]], durable: bool) -> None:
        if entries:
            self._write(_lines(entries), [entries], durable)

    def _write(self, text: str, chunks: list[_Chunk], durable: bool) -> None:
        fd = self._open()
        self._load()  # the cache holds the file's records before these lines are added
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
            self._unsynced = self._owed = False
        else:
            self._unsynced = True
        if self._tail or isinstance(chunks[0], tuple):
            self._tail.extend(chunks)
        else:
            assert self._records is not None
            self._records.extend(chunks[0])  # type: ignore[arg-type]

    def _settle(self) -> list[dict[str, Any]]:
        """The cache with every chunk of rows turned into records."""
        self._load()
        recs = self._records
        assert recs is not None
        for chunk in self._tail:
            recs.extend(rows_to_records(*chunk) if isinstance(chunk, tuple) else chunk)
        self._tail.clear()
        return recs

    def record(self, driver: str, op: str, **data: Any) -> None:
        """Durably append one record (call BEFORE making the change it describes)."""
        self._append([{"driver": driver, "op": op, **data}], durable=True)

    def record_many(self, entries: Iterable[Entry]) -> None:
        """Durably append several records with one write and one fsync (group commit).

        Call BEFORE making any of the changes they describe.
        """
        if self._overridden():
            for driver, op, data in entries:
                self.record(driver, op, **data)
            return
        self._append([{"driver": d, "op": op, **data} for d, op, data in entries], durable=True)

    def record_rows(self, driver: str, op: str, keys: tuple[str, ...], rows: list[list[Any]],
                    same: dict[str, Any] | None = None) -> None:
        """Durably append one record per row (``keys`` names its values; ``same`` holds the
        fields every record shares) with one write and one fsync, as one group line.

        Call BEFORE making any of the changes they describe. The rows are kept, not copied:
        the caller must not change them afterwards.
        """
        self.record_groups(driver, op, keys, [(same or {}, rows)])

    def record_groups(self, driver: str, op: str, keys: tuple[str, ...],
                      groups: list[tuple[dict[str, Any], list[list[Any]]]]) -> None:
        """:meth:`record_rows` for several groups (each its shared fields and its rows, one
        line each), all with one write and one fsync."""
        self._groups(driver, op, keys, groups, durable=True)

    def note_rows(self, driver: str, op: str, keys: tuple[str, ...], rows: list[list[Any]],
                  same: dict[str, Any] | None = None) -> None:
        """:meth:`note` for one record per row (see :meth:`record_rows`)."""
        self._groups(driver, op, keys, [(same or {}, rows)], durable=False)

    def note_groups(self, driver: str, op: str, keys: tuple[str, ...],
                    groups: list[tuple[dict[str, Any], list[list[Any]]]]) -> None:
        """:meth:`note_rows` for several groups (see :meth:`record_groups`), in one write."""
        self._groups(driver, op, keys, groups, durable=False)

    def _groups(self, driver: str, op: str, keys: tuple[str, ...],
                groups: list[tuple[dict[str, Any], list[list[Any]]]], durable: bool) -> None:
        full = [({"driver": driver, "op": op, **same}, rows) for same, rows in groups if rows]
        if not full:
            return
        if self._overridden():
            for shared, rows in full:
                for rec in rows_to_records(shared, keys, rows):
                    self.record(**rec)
            return
        self._write("".join([_encode({"group": keys, "rows": rows, "same": shared}) + "\n"
                             for shared, rows in full]),
                    [(shared, keys, rows) for shared, rows in full], durable)

    def note(self, driver: str, op: str, **data: Any) -> None:
        """Append a marker of something already done; durable with the next sync."""
        self.note_many([(driver, op, data)])

    def note_many(self, entries: Iterable[Entry]) -> None:
        """:meth:`note` for several markers, in one write."""
        if self._overridden():
            for driver, op, data in entries:
                self.record(driver, op, **data)
            return
        self._append([{"driver": d, "op": op, **data} for d, op, data in entries],
                     durable=False)

    def sync_ahead(self) -> None:
        """Start an fsync of everything written so far without waiting for it (see the module
        docstring). The thread syncs a duplicate of the descriptor, so the journal may be
        closed or removed meanwhile."""
        if self._fd is None or not self._unsynced:
            return
        _thread.start_new_thread(_fsync_and_close, (os.dup(self._fd),))

    def sync(self) -> None:
        """Make every note written so far durable (no-op when there is none); inside
        :meth:`deferred_syncs`, by the next durable record or at the block's end."""
        if self._deferring and self._unsynced:
            self._owed = True
            return
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
        self._unsynced = self._owed = False

    @contextlib.contextmanager
    def deferred_syncs(self) -> Iterator[None]:
        """A block whose :meth:`sync` calls are paid by the next durable record, or at its
        end (see the module docstring)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._owed:
                self.sync()

    def _load(self) -> None:
        """Read the file into the cache (once): plain records as records, group lines with
        shared fields as groups (read as records only when asked for)."""
        if self._records is not None:
            return
        self._records, self._tail = [], []
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        lines = text.splitlines()
        plain: list[dict[str, Any]] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                chunk = _as_group(obj)
                if chunk is None:
                    plain.extend(_expand(obj))
            except (json.JSONDecodeError, _Corrupt):
                # a torn final line from a crash mid-write: the changes it described were
                # never made (records are written and synced before their changes)
                if n == len(lines):
                    break
                raise LaunchError(
                    f"{self.path}:{n}: corrupt journal line; inspect it, undo the listed "
                    "changes by hand and delete the file"
                ) from None
            if chunk is not None:
                if plain:
                    self._tail.append(plain)
                    plain = []
                self._tail.append(chunk)
        if plain:
            if self._tail:
                self._tail.append(plain)
            else:
                self._records.extend(plain)

    def records(self, driver: str | None = None, op: str | None = None) -> list[dict[str, Any]]:
        """Records in the order they were written, optionally filtered."""
        self._load()
        if driver is not None and op is not None and self._tail:
            # only the groups of driver/op are read as records (the cache keeps the rest)
            return [rec for same, keys, rows in self.groups(driver, op)
                    for rec in rows_to_records(same, keys, rows)]
        recs = self._settle() if self._tail else self._records
        assert recs is not None
        if driver is None and op is None:
            return list(recs)
        return [
            r
            for r in recs
            if (driver is None or r.get("driver") == driver) and (op is None or r.get("op") == op)
        ]

    def groups(self, driver: str, op: str,
               ) -> list[tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]]:
        """The records of ``driver``/``op`` in the order they were written, as groups: (the
        fields the group's records share, the names of the others, one row of values per
        record). A record written on its own is a group of one: all its fields shared, one
        empty row. Nothing is read as a record dict: for a caller that can decide on a whole
        group (hundreds of records) at once."""
        self._load()
        out: list[tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]] = []

        def plain(recs: list[dict[str, Any]]) -> None:
            out.extend((r, (), [[]]) for r in recs
                       if r.get("driver") == driver and r.get("op") == op)

        assert self._records is not None
        plain(self._records)
        for chunk in self._tail:
            if isinstance(chunk, tuple):
                if chunk[0]["driver"] == driver and chunk[0]["op"] == op:
                    out.append(chunk)
            else:
                plain(chunk)
        return out

    def groups_by_op(self, driver: str, ops: Iterable[str],
                     ) -> dict[str, list[tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]]]:
        """:meth:`groups` of several ops of ``driver`` at once, in one pass over the journal:
        op → its groups (an op without records: an empty list)."""
        self._load()
        out: dict[str, list[tuple[dict[str, Any], tuple[str, ...], list[list[Any]]]]] = {
            op: [] for op in ops}

        def plain(recs: list[dict[str, Any]]) -> None:
            for r in recs:
                if r.get("driver") == driver:
                    found = out.get(r.get("op"))  # type: ignore[arg-type]
                    if found is not None:
                        found.append((r, (), [[]]))

        assert self._records is not None
        plain(self._records)
        for chunk in self._tail:
            if isinstance(chunk, tuple):
                if chunk[0]["driver"] == driver:
                    found = out.get(chunk[0]["op"])
                    if found is not None:
                        found.append(chunk)
            else:
                plain(chunk)
        return out

    def count(self, driver: str, op: str) -> int:
        """How many records of ``driver``/``op`` there are (amortised O(1): no filtered copy;
        rows not read as records yet are counted by their group)."""
        self._load()
        recs = self._records
        assert recs is not None
        if recs is not self._counted_list or len(recs) < self._counted:
            self._counts.clear()  # the list was replaced (remove()) or shrunk: count again
            self._counted, self._counted_list = 0, recs
        for r in recs[self._counted:]:
            self._counts[(r.get("driver"), r.get("op"))] += 1
        self._counted = len(recs)
        n = self._counts[(driver, op)]
        for chunk in self._tail:
            if isinstance(chunk, tuple):
                if chunk[0]["driver"] == driver and chunk[0]["op"] == op:
                    n += len(chunk[2])
            else:
                n += sum(1 for r in chunk if r.get("driver") == driver and r.get("op") == op)
        return n

    def last(self, driver: str, op: str) -> dict[str, Any] | None:
        found = self.records(driver, op)
        return found[-1] if found else None

    def exists(self) -> bool:
        return self.path.exists()

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """Delete the journal once every change it lists has been undone."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._records, self._tail = [], []


def _fsync_and_close(fd: int) -> None:
    """:meth:`Journal.sync_ahead`'s thread (system calls only: they run without the GIL)."""
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class _Corrupt(ValueError):
    """A journal line that is JSON but not a record or a group of records."""


def _lines(entries: list[dict[str, Any]]) -> str:
    """The text of ``entries``: one line per record, or per run of records with the same
    fields (a group: the field names once, then one row of values per record)."""
    if len(entries) == 1:
        return _encode(entries[0]) + "\n"
    out: list[str] = []
    i, n = 0, len(entries)
    while i < n:
        keys = tuple(entries[i])
        j = i + 1
        while j < n and tuple(entries[j]) == keys:
            j += 1
        if j - i == 1:
            out.append(_encode(entries[i]))
        else:
            out.append(_encode({"group": keys, "rows": [list(e.values())
                                                        for e in entries[i:j]]}))
        i = j
    out.append("")
    return "\n".join(out)


def _expand(obj: Any) -> list[dict[str, Any]]:
    """The records of one parsed line."""
    if isinstance(obj, dict) and "driver" in obj:
        return [obj]
    if not (isinstance(obj, dict) and isinstance(obj.get("group"), list)
            and isinstance(obj.get("rows"), list)
            and isinstance(obj.get("same", {}), dict)):
        raise _Corrupt(str(obj)[:80])
    keys = obj["group"]
    for row in obj["rows"]:
        if not isinstance(row, list) or len(row) != len(keys):
            raise _Corrupt(str(row)[:80])
    out = rows_to_records(obj.get("same", {}), keys, obj["rows"])
    if out and "driver" not in out[0]:
        raise _Corrupt(str(obj)[:80])
    return out


def _as_group(obj: Any) -> tuple[dict[str, Any], tuple[str, ...], list[list[Any]]] | None:
    """A group line with shared fields (``driver`` and ``op`` among them) as a group of the
    cache; None for any other line."""
    if not (isinstance(obj, dict) and isinstance(obj.get("same"), dict)
            and "driver" in obj["same"] and "op" in obj["same"]):
        return None
    keys, rows = obj.get("group"), obj.get("rows")
    if not (isinstance(keys, list) and isinstance(rows, list)):
        raise _Corrupt(str(obj)[:80])
    for row in rows:
        if not isinstance(row, list) or len(row) != len(keys):
            raise _Corrupt(str(row)[:80])
    return obj["same"], tuple(keys), rows


def rows_to_records(same: dict[str, Any], keys: tuple[str, ...] | list[str],
                    rows: list[list[Any]]) -> list[dict[str, Any]]:
    """The records of one group (see :meth:`Journal.groups`)."""
    out = []
    for row in rows:
        rec = same.copy()
        rec.update(zip(keys, row, strict=True))
        out.append(rec)
    return out


def _trim_torn_line(fd: int) -> int:
    """Cut a torn last line (a crash mid-write) before appending, so the next record does not
    get glued onto it. Records are written before the changes they describe, so the torn one
    described nothing that was done. Returns the size the file had."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    tail_start = max(0, size - 65536)
    tail = os.pread(fd, size - tail_start, tail_start)
    if tail.endswith(b"\n"):
        return size
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, tail_start + cut + 1 if cut >= 0 else 0 if tail_start == 0 else size)
    return size
