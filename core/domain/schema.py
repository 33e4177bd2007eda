"""``--validate``: check domain XML against libvirt's own RelaxNG schema, as ``virsh define
--validate`` does.

The schema is the one libvirt ships (Debian's ``libvirt0`` package installs
``/usr/share/libvirt/schemas/domain.rng`` and the files it includes); lxml compiles it once
per process (libxml2's RelaxNG, the validator libvirt itself uses, so the messages are
libvirt's). A failure is one ``XMLError`` line: the file, the line of the offending element
and libxml2's reasons.
"""

from __future__ import annotations

import os
from functools import cache

from lxml import etree

from vmconfine.domain.xml import one_line, safe_tree, xml_error
from vmconfine.errors import VmconfineError

#: where Debian's libvirt0 installs libvirt's schemas; VMCONFINE_DOMAIN_SCHEMA overrides it
DOMAIN_RNG = "/usr/share/libvirt/schemas/domain.rng"


def schema_path() -> str:
    """The domain schema used by ``--validate``."""
    return os.environ.get("VMCONFINE_DOMAIN_SCHEMA") or DOMAIN_RNG


@cache
def _load(path: str) -> etree.RelaxNG:
    if not os.path.isfile(path):
        raise VmconfineError(f"libvirt's domain schema {path} is missing, so --validate cannot "
                             "check the XML; install it (apt-get install libvirt0) or leave "
                             "out --validate")
    try:
        return etree.RelaxNG(etree.parse(path))
    except (etree.RelaxNGParseError, etree.XMLSyntaxError, OSError) as exc:
        raise VmconfineError(f"libvirt's domain schema {path} cannot be loaded: "
                             f"{one_line(str(exc), 200)}; reinstall libvirt0") from None


def validate(data: bytes | str, source: str) -> None:
    """Raise ``XMLError`` when ``data`` does not validate against libvirt's domain schema."""
    schema = _load(schema_path())
    tree = safe_tree(data, source)
    if schema.validate(tree):
        return
    errors = list(schema.error_log)
    line = next((e.line for e in errors if e.line > 0), 1)
    reasons = "; ".join(dict.fromkeys(e.message for e in errors)) or "invalid"
    raise xml_error(source, line, "XML document failed to validate against schema "
                                  f"{schema_path()}: {reasons}")
