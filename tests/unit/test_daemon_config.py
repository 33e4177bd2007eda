"""``vmconfined.conf``: libvirt's keys and defaults, every wrong value a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmconfine.daemon.main import DaemonConfig
from vmconfine.errors import ConfigError


def load(tmp_path: Path, text: str) -> DaemonConfig:
    path = tmp_path / "vmconfined.conf"
    path.write_text(text)
    return DaemonConfig.load(path)


def test_defaults_are_libvirts(tmp_path: Path) -> None:
    cfg = DaemonConfig.load(tmp_path / "absent.conf")
    assert (cfg.unix_sock_rw_perms, cfg.unix_sock_ro_perms, cfg.listen_tls, cfg.tls_port,
            cfg.max_clients, cfg.max_anonymous_clients) == (0o700, 0o777, 0, 16514, 5000, 20)


def test_connection_limits(tmp_path: Path) -> None:
    cfg = load(tmp_path, "max_clients = 64\nmax_anonymous_clients = 4\n")
    assert (cfg.max_clients, cfg.max_anonymous_clients) == (64, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("max_clients = 0\n", "max_clients must be a number of connections (1-1000000), not 0"),
    ('max_clients = "10"\n', "max_clients must be a number of connections"),
    ("max_anonymous_clients = -1\n", "max_anonymous_clients must be a number of connections"),
    ("max_client = 10\n", "unknown setting 'max_client' (did you mean max_clients?)"),
    ('unix_sock_rw_perms = "0999"\n', 'unix_sock_rw_perms must be an octal mode such as'),
    ("listen_tls = 2\n", "listen_tls must be 0 or 1, not 2"),
    ("tls_allowed_dn_list = [1]\n", "tls_allowed_dn_list must be a list of strings"),
    ('unix_sock_group = "no-such-group-here"\n', "unix_sock_group 'no-such-group-here' is "
                                                  "not a group on this host"),
])
def test_wrong_values_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert message in err.value.message and "vmconfined.conf:1" in err.value.message
    assert "\n" not in err.value.message
