"""One exception hierarchy for every user-facing failure.

The CLI prints ``error: <message>`` on one line and exits 1; ``--debug`` shows the traceback.
A message names the path, driver or key involved, what was expected and what was found, and
the fix.
"""

from __future__ import annotations


class VmconfineError(Exception):
    """Base class: a failure the user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VmconfineError):
    """qemu.conf syntax or value error ("FILE:LINE: message")."""


class XMLError(VmconfineError):
    """Malformed or invalid domain XML."""


class URIError(VmconfineError):
    """Bad or unsupported connection URI."""


class DriverError(VmconfineError):
    """A security driver is missing, unavailable or failed."""


class LabelError(VmconfineError):
    """Label generation, reservation or relabelling failed."""


class LaunchError(VmconfineError):
    """Starting, verifying or stopping QEMU failed."""


class NotRunningError(VmconfineError):
    """The named domain is not running in this instance."""
