"""The per-domain journal: every host change is recorded here before it is made.

One JSON object per line, appended and fsynced. The pipeline records its own stages
(``driver="pipeline"``); each driver records what it is about to change (a chown, a cgroup it
creates, a profile it loads) under its own name. Teardown, rollback and crash recovery read the
journal back, so a fresh process can undo exactly what a crashed one did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vmconfine.errors import LaunchError


class Journal:
    """Append-only record of host changes for one domain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] | None = None
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        return self._fd

    def record(self, driver: str, op: str, **data: Any) -> None:
        """Durably append one record (call BEFORE making the change it describes)."""
        entry = {"driver": driver, "op": op, **data}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        if self._records is None:
            self.records()  # load the cache from the file before this line is added to it
        fd = self._open()
        os.write(fd, line)
        os.fsync(fd)
        assert self._records is not None
        self._records.append(entry)

    def records(self, driver: str | None = None, op: str | None = None) -> list[dict[str, Any]]:
        """Records in the order they were written, optionally filtered."""
        if self._records is None:
            self._records = []
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                text = ""
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self._records.append(json.loads(line))
                except json.JSONDecodeError:
                    # a torn final line from a crash mid-write: the change it described was
                    # never made (records are written before changes)
                    if n == len(text.splitlines()):
                        break
                    raise LaunchError(
                        f"{self.path}:{n}: corrupt journal line; inspect it, undo the listed "
                        "changes by hand and delete the file"
                    ) from None
        return [
            r
            for r in self._records
            if (driver is None or r.get("driver") == driver) and (op is None or r.get("op") == op)
        ]

    def last(self, driver: str, op: str) -> dict[str, Any] | None:
        found = self.records(driver, op)
        return found[-1] if found else None

    def exists(self) -> bool:
        return self.path.exists()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Delete the journal once every change it lists has been undone."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._records = []
