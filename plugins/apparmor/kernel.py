"""What the kernel says about AppArmor, and the calls that change a process's profile.

Reads only: ``/sys/module/apparmor/parameters/enabled``, the loaded-profiles list in securityfs
and ``/proc/PID/attr/apparmor/current`` (``/proc/PID/attr/current`` on kernels before 5.8).
:func:`change_profile` uses libapparmor's ``aa_change_profile`` (QEMU, now) and
:func:`change_onexec` its ``aa_change_onexec`` (helper processes such as swtpm: at their exec),
the ``LibAppArmor`` binding from Debian's python3-libapparmor, else ``libapparmor.so.1`` through
ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

ENABLED_PARAM = Path("/sys/module/apparmor/parameters/enabled")
SECURITYFS = Path("/sys/kernel/security")
PROFILES = SECURITYFS / "apparmor" / "profiles"


class AppArmorUnavailable(Exception):
    """The kernel or the user space cannot do what was asked (message says which)."""


def enabled() -> tuple[bool, str]:
    """(True, "") when the kernel enforces AppArmor and its profile list is readable."""
    try:
        flag = ENABLED_PARAM.read_text().strip()
    except OSError:
        flag = ""
    if flag != "Y":
        return False, ("AppArmor is not enabled in this kernel; boot a kernel with "
                       "'apparmor=1 security=apparmor' or choose another security_driver")
    try:
        PROFILES.read_text()
    except OSError as exc:
        return False, (f"AppArmor is enabled but {PROFILES} is unreadable ({exc.strerror}); "
                       f"mount it: mount -t securityfs securityfs {SECURITYFS}")
    return True, ""


def loaded_profiles() -> dict[str, str] | None:
    """Loaded profile name → mode ("enforce", "complain"...), None when unreadable."""
    try:
        text = PROFILES.read_text()
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, _, mode = line.rpartition(" (")
        if name and mode.endswith(")"):
            out[name] = mode[:-1]
        elif line:
            out[line] = ""
    return out


def split_label(text: str) -> tuple[str, str]:
    """``"NAME (enforce)"`` → ("NAME", "enforce"); ``"unconfined"`` → ("unconfined", "")."""
    text = text.strip("\x00\n ")
    name, _, mode = text.rpartition(" (")
    if name and mode.endswith(")"):
        return name, mode[:-1]
    return text, ""


def process_label(pid: int) -> str:
    """The raw AppArmor label of ``pid`` (e.g. ``"vmconfine-<uuid> (enforce)"``).

    Raises OSError when neither attribute file can be read.
    """
    error: OSError | None = None
    for attr in (f"/proc/{pid}/attr/apparmor/current", f"/proc/{pid}/attr/current"):
        try:
            with open(attr, "rb") as fh:
                return fh.read().decode(errors="replace").strip("\x00\n ")
        except OSError as exc:
            error = error or exc
    assert error is not None
    raise error


def _binding(call: str = "aa_change_profile") -> Callable[[str], None]:
    """libapparmor's ``call`` (``aa_change_profile`` or ``aa_change_onexec``): the
    LibAppArmor binding, else ctypes on libapparmor.so.1."""
    try:
        import LibAppArmor  # type: ignore[import-not-found]

        bound = getattr(LibAppArmor, call)

        def via_binding(name: str) -> None:
            rc = bound(name)
            if rc not in (None, 0):
                raise OSError(ctypes.get_errno() or 1, f"{call} failed")

        return via_binding
    except ImportError:
        pass
    libname = ctypes.util.find_library("apparmor") or "libapparmor.so.1"
    try:
        lib = ctypes.CDLL(libname, use_errno=True)
    except OSError as exc:
        raise AppArmorUnavailable(
            "neither the LibAppArmor module nor libapparmor.so.1 is available; "
            "install python3-libapparmor (or libapparmor1)"
        ) from exc
    func = getattr(lib, call)
    func.argtypes = [ctypes.c_char_p]
    func.restype = ctypes.c_int

    def via_ctypes(name: str) -> None:
        if func(name.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return via_ctypes


_CHANGE: Callable[[str], None] | None = None
_ONEXEC: Callable[[str], None] | None = None


def load_binding() -> Callable[[str], None]:
    """Find (once) the aa_change_profile and aa_change_onexec implementations; call it in
    the parent before fork."""
    global _CHANGE, _ONEXEC
    if _CHANGE is None:
        _CHANGE = _binding()
    if _ONEXEC is None:
        _ONEXEC = _binding("aa_change_onexec")
    return _CHANGE


def change_onexec(name: str) -> None:
    """Make the calling task's next exec enter profile ``name`` (``aa_change_onexec``)."""
    load_binding()
    assert _ONEXEC is not None
    _ONEXEC(name)


def change_profile(name: str) -> None:
    """Move the calling task into profile ``name`` now (``aa_change_profile``)."""
    load_binding()(name)
