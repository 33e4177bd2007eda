"""``python -m tests.host.daemon_fake_selinux URI POLICY_DIR``: the daemon for URI with the
stack selinux (on its fake backend: contexts in a user xattr, the process context reported as
the child set it) + dac + cgroups, and the real, file-locked MCS registry of the instance."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import vmconfine_cgroups
import vmconfine_dac
import vmconfine_selinux
from vmconfine.daemon.main import serve
from vmconfine.plugin import nop
from vmconfine.plugin.hookspecs import hookimpl
from vmconfine.plugin.registry import collect_drivers, make_plugin_manager
from vmconfine_selinux import SETTINGS as SELINUX_SETTINGS
from vmconfine_selinux.backend import FakeBackend
from vmconfine_selinux.driver import SELinuxDriver

VIRTD = "system_u:system_r:virtd_t:s0-s0:c0.c1023"


def write_policy(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "virtual_domain_context").write_text(
        "system_u:system_r:svirt_t:s0\nsystem_u:system_r:svirt_tcg_t:s0\n")
    (d / "virtual_image_context").write_text(
        "system_u:object_r:svirt_image_t:s0\nsystem_u:object_r:virt_content_t:s0\n")
    return d


#: the real driver's registration (its autodetection priority)
_REAL = collect_drivers(make_plugin_manager(autoload=False, plugins=[vmconfine_selinux])).get(
    "selinux")
assert _REAL is not None


def plugin(policy: Path) -> types.ModuleType:
    backend = FakeBackend(str(policy / "virtual_domain_context"),
                          str(policy / "virtual_image_context"), process_context=VIRTD,
                          exec_record_dir=str(policy))
    mod = types.ModuleType("fake_selinux")

    @hookimpl
    def vmconfine_register_drivers(registry: Any) -> None:
        registry.add("selinux", lambda host: SELinuxDriver(host, backend),
                     "SELinux on the fake backend (tests)", settings=SELINUX_SETTINGS,
                     autodetect=_REAL.autodetect)  # autodetected as the real one

    mod.vmconfine_register_drivers = vmconfine_register_drivers  # type: ignore[attr-defined]
    return mod


if __name__ == "__main__":
    uri, policy_dir = sys.argv[1:3]
    pm = make_plugin_manager(autoload=False, plugins=[
        nop, vmconfine_dac, vmconfine_cgroups, plugin(write_policy(Path(policy_dir)))])
    sys.exit(serve(uri, pm=pm))
