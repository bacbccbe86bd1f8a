"""Line framing: bytes in, complete lines out, with a cap on buffered input.

Theory of operation
-------------------
The transport of SPEC section 9 carries one JSON text per ``\\n``-terminated
line. :class:`LineSplitter` accumulates received bytes and hands back whole
lines. It never buffers more than ``max_line`` bytes of an unfinished line:
as soon as a line grows past the cap, the splitter reports
:data:`LINE_TOO_LONG` once and then *discards* bytes until the next newline,
so the peer can carry on with its next request on the same connection
(h11's ``max_incomplete_event_size`` plays the same role).

End of input is signalled with ``feed(b"")``. A final line without its
newline is still delivered (clients such as ``printf '{...}' | socat``
often omit it); after that :meth:`next_line` returns :data:`END`.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["DEFAULT_MAX_LINE", "END", "LINE_TOO_LONG", "NEED_DATA", "LineSplitter", "Signal"]

#: SPEC section 9: "A line over 1 MiB (default) is refused".
DEFAULT_MAX_LINE: Final = 1024 * 1024

_NEWLINE: Final = b"\n"


class Signal(enum.Enum):
    """Non-line results of :meth:`LineSplitter.next_line`."""

    NEED_DATA = "NEED_DATA"
    LINE_TOO_LONG = "LINE_TOO_LONG"
    END = "END"


NEED_DATA: Final = Signal.NEED_DATA
LINE_TOO_LONG: Final = Signal.LINE_TOO_LONG
END: Final = Signal.END


class LineSplitter:
    """Split a byte stream into lines of at most ``max_line`` bytes.

    Args:
        max_line: the largest accepted line, newline excluded.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self.max_line = max_line
        self._buffer = bytearray()
        self._scan_from = 0  # bytes before this offset hold no newline
        self._discarding = False
        self._eof = False
        self._overflow_pending = False

    @property
    def buffered(self) -> int:
        """How many bytes of unfinished input are held (never above ``max_line + 1``)."""
        return len(self._buffer)

    @property
    def at_eof(self) -> bool:
        """Whether ``feed(b"")`` has been called."""
        return self._eof

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` marks the end of input.

        Raises:
            RuntimeError: data fed after the end of input.
        """
        if self._eof:
            if data:
                raise RuntimeError("data received after end of input")
            return
        if not data:
            self._eof = True
            return
        if self._discarding:
            cut = data.find(_NEWLINE)
            if cut < 0:
                return
            self._discarding = False
            data = data[cut + 1 :]
        self._buffer += data
        self._check_overflow()

    def _check_overflow(self) -> None:
        if self._buffer.find(_NEWLINE, self._scan_from) >= 0:
            return
        self._scan_from = len(self._buffer)
        if len(self._buffer) > self.max_line:
            self._buffer.clear()
            self._scan_from = 0
            self._discarding = True
            self._overflow_pending = True

    def next_line(self) -> bytes | Signal:
        """Return the next complete line (without ``\\n``) or a :class:`Signal`.

        Returns :data:`LINE_TOO_LONG` once per over-long line, at the point
        where it occurred in the stream; :data:`NEED_DATA` when more input is
        needed; :data:`END` after the end of input and the last line.
        """
        if self._overflow_pending:
            # Overflow clears the buffer, so every buffered line came after it.
            self._overflow_pending = False
            return LINE_TOO_LONG
        cut = self._buffer.find(_NEWLINE)
        if cut >= 0:
            if cut > self.max_line:
                # A long line that arrived in one chunk together with its newline.
                del self._buffer[: cut + 1]
                self._scan_from = 0
                return LINE_TOO_LONG
            line = bytes(self._buffer[:cut])
            del self._buffer[: cut + 1]
            self._scan_from = 0
            self._check_overflow()
            return line
        if self._eof:
            if self._buffer:
                line = bytes(self._buffer)
                self._buffer.clear()
                if len(line) > self.max_line:
                    return LINE_TOO_LONG
                return line
            return END
        return NEED_DATA
