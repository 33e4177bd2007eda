"""Helpers shared by the SELinux driver tests (no tests here).

The driver runs on :class:`vmconfine_selinux.backend.FakeBackend`: file contexts in the
``user.vmconfine.selinux`` xattr, a chosen vmconfine process context, and the policy's context
files written by :func:`write_policy` (libvirt's targeted-policy values, with the TCG line).
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

from tests.support import builtin_roles, make_host
from vmconfine.domain import SecLabel, parse_domain
from vmconfine.launch.journal import Journal
from vmconfine.plugin.context import DomainContext
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine_selinux import SETTINGS as SELINUX_SETTINGS
from vmconfine_selinux.backend import FakeBackend
from vmconfine_selinux.driver import SELinuxDriver

DOMAIN_CONTEXT = "system_u:system_r:svirt_t:s0"
TCG_CONTEXT = "system_u:system_r:svirt_tcg_t:s0"
IMAGE_CONTEXT = "system_u:object_r:svirt_image_t:s0"
CONTENT_CONTEXT = "system_u:object_r:virt_content_t:s0"
VIRTD = "system_u:system_r:virtd_t:s0-s0:c0.c1023"
XATTR = "user.vmconfine.selinux"

UUID_A = "c7b3edbd-edaf-9455-926a-d65c16db1800"
UUID_B = "c7b3edbd-edaf-9455-926a-d65c16db1801"


def write_policy(directory: Path, *, tcg: bool = True, mcs: bool = True) -> tuple[str, str]:
    """virtual_domain_context / virtual_image_context files; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    strip = (lambda c: c) if mcs else (lambda c: c.rsplit(":", 1)[0])
    dom = directory / "virtual_domain_context"
    img = directory / "virtual_image_context"
    lines = [strip(DOMAIN_CONTEXT)] + ([strip(TCG_CONTEXT)] if tcg else [])
    dom.write_text("\n".join(lines) + "\n")
    img.write_text(f"{strip(IMAGE_CONTEXT)}\n{strip(CONTENT_CONTEXT)}\n")
    return str(dom), str(img)


def fake_backend(tmp: Path, *, tcg: bool = True, policy_mcs: bool = True,
                 **kwargs: Any) -> FakeBackend:
    dom, img = write_policy(tmp / "policy", tcg=tcg, mcs=policy_mcs)
    kwargs.setdefault("process_context", VIRTD)
    return FakeBackend(dom, img, **kwargs)


def plugin(backend: FakeBackend, dac: bool = True) -> types.ModuleType:
    """A plugin module registering ``selinux`` on ``backend`` (and a do-nothing ``dac``)."""
    mod = types.ModuleType("selinux_under_test")

    class NoDac:
        @hookimpl
        def model(self) -> str:
            return "dac"

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add("selinux", lambda host: SELinuxDriver(host, backend), "selinux (fake)",
                     settings=SELINUX_SETTINGS, **builtin_roles("selinux"))
        if dac:
            registry.add("dac", lambda host: NoDac(), "dac stand-in", **builtin_roles("dac"))

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


def setup(tmp: Path, *, config: str = "", backend: FakeBackend | None = None,
          **kwargs: Any) -> tuple[Any, SELinuxDriver, FakeBackend]:
    """(host, driver, backend) for an embed instance under ``tmp/inst``."""
    be = backend or fake_backend(tmp, **kwargs)
    host = make_host(tmp / "inst", [plugin(be)], config=config)
    return host, SELinuxDriver(host, be), be


def make_ctx(host: Any, xml: str, *, live: bool = False) -> DomainContext:
    domain = parse_domain(xml, live=live)
    return DomainContext(host, domain, Journal(host.instance.journal_path(domain.name)))


def fresh_ctx(host: Any, ctx: DomainContext) -> DomainContext:
    """The context a fresh process rebuilds from the journal after a crash."""
    return make_ctx(host, ctx.domain.to_xml(live=True), live=False)


def gen(driver: SELinuxDriver, ctx: DomainContext, type_: str = "dynamic") -> SecLabel:
    sec = ctx.domain.seclabel("selinux") or ctx.domain.add_seclabel("selinux", type_)
    driver.gen_label(ctx, sec)
    return sec


def domain_xml(name: str = "vm1", uuid: str = UUID_A, virt_type: str = "kvm",
               devices: str = "", seclabel: str = "", os_extra: str = "") -> str:
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>219200</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}
  </devices>
{seclabel}
</domain>"""


def disk(path: str, target: str, extra: str = "", source_extra: str = "") -> str:
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{path}'>{source_extra}</source>
      <target dev='{target}' bus='virtio'/>{extra}
    </disk>"""


def label_of(path: Path | str) -> str | None:
    try:
        return os.getxattr(str(path), XATTR).decode()
    except OSError:
        return None


def set_label(path: Path | str, label: str) -> None:
    os.setxattr(str(path), XATTR, label.encode())


def touch(path: Path, label: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    if label is not None:
        set_label(path, label)
    return path


def remembered(path: Path | str, prefix: str = "trusted.vmconfine.security") -> dict[str, str]:
    out = {}
    for name in os.listxattr(str(path)):
        if name.startswith(prefix + "."):
            out[name[len(prefix) + 1:]] = os.getxattr(str(path), name).decode()
    return out
