"""The driver registry and the plugin manager.

Plugin modules are found through the ``vmconfine`` entry-point group (built-in drivers are
registered there exactly like third-party ones). Each plugin module implements
``vmconfine_register_drivers(registry)`` and adds its drivers by name. Tests build a manager with
``autoload=False`` and register in-test plugin modules.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from vmconfine.config.keys import Setting
from vmconfine.config.settings import KNOWN_KEYS
from vmconfine.errors import DriverError
from vmconfine.plugin import hookspecs

if TYPE_CHECKING:
    from vmconfine.plugin.context import HostContext

log = logging.getLogger(__name__)

DriverFactory = Callable[["HostContext"], Any]
KINDS = ("security", "pipeline")


@dataclass(frozen=True)
class DriverInfo:
    """One registered driver: its name, how to build it, a one-line description, its
    qemu.conf keys and whether it is a label-bearing security model."""

    name: str
    factory: DriverFactory
    description: str
    kind: str = "security"
    plugin: str = ""
    settings: tuple[Setting, ...] = ()
    labels: bool = True
    #: when ``security_driver`` is unset, security drivers with a priority are probed in
    #: ascending order and the first available one is used (libvirt's autodetection)
    autodetect: int | None = None
    #: stacked after the configured security drivers of every privileged instance, and never
    #: listed in ``security_driver`` (libvirt's DAC)
    implicit: bool = False


class DriverRegistry:
    """Name → driver, filled by the ``vmconfine_register_drivers`` hook."""

    def __init__(self) -> None:
        self._drivers: dict[str, DriverInfo] = {}
        self._current_plugin = ""

    def add(
        self, name: str, factory: DriverFactory, description: str, kind: str = "security",
        *, settings: Iterable[Setting] = (), labels: bool = True,
        autodetect: int | None = None, implicit: bool = False,
    ) -> None:
        """Register driver ``name``; a second registration of the same name is an error.

        ``settings`` declares the driver's own qemu.conf keys (known before any stack is
        built: ``vmconfine config`` lists them, a bad value is a ``FILE:LINE`` error, the
        driver reads them with ``host.config.driver_settings(name)``). ``labels=False`` says
        the driver is not a label-bearing security model: it gets no ``<seclabel>``, no
        ``<secmodel>`` in capabilities and no label row in ``dominfo``. ``autodetect`` (a
        priority, lower first) makes a security driver a candidate when ``security_driver`` is
        unset; ``implicit`` stacks it for every privileged instance (it may then not be listed
        in ``security_driver``)."""
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
        settings = tuple(settings)
        for setting in settings:
            if not isinstance(setting, Setting):
                raise DriverError(
                    f"driver '{name}': settings must be vmconfine.config.keys.Setting objects, "
                    f"not {type(setting).__name__}")
            owner = self._key_owner(setting.name)
            if setting.name in KNOWN_KEYS or owner is not None:
                raise DriverError(
                    f"driver '{name}' declares qemu.conf key '{setting.name}', which "
                    f"{f'driver {owner!r}' if owner else 'core'} already owns; give the "
                    "driver's key a name of its own (e.g. prefixed with the driver's name)")
        if len({s.name for s in settings}) != len(settings):
            raise DriverError(f"driver '{name}' declares a qemu.conf key twice")
        if (autodetect is not None or implicit) and kind != "security":
            raise DriverError(f"driver '{name}': only security drivers can be autodetected or "
                              "implicit")
        if autodetect is not None and implicit:
            raise DriverError(f"driver '{name}': an implicit driver is always stacked; it "
                              "cannot also be autodetected")
        if autodetect is not None and (isinstance(autodetect, bool)
                                       or not isinstance(autodetect, int)):
            raise DriverError(f"driver '{name}': autodetect must be an integer priority, not "
                              f"{autodetect!r}")
        self._drivers[name] = DriverInfo(name, factory, description, kind, self._current_plugin,
                                         settings, bool(labels), autodetect, bool(implicit))

    def _key_owner(self, key: str) -> str | None:
        for info in self._drivers.values():
            if any(s.name == key for s in info.settings):
                return info.name
        return None

    def settings(self) -> list[tuple[str, tuple[Setting, ...]]]:
        """Every driver's declared qemu.conf keys, by driver name."""
        return [(info.name, info.settings) for info in self.infos()]

    def get(self, name: str) -> DriverInfo | None:
        return self._drivers.get(name)

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, i in self._drivers.items() if kind is None or i.kind == kind)

    def infos(self) -> list[DriverInfo]:
        return [self._drivers[n] for n in sorted(self._drivers)]

    def autodetected(self) -> list[DriverInfo]:
        """The security drivers tried when ``security_driver`` is unset, in probing order."""
        found = [i for i in self._drivers.values() if i.autodetect is not None]
        return sorted(found, key=lambda i: (i.autodetect, i.name))

    def implicit(self) -> list[DriverInfo]:
        """The security drivers every privileged instance stacks, by name."""
        return [i for i in self.infos() if i.implicit]


def check_contract(pm: pluggy.PluginManager, plugin: object, who: str) -> None:
    """Refuse a plugin module or driver object that vmconfine would silently ignore in part:
    a method marked ``@hookimpl`` whose name is no hook (a misspelt ``child_confined``), or a
    method named like a hook without the marker. ``who`` names it in the error."""
    for name in dir(plugin):
        if name.startswith("_"):
            continue
        marked = pm.parse_hookimpl_opts(plugin, name) is not None
        if marked and name not in hookspecs.HOOK_NAMES:
            close = difflib.get_close_matches(name, sorted(hookspecs.HOOK_NAMES), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise DriverError(
                f"{who}: method '{name}' is marked @hookimpl but vmconfine has no hook of that "
                f"name, so it would never be called ({hint}rename it to a hook of "
                "vmconfine.plugin.hookspecs, or remove the marker)")
        if not marked and name in hookspecs.HOOK_NAMES:
            attr = inspect.getattr_static(plugin, name, None)
            if inspect.ismodule(plugin) and getattr(attr, "__module__", None) != plugin.__name__:
                continue  # a module's imported names are not its methods
            if isinstance(attr, (staticmethod, classmethod)) or callable(attr):
                raise DriverError(
                    f"{who}: method '{name}' has the name of a vmconfine hook but no @hookimpl "
                    "marker, so it would never be called (decorate it with @hookimpl from "
                    "vmconfine.plugin.hookspecs, or rename it)")


def register_checked(pm: pluggy.PluginManager, plugin: object, who: str,
                     name: str | None = None) -> None:
    """Register ``plugin`` after :func:`check_contract`; a hook signature pluggy refuses, or
    an unknown hook pluggy finds (``check_pending``), is a one-line error naming ``who``."""
    check_contract(pm, plugin, who)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise DriverError(f"{who}: {text} (make the method match its hook in "
                          "vmconfine.plugin.hookspecs)") from None


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
    then ``plugins``. ``trace`` (default: env ``VMCONFINE_TRACE_HOOKS``) logs every hook call.

    Every plugin module must keep the contract (:func:`check_contract`): a violation is a
    :class:`DriverError` naming the plugin, the method and the fix."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload:
        for name, value in entry_points(hookspecs.PROJECT):
            if pm.get_plugin(name) is None and not pm.is_blocked(name):
                register_checked(pm, _load(value), f"plugin '{name}'", name=name)
    for plugin in plugins:
        register_checked(pm, plugin, f"plugin '{_module_name(plugin)}'")
    for plugin in pm.get_plugins():
        check_contract(pm, plugin, f"plugin '{pm.get_name(plugin)}'")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise DriverError(f"plugin '{pm.get_name(exc.plugin)}': "
                          f"{' '.join(str(exc).split())} (rename it to a hook of "
                          "vmconfine.plugin.hookspecs)") from None
    if trace is None:
        trace = os.environ.get("VMCONFINE_TRACE_HOOKS", "") not in ("", "0")
    if trace:
        pm.trace.root.setwriter(lambda msg: log.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


def _module_name(plugin: object) -> str:
    return str(getattr(plugin, "__name__", None) or type(plugin).__name__)


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
