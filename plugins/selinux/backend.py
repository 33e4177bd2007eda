"""What the SELinux driver needs from libselinux, behind one small interface.

:class:`RealBackend` binds Debian's ``python3-selinux`` (``import selinux``). :class:`FakeBackend`
needs no SELinux at all: file contexts live in an ordinary extended attribute
(``user.vmconfine.selinux`` by default), the process context is whatever the test chose, and
exec / socket-create contexts are recorded in the object. Both take paths that are already
resolved and never follow a symlink in the last component (``lsetfilecon``).

Errors are ``OSError`` with the errno libselinux reports; the driver turns them into messages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmconfine_selinux.contexts import Context

#: the xattr the kernel keeps a file's SELinux context in
SELINUX_XATTR = "security.selinux"


class Backend(Protocol):
    """The libselinux calls the driver uses."""

    def available(self) -> tuple[bool, str]:
        """(True, "") when SELinux is enabled on this host, else (False, why + fix)."""

    def mcs_enabled(self) -> bool:
        """True when the loaded policy has MCS/MLS ranges."""

    def enforcing(self) -> bool:
        """True when the kernel enforces (``security_getenforce() == 1``)."""

    def getcon(self) -> str:
        """This process's context (raises OSError)."""

    def getpidcon(self, pid: int) -> str:
        """The context of ``pid`` as ``/proc/PID/attr/current`` reports it (raises OSError)."""

    def getfilecon(self, path: str) -> str | None:
        """The context of ``path`` (not following a final symlink), None when it has none."""

    def setfilecon(self, path: str, context: str) -> None:
        """Set the context of ``path`` (not following a final symlink)."""

    def removefilecon(self, path: str) -> None:
        """Remove the context of ``path`` (a file that had none before vmconfine labelled it)."""

    def default_context(self, path: str, mode: int) -> str | None:
        """The policy's default context for ``path`` (selabel_lookup), None when it has none."""

    def setexeccon(self, context: str | None) -> None:
        """Context of the next exec of this process (None = back to the policy's default)."""

    def setsockcreatecon(self, context: str | None) -> None:
        """Context of sockets this process creates next (None = default)."""

    def check_context(self, context: str) -> bool:
        """True when the loaded policy accepts ``context``."""

    def allowed(self, scon: str, tcon: str, tclass: str, perm: str) -> bool:
        """True when the loaded policy grants ``perm`` on ``tclass`` from ``scon`` to ``tcon``
        (``security_compute_av``: no audit record); a class or permission the policy does not
        know counts as allowed. Raises OSError for contexts the policy refuses."""

    def boolean(self, name: str) -> bool | None:
        """The active value of policy boolean ``name``, None when the policy has none."""

    def domain_context_path(self) -> str:
        """Path of the policy's virtual_domain_context file."""

    def image_context_path(self) -> str:
        """Path of the policy's virtual_image_context file."""


def read_proc_attr(pid: int) -> str:
    """``/proc/PID/attr/current`` without the trailing NUL/newline (raises OSError)."""
    with open(f"/proc/{pid}/attr/current", "rb") as fh:
        raw = fh.read(4096)
    return raw.rstrip(b"\0\n").decode("utf-8", "replace")


class RealBackend:
    """libselinux through Debian's python3-selinux.

    ``process_context`` and ``assume_mcs`` override what the kernel says about this process;
    they exist for hosts that carry labels without running SELinux (the host test tier).
    """

    def __init__(self, *, process_context: str | None = None,
                 assume_mcs: bool | None = None) -> None:
        self._process_context = process_context
        self._assume_mcs = assume_mcs
        self._mod: Any = None
        self._import_error: str | None = None
        self._handle: Any = None
        try:
            import selinux

            self._mod = selinux
        except ImportError as exc:
            self._import_error = str(exc)

    @property
    def se(self) -> Any:
        if self._mod is None:
            raise OSError(errno.ENOSYS, "python3-selinux is not installed "
                          "(apt-get install python3-selinux)")
        return self._mod

    def available(self) -> tuple[bool, str]:
        if self._mod is None:
            return False, (f"the libselinux binding cannot be imported ({self._import_error}); "
                           "install python3-selinux (apt-get install python3-selinux)")
        if self._mod.is_selinux_enabled() <= 0:
            return False, ("SELinux is not enabled on this host (is_selinux_enabled() is 0); "
                           "boot a kernel with security=selinux and load a policy, or set "
                           "security_driver to another driver")
        return True, ""

    def mcs_enabled(self) -> bool:
        if self._assume_mcs is not None:
            return self._assume_mcs
        return bool(self._mod is not None and self._mod.is_selinux_mls_enabled() > 0)

    def enforcing(self) -> bool:
        try:
            return bool(self.se.security_getenforce() == 1)
        except OSError:
            return False

    def getcon(self) -> str:
        if self._process_context is not None:
            return self._process_context
        return str(self.se.getcon_raw()[1])

    def getpidcon(self, pid: int) -> str:
        return read_proc_attr(pid)

    def getfilecon(self, path: str) -> str | None:
        try:
            return str(self.se.lgetfilecon_raw(path)[1])
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def setfilecon(self, path: str, context: str) -> None:
        self.se.lsetfilecon_raw(path, context)

    def removefilecon(self, path: str) -> None:
        try:
            os.removexattr(path, SELINUX_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def default_context(self, path: str, mode: int) -> str | None:
        se = self.se
        if self._handle is None:
            self._handle = se.selabel_open(se.SELABEL_CTX_FILE, None, 0)
        try:
            return str(se.selabel_lookup_raw(self._handle, path, stat.S_IFMT(mode))[1])
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def setexeccon(self, context: str | None) -> None:
        self.se.setexeccon_raw(context)

    def setsockcreatecon(self, context: str | None) -> None:
        self.se.setsockcreatecon_raw(context)

    def check_context(self, context: str) -> bool:
        try:
            return bool(self.se.security_check_context_raw(context) == 0)
        except OSError:
            return False

    def allowed(self, scon: str, tcon: str, tclass: str, perm: str) -> bool:
        se = self.se
        cls = se.string_to_security_class(tclass)
        bit = se.string_to_av_perm(cls, perm) if cls else 0
        if not cls or not bit:
            return True
        avd = se.av_decision()
        se.security_compute_av_raw(scon, tcon, cls, bit, avd)
        return bool(avd.allowed & bit)

    def boolean(self, name: str) -> bool | None:
        try:
            return bool(self.se.security_get_boolean_active(name) == 1)
        except OSError:
            return None

    def domain_context_path(self) -> str:
        return str(self.se.selinux_virtual_domain_context_path())

    def image_context_path(self) -> str:
        return str(self.se.selinux_virtual_image_context_path())


@dataclass
class FakeBackend:
    """SELinux without a kernel: contexts in an ordinary xattr, a chosen process context.

    ``unsupported`` path prefixes answer EOPNOTSUPP like an NFS mount; ``defaults`` maps path
    prefixes (longest wins) to the policy default returned by :meth:`default_context`.
    ``pid_contexts`` answers :meth:`getpidcon`; the current pid answers ``process_context``.
    ``denied`` holds the (source type, target type, class, permission) the policy refuses
    (everything else is allowed); ``booleans`` the policy's booleans.
    With ``exec_record_dir`` set, :meth:`setexeccon` (called in the forked child) also records
    the context under the calling pid there, and :meth:`getpidcon` answers it for that pid, as
    a kernel would after the exec transition (for processes that verify another's exec).
    """

    domain_path: str
    image_path: str
    process_context: str = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
    xattr: str = "user.vmconfine.selinux"
    enabled: bool = True
    mcs: bool = True
    enforce: bool = True
    unsupported: tuple[str, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)
    pid_contexts: dict[int, str] = field(default_factory=dict)
    exec_context: str | None = None
    exec_record_dir: str | None = None
    sockcreate_context: str | None = None
    fail: dict[str, int] = field(default_factory=dict)  #: method name -> errno to raise
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    on_set: Callable[[str, str], None] | None = None
    denied: set[tuple[str, str, str, str]] = field(default_factory=set)
    booleans: dict[str, bool] = field(default_factory=dict)

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            code = self.fail[name]
            raise OSError(code, os.strerror(code))

    def _check_supported(self, path: str) -> None:
        if any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.unsupported):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)

    def available(self) -> tuple[bool, str]:
        if not self.enabled:
            return False, ("SELinux is not enabled on this host (is_selinux_enabled() is 0); "
                           "boot a kernel with security=selinux and load a policy, or set "
                           "security_driver to another driver")
        return True, ""

    def mcs_enabled(self) -> bool:
        return self.mcs

    def enforcing(self) -> bool:
        return self.enforce

    def getcon(self) -> str:
        self._maybe_fail("getcon")
        return self.process_context

    def getpidcon(self, pid: int) -> str:
        self._maybe_fail("getpidcon")
        if pid in self.pid_contexts:
            return self.pid_contexts[pid]
        if self.exec_record_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                return Path(self.exec_record_dir, str(pid)).read_text()
        if pid == os.getpid():
            return self.process_context
        raise OSError(errno.ESRCH, os.strerror(errno.ESRCH), f"/proc/{pid}/attr/current")

    def getfilecon(self, path: str) -> str | None:
        self._check_supported(path)
        try:
            return os.getxattr(path, self.xattr, follow_symlinks=False).decode()
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def setfilecon(self, path: str, context: str) -> None:
        self._check_supported(path)
        self._maybe_fail("setfilecon")
        Context.parse(context)  # the kernel refuses malformed contexts with EINVAL
        self.calls.append(("setfilecon", path, context))
        if self.on_set is not None:
            self.on_set(path, context)
        os.setxattr(path, self.xattr, context.encode(), follow_symlinks=False)

    def removefilecon(self, path: str) -> None:
        self.calls.append(("removefilecon", path, None))
        try:
            os.removexattr(path, self.xattr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def default_context(self, path: str, mode: int) -> str | None:
        best = None
        for prefix in self.defaults:
            if (path == prefix or path.startswith(prefix.rstrip("/") + "/")) and (
                    best is None or len(prefix) > len(best)):
                best = prefix
        return self.defaults[best] if best is not None else None

    def setexeccon(self, context: str | None) -> None:
        self._maybe_fail("setexeccon")
        self.exec_context = context
        if self.exec_record_dir is not None and context is not None:
            Path(self.exec_record_dir, str(os.getpid())).write_text(context)

    def setsockcreatecon(self, context: str | None) -> None:
        self._maybe_fail("setsockcreatecon")
        self.sockcreate_context = context

    def check_context(self, context: str) -> bool:
        try:
            Context.parse(context)
        except ValueError:
            return False
        return True

    def allowed(self, scon: str, tcon: str, tclass: str, perm: str) -> bool:
        key = (Context.parse(scon).type, Context.parse(tcon).type, tclass, perm)
        return key not in self.denied

    def boolean(self, name: str) -> bool | None:
        return self.booleans.get(name)

    def domain_context_path(self) -> str:
        return self.domain_path

    def image_context_path(self) -> str:
        return self.image_path
