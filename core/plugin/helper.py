"""Helper processes: programs vmconfine starts for a domain beside QEMU (libvirt's external
devices; today the TPM emulator ``swtpm``), confined by the same stack as QEMU.

A :class:`Helper` says what the stack needs to confine one such program: the account it runs
as (qemu.conf keys such as ``swtpm_user``/``swtpm_group``), the executable, the paths it opens
by name with their access, and the directories whose files belong to it (its persistent state).
Drivers implement ``set_helper_label`` / ``restore_helper_label`` (the files, libvirt's
``SetTPMLabels``), ``child_helper`` (the process between fork and exec, libvirt's
``SetChildProcessLabel``) and ``verify_helper`` (the kernel's view after exec); see
:mod:`vmconfine.plugin.hookspecs`. The launch layer runs the program
(:mod:`vmconfine.launch.swtpm`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HelperPath:
    """One path the helper opens by name: ``access`` is ``r``, ``rw`` or ``rx`` (execute);
    ``tree``: the path is a directory and the access covers everything beneath it."""

    path: str
    access: str
    tree: bool = False


@dataclass(frozen=True)
class Helper:
    """One helper program of a domain (see the module docstring).

    ``name`` is its kind (``swtpm``, ``swtpm_setup``); ``user``/``group`` the qemu.conf account
    specs it runs as in a privileged instance (``tss``, ``+0``); ``owned``: directories whose
    whole tree belongs to the helper's account (its state, kept across starts); ``paths``:
    what it opens by name (its state, its executables and the system files they need).
    """

    name: str
    executable: str
    user: str
    group: str
    paths: tuple[HelperPath, ...] = ()
    owned: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Helper:
        return cls(name=data["name"], executable=data["executable"], user=data["user"],
                   group=data["group"],
                   paths=tuple(HelperPath(**p) for p in data.get("paths", ())),
                   owned=tuple(data.get("owned", ())))
