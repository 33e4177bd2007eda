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

:func:`check_helper_exec` asks questions 1-3 for a helper program that runs with the domain's
label (swtpm): its binary must be an entry point of QEMU's domain type, which refpolicy grants
only with vmconfine's module ``policy/vmconfine_swtpm.cil`` (:data:`SWTPM_MODULE`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmconfine_selinux.backend import Backend
from vmconfine_selinux.contexts import Context

#: refpolicy's boolean that grants execmem to the sVirt domain types
EXECMEM_BOOLEAN = "virt_use_execmem"
#: where distributions install the emulator; their file context names the entry-point type
KNOWN_EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm")
#: vmconfine's policy module that makes swtpm an entry point of the sVirt domain
SWTPM_MODULE = Path(__file__).resolve().parent / "policy" / "vmconfine_swtpm.cil"


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


def _asker(backend: Backend) -> Callable[[str, str, str, str], bool]:
    """``allowed`` where an unanswerable question (an invalid context) counts as allowed: the
    kernel still decides at exec time."""
    def ask(scon: str, tcon: str, tclass: str, perm: str) -> bool:
        try:
            return backend.allowed(scon, tcon, tclass, perm)
        except OSError:
            return True
    return ask


def _domain_change(backend: Backend, own: str, label: str, program: str, who: str,
                   entry_fix: Callable[[], str]) -> list[Problem]:
    """Questions 1-3 for ``own`` exec'ing ``program`` (``who``: what it is, for the messages)
    into ``label``."""
    problems: list[Problem] = []
    src, dst = _type(own), _type(label)
    ask = _asker(backend)
    if not ask(own, label, "process", "transition"):
        problems.append(Problem("transition", (
            f"the SELinux policy does not let vmconfine's domain {src} start {who} as {dst} "
            f"(process transition); run vmconfine in a domain that may (virtd_t in refpolicy) "
            f"or add a module with: (allow {src} {dst} (process (transition)))")))
    if not ask(own, label, "process2", "nnp_transition"):
        problems.append(Problem("nnp_transition", (
            f"vmconfine starts {who} with no_new_privs, and the SELinux policy does not grant "
            f"{src} 'process2 nnp_transition' to {dst}, so the kernel refuses the exec; add a "
            f"module with: (allow {src} {dst} (process2 (nnp_transition))) (docs/selinux.md)")))
    try:
        current = backend.getfilecon(os.path.realpath(program))
    except OSError:
        current = None
    if current is not None and not ask(label, current, "file", "entrypoint"):
        problems.append(Problem("entrypoint", (
            f"the {'emulator' if who == 'QEMU' else who + ' binary'} {program} is labelled "
            f"'{current}', which the SELinux policy does not accept as an entry point into "
            f"{dst}; {entry_fix()}")))
    return problems


def check_helper_exec(backend: Backend, own: str, label: str, program: str,
                      who: str) -> list[Problem]:
    """What the policy denies for ``own`` exec'ing the helper ``program`` (swtpm) into the
    domain's ``label`` (empty: all allowed)."""
    def fix() -> str:
        return (f"install vmconfine's SELinux module for it and relabel the binary: semodule -i "
                f"{SWTPM_MODULE} && restorecon {program} (docs/tpm.md)")
    return _domain_change(backend, own, label, program, who, fix)


def check_exec(backend: Backend, own: str, label: str, emulator: str,
               virt_type: str) -> list[Problem]:
    """What the policy denies for ``own`` exec'ing ``emulator`` into ``label`` (empty: all
    allowed). Questions libselinux cannot answer (an invalid context) are skipped: the kernel
    still decides at exec time."""
    problems = _domain_change(backend, own, label, emulator, "QEMU",
                              lambda: _entry_fix(backend, label, emulator))
    dst = _type(label)
    ask = _asker(backend)
    if virt_type == "qemu" and not ask(label, label, "process", "execmem"):
        state = backend.boolean(EXECMEM_BOOLEAN)
        fix = (f"turn on the boolean: setsebool -P {EXECMEM_BOOLEAN} on" if state is False else
               "give TCG domains a type with execmem (line 2 of the policy's "
               "virtual_domain_context, or a <baselabel> in the domain's <seclabel>)")
        problems.append(Problem("execmem", (
            f"QEMU TCG (<domain type='qemu'>) needs execmem for its code generator, and the "
            f"SELinux policy denies it to {dst}; {fix}")))
    return problems
