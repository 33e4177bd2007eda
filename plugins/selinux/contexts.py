"""SELinux security contexts as strings, and the policy's virtualization context files.

A context is ``user:role:type[:range]``; the range may itself contain colons
(``s0-s0:c0.c1023``, ``s0:c41,c264``). :class:`Context` splits and rebuilds one without
libselinux, so the fake backend and the label rules work on any host.

The policy names the contexts sVirt uses in two files (libselinux gives their paths:
``selinux_virtual_domain_context_path()`` and ``selinux_virtual_image_context_path()``):

* ``virtual_domain_context``: line 1 the QEMU process context (``svirt_t``), optional line 2 the
  one for TCG guests (``svirt_tcg_t``);
* ``virtual_image_context``: line 1 the image context (``svirt_image_t``), line 2 the read-only
  content context (``virt_content_t``).

:func:`load_policy_contexts` reads them with libvirt's size limits and error messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from vmconfine.errors import DriverError

log = logging.getLogger(__name__)

#: libvirt reads at most this many bytes of virtual_domain_context (twice that for images)
MAX_CONTEXT = 1024


@dataclass(frozen=True)
class Context:
    """One parsed context. ``range`` is None when the context has none (non-MCS policy)."""

    user: str
    role: str
    type: str
    range: str | None = None

    @classmethod
    def parse(cls, text: str) -> Context:
        """Split ``user:role:type[:range]``; raise ValueError when that shape is not there."""
        parts = text.strip().split(":", 3)
        if len(parts) < 3 or not all(parts[:3]) or (len(parts) == 4 and not parts[3]):
            raise ValueError(f"'{text}' is not an SELinux context (user:role:type[:range])")
        if any(c.isspace() for c in text.strip()):
            raise ValueError(f"'{text}' is not an SELinux context (it contains white space)")
        return cls(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None)

    def __str__(self) -> str:
        base = f"{self.user}:{self.role}:{self.type}"
        return base if self.range is None else f"{base}:{self.range}"

    def with_range(self, rng: str | None) -> Context:
        return replace(self, range=rng)

    @property
    def low_level(self) -> str | None:
        """The low end of the range (``s0:c1,c2`` of ``s0:c1,c2-s0:c0.c1023``), or None."""
        if self.range is None:
            return None
        return self.range.split("-", 1)[0]


def range_of(text: str) -> str | None:
    """The range part of a context string, None when it has none (ValueError if malformed)."""
    return Context.parse(text).range


def new_context(base: str, own: str, level: str | None, *, is_object: bool) -> str:
    """libvirt's GenNewContext: ``base``'s type (and role for objects), vmconfine's own user
    (and role for processes), range ``level``."""
    b = Context.parse(base)
    me = Context.parse(own)
    role = b.role if is_object else me.role
    return str(Context(me.user, role, b.type, level))


@dataclass(frozen=True)
class PolicyContexts:
    """The four contexts of the policy's virtualization files."""

    domain: str
    alt_domain: str | None
    file: str
    content: str
    domain_path: str = ""
    image_path: str = ""

    def process_base(self, virt_type: str) -> str:
        """The base process context: the TCG type for ``type='qemu'`` when the policy has one."""
        if virt_type == "qemu":
            if self.alt_domain is None:
                _warn_no_tcg()
                return self.domain
            return self.alt_domain
        return self.domain

    @property
    def has_mcs(self) -> bool:
        """True when the policy's contexts carry a range (an MCS/MLS policy)."""
        return Context.parse(self.domain).range is not None


_warned_tcg = False


def _warn_no_tcg() -> None:
    global _warned_tcg
    if not _warned_tcg:
        _warned_tcg = True
        log.warning(
            "SELinux policy does not define a domain type for QEMU TCG. Guest startup may be "
            "denied due to missing 'execmem' privilege unless the 'virt_use_execmem' policy "
            "boolean is enabled"
        )


def _read_lines(path: str, limit: int, what: str) -> list[str]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise DriverError(
            f"cannot read SELinux {what} context file '{path}': {exc.strerror}; install the "
            "policy's virtualization contexts (Debian: apt-get install selinux-policy-default)"
        ) from None
    if len(data) > limit:
        raise DriverError(
            f"cannot read SELinux {what} context file '{path}': it is larger than {limit} "
            "bytes; check the policy package"
        )
    text = data.decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines()]


def _check(path: str, line: int, text: str) -> str:
    try:
        Context.parse(text)
    except ValueError as exc:
        raise DriverError(f"{path}:{line}: {exc}; check the policy package") from None
    return text


def load_policy_contexts(domain_path: str, image_path: str) -> PolicyContexts:
    """Read ``virtual_domain_context`` and ``virtual_image_context`` (libvirt's rules)."""
    dom = _read_lines(domain_path, MAX_CONTEXT, "virtual domain")
    if not dom or not dom[0]:
        raise DriverError(
            f"cannot read SELinux virtual domain context file '{domain_path}': it is empty; "
            "check the policy package"
        )
    img = _read_lines(image_path, 2 * MAX_CONTEXT, "virtual image")
    if len(img) < 2 or not img[0] or not img[1]:
        raise DriverError(
            f"cannot read SELinux virtual image context file '{image_path}': it needs the "
            "image context on line 1 and the content context on line 2; check the policy "
            "package"
        )
    alt = dom[1] if len(dom) > 1 and dom[1] else None
    return PolicyContexts(
        domain=_check(domain_path, 1, dom[0]),
        alt_domain=_check(domain_path, 2, alt) if alt else None,
        file=_check(image_path, 1, img[0]),
        content=_check(image_path, 2, img[1]),
        domain_path=domain_path,
        image_path=image_path,
    )
