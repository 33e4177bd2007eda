"""Per-domain identity: each domain of a privileged instance gets a uid (and a primary gid of
the same number) of its own from qemu.conf ``user_range``, so DAC alone separates domains.

The qemu.conf keys (declared in :mod:`vmconfine_dac`):

* ``user_range = "LOW-HIGH"``: the ids handed out (unset: every QEMU runs as ``user``/``group``,
  libvirt's model). No account or group of the user database may use an id of the range;
* ``shared_group = "NAME"`` (or ``"+GID"``): the supplementary group of every domain's QEMU.
  Images several domains may use at once (backing layers, ``<readonly/>`` and ``<shareable/>``
  disks, kernels) keep their owner and get this group with group read (``<shareable/>``:
  read-write), only when QEMU cannot already read them; world access is never added.

Allocation: :mod:`vmconfine_dac.idleases`. This module is imported when the drivers
register (its check types the key), so it imports nothing heavy.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from dataclasses import dataclass
from typing import Any

from vmconfine.config.keys import error
from vmconfine.errors import ConfigError, LabelError
from vmconfine_dac.identity import group_id

#: the highest id a range may reach: (uid_t)-1 means "unchanged" to the kernel, and
#: (uid_t)-2 is the overflow id on many systems
ID_MAX = 2**32 - 3
_RANGE_RE = re.compile(r"\s*(\d{1,10})\s*-\s*(\d{1,10})\s*")


def parse_range(text: str) -> tuple[int, int]:
    """``"LOW-HIGH"`` → ``(LOW, HIGH)``; ValueError with the reason otherwise."""
    m = _RANGE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"'{text}' is not LOW-HIGH (e.g. \"200000-200999\")")
    low, high = int(m.group(1)), int(m.group(2))
    if low < 1000:
        raise ValueError(f"{low} is a system id (below 1000); start the range at 1000 or above")
    if high < low:
        raise ValueError(f"{high} is below {low}")
    if high > ID_MAX:
        raise ValueError(f"{high} is above the highest usable id {ID_MAX}")
    return low, high


def check_range(key: str, value: Any, where: str, privileged: bool) -> Any:
    """qemu.conf check of ``user_range`` (unset: "")."""
    if value:
        try:
            parse_range(value)
        except ValueError as exc:
            raise error(where, f"'{key}' {exc}") from None
    return value


@dataclass(frozen=True)
class UidRange:
    """The uids of ``user_range`` as a :class:`vmconfine.plugin.leases.LeaseRange`."""

    low: int
    high: int

    @property
    def capacity(self) -> int:
        return self.high - self.low + 1

    @property
    def key(self) -> str:
        return f"uid-{self.low}-{self.high}"

    def value(self, number: int) -> str:
        return str(self.low + number)

    def number(self, value: str) -> int | None:
        if not value.isdigit():
            return None
        uid = int(value)
        return uid - self.low if self.low <= uid <= self.high else None

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.low <= uid <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class RangeConfig:
    """``user_range`` and ``shared_group`` resolved and checked against the user database."""

    range: UidRange
    shared_gid: int


def range_config(config: Any) -> RangeConfig | None:
    """The per-domain identity settings, or None when ``user_range`` is unset. Raises
    ConfigError (one line, naming the key and the fix) for a range that overlaps an account
    or group of the user database, or a missing/unusable ``shared_group``."""
    settings = config.driver_settings("dac")
    text = settings.user_range
    if not text:
        return None
    where = settings.source("user_range")
    try:
        low, high = parse_range(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: 'user_range' {exc}") from None
    rng = UidRange(low, high)
    shared = settings.shared_group
    if not shared:
        raise ConfigError(f"{where}: user_range needs shared_group (the group of images "
                          "several domains read): add shared_group = \"vmconfine-shared\" to "
                          "qemu.conf and create it with 'groupadd -r vmconfine-shared'")
    try:
        shared_gid = group_id(shared, "qemu.conf shared_group")
    except (ConfigError, LabelError) as exc:
        raise ConfigError(f"{settings.source('shared_group')}: {exc}") from None
    if shared_gid == 0 or shared_gid in rng:
        raise ConfigError(f"{settings.source('shared_group')}: shared_group '{shared}' (gid "
                          f"{shared_gid}) must be neither root's group nor inside user_range "
                          f"{rng}")
    for pw in pwd.getpwall():
        if pw.pw_uid in rng:
            raise ConfigError(f"{where}: user_range {rng} overlaps the account '{pw.pw_name}' "
                              f"(uid {pw.pw_uid}) in the user database; choose a range no "
                              "account uses")
    for gr in grp.getgrall():
        if gr.gr_gid in rng:
            raise ConfigError(f"{where}: user_range {rng} overlaps the group '{gr.gr_name}' "
                              f"(gid {gr.gr_gid}) in the group database; each domain's "
                              "primary gid is its uid: choose a range no group uses")
    return RangeConfig(rng, shared_gid)


def kvm_group(virt_type: str) -> int | None:
    """The group of /dev/kvm for a KVM domain (QEMU's own uid has no groups of the user
    database; libvirt's qemu user is in that group)."""
    if virt_type != "kvm":
        return None
    try:
        gid = os.stat("/dev/kvm").st_gid
    except OSError:
        return None
    return gid or None
