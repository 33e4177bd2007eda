"""``dumpxml`` leaves graphics passwords out unless asked (libvirt's VIR_DOMAIN_XML_SECURE)."""

from __future__ import annotations

import pytest

from vmconfine.domain.xml import without_secrets
from vmconfine.errors import XMLError

DOMAIN = ("<domain type='kvm'><name>passwd</name><devices>"
          "<graphics type='spice' autoport='yes' passwd='s3cret' "
          "passwdValidTo='2030-01-01T00:00:00'><listen type='address'/></graphics>"
          "<graphics type='vnc' passwd='other'/></devices>"
          "<description>passwd='kept: not an attribute of graphics'</description></domain>\n")


def test_passwords_of_every_graphics_are_removed_and_nothing_else() -> None:
    out = without_secrets(DOMAIN, "t")
    assert "s3cret" not in out and "other" not in out and "passwdValidTo" not in out
    assert "autoport=\"yes\"" in out and "<listen type=\"address\"/>" in out
    assert "passwd='kept: not an attribute of graphics'" in out and out.endswith("</domain>\n")


def test_without_a_password_the_text_is_returned_unchanged() -> None:
    plain = "<domain type='kvm'>\n  <name>passwd</name>\n  <devices/>\n</domain>\n"
    assert without_secrets(plain, "t") is plain  # byte for byte, not re-serialised
    other = "<domain><devices><disk passwd='x'/></devices></domain>"
    assert without_secrets(other, "t") is other  # only <graphics> carries the secret


def test_hostile_xml_is_refused_not_expanded() -> None:
    bomb = ("<!DOCTYPE d [<!ENTITY p 'x'>]><domain><devices>"
            "<graphics passwd='&p;'/></devices></domain>")
    with pytest.raises(XMLError):
        without_secrets(bomb, "t")
