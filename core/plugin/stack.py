"""The security stack: which drivers run, in which order, with what fan-out semantics.

Built from ``security_driver`` (libvirt's rules): a string or list of names, or "none"; unset
means the first available of the drivers that registered an ``autodetect`` priority (lowest
first), else none. Drivers registered ``implicit`` are appended after them when the instance is
privileged. Pipeline drivers follow when they say they are enabled.

The stack owns the semantics once, so drivers stay simple:

* set-type calls run in stack order; on the first failure the failing driver and every earlier
  one get their matching restore call, in reverse order (journal-driven, so only what was done is
  undone), then the error is re-raised;
* restore-type calls run on every driver and report every failure;
* label generation follows libvirt's ``virSecurityManagerGenLabel`` policy per driver: implicit
  dynamic labels under ``security_default_confined``, and "Unconfined guests are not allowed on
  this host" under ``security_require_confined``.
"""

from __future__ import annotations

import difflib
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmconfine.errors import DriverError, LabelError, VmconfineError
from vmconfine.plugin.registry import register_checked

if TYPE_CHECKING:
    from vmconfine.domain import Domain
    from vmconfine.plugin.context import DomainContext, HostContext
    from vmconfine.plugin.helper import Helper
    from vmconfine.plugin.registry import DriverInfo

log = logging.getLogger(__name__)

#: set-type hook -> the restore-type hook that undoes it
RESTORE_OF = {
    "set_all_labels": "restore_all_labels",
    "set_image_label": "restore_image_label",
    "set_hostdev_label": "restore_hostdev_label",
    "set_chardev_label": "restore_chardev_label",
    "set_socket_label": "clear_socket_label",
    "set_helper_label": "restore_helper_label",
}

_driver_serial = itertools.count(1)

CHILD_HOOKS = (
    "child_cgroup",
    "child_namespace",
    "child_exec_label",
    "child_identity",
    "child_capabilities",
    "child_confine",
)


@dataclass
class Driver:
    """A driver instance in the stack, with cached per-hook callers."""

    name: str
    info: DriverInfo
    obj: Any
    host: HostContext
    _callers: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def labels(self) -> bool:
        """A label-bearing security model (``registry.add(..., labels=True)``, the default)."""
        return self.kind == "security" and self.info.labels

    def implements(self, hook: str) -> bool:
        return callable(getattr(self.obj, hook, None)) and any(
            impl.plugin is self.obj for impl in getattr(self.host.pm.hook, hook).get_hookimpls()
        )

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call one hook of this driver only (through pluggy, so tracing applies).

        Returns the hook's result, or None when the driver does not implement it.
        """
        caller = self._callers.get(hook)
        if caller is None:
            if not self.implements(hook):
                return None
            pm = self.host.pm
            others = [p for p in pm.get_plugins() if p is not self.obj]
            caller = pm.subset_hook_caller(hook, others)
            self._callers[hook] = caller
        try:
            result = caller(**kwargs)
        except VmconfineError:
            raise
        except Exception as exc:  # a driver's bug or an unexpected OSError: name the driver
            raise DriverError(f"{self.name}: {hook} failed: {_describe(exc)}") from exc
        spec = caller.spec
        if spec is not None and spec.opts.get("firstresult"):
            return result
        # other hooks return the list of results of their (single) implementation
        return result[0] if result else None

    @property
    def model(self) -> str:
        return self.call("model") or self.name

    @property
    def doi(self) -> str:
        return self.call("doi") or "0"

    def probe(self) -> tuple[bool, str]:
        res = self.call("probe", host=self.host)
        return (True, "") if res is None else (bool(res[0]), str(res[1]))


def load_driver(host: HostContext, info: DriverInfo) -> Driver:
    """Build driver ``info`` for ``host`` and register it with the plugin manager (no probe).

    Each driver object is registered under a name of its own, so loading a driver again (for
    ``vmconfine drivers`` or a report) never unregisters one a built stack is using."""
    pm = host.pm
    try:
        obj = info.factory(host)
    except VmconfineError:
        raise
    except Exception as exc:
        raise DriverError(f"{info.name}: building the driver failed: {_describe(exc)} "
                          f"(plugin {info.plugin or '?'})") from exc
    if not pm.is_registered(obj):
        register_checked(pm, obj, f"driver '{info.name}' (plugin {info.plugin or '?'})",
                         name=f"driver:{info.name}:{next(_driver_serial)}")
    return Driver(info.name, info, obj, host)


def _not_installed(host: HostContext, name: str) -> DriverError:
    names = ", ".join(host.registry.names("security")) or "none"
    return DriverError(
        f"security driver '{name}' is not installed (installed: {names}); "
        "fix security_driver in qemu.conf or install the plugin that provides it"
    )


def _implicit_listed(name: str) -> str:
    return (f'security_driver cannot contain "{name}": the {name} driver is always enabled for '
            "privileged instances; remove it from the list")


def resolve_security_names(host: HostContext) -> tuple[list[str], bool]:
    """The configured security driver names in order, and whether they were explicit."""
    configured = host.config.security_driver
    if configured is None:
        for info in host.registry.autodetected():
            ok, _why = load_driver(host, info).probe()
            if ok:
                return [info.name], False
        return ["none"], False
    names = list(configured)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DriverError(f"Duplicate security driver {name} in security_driver")
        seen.add(name)
    for info in host.registry.implicit():
        if info.name in names:
            raise DriverError(_implicit_listed(info.name))
    if "none" in names and len(names) > 1:
        raise DriverError(
            'security driver "none" cannot appear in a list of drivers; use it alone or remove it'
        )
    if not names:
        return ["none"], True
    return names, True


class Stack:
    """The ordered drivers of one instance, and the fan-out semantics over them."""

    def __init__(self, host: HostContext, drivers: list[Driver], *, default_confined: bool,
                 require_confined: bool) -> None:
        self.host = host
        self.drivers = drivers
        self.default_confined = default_confined
        self.require_confined = require_confined

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def build(cls, host: HostContext) -> Stack:
        cfg = host.config
        names, explicit = resolve_security_names(host)
        default_confined = bool(cfg.security_default_confined)
        require_confined = bool(cfg.security_require_confined)
        drivers: list[Driver] = []
        for name in names:
            info = host.registry.get(name)
            if info is None or info.kind != "security":
                raise _not_installed(host, name)
            drv = load_driver(host, info)
            ok, why = drv.probe()
            if not ok:
                raise DriverError(f"Security driver {name} not enabled: {why}")
            drivers.append(drv)
        if not any(d.labels for d in drivers):  # only drivers that set no label
            if require_confined:
                raise DriverError(
                    f"security_require_confined = 1 needs a security driver that labels the "
                    f"domain, but {', '.join(names)} set no label; add one to security_driver "
                    "or set security_require_confined = 0")
            nop = host.registry.get("none")
            if nop is not None:  # the stack's primary model, as for security_driver = "none"
                drivers.insert(0, load_driver(host, nop))
        if names == ["none"]:
            if require_confined:
                raise DriverError(
                    'Security driver "none" cannot create confined guests; set '
                    "security_require_confined = 0 or configure a security driver"
                )
            if explicit and default_confined:
                # libvirt clears DEFAULT_CONFINED on the "none" manager only; DAC (a manager
                # of its own) still generates implicit labels
                log.info(
                    'Configured security driver "none" disables default policy to create '
                    "confined guests"
                )
        if host.privileged:
            drivers.extend(load_driver(host, info) for info in host.registry.implicit())
        for name in host.registry.names("pipeline"):
            info = host.registry.get(name)
            assert info is not None
            drv = load_driver(host, info)
            ok, why = drv.probe()
            if not ok:
                log.info("pipeline driver %s not used: %s", name, why)
                continue
            if drv.call("enabled", host=host) is False:
                continue
            drivers.append(drv)
        return cls(host, drivers, default_confined=default_confined,
                   require_confined=require_confined)

    @classmethod
    def for_teardown(cls, host: HostContext, names: list[str]) -> Stack:
        """The stack that made a journal's changes (its driver names, recorded at start), to
        undo them even if qemu.conf changed since. No probe: undoing must not depend on it."""
        drivers = []
        for name in names:
            info = host.registry.get(name)
            if info is None:
                raise DriverError(
                    f"the journal was written by driver '{name}', which is not installed any "
                    "more; reinstall it so its changes can be undone"
                )
            drivers.append(load_driver(host, info))
        cfg = host.config
        return cls(host, drivers, default_confined=bool(cfg.security_default_confined),
                   require_confined=bool(cfg.security_require_confined))

    @classmethod
    def fallback(cls, host: HostContext) -> Stack:
        """When :meth:`build` fails: the configured drivers that work (with "none" as primary
        if none does), DAC and the enabled pipeline drivers. For reports, which must describe a
        host whose configuration is broken; never for starting a domain."""
        cfg = host.config
        infos = [host.registry.get(n) for n in cfg.security_driver or []]
        drivers = [load_driver(host, i) for i in infos if i is not None and i.kind == "security"]
        drivers = [d for d in drivers if d.probe()[0]]
        fallback = host.registry.get("none")
        if not any(d.labels for d in drivers) and fallback is not None:
            drivers.insert(0, load_driver(host, fallback))  # the stack needs a primary model
        if host.privileged:
            drivers.extend(load_driver(host, info) for info in host.registry.implicit())
        for name in host.registry.names("pipeline"):
            info = host.registry.get(name)
            drv = load_driver(host, info) if info is not None else None
            if drv is not None and drv.probe()[0] and drv.call("enabled", host=host) is not False:
                drivers.append(drv)
        return cls(host, drivers, default_confined=bool(cfg.security_default_confined),
                   require_confined=bool(cfg.security_require_confined))

    @staticmethod
    def probe_installed(host: HostContext) -> list[tuple[DriverInfo, bool, str]]:
        """Every installed driver with its probe result ``(info, available, why)``."""
        out = []
        for info in host.registry.infos():
            ok, why = load_driver(host, info).probe()
            out.append((info, ok, why))
        return out

    @classmethod
    def check_config(cls, host: HostContext) -> list[str]:
        """Problems of the configured stack, for ``config --check``: each configured security
        driver that is not installed or not available on this host, else why the stack cannot
        be built. Empty when :meth:`build` would succeed."""
        cfg = host.config
        source = cfg.source("security_driver")
        where = "security_driver" if source == "default" else source
        problems = []
        for name in cfg.security_driver or []:
            info = host.registry.get(name)
            if info is not None and info.implicit:
                problems.append(f"{where}: {_implicit_listed(name)}")
                continue
            if info is None or info.kind != "security":
                close = difflib.get_close_matches(name, host.registry.names("security"), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{where}: {_not_installed(host, name).message}{hint}")
                continue
            ok, why = load_driver(host, info).probe()
            if not ok:
                problems.append(f"{where}: security driver '{name}' is not available on this "
                                f"host: {why}")
        if not problems:
            try:
                cls.build(host)
            except VmconfineError as exc:
                problems.append(f"{where}: {exc.message}")
        return problems

    # ---- views -------------------------------------------------------------------------------
    @property
    def security_drivers(self) -> list[Driver]:
        return [d for d in self.drivers if d.kind == "security"]

    @property
    def label_drivers(self) -> list[Driver]:
        """The label-bearing security models, in stack order: they get a ``<seclabel>``, a
        ``<secmodel>`` in capabilities and a line in ``dominfo``; drivers registered with
        ``labels=False`` (confinement without a label) do not."""
        return [d for d in self.security_drivers if d.labels]

    @property
    def primary(self) -> Driver:
        """The first label-bearing security driver (libvirt's primary security manager)."""
        return self.label_drivers[0]

    def names(self) -> list[str]:
        return [d.name for d in self.drivers]

    def secmodels(self) -> list[dict[str, Any]]:
        """One entry per security driver, in stack order, for capabilities."""
        out = []
        for d in self.label_drivers:
            base = {vt: d.call("base_label", virt_type=vt) for vt in ("kvm", "qemu")}
            out.append({"model": d.model, "doi": d.doi,
                        "baselabels": {k: v for k, v in base.items() if v}})
        return out

    # ---- validation and labels ----------------------------------------------------------------
    def check_models(self, domain: Domain) -> None:
        """Every seclabel model in the XML must be "none" or a model of this stack."""
        models = {d.model for d in self.label_drivers}
        primary = self.primary.model
        for sec in domain.seclabels:
            if sec.model is None:
                sec.model = primary  # libvirt: default model = the primary driver's
        found = [s.model for s in domain.seclabels]
        for dev_model in _device_seclabel_models(domain):
            found.append(dev_model)
        for model in found:
            if model and model != "none" and model not in models:
                raise DriverError(
                    f"Security driver model '{model}' is not available "
                    f"(this instance's stack: {', '.join(sorted(models))})"
                )

    def verify(self, domain: Domain) -> None:
        for d in self.label_drivers:
            d.call("verify", domain=domain, seclabel=domain.seclabel(d.model))

    def gen_labels(self, ctx: DomainContext, *, plan: bool = False) -> None:
        """libvirt's GenLabel policy, per security driver, in stack order. ``plan``: a dry run
        (the report): drivers with a ``plan_label`` hook fill the label they would generate
        and change nothing (see :meth:`generating`); the others generate as usual."""
        domain = ctx.domain
        done: list[Driver] = []
        try:
            for d in self.label_drivers:
                if d.model == "none":
                    continue
                sec = domain.seclabel(d.model)
                if sec is None:
                    if not self.default_confined:
                        continue
                    sec = domain.add_seclabel(d.model, "dynamic", implicit=True)
                if sec.type == "none":
                    if self.require_confined:
                        raise LabelError("Unconfined guests are not allowed on this host")
                    continue
                if plan and d.implements("plan_label"):
                    d.call("plan_label", ctx=ctx, seclabel=sec)
                    continue  # nothing was taken: nothing to release
                d.call("gen_label", ctx=ctx, seclabel=sec)
                done.append(d)
        except BaseException:
            for d in reversed(done):
                sec = domain.seclabel(d.model)
                if sec is not None:
                    _best_effort(d, "release_label", ctx=ctx, seclabel=sec)
            raise

    def generating(self) -> Stack:
        """The drivers whose labels a dry run (``gen_labels(plan=True)``) generated for real,
        i.e. the stack whose ``release_labels`` gives them back."""
        return Stack(self.host, [d for d in self.drivers if not d.implements("plan_label")],
                     default_confined=self.default_confined,
                     require_confined=self.require_confined)

    def reserve_labels(self, ctx: DomainContext, pid: int) -> None:
        for d in self.label_drivers:
            sec = ctx.domain.seclabel(d.model)
            if sec is not None and sec.type == "dynamic":
                d.call("reserve_label", ctx=ctx, seclabel=sec, pid=pid)

    def release_labels(self, ctx: DomainContext) -> list[str]:
        errors: list[str] = []
        for d in self.label_drivers:
            sec = ctx.domain.seclabel(d.model)
            if sec is not None and sec.type != "none":
                err = _best_effort(d, "release_label", ctx=ctx, seclabel=sec)
                if err:
                    errors.append(err)
        return errors

    def forget(self, domain: Domain) -> list[str]:
        """``forget_domain`` on every driver (an undefined domain that does not run);
        returns the problems (best effort, as a restore)."""
        errors: list[str] = []
        for d in self.drivers:
            err = _best_effort(d, "forget_domain", host=self.host, domain=domain)
            if err:
                errors.append(err)
        return errors

    # ---- set / restore ------------------------------------------------------------------------
    def set(self, hook: str, ctx: DomainContext, **kwargs: Any) -> None:
        """Run set-type ``hook`` in order; on failure restore the failing and earlier drivers in
        reverse order, then re-raise. A later :meth:`restore` of the same hook (the
        pipeline's teardown) does not run those restores again: each runs once."""
        restore = RESTORE_OF[hook]
        for d in self.drivers:  # a new set makes its restore due again
            ctx.restored.pop(_restore_key(d, restore, kwargs), None)
        for i, d in enumerate(self.drivers):
            try:
                d.call(hook, ctx=ctx, **kwargs)
            except BaseException as exc:
                for prev in reversed(self.drivers[: i + 1]):
                    err = self._restore_once(prev, restore, ctx, kwargs)
                    if err:
                        log.warning(
                            "Unable to restore labels after failed %s of driver %s: %s",
                            hook, d.name, err,
                        )
                if isinstance(exc, VmconfineError) and not exc.message.startswith(d.name):
                    raise type(exc)(f"{d.name}: {exc.message}") from exc
                raise

    def restore(self, hook: str, ctx: DomainContext, **kwargs: Any) -> list[str]:
        """Run restore-type ``hook`` on every driver (reverse stack order); return failures.

        A driver whose restore already ran for this context (a rollback in :meth:`set`) is
        not called again; its failure, if it failed, is returned again."""
        errors = []
        for d in reversed(self.drivers):
            err = self._restore_once(d, hook, ctx, kwargs)
            if err:
                errors.append(err)
        return errors

    @staticmethod
    def _restore_once(d: Driver, hook: str, ctx: DomainContext,
                      kwargs: dict[str, Any]) -> str | None:
        key = _restore_key(d, hook, kwargs)
        if key not in ctx.restored:  # the objects are kept so their ids are not reused
            ctx.restored[key] = (_best_effort(d, hook, ctx=ctx, **kwargs), d.obj, kwargs)
        return ctx.restored[key][0]

    def preflight(self, ctx: DomainContext) -> None:
        for d in self.drivers:
            d.call("preflight", ctx=ctx)

    # ---- child and after exec -----------------------------------------------------------------
    def spawn_groups(self, ctx: DomainContext) -> list[int]:
        """Parent, before fork: the cgroup v2 directories (open descriptors, the caller closes
        them) the drivers want the process created in (``spawn_cgroup``), in stack order."""
        found = [d.call("spawn_cgroup", ctx=ctx) for d in self.drivers]
        return [fd for fd in found if fd is not None]

    def run_child_hook(self, hook: str, ctx: DomainContext) -> None:
        """In the forked child: run ``hook`` of every driver in order; the first error wins."""
        assert hook in CHILD_HOOKS
        for d in self.drivers:
            d.call(hook, ctx=ctx)

    def check_helper(self, helper: Helper) -> None:
        """Fail closed: every label-bearing security driver must know how to confine a helper
        process (``child_helper``), or a domain that needs ``helper`` does not start."""
        for d in self.label_drivers:
            if not d.implements("child_helper"):
                raise DriverError(
                    f"{d.name}: this driver cannot confine the {helper.name} helper process; "
                    f"remove the device that needs it or use another security_driver")

    def run_helper_child(self, step: str, ctx: DomainContext, helper: Helper) -> None:
        """In a helper's forked child: ``child_helper(step)`` of every driver in order."""
        assert step in CHILD_HOOKS
        for d in self.drivers:
            d.call("child_helper", ctx=ctx, helper=helper, step=step)

    def verify_helper(self, ctx: DomainContext, helper: Helper, pid: int) -> list[str]:
        problems: list[str] = []
        for d in self.drivers:
            found = d.call("verify_helper", ctx=ctx, helper=helper, pid=pid) or []
            problems.extend(f"{d.name}: {p}" for p in found)
        return problems

    def verify_process(self, ctx: DomainContext, pid: int) -> list[str]:
        problems: list[str] = []
        for d in self.drivers:
            found = d.call("verify_process", ctx=ctx, pid=pid) or []
            problems.extend(f"{d.name}: {p}" for p in found)
        return problems

    def process_labels(self, ctx: DomainContext, pid: int) -> list[tuple[str, str, str]]:
        """(model, doi, label) per security driver, for ``dominfo``."""
        out = []
        for d in self.label_drivers:
            label = d.call("process_label", ctx=ctx, pid=pid)
            out.append((d.model, d.doi, label or ""))
        return out

    def describe(self, ctx: DomainContext) -> dict[str, dict[str, Any]]:
        return {d.name: (d.call("describe", ctx=ctx) or {}) for d in self.drivers}

    def mount_options(self, ctx: DomainContext) -> str:
        """Every driver's ``mount_options``, in stack order, joined with commas."""
        found = (d.call("mount_options", ctx=ctx) for d in self.drivers)
        return ",".join(opt for opt in found if opt)


def _best_effort(d: Driver, hook: str, **kwargs: Any) -> str | None:
    try:
        d.call(hook, **kwargs)
    except Exception as exc:  # restore-type: report, never stop
        text = str(exc) if str(exc).startswith(f"{d.name}:") else f"{d.name}: {exc}"
        log.warning("%s", text)
        return text
    return None


def _restore_key(d: Driver, hook: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Which restore call this is: the driver, the hook and the objects it is about."""
    return (d.name, id(d.obj), hook, *sorted((k, id(v)) for k, v in kwargs.items()))


def _describe(exc: BaseException) -> str:
    """One line for an exception that is not a VmconfineError."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _device_seclabel_models(domain: Domain) -> list[str]:
    models: list[str] = []
    for disk in domain.disks:
        for src in disk.chain():
            models.extend(s.model for s in src.seclabels if s.model)
    for chr_ in domain.chardevs:
        models.extend(s.model for s in chr_.seclabels if s.model)
    return models
