"""The TPM emulator's child profile ``<profile>//swtpm`` (libvirt's virt-aa-helper adds swtpm's
paths to the domain's profile; vmconfine gives swtpm a profile of its own inside it).

A domain with ``<tpm><backend type='emulator'>`` gets, at the end of its ``.files`` include, a
child profile that allows exactly what swtpm needs: the shared libraries and system files of
``abstractions/base`` and ``abstractions/openssl`` (libtpms' crypto), its own binary, its
state directory (``<lib_dir>/swtpm/<uuid>/tpm2``, read, write, lock), its log (inherited
descriptor, written) and unnamed stream sockets (the control channel it inherits, the data
channel QEMU sends over it). QEMU's own profile gets none of these: a compromised QEMU can
neither read the TPM state nor enter the child profile (it has no ``change_profile`` rule).
vmconfine's AppArmor driver moves swtpm into it with ``aa_change_onexec`` between fork and
exec.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from vmconfine_aa_helper.paths import canonical_path, check_text

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain

#: the child profile's name (the full label is ``<domain profile>//swtpm``)
CHILD = "swtpm"
SEARCH_PATH = "/usr/bin:/usr/local/bin:/bin:/usr/sbin:/sbin"


def swtpm_profile(domain: Domain, instance: Instance) -> str | None:
    """The ``profile swtpm { ... }`` block for ``domain``, None without an emulated TPM."""
    from vmconfine.launch.swtpm import log_path, state_dir
    from vmconfine.qemu.argv_devices import tpm_version

    tpm = next((t for t in domain.tpms if t.backend == "emulator"), None)
    if tpm is None:
        return None
    state = canonical_path(str(state_dir(instance, domain, tpm_version(tpm))), writable=True,
                           what="TPM state directory")
    log = canonical_path(str(log_path(instance, domain)), writable=True, what="swtpm log")
    lines = [f"  profile {CHILD} {{",
             "    #include <abstractions/base>",
             "    #include <abstractions/openssl>"]
    binary = shutil.which("swtpm", path=SEARCH_PATH)
    if binary:  # a system binary (the guest-path checks do not apply), quoted safely
        binary = os.path.realpath(binary)
        check_text(binary, "swtpm binary")
        lines.append(f'    "{binary}" rm,')
    lines += [f'    "{state}/" r,',
              f'    "{state}/**" rwk,',
              f'    "{log}" w,',
              "    unix (send, receive) type=stream addr=none peer=(addr=none),",
              "    unix (getattr, getopt, setopt, shutdown) type=stream addr=none,",
              "  }"]
    return "\n".join(lines)


__all__ = ["CHILD", "swtpm_profile"]
