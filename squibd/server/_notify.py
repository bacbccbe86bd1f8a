"""sd_notify(3) without libsystemd: READY=1, STATUS=, STOPPING=1, WATCHDOG=1.

The service manager passes ``$NOTIFY_SOCKET`` (a path, or an abstract name
starting with ``@``); each notification is one datagram of ``KEY=VALUE``
lines. The watchdog interval comes from ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID`` when set, which must be our pid); systemd wants a ping at
least every interval, and sd_watchdog_enabled(3) recommends half of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

import attrs

__all__ = ["Notifier"]

_USEC_PER_S: Final = 1_000_000
#: sd_watchdog_enabled(3): ping at half the interval.
_WATCHDOG_FRACTION: Final = 0.5


@attrs.define(eq=False)
class Notifier:
    """Sends notifications to the service manager, if there is one.

    Args:
        address: ``$NOTIFY_SOCKET`` (``None``: every call is a no-op).
        watchdog_usec: ``$WATCHDOG_USEC`` when it applies to this process.
    """

    address: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if raw and raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1, or ``None`` when no watchdog is configured."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / _USEC_PER_S * _WATCHDOG_FRACTION

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY="1", STATUS="...")``).

        Returns whether a datagram was sent; errors are swallowed, as
        sd_notify's are: the daemon works the same without a manager.
        """
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.connect(address)
                s.send(payload)
        except OSError:
            return False
        return True
