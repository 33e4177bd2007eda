"""The plugin contract fails loudly: misspelt hooks, unmarked hook-named methods, exceptions
escaping a driver, and each restore running once."""

from __future__ import annotations

import errno
import logging
import types
from pathlib import Path
from typing import Any

import pytest

from tests.support import builtin_roles, make_ctx, make_host
from vmconfine.errors import DriverError, LabelError
from vmconfine.launch.pipeline import teardown
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.plugin.registry import make_plugin_manager
from vmconfine.plugin.stack import Stack, load_driver

XML = ("<domain type='qemu'><name>contract1</name><memory>65536</memory>"
       "<os><type arch='x86_64'>hvm</type></os></domain>")


def plugin(name: str, factory: Any, **add: Any) -> types.ModuleType:
    mod = types.ModuleType(f"thirdparty_{name}")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add(name, factory, f"test driver {name}", **{**builtin_roles(name), **add})

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


class Misspelt:
    @hookimpl
    def child_confined(self, ctx: Any) -> None:  # the hook is child_confine
        raise AssertionError("never called")


class Unmarked:
    def set_all_labels(self, ctx: Any) -> None:  # no @hookimpl: pluggy would skip it
        raise AssertionError("never called")


def test_misspelt_hook_names_driver_method_and_fix(tmp_path: Path) -> None:
    host = make_host(tmp_path, [plugin("rl", lambda h: Misspelt())])
    info = host.registry.get("rl")
    assert info is not None
    with pytest.raises(DriverError) as exc:
        load_driver(host, info)
    msg = exc.value.message
    assert msg.startswith("driver 'rl' (plugin thirdparty_rl): method 'child_confined' is "
                          "marked @hookimpl but vmconfine has no hook of that name")
    assert "did you mean child_confine?" in msg and "\n" not in msg


def test_unmarked_hook_named_method_is_an_error(tmp_path: Path) -> None:
    host = make_host(tmp_path, [plugin("rl", lambda h: Unmarked())])
    info = host.registry.get("rl")
    assert info is not None
    with pytest.raises(DriverError, match=r"^driver 'rl' \(plugin thirdparty_rl\): method "
                       r"'set_all_labels' has the name of a vmconfine hook but no @hookimpl"):
        load_driver(host, info)


def test_unmarked_static_and_class_methods_count_too(tmp_path: Path) -> None:
    class Static:
        @staticmethod
        def probe(host: Any) -> tuple[bool, str]:
            return True, ""

    host = make_host(tmp_path, [plugin("st", lambda h: Static())])
    info = host.registry.get("st")
    assert info is not None
    with pytest.raises(DriverError, match="'probe' has the name of a vmconfine hook"):
        load_driver(host, info)


def test_misspelt_module_level_hook_fails_when_the_manager_is_built() -> None:
    mod = types.ModuleType("thirdparty_typo")

    @hookimpl
    def vmconfine_register_driver(registry: Any) -> None:  # missing "s"
        raise AssertionError("never called")

    mod.vmconfine_register_driver = vmconfine_register_driver  # type: ignore[attr-defined]
    with pytest.raises(DriverError, match=r"^plugin 'thirdparty_typo': method "
                       r"'vmconfine_register_driver' is marked @hookimpl.*did you mean "
                       r"vmconfine_register_drivers\?"):
        make_plugin_manager(autoload=False, plugins=[mod])


def test_unmarked_module_level_register_hook_is_an_error() -> None:
    mod = types.ModuleType("thirdparty_plain")
    exec("def vmconfine_register_drivers(registry):\n    pass\n", mod.__dict__)
    with pytest.raises(DriverError, match=r"^plugin 'thirdparty_plain': method "
                       r"'vmconfine_register_drivers' has the name of a vmconfine hook"):
        make_plugin_manager(autoload=False, plugins=[mod])


def test_imported_hook_named_functions_of_a_module_are_not_its_methods() -> None:
    from vmconfine.plugin import nop

    mod = types.ModuleType("thirdparty_imports")
    exec("from os.path import exists as verify\n", mod.__dict__)  # someone else's function
    mod.vmconfine_register_drivers = nop.vmconfine_register_drivers  # type: ignore[attr-defined]
    make_plugin_manager(autoload=False, plugins=[mod])  # no error


def test_refused_signature_is_one_line_naming_the_driver(tmp_path: Path) -> None:
    class Bad:
        @hookimpl
        def set_all_labels(self, ctx: Any, surprise: Any) -> None:
            pass

    host = make_host(tmp_path, [plugin("bad", lambda h: Bad())])
    info = host.registry.get("bad")
    assert info is not None
    with pytest.raises(DriverError) as exc:
        load_driver(host, info)
    assert exc.value.message.startswith("driver 'bad' (plugin thirdparty_bad): ")
    assert "surprise" in exc.value.message and "\n" not in exc.value.message


# ---- exceptions escaping a driver -----------------------------------------------------------

class Crashing:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @hookimpl
    def set_all_labels(self, ctx: Any) -> None:
        raise self.exc

    @hookimpl
    def child_confine(self, ctx: Any) -> None:
        raise self.exc


@pytest.mark.parametrize(("exc", "text"), [
    (RuntimeError("boom"), "crash: set_all_labels failed: RuntimeError: boom"),
    (OSError(errno.EACCES, "Permission denied", "/srv/x.img"),
     "crash: set_all_labels failed: /srv/x.img: Permission denied"),
    (KeyError("k"), "crash: set_all_labels failed: KeyError: 'k'"),
])
def test_exception_escaping_a_hook_names_driver_and_hook(tmp_path: Path, exc: BaseException,
                                                        text: str) -> None:
    host = make_host(tmp_path, [plugin("crash", lambda h: Crashing(exc))])
    info = host.registry.get("crash")
    assert info is not None
    drv = load_driver(host, info)
    stack = Stack(host, [drv], default_confined=True, require_confined=False)
    ctx = make_ctx(host, XML)
    with pytest.raises(DriverError) as err:
        stack.set("set_all_labels", ctx)
    assert err.value.message == text
    with pytest.raises(DriverError, match=r"^crash: child_confine failed: "):
        stack.run_child_hook("child_confine", ctx)


# ---- each restore runs once -------------------------------------------------------------------

class Counting:
    def __init__(self, name: str, calls: list[str], fail_set: bool = False,
                 fail_restore: bool = False) -> None:
        self.name, self.calls = name, calls
        self.fail_set, self.fail_restore = fail_set, fail_restore

    @hookimpl
    def set_all_labels(self, ctx: Any) -> None:
        self.calls.append(f"set {self.name}")
        if self.fail_set:
            raise LabelError("refused")

    @hookimpl
    def restore_all_labels(self, ctx: Any) -> None:
        self.calls.append(f"restore {self.name}")
        if self.fail_restore:
            raise LabelError("cannot restore")

    @hookimpl
    def set_socket_label(self, ctx: Any) -> None:
        self.calls.append(f"set-socket {self.name}")

    @hookimpl
    def clear_socket_label(self, ctx: Any) -> None:
        self.calls.append(f"clear-socket {self.name}")


def counting_stack(tmp_path: Path, calls: list[str], **fail: dict[str, bool]) -> Stack:
    drivers = {n: Counting(n, calls, **fail.get(n, {})) for n in ("a", "b", "c")}
    mods = [plugin(n, lambda h, d=d: d) for n, d in drivers.items()]
    host = make_host(tmp_path, mods)
    loaded = [load_driver(host, host.registry.get(n)) for n in drivers]  # type: ignore[arg-type]
    return Stack(host, loaded, default_confined=True, require_confined=False)


def test_failed_set_all_labels_restores_each_driver_once(tmp_path: Path) -> None:
    calls: list[str] = []
    stack = counting_stack(tmp_path, calls, b={"fail_set": True})
    ctx = make_ctx(stack.host, XML)
    with pytest.raises(LabelError, match=r"^b: refused$"):
        stack.set("set_all_labels", ctx)
    assert calls == ["set a", "set b", "restore b", "restore a"]
    errors = teardown(stack, ctx, labels_generated=False)  # what the pipeline does next
    assert errors == []
    assert calls == ["set a", "set b", "restore b", "restore a", "restore c"]
    assert sorted(c for c in calls if c.startswith("restore")) == [
        "restore a", "restore b", "restore c"]  # once each, not twice


def test_a_failed_rollback_restore_is_reported_by_teardown_not_rerun(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    stack = counting_stack(tmp_path, calls, b={"fail_set": True},
                           a={"fail_restore": True})
    ctx = make_ctx(stack.host, XML)
    with caplog.at_level(logging.WARNING), pytest.raises(LabelError):
        stack.set("set_all_labels", ctx)
    errors = teardown(stack, ctx, labels_generated=False)
    assert errors == ["a: cannot restore"]  # so the journal is kept
    assert calls.count("restore a") == 1


def test_set_after_restore_makes_the_restore_due_again(tmp_path: Path) -> None:
    calls: list[str] = []
    stack = counting_stack(tmp_path, calls)
    ctx = make_ctx(stack.host, XML)
    for _ in range(2):
        stack.set("set_socket_label", ctx)
        assert stack.restore("clear_socket_label", ctx) == []
    assert calls.count("clear-socket a") == 2 and calls.count("set-socket a") == 2


# ---- typed context ------------------------------------------------------------------------------

def test_resource_roles_are_a_str_enum() -> None:
    import json

    from vmconfine.domain import parse_domain
    from vmconfine.plugin.resources import Resource, Role, domain_resources

    dom = parse_domain(XML.replace("</os>", "<kernel>/boot/vmlinuz</kernel></os>"))
    kernel = next(r for r in domain_resources(dom) if r.path == "/boot/vmlinuz")
    assert kernel.role is Role.KERNEL and kernel.role == "kernel"
    assert json.dumps({"role": kernel.role}) == '{"role": "kernel"}'
    assert f"{kernel.role}" == "kernel"
    assert Resource("/x", "disk", "rw").role is Role.DISK  # strings are converted
    with pytest.raises(ValueError, match="'diks' is not a valid Role"):
        Resource("/x", "diks", "rw")


def test_the_command_is_a_typed_context_field(tmp_path: Path) -> None:
    host = make_host(tmp_path, [])
    ctx = make_ctx(host, XML)
    assert ctx.command is None  # set by the pipeline once the argv is built


# ---- label-bearing declaration ------------------------------------------------------------------

class LabelLess:
    """Confines without a label (like an rlimit driver)."""

    def __init__(self) -> None:
        self.gen_calls = 0

    @hookimpl
    def probe(self, host: Any) -> tuple[bool, str]:
        return True, ""

    @hookimpl
    def model(self) -> str:
        return "rl"

    @hookimpl
    def gen_label(self, ctx: Any, seclabel: Any) -> None:
        self.gen_calls += 1

    @hookimpl
    def process_label(self, ctx: Any, pid: int) -> str | None:
        return "rl-label"


class StandInDac:
    @hookimpl
    def model(self) -> str:
        return "dac"

    @hookimpl
    def gen_label(self, ctx: Any, seclabel: Any) -> None:
        seclabel.label = seclabel.imagelabel = "+107:+107"


def label_host(tmp_path: Path, conf: str, drv: LabelLess) -> Any:
    from vmconfine.plugin import nop

    return make_host(tmp_path, [nop, plugin("rl", lambda h: drv, labels=False),
                                plugin("dac", lambda h: StandInDac())], config=conf)


def test_a_driver_without_labels_gets_no_seclabel_secmodel_or_dominfo_line(
        tmp_path: Path) -> None:
    drv = LabelLess()
    host = label_host(tmp_path, 'security_driver = "rl"\n', drv)
    stack = Stack.build(host)
    assert stack.names() == ["none", "rl", "dac"]  # "none" is the primary model, as libvirt's
    assert [d.name for d in stack.label_drivers] == ["none", "dac"]
    assert [m["model"] for m in stack.secmodels()] == ["none", "dac"]
    ctx = make_ctx(host, XML)
    stack.check_models(ctx.domain)
    stack.gen_labels(ctx)
    assert drv.gen_calls == 0
    assert [s.model for s in ctx.domain.seclabels] == ["dac"]
    assert "model='rl'" not in ctx.domain.to_xml(live=True).replace('"', "'")
    assert [m for m, _doi, _label in stack.process_labels(ctx, 1)] == ["none", "dac"]
    with pytest.raises(DriverError, match="Security driver model 'rl' is not available"):
        stack.check_models(make_ctx(host, XML.replace(
            "</os>", "</os><seclabel model='rl' type='dynamic'/>")).domain)


def test_label_less_drivers_alone_cannot_satisfy_require_confined(tmp_path: Path) -> None:
    host = label_host(tmp_path, 'security_driver = "rl"\nsecurity_require_confined = 1\n',
                      LabelLess())
    with pytest.raises(DriverError, match="security_require_confined = 1 needs a security "
                       "driver that labels the domain, but rl set no label"):
        Stack.build(host)


def test_a_label_bearing_driver_keeps_its_seclabel(tmp_path: Path) -> None:
    from vmconfine.plugin import nop

    drv = LabelLess()
    host = make_host(tmp_path, [nop, plugin("rl", lambda h: drv),
                                plugin("dac", lambda h: StandInDac())],
                     config='security_driver = "rl"\n')
    stack = Stack.build(host)
    assert stack.names() == ["rl", "dac"]
    ctx = make_ctx(host, XML)
    stack.gen_labels(ctx)
    assert drv.gen_calls == 1 and [s.model for s in ctx.domain.seclabels] == ["rl", "dac"]
