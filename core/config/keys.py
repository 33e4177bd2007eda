"""qemu.conf key declarations: how a key is typed, checked and defaulted.

Core declares the instance-wide keys (:mod:`vmconfine.config.settings`); every driver declares
its own keys when it registers (``registry.add(..., settings=[Setting(...), ...])``), so
``vmconfine config``, ``config --check``, the ``FILE:LINE`` type errors and the typed access
(:class:`DriverSettings`) work for a third-party driver's key exactly as for a built-in one.

Types are checked as libvirt's ``virConfGetValue*`` getters check them, with the same
messages prefixed by ``FILE:LINE``. A :data:`Check` validates further (an enum, absolute
paths, a pattern) and may normalise the value.

Kinds: ``bool`` (0 or 1), ``int`` (signed 32-bit), ``uint`` (unsigned 32-bit), ``ullong``
(unsigned 64-bit), ``string``, ``strlist`` (a list of strings), ``strlist_compat`` (a string or
a list of strings), ``max_core`` (``"unlimited"`` or an ``ullong``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vmconfine.errors import ConfigError

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
UINT_MAX = 2**32 - 1
ULLONG_MAX = 2**64 - 1

KINDS = ("bool", "int", "uint", "ullong", "string", "strlist", "strlist_compat", "max_core")

#: ``check(key, value, where, privileged) -> value``: raise :func:`error` or return the value.
Check = Callable[[str, Any, str, bool], Any]

_NAME = re.compile(r"[a-z][a-z0-9_]*")


class _Same:
    def __repr__(self) -> str:
        return "SAME"


#: :attr:`Setting.unprivileged` default: the same value as for a privileged instance.
SAME: Any = _Same()


@dataclass(frozen=True)
class Spec:
    """How one key is typed: ``kind`` picks the libvirt getter; ``check`` validates further;
    ``unset`` says what None means (for ``vmconfine config``)."""

    kind: str
    check: Check | None = None
    unset: str = ""


@dataclass(frozen=True, kw_only=True)
class Setting(Spec):
    """A qemu.conf key a driver owns: its name, type, default and one-line documentation.

    ``Setting(name="rlimit_nofile", kind="uint", default=1024, doc="...", check=positive)``

    ``unprivileged`` is the default for an unprivileged (session) instance when it differs;
    ``privileged_only`` makes ``config --check`` note that setting it in an unprivileged
    instance has no effect.
    """

    name: str
    default: Any
    doc: str
    unprivileged: Any = SAME
    privileged_only: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"qemu.conf key {self.name!r} is not lower_case_with_underscores")
        if self.kind not in KINDS:
            raise ValueError(f"qemu.conf key '{self.name}': kind {self.kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        if not self.doc:
            raise ValueError(f"qemu.conf key '{self.name}' has no doc (one line saying what "
                             "it does)")

    def default_for(self, privileged: bool) -> Any:
        value = self.default if privileged or self.unprivileged is SAME else self.unprivileged
        return copy.deepcopy(value)


# -- checks a key may use ------------------------------------------------------------------

def error(where: str, message: str) -> ConfigError:
    """The ``FILE:LINE: message`` error of a bad value."""
    return ConfigError(f"{where}: {message}")


def enum(*choices: str, message: str = "unknown {key} value '{value}'") -> Check:
    """Accept only ``choices``; ``message`` may use ``{key}`` and ``{value}``."""
    def check(key: str, value: Any, where: str, privileged: bool) -> Any:
        if value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            text = message.format(key=key, value=value)
            raise error(where, f"{text} (use one of {allowed})")
        return value

    return check


def absolute(key: str, value: Any, where: str, privileged: bool) -> Any:
    """Every path (a string, or each string of a list) must be absolute."""
    for path in value if isinstance(value, list) else [value]:
        if not path.startswith("/"):
            raise error(where, f"'{path}' in '{key}' is not an absolute path (start it with '/')")
    return value


def pattern(regex: str, example: str) -> Check:
    """The whole string must match ``regex``; ``example`` shows a valid value."""
    compiled = re.compile(regex)

    def check(key: str, value: Any, where: str, privileged: bool) -> Any:
        if not compiled.fullmatch(value):
            raise error(where, f"'{key}' value '{value}' is not valid (expected something like "
                               f"'{example}')")
        return value

    return check


def positive(key: str, value: Any, where: str, privileged: bool) -> Any:
    """An integer of at least 1."""
    if value < 1:
        raise error(where, f"value for '{key}' parameter must be at least 1")
    return value


# -- typed getters (libvirt's virConfGetValue* rules) -------------------------------------

def typed(kind: str, key: str, value: Any, where: str) -> Any:
    """Check ``value`` against ``kind`` as libvirt's getter for that kind does."""
    if kind == "bool":
        if not isinstance(value, int) or value < 0:
            raise error(where, f"expected a bool for '{key}' parameter (write 0 or 1)")
        if value > 1:
            raise error(where, f"value for '{key}' parameter must be 0 or 1")
        return value == 1
    if kind == "int":
        if not isinstance(value, int):
            raise error(where, f"expected a signed integer for '{key}' parameter")
        if not INT_MIN <= value <= INT_MAX:
            raise error(where, f"value for '{key}' parameter must be in range "
                               f"{INT_MIN}:{INT_MAX}")
        return value
    if kind in ("uint", "ullong"):
        if not isinstance(value, int) or value < 0:
            raise error(where, f"expected an unsigned integer for '{key}' parameter")
        top = UINT_MAX if kind == "uint" else ULLONG_MAX
        if value > top:
            raise error(where, f"value for '{key}' parameter must be in range 0:{top}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise error(where, f"expected a string for '{key}' parameter (put it in quotes)")
        return value
    if kind in ("strlist", "strlist_compat"):
        if kind == "strlist_compat" and isinstance(value, str):
            return [value]
        if kind == "strlist_compat" and not isinstance(value, list):
            raise error(where, f"expected a string or string list for '{key}' parameter "
                               '(write "a" or [ "a", "b" ])')
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise error(where, f"expected a string list for '{key}' parameter "
                               '(write [ "a", "b" ])')
        return list(value)
    if kind == "max_core":
        if isinstance(value, str):
            if value != "unlimited":
                raise error(where, f"Unknown core size '{value}' (use \"unlimited\" or a "
                                   "number of bytes)")
            return value
        return typed("ullong", key, value, where)
    raise AssertionError(f"unknown kind {kind}")


def apply(spec: Spec, key: str, value: Any, where: str, privileged: bool) -> Any:
    """The typed and checked value of ``key = value`` read at ``where``."""
    value = typed(spec.kind, key, value, where)
    if spec.check is not None:
        value = spec.check(key, value, where, privileged)
    return value


# -- a driver's typed view --------------------------------------------------------------------

class DriverSettings:
    """The effective values of one driver's qemu.conf keys (and where each came from).

    ``settings.cgroup_partition`` or ``settings["cgroup_partition"]`` reads a value;
    :meth:`source` says ``"default"`` or ``"FILE:LINE"``. Only the driver's own keys are
    here: a driver never reads another driver's keys.
    """

    def __init__(self, driver: str, settings: Iterable[Setting], privileged: bool) -> None:
        self.driver = driver
        self.specs: dict[str, Setting] = {s.name: s for s in settings}
        self._values: dict[str, Any] = {
            name: s.default_for(privileged) for name, s in self.specs.items()}
        self._sources: dict[str, str] = {}

    def set(self, key: str, value: Any, where: str) -> None:
        self._values[key] = value
        self._sources[key] = where

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(self._unknown(key)) from None

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(self._unknown(key)) from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("driver", "specs", "_values", "_sources"):
            object.__setattr__(self, key, value)
        elif key in self._values:  # tests and callers adjusting a value in memory
            self._values[key] = value
        else:
            raise AttributeError(self._unknown(key))

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def source(self, key: str) -> str:
        if key not in self._values:
            raise KeyError(self._unknown(key))
        return self._sources.get(key, "default")

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def _unknown(self, key: str) -> str:
        return (f"driver '{self.driver}' declares no qemu.conf key '{key}' (its keys: "
                f"{', '.join(self._values) or 'none'}); declare it in registry.add(..., "
                "settings=[...])")
