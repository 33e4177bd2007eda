"""Can QEMU enter its sVirt domain? The policy's answer, asked before the fork.

QEMU gets its label from an exec transition (``setexeccon`` in the child, then ``execve``).
When the policy refuses it, ``execve`` fails with a bare EPERM/EACCES, or QEMU starts and dies on
its first JIT mapping. Before anything is labelled, the driver asks the loaded policy
(``security_compute_av``) the four questions the kernel will ask, and names what is missing:

1. ``process transition`` from vmconfine's domain to QEMU's;
2. ``process2 nnp_transition`` for the same pair: the pipeline sets no_new_privs on QEMU
   (libvirt does not), and under no_new_privs the kernel allows a domain change only where the
   policy grants this (or the new type is bounded by the old one, which refpolicy's sVirt
   types are not);
3. ``file entrypoint``: the emulator's file type must be an entry point of QEMU's domain
   (``qemu_exec_t`` in refpolicy); the message gives the context the policy's file contexts
   assign to the emulator path when that context would do;
4. ``process execmem`` for TCG (``<domain type='qemu'>``): QEMU's code generator maps
   writable+executable memory. A policy with a TCG type (line 2 of virtual_domain_context,
   Fedora's ``svirt_tcg_t``) grants it there; refpolicy instead has the boolean
   ``virt_use_execmem`` for its one domain type. The check follows whatever the loaded policy
   says, so turning the boolean on (or using a type that has execmem) is what makes it pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmconfine_selinux.backend import Backend
from vmconfine_selinux.contexts import Context

#: refpolicy's boolean that grants execmem to the sVirt domain types
EXECMEM_BOOLEAN = "virt_use_execmem"
#: where distributions install the emulator; their file context names the entry-point type
KNOWN_EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm")


@dataclass(frozen=True)
class Problem:
    """One permission the policy denies, with the message that names the fix."""

    what: str
    message: str


def _type(context: str) -> str:
    try:
        return Context.parse(context).type
    except ValueError:
        return context


def _entry_fix(backend: Backend, label: str, emulator: str) -> str:
    """The context to give the emulator: the first file-context default (for the emulator's
    own path, then the usual install paths) that the policy accepts as an entry point."""
    for path in (emulator, *KNOWN_EMULATORS):
        try:
            want = backend.default_context(path, 0o100755)
        except OSError:
            want = None
        if want and backend.allowed(label, want, "file", "entrypoint"):
            return (f"label it '{want}' (restorecon {emulator}, or chcon {want} {emulator}; "
                    "semanage fcontext makes that stick for a non-standard path)")
    return ("label it with an entry-point type of that domain (qemu_exec_t in refpolicy: "
            f"chcon -t qemu_exec_t {emulator})")


def check_exec(backend: Backend, own: str, label: str, emulator: str,
               virt_type: str) -> list[Problem]:
    """What the policy denies for ``own`` exec'ing ``emulator`` into ``label`` (empty: all
    allowed). Questions libselinux cannot answer (an invalid context) are skipped: the kernel
    still decides at exec time."""
    problems: list[Problem] = []
    src, dst = _type(own), _type(label)
    real = os.path.realpath(emulator)

    def ask(scon: str, tcon: str, tclass: str, perm: str) -> bool:
        try:
            return backend.allowed(scon, tcon, tclass, perm)
        except OSError:
            return True

    if not ask(own, label, "process", "transition"):
        problems.append(Problem("transition", (
            f"the SELinux policy does not let vmconfine's domain {src} start QEMU as {dst} "
            f"(process transition); run vmconfine in a domain that may (virtd_t in refpolicy) "
            f"or add a module with: (allow {src} {dst} (process (transition)))")))
    if not ask(own, label, "process2", "nnp_transition"):
        problems.append(Problem("nnp_transition", (
            f"vmconfine starts QEMU with no_new_privs, and the SELinux policy does not grant "
            f"{src} 'process2 nnp_transition' to {dst}, so the kernel refuses the exec; add a "
            f"module with: (allow {src} {dst} (process2 (nnp_transition))) (docs/selinux.md)")))
    try:
        current = backend.getfilecon(real)
    except OSError:
        current = None
    if current is not None and not ask(label, current, "file", "entrypoint"):
        problems.append(Problem("entrypoint", (
            f"the emulator {emulator} is labelled '{current}', which the SELinux policy does "
            f"not accept as an entry point into {dst}; {_entry_fix(backend, label, emulator)}")))
    if virt_type == "qemu" and not ask(label, label, "process", "execmem"):
        state = backend.boolean(EXECMEM_BOOLEAN)
        fix = (f"turn on the boolean: setsebool -P {EXECMEM_BOOLEAN} on" if state is False else
               "give TCG domains a type with execmem (line 2 of the policy's "
               "virtual_domain_context, or a <baselabel> in the domain's <seclabel>)")
        problems.append(Problem("execmem", (
            f"QEMU TCG (<domain type='qemu'>) needs execmem for its code generator, and the "
            f"SELinux policy denies it to {dst}; {fix}")))
    return problems
