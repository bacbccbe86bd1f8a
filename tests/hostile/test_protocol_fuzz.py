"""Issue 10: byte-level protocol fuzzing against a real squibd subprocess.

Hypothesis builds JSON-RPC-shaped traffic and then breaks it: random splits
across writes, deep nesting, batches, every JSON number extreme, lone
surrogates, other encodings (UTF-16, Latin-1, a BOM, invalid UTF-8), NULs and
blank lines. After each case the daemon must still be up and answer a
well-behaved client's daemon.status, and everything it answered must be
valid JSON-RPC without a -32603. Bounded: a few hundred cases, no timings.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._daemon import Daemon, exchange

_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Cheap methods only (nothing here may create a VM or write a file), plus nonsense.
_METHODS = st.sampled_from([
    "daemon.status", "vm.list", "vm.describe", "vm.destroy", "vm.start", "vm.pause",
    "snapshot.rebase", "vm.read_memory", "$/cancelRequest", "$/progress", "", "x", "\ud800",
    "daemon.status\x00", "vm.list\n",
])  # fmt: skip
_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["\ud800", "\udfff", "a\udc80b", "\U0001f600", "\x00", "/tmp", "ghost"]
)
_NUMBERS = st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [2**63, 2**64, -(2**63) - 1, 10**300, 0.0, -0.0, 1e308]
)
_SCALARS = st.none() | st.booleans() | _NUMBERS | _TEXT
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_IDS = st.none() | st.integers() | _TEXT | st.floats(allow_nan=False) | st.booleans()
_PARAM_KEYS = st.sampled_from(["vm_id", "id", "progress_token", "length", "guest_addr"]) | _TEXT


@st.composite
def _message(draw: st.DrawFn) -> Any:
    message: dict[Any, Any] = {}
    if draw(st.booleans()):
        message["jsonrpc"] = draw(st.sampled_from(["2.0", "2.0", "1.0", 2.0]))
    if draw(st.booleans()):
        message["id"] = draw(_IDS)
    message["method"] = draw(_METHODS)
    if draw(st.booleans()):
        message["params"] = draw(st.dictionaries(_PARAM_KEYS, _JSON, max_size=4) | _JSON)
    if draw(st.integers(0, 9)) == 0:
        message[draw(_TEXT)] = draw(_JSON)
    return message


def _dumps(value: Any, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8


_ODD_NUMBERS = [b"9" * 4300, b"9" * 4301, b"1e999", b"-1e999", b"1e-999", b"NaN", b"Infinity",
                b"0x10", b"01"]  # fmt: skip
_SEPARATORS = st.sampled_from([b"\n", b"\r\n", b"\n\n\n", b" \n", b"\n" * 2000])


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["message", "batch", "nested", "number", "raw", "encoded"]))
    ascii_only = draw(st.booleans())
    if kind == "message":
        line = _dumps(draw(_message()), ascii_only)
    elif kind == "batch":
        line = _dumps(draw(st.lists(_message() | _JSON, max_size=8)), ascii_only)
    elif kind == "nested":
        depth = draw(st.sampled_from([1, 63, 64, 65, 200, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = _dumps(draw(_message()), True)
        line = opener * depth + inner + closer * draw(st.sampled_from([0, depth, depth + 1]))
    elif kind == "number":
        digits = draw(st.sampled_from(_ODD_NUMBERS))
        line = b'{"jsonrpc":"2.0","id":' + digits + b',"method":"daemon.status"}'
    elif kind == "raw":
        line = draw(st.binary(max_size=64))
    else:
        text = json.dumps(draw(_message()), ensure_ascii=False)
        encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "utf-8-sig"]))
        line = text.encode(encoding, "replace")
    if draw(st.integers(0, 4)) == 0:  # flip a few bytes
        data = bytearray(line)
        for _ in range(draw(st.integers(1, 3))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        line = bytes(data)
    return line


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="sqd-", dir="/tmp") as directory:
        d = Daemon(directory, "--log-level", "error")
        try:
            yield d
        finally:
            assert d.stop() == 0, "the daemon survived the fuzzing and stops cleanly"


def _check_answers(answers: list[Any]) -> None:
    for answer in answers:
        items = answer if isinstance(answer, list) else [answer]
        assert items, "an empty batch is never answered"
        for item in items:
            assert item["jsonrpc"] == "2.0"
            assert ("result" in item) != ("error" in item)
            if "error" in item:
                assert item["error"]["code"] != -32603, item


@_SETTINGS
@given(
    lines=st.lists(_line(), min_size=1, max_size=6),
    separators=st.lists(_SEPARATORS, min_size=6, max_size=6),
    chunks=st.none() | st.lists(st.integers(1, 4096), max_size=8),
)
def test_fuzzed_lines_never_take_the_daemon_down(
    daemon: Daemon, lines: list[bytes], separators: list[bytes], chunks: list[int] | None
) -> None:
    data = b"".join(line + sep for line, sep in zip(lines, separators, strict=False))
    _check_answers(exchange(daemon.path, data, chunks=chunks))
    daemon.check_alive()


@_SETTINGS
@given(data=st.binary(max_size=2048), chunks=st.lists(st.integers(1, 64), max_size=8))
def test_random_bytes_never_take_the_daemon_down(
    daemon: Daemon, data: bytes, chunks: list[int]
) -> None:
    _check_answers(exchange(daemon.path, data, chunks=chunks))
    daemon.check_alive()
