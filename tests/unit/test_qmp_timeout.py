"""The QMP handshake limit of a starting QEMU (vmconfine.qemu.qmp.start_timeout)."""

from __future__ import annotations

import pytest

from vmconfine.qemu import qmp


@pytest.mark.parametrize(("value", "expected"), [
    (None, qmp.START_TIMEOUT), ("240", 240.0), ("0.5", 0.5),
    ("0", qmp.START_TIMEOUT), ("-3", qmp.START_TIMEOUT), ("soon", qmp.START_TIMEOUT),
])
def test_start_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            value: str | None, expected: float) -> None:
    if value is None:
        monkeypatch.delenv(qmp.START_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(qmp.START_TIMEOUT_ENV, value)
    assert qmp.start_timeout() == expected
