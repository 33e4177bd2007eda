"""Who QEMU runs as: ids from qemu.conf and seclabels, groups, the switch, capabilities.

Everything that needs the user database (names, supplementary groups) runs in the parent;
the child only calls :func:`switch_identity` and :func:`drop_capabilities` with the
:class:`Identity` computed before fork.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from vmconfine.errors import ConfigError, DriverError, LabelError
from vmconfine.launch.runtime import proc_status

PR_SET_KEEPCAPS = 8
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

_libc = ctypes.CDLL(None, use_errno=True)


def _capng() -> Any:
    """The libcap-ng binding (Debian python3-cap-ng), or None."""
    try:
        import capng  # type: ignore[import-not-found]
    except ImportError:
        return None
    return capng


CAPNG_MISSING = ("the libcap-ng Python binding is missing (import capng failed); install "
                 "python3-cap-ng, or set clear_emulator_capabilities = 0 in qemu.conf")


def have_capng() -> bool:
    return _capng() is not None


# ---- ids --------------------------------------------------------------------------------------


def user_id(spec: str, what: str = "user") -> int:
    """``+N`` → N; a name → its uid; an all-digit string that is no name → that number
    (libvirt's virGetUserID)."""
    if spec.startswith("+"):
        try:
            return int(spec[1:])
        except ValueError:
            raise LabelError(f"{what} '{spec}' is not +UID with a decimal id") from None
    try:
        return pwd.getpwnam(spec).pw_uid
    except KeyError:
        if spec.isdigit():
            return int(spec)
    raise ConfigError(f"{what} '{spec}' does not exist; create the account (scripts/setup.sh "
                      "creates vmconfine-qemu) or give a numeric id as +UID")


def group_id(spec: str, what: str = "group") -> int:
    """Like :func:`user_id`, for groups (libvirt's virGetGroupID)."""
    if spec.startswith("+"):
        try:
            return int(spec[1:])
        except ValueError:
            raise LabelError(f"{what} '{spec}' is not +GID with a decimal id") from None
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        if spec.isdigit():
            return int(spec)
    raise ConfigError(f"{what} '{spec}' does not exist; create the group or give a numeric "
                      "id as +GID")


def parse_label(label: str) -> tuple[int, int]:
    """A DAC label ``USER:GROUP`` (names or ``+N``) → ``(uid, gid)``."""
    user, sep, group = label.partition(":")
    if not sep or not user or not group:
        raise LabelError(f"Failed to parse uid and gid from '{label}'; a DAC label is "
                         "USER:GROUP, e.g. +107:+107")
    try:
        return user_id(user, "DAC label user"), group_id(group, "DAC label group")
    except ConfigError as exc:
        raise LabelError(f"DAC label '{label}': {exc}") from None


def format_label(uid: int, gid: int) -> str:
    return f"+{uid}:+{gid}"


def config_ids(config: Any) -> tuple[int, int]:
    """qemu.conf ``user`` / ``group`` → ``(uid, gid)``."""
    return user_id(config.user, "qemu.conf user"), group_id(config.group, "qemu.conf group")


def supplementary_groups(uid: int, gid: int) -> tuple[int, ...]:
    """The groups a process of ``uid`` gets (libvirt's virGetGroupList): the user's groups
    from the user database plus ``gid``; an id without a passwd entry gets none."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return ()
    groups = list(os.getgrouplist(pw.pw_name, pw.pw_gid))
    if gid not in groups:
        groups.append(gid)
    return tuple(sorted(set(groups)))


@dataclass(frozen=True)
class Identity:
    """The uid, gid and groups QEMU runs with, and whether it loses every capability."""

    uid: int
    gid: int
    groups: tuple[int, ...] = field(default_factory=tuple)
    clear_caps: bool = True
    #: the domain's own uid from qemu.conf ``user_range``: the group of the images several
    #: domains use (None: the qemu.conf user/group model, libvirt's)
    shared_gid: int | None = None

    @property
    def label(self) -> str:
        return format_label(self.uid, self.gid)

    @property
    def high_privileges(self) -> bool:
        """libvirt's "high-privileges" taint: caps kept, or user or group root."""
        return not self.clear_caps or self.uid == 0 or self.gid == 0


# ---- in the child -----------------------------------------------------------------------------


def switch_identity(ident: Identity) -> None:
    """Child: set groups, gid, uid (all of real, effective, saved). When capabilities are to
    be dropped afterwards, keep the permitted set across the uid change so the bounding set
    can still be emptied (the kernel clears PR_SET_KEEPCAPS again at exec)."""
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, ident.gid, ident.gid)
    if ident.clear_caps and ident.uid != 0 and os.geteuid() == 0:
        if _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise DriverError(f"prctl(PR_SET_KEEPCAPS) failed: {os.strerror(err)}")
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise DriverError(f"switching to {ident.label} did not take effect")


def drop_capabilities() -> None:
    """Child: empty the effective, permitted, inheritable, bounding and ambient sets."""
    capng = _capng()
    if capng is None:
        raise DriverError(CAPNG_MISSING)
    capng.capng_get_caps_process()
    # dropping the bounding set needs CAP_SETPCAP in effect; after a uid change with
    # PR_SET_KEEPCAPS it is only permitted, so raise it first
    if capng.capng_have_capability(capng.CAPNG_PERMITTED, capng.CAP_SETPCAP):
        capng.capng_update(capng.CAPNG_ADD, capng.CAPNG_EFFECTIVE, capng.CAP_SETPCAP)
        if capng.capng_apply(capng.CAPNG_SELECT_CAPS) != 0:
            raise DriverError("libcap-ng could not raise CAP_SETPCAP to empty the bounding set")
    capng.capng_clear(capng.CAPNG_SELECT_ALL)
    rc = capng.capng_apply(capng.CAPNG_SELECT_ALL)
    _libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    left = {k: v for k, v in read_caps("self").items() if v}
    if rc != 0 or left:
        shown = ", ".join(f"{k}={v:#x}" for k, v in left.items()) or f"capng_apply rc {rc}"
        raise DriverError(f"dropping capabilities failed: {shown}")


# ---- reading the kernel's view ----------------------------------------------------------------


read_status = proc_status  # the kernel's view of a process, shared with core


def read_caps(pid: int | str) -> dict[str, int]:
    status = read_status(pid)
    return {k: int(status.get(k, "0"), 16) for k in CAP_FIELDS}


def process_ids(status: dict[str, str]) -> tuple[list[int], list[int], list[int]]:
    """(uids, gids, groups) from a parsed status: real, effective, saved, fs."""
    uids = [int(x) for x in status.get("Uid", "").split()]
    gids = [int(x) for x in status.get("Gid", "").split()]
    groups = [int(x) for x in status.get("Groups", "").split()]
    return uids, gids, groups


def verify_status(status: dict[str, str], ident: Identity) -> list[str]:
    """Differences between a process's status and the identity it should have."""
    problems: list[str] = []
    uids, gids, groups = process_ids(status)
    if not uids or any(u != ident.uid for u in uids):
        problems.append(f"Uid is {' '.join(map(str, uids))}, expected {ident.uid} everywhere")
    if not gids or any(g != ident.gid for g in gids):
        problems.append(f"Gid is {' '.join(map(str, gids))}, expected {ident.gid} everywhere")
    if sorted(set(groups)) != sorted(set(ident.groups)):
        problems.append(f"Groups are [{' '.join(map(str, sorted(groups)))}], expected "
                        f"[{' '.join(map(str, sorted(ident.groups)))}]")
    if ident.clear_caps:
        for key in CAP_FIELDS:
            value = int(status.get(key, "-1"), 16) if key in status else -1
            if value != 0:
                shown = status.get(key, "missing")
                problems.append(f"{key} is {shown}, expected 0000000000000000")
    return problems
