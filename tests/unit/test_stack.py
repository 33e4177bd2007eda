"""The stack: driver selection rules, ordering, rollback, restore and the label policy."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from tests.support import builtin_roles, make_ctx, make_host
from vmconfine.errors import DriverError, LabelError
from vmconfine.plugin import nop
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.plugin.stack import RESTORE_OF, Stack

XML = """<domain type='qemu'>
  <name>t1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <memory>65536</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""

SET_HOOKS = list(RESTORE_OF)


class Recorder:
    """A test driver that logs every call and fails where told."""

    def __init__(self, name: str, log: list[str], fail_at: str | None = None,
                 available: bool = True) -> None:
        self.name = name
        self.log = log
        self.fail_at = fail_at
        self.available = available

    def _do(self, hook: str) -> None:
        self.log.append(f"{self.name}.{hook}")
        if hook == self.fail_at:
            raise LabelError(f"{hook} failed on purpose")

    @hookimpl
    def probe(self, host: Any) -> tuple[bool, str]:
        return (self.available, "" if self.available else "not here; install foo")

    @hookimpl
    def model(self) -> str:
        return self.name

    @hookimpl
    def gen_label(self, ctx: Any, seclabel: Any) -> None:
        self._do("gen_label")
        seclabel.label = f"{self.name}-label"

    @hookimpl
    def release_label(self, ctx: Any, seclabel: Any) -> None:
        self._do("release_label")


def _add_set_restore(cls: type) -> None:
    """Give the recorder every set/restore hook, each with the spec's own argument names
    (pluggy checks hookimpl arguments against the spec)."""
    import inspect

    from vmconfine.plugin import hookspecs
    for set_hook, restore_hook in RESTORE_OF.items():
        for h in (set_hook, restore_hook):
            names = list(inspect.signature(getattr(hookspecs, h)).parameters)
            src = f"def {h}(self, {', '.join(names)}):\n    self._do('{h}')\n"
            ns: dict[str, Any] = {}
            exec(src, ns)
            setattr(cls, h, hookimpl(ns[h]))


_add_set_restore(Recorder)


def plugin_module(name: str, drivers: dict[str, Recorder], kind: str = "security") -> Any:
    mod = types.ModuleType(name)

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        for dname, drv in drivers.items():
            registry.add(dname, lambda host, d=drv: d, f"test driver {dname}", kind=kind,
                         **(builtin_roles(dname) if kind == "security" else {}))

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


def build(tmp_path: Path, conf: str, drivers: dict[str, Recorder],
          privileged_dac: Recorder | None = None) -> Stack:
    mods = [nop, plugin_module("testdrivers", drivers)]
    if privileged_dac is not None:
        mods.append(plugin_module("testdac", {"dac": privileged_dac}))
    host = make_host(tmp_path, mods, config=conf)
    return Stack.build(host)


def test_order_is_configured_order_and_dac_last(tmp_path: Path) -> None:
    log: list[str] = []
    drv = {"b": Recorder("b", log), "a": Recorder("a", log)}
    stack = build(tmp_path, 'security_driver = [ "b", "a" ]\n', drv, Recorder("dac", log))
    # root runs the tests: the embed instance is privileged, so DAC is appended last
    assert stack.names()[:3] == ["b", "a", "dac"]
    ctx = make_ctx(stack.host, XML)
    stack.set("set_all_labels", ctx)
    assert log == ["b.set_all_labels", "a.set_all_labels", "dac.set_all_labels"]


@pytest.mark.parametrize("hook", SET_HOOKS)
@pytest.mark.parametrize("failing", ["a", "b", "dac"])
def test_set_failure_rolls_back_in_reverse(tmp_path: Path, hook: str, failing: str) -> None:
    log: list[str] = []
    recs = {n: Recorder(n, log, fail_at=hook if n == failing else None) for n in ("a", "b")}
    dac = Recorder("dac", log, fail_at=hook if failing == "dac" else None)
    stack = build(tmp_path, 'security_driver = [ "a", "b" ]\n', recs, dac)
    ctx = make_ctx(stack.host, XML)
    kwargs: dict[str, Any] = {}
    if hook == "set_image_label":
        kwargs["disk"] = None
    elif hook == "set_hostdev_label":
        kwargs["hostdev"] = None
    elif hook == "set_chardev_label":
        kwargs["chardev"] = None
    elif hook == "set_helper_label":
        kwargs["helper"] = None
    with pytest.raises(LabelError, match="failed on purpose"):
        stack.set(hook, ctx, **kwargs)
    order = ["a", "b", "dac"]
    upto = order[: order.index(failing) + 1]
    restore = RESTORE_OF[hook]
    assert log == [f"{n}.{hook}" for n in upto] + [f"{n}.{restore}" for n in reversed(upto)]


def test_restore_runs_on_every_driver_and_reports_each_failure(tmp_path: Path) -> None:
    log: list[str] = []
    recs = {"a": Recorder("a", log, fail_at="restore_all_labels"),
            "b": Recorder("b", log, fail_at="restore_all_labels")}
    stack = build(tmp_path, 'security_driver = [ "a", "b" ]\n', recs, Recorder("dac", log))
    errors = stack.restore("restore_all_labels", make_ctx(stack.host, XML))
    assert log == ["dac.restore_all_labels", "b.restore_all_labels", "a.restore_all_labels"]
    assert len(errors) == 2 and errors[0].startswith("b:") and errors[1].startswith("a:")


def test_default_confined_adds_implicit_dynamic_labels(tmp_path: Path) -> None:
    log: list[str] = []
    stack = build(tmp_path, 'security_driver = "a"\n', {"a": Recorder("a", log)},
                  Recorder("dac", log))
    ctx = make_ctx(stack.host, XML)
    stack.gen_labels(ctx)
    sec = ctx.domain.seclabel("a")
    assert sec is not None and sec.type == "dynamic" and sec.label == "a-label"
    assert ctx.domain.seclabel("dac") is not None


def test_default_confined_off_generates_nothing(tmp_path: Path) -> None:
    log: list[str] = []
    stack = build(tmp_path, 'security_driver = "a"\nsecurity_default_confined = 0\n',
                  {"a": Recorder("a", log)}, Recorder("dac", log))
    ctx = make_ctx(stack.host, XML)
    stack.gen_labels(ctx)
    assert log == [] and ctx.domain.seclabels == []


def test_require_confined_refuses_type_none(tmp_path: Path) -> None:
    xml = XML.replace("</devices>", "</devices><seclabel type='none' model='a'/>")
    stack = build(tmp_path, 'security_driver = "a"\nsecurity_require_confined = 1\n',
                  {"a": Recorder("a", [])}, Recorder("dac", []))
    with pytest.raises(LabelError, match="Unconfined guests are not allowed on this host"):
        stack.gen_labels(make_ctx(stack.host, xml))


def test_gen_failure_releases_earlier_labels(tmp_path: Path) -> None:
    log: list[str] = []
    recs = {"a": Recorder("a", log), "b": Recorder("b", log, fail_at="gen_label")}
    stack = build(tmp_path, 'security_driver = [ "a", "b" ]\n', recs, Recorder("dac", log))
    with pytest.raises(LabelError):
        stack.gen_labels(make_ctx(stack.host, XML))
    assert log == ["a.gen_label", "b.gen_label", "a.release_label"]


def test_none_with_require_confined_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match='"none" cannot create confined guests'):
        build(tmp_path, 'security_driver = "none"\nsecurity_require_confined = 1\n', {},
              Recorder("dac", []))


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ('security_driver = "foo"\n',
         r"security driver 'foo' is not installed \(installed: a, dac, none\)"),
        ('security_driver = [ "a", "a" ]\n', "Duplicate security driver a"),
        ('security_driver = [ "a", "none" ]\n', '"none" cannot appear in a list'),
        ('security_driver = [ "dac" ]\n', 'cannot contain "dac"'),
    ],
)
def test_bad_driver_lists(tmp_path: Path, conf: str, message: str) -> None:
    from vmconfine.errors import ConfigError

    with pytest.raises((DriverError, ConfigError), match=message):
        build(tmp_path, conf, {"a": Recorder("a", [])}, Recorder("dac", []))


def test_explicit_unavailable_driver_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="Security driver a not enabled: not here; install foo"):
        build(tmp_path, 'security_driver = "a"\n', {"a": Recorder("a", [], available=False)},
              Recorder("dac", []))


def test_autodetect_skips_unavailable_and_falls_back_to_none(tmp_path: Path) -> None:
    drivers = {"selinux": Recorder("selinux", [], available=False),
               "apparmor": Recorder("apparmor", [], available=True)}
    stack = build(tmp_path, "", drivers, Recorder("dac", []))
    assert stack.names()[:2] == ["apparmor", "dac"]
    drivers["apparmor"].available = False
    stack = build(tmp_path / "2", "", drivers, Recorder("dac", []))
    assert stack.names()[:2] == ["none", "dac"]


def _roles_module(name: str, spec: dict[str, dict[str, Any]]) -> Any:
    """A third-party plugin registering drivers with the given roles (no built-in names)."""
    mod = types.ModuleType(name)

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        for dname, entry in spec.items():
            roles = dict(entry)
            drv = roles.pop("driver")
            registry.add(dname, lambda host, d=drv: d, f"test driver {dname}", **roles)

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


def test_autodetection_and_implicit_drivers_are_the_drivers_own_declaration(
        tmp_path: Path) -> None:
    """Core names no driver: any security driver can declare an autodetection priority
    (lowest available first) or be stacked implicitly for privileged instances."""
    zeta, alpha, base = Recorder("zeta", []), Recorder("alpha", []), Recorder("base", [])
    mods = [nop, _roles_module("roles", {
        "zeta": {"driver": zeta, "autodetect": 1},  # tried first despite its name
        "alpha": {"driver": alpha, "autodetect": 2},
        "plain": {"driver": Recorder("plain", [])},  # never autodetected
        "base": {"driver": base, "implicit": True}})]
    host = make_host(tmp_path / "a", mods)
    assert [i.name for i in host.registry.autodetected()] == ["zeta", "alpha"]
    assert Stack.build(host).names() == ["zeta", "base"]
    zeta.available = False
    assert Stack.build(make_host(tmp_path / "b", mods)).names() == ["alpha", "base"]
    alpha.available = False
    assert Stack.build(make_host(tmp_path / "c", mods)).names() == ["none", "base"]
    explicit = make_host(tmp_path / "d", mods, config='security_driver = "plain"\n')
    assert Stack.build(explicit).names() == ["plain", "base"]
    listed = make_host(tmp_path / "e", mods, config='security_driver = [ "plain", "base" ]\n')
    with pytest.raises(DriverError, match='security_driver cannot contain "base": the base '
                                          "driver is always enabled for privileged instances"):
        Stack.build(listed)


@pytest.mark.parametrize(("roles", "message"), [
    ({"autodetect": 1, "kind": "pipeline"}, "only security drivers can be autodetected"),
    ({"implicit": True, "kind": "pipeline"}, "only security drivers can be autodetected"),
    ({"autodetect": 1, "implicit": True}, "cannot also be autodetected"),
    ({"autodetect": "1"}, "autodetect must be an integer priority"),
    ({"autodetect": True}, "autodetect must be an integer priority"),
])
def test_bad_roles_are_refused_at_registration(tmp_path: Path, roles: dict[str, Any],
                                               message: str) -> None:
    mods = [nop, _roles_module("badroles", {"x": {"driver": Recorder("x", []), **roles}})]
    with pytest.raises(DriverError, match=message):
        make_host(tmp_path, mods)


def test_builtin_roles_match_libvirt() -> None:
    """libvirt autodetects SELinux before AppArmor and always stacks DAC (privileged)."""
    from vmconfine.plugin.registry import collect_drivers, make_plugin_manager

    reg = collect_drivers(make_plugin_manager())
    assert [i.name for i in reg.autodetected()] == ["selinux", "apparmor"]
    assert [i.name for i in reg.implicit()] == ["dac"]


def test_unknown_seclabel_model_is_refused(tmp_path: Path) -> None:
    xml = XML.replace("</devices>", "</devices><seclabel type='dynamic' model='smack'/>")
    stack = build(tmp_path, 'security_driver = "a"\n', {"a": Recorder("a", [])},
                  Recorder("dac", []))
    with pytest.raises(DriverError, match="Security driver model 'smack' is not available"):
        stack.check_models(make_ctx(stack.host, xml).domain)


def test_pipeline_drivers_follow_security_drivers(tmp_path: Path) -> None:
    log: list[str] = []
    mods = [nop, plugin_module("sec", {"a": Recorder("a", log)}),
            plugin_module("pipe", {"cg": Recorder("cg", log)}, kind="pipeline"),
            plugin_module("testdac", {"dac": Recorder("dac", log)})]
    host = make_host(tmp_path, mods, config='security_driver = "a"\n')
    stack = Stack.build(host)
    assert stack.names() == ["a", "dac", "cg"]
    assert [m["model"] for m in stack.secmodels()] == ["a", "dac"]


def test_capabilities_secmodels_in_stack_order(tmp_path: Path) -> None:
    stack = build(tmp_path, 'security_driver = [ "b", "a" ]\n',
                  {"a": Recorder("a", []), "b": Recorder("b", [])}, Recorder("dac", []))
    assert [m["model"] for m in stack.secmodels()] == ["b", "a", "dac"]
