"""Persistent domain definitions: one ``NAME.xml`` per domain under the instance's config dir
(libvirt: ``/etc/libvirt/qemu/NAME.xml``), and ``autostart/NAME.xml`` symlinks to them.

Every write is atomic (a temporary file in the same directory, fsync, rename), so a crash never
leaves a half-written definition; files are 0600 and the directories 0700.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.config.instance import Instance
from vmconfine.errors import VmconfineError
from vmconfine.launch import runtime

if TYPE_CHECKING:
    from vmconfine.domain import Domain


class DefinitionStore:
    """The definitions of one instance."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.dir = instance.definitions_dir

    def _ensure_dirs(self) -> None:
        for d in (self.dir, self.dir / "autostart"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.xml") if p.is_file())

    def load(self, name: str) -> Domain | None:
        path = self.instance.definition_path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        from vmconfine.domain import parse_domain  # names() alone needs no domain model

        return parse_domain(text, source=str(path), live=False)

    def load_all(self) -> dict[str, Domain]:
        out: dict[str, Domain] = {}
        for name in self.names():
            try:
                dom = self.load(name)
            except VmconfineError as exc:
                raise VmconfineError(f"definition of domain '{name}' is unreadable: "
                                     f"{exc.message}; fix or remove "
                                     f"{self.instance.definition_path(name)}") from None
            if dom is not None:
                out[name] = dom
        return out

    def save(self, domain: Domain) -> None:
        self._ensure_dirs()
        runtime.write_atomic(self.instance.definition_path(domain.name),
                             domain.to_xml(live=False))

    def remove(self, name: str) -> None:
        self.set_autostart(name, False)
        self.instance.definition_path(name).unlink(missing_ok=True)

    def autostart(self, name: str) -> bool:
        return self.instance.autostart_path(name).is_symlink()

    def set_autostart(self, name: str, enable: bool) -> None:
        link = self.instance.autostart_path(name)
        if not enable:
            link.unlink(missing_ok=True)
            return
        self._ensure_dirs()
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(Path("..") / f"{name}.xml", link)

    def autostart_names(self) -> list[str]:
        return [n for n in self.names() if self.autostart(n)]
