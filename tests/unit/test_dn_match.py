"""tls_allowed_dn_list patterns: libvirt's ``*`` / ``?`` wildcards, kept inside one RDN."""

from __future__ import annotations

import pytest

from vmconfine.daemon.api import dn_matches


@pytest.mark.parametrize(("dn", "pattern", "allowed"), [
    ("C=GB,O=Example,CN=admin", "C=GB,O=Example,CN=admin", True),
    ("C=GB,O=Example,CN=admin7", "C=GB,O=Example,CN=admin*", True),
    ("C=GB,O=Example,CN=admin7", "C=GB,O=Example,CN=admin?", True),
    ("C=GB,O=Example,CN=Admin", "C=GB,O=Example,CN=admin", False),  # case-sensitive
    ("C=GB,O=Evil,CN=admin", "C=GB,O=*,CN=admin", True),
    # a CN of the attacker's choosing cannot stretch a wildcard over an RDN boundary
    ("C=GB,O=Evil,CN=bob\\,CN=admin", "C=GB,O=*,CN=admin", False),
    ("C=GB,O=Evil\\,CN=admin", "C=GB,O=*", True),  # one (escaped) organisation value
    ("C=GB,O=Evil,CN=x", "C=GB,O=*", False),
    ("C=GB,O=a\\,b,CN=x", "C=GB,O=a?b,CN=x", True),  # an escaped comma is one character
    ("anything=at,all=really", "*", True),  # the default: any certificate the CA signed
    ("C=GB,O=x.y", "C=GB,O=x.y", True),
    ("C=GB,O=xzy", "C=GB,O=x.y", False),  # not a regular expression
])
def test_dn_patterns(dn: str, pattern: str, allowed: bool) -> None:
    assert dn_matches(dn, pattern) is allowed
