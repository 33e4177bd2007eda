"""The driver registry and the plugin manager.

Plugin modules are found through the ``vmconfine`` entry-point group (built-in drivers are
registered there exactly like third-party ones). Each plugin module implements
``vmconfine_register_drivers(registry)`` and adds its drivers by name. Tests build a manager with
``autoload=False`` and register in-test plugin modules.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from vmconfine.errors import DriverError
from vmconfine.plugin import hookspecs

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext

log = logging.getLogger(__name__)

DriverFactory = Callable[["HostContext"], Any]
KINDS = ("security", "pipeline")


@dataclass(frozen=True)
class DriverInfo:
    """One registered driver: its name, how to build it, and a one-line description."""

    name: str
    factory: DriverFactory
    description: str
    kind: str = "security"
    plugin: str = ""


class DriverRegistry:
    """Name → driver, filled by the ``vmconfine_register_drivers`` hook."""

    def __init__(self) -> None:
        self._drivers: dict[str, DriverInfo] = {}
        self._current_plugin = ""

    def add(
        self, name: str, factory: DriverFactory, description: str, kind: str = "security"
    ) -> None:
        """Register driver ``name``; a second registration of the same name is an error."""
        if kind not in KINDS:
            raise DriverError(
                f"driver '{name}': kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise DriverError(f"driver name {name!r} is not a plain word")
        if name in self._drivers:
            other = self._drivers[name].plugin
            raise DriverError(
                f"security driver '{name}' is registered twice (by {other} and "
                f"{self._current_plugin}); uninstall one of them"
            )
        self._drivers[name] = DriverInfo(name, factory, description, kind, self._current_plugin)

    def get(self, name: str) -> DriverInfo | None:
        return self._drivers.get(name)

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, i in self._drivers.items() if kind is None or i.kind == kind)

    def infos(self) -> list[DriverInfo]:
        return [self._drivers[n] for n in sorted(self._drivers)]


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, ``module[:attr]``) of every entry point in ``group``, distributions in
    ``sys.path`` order — what pluggy's ``load_setuptools_entrypoints`` finds through
    ``importlib.metadata``, read from the ``entry_points.txt`` files directly: importing
    ``importlib.metadata`` (its e-mail based metadata parser) cost 15-25 ms of every command's
    start-up (docs/performance.md, P1)."""
    found: list[tuple[str, str]] = []
    for entry in sys.path:
        try:
            names = sorted(n for n in os.listdir(entry or ".")
                           if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        for dist in names:
            try:
                with open(os.path.join(entry or ".", dist, "entry_points.txt"),
                          encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            found += _section(text, group)
    return found


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """The ``name = value`` lines of section ``[group]`` of an entry_points.txt (the format
    importlib.metadata reads: ``#`` comments, ``[extras]`` after the value dropped)."""
    out, inside = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            name, _sep, value = line.partition("=")
            out.append((name.strip(), value.split("[", 1)[0].strip()))
    return out


def _load(value: str) -> object:
    """Import ``module[:attr.attr]`` (an entry point's value)."""
    module, _sep, attrs = value.partition(":")
    obj: object = importlib.import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def make_plugin_manager(
    *, autoload: bool = True, plugins: Iterable[object] = (), trace: bool | None = None
) -> pluggy.PluginManager:
    """Build the plugin manager: hookspecs, entry-point plugins (unless ``autoload`` is off),
    then ``plugins``. ``trace`` (default: env ``VMCONFINE_TRACE_HOOKS``) logs every hook call."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload:
        for name, value in entry_points(hookspecs.PROJECT):
            if pm.get_plugin(name) is None and not pm.is_blocked(name):
                pm.register(_load(value), name=name)
    for plugin in plugins:
        pm.register(plugin)
    if trace is None:
        trace = os.environ.get("VMCONFINE_TRACE_HOOKS", "") not in ("", "0")
    if trace:
        pm.trace.root.setwriter(lambda msg: log.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


def collect_drivers(pm: pluggy.PluginManager) -> DriverRegistry:
    """Ask every registered plugin module for its drivers."""
    registry = DriverRegistry()
    for plugin in pm.get_plugins():
        impl = getattr(plugin, "vmconfine_register_drivers", None)
        if impl is None:
            continue
        registry._current_plugin = pm.get_name(plugin) or repr(plugin)
        caller = pm.subset_hook_caller(
            "vmconfine_register_drivers", [p for p in pm.get_plugins() if p is not plugin]
        )
        caller(registry=registry)
    registry._current_plugin = ""
    return registry
