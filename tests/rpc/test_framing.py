"""Line framing: chunking never changes the lines, the cap holds, the stream recovers."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.rpc import END, LINE_TOO_LONG, NEED_DATA, LineSplitter, Signal

_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"x"))


def _drain(splitter: LineSplitter) -> list[bytes | Signal]:
    out: list[bytes | Signal] = []
    while True:
        item = splitter.next_line()
        if item is NEED_DATA or item is END:
            return out
        out.append(item)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINE, max_size=12), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_chunking_yields_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(max_line=64)
    got: list[bytes | Signal] = []
    for chunk in _chunks(data, cuts):
        splitter.feed(chunk)
        got += _drain(splitter)
        assert splitter.buffered <= 64 + 1
    splitter.feed(b"")
    got += _drain(splitter)
    assert got == lines
    assert splitter.next_line() is END


@settings(max_examples=100, deadline=None)
@given(st.integers(9, 300), st.lists(st.integers(0, 10_000), max_size=20))
def test_oversize_line_is_reported_once_then_next_line_arrives(size: int, cuts: list[int]) -> None:
    data = b"a\n" + b"y" * size + b"\nnext\n"
    splitter = LineSplitter(max_line=8)
    got: list[bytes | Signal] = []
    for chunk in _chunks(data, cuts):
        splitter.feed(chunk)
        got += _drain(splitter)
        assert splitter.buffered <= 8 + 1 or b"\n" in data
    assert got == [b"a", LINE_TOO_LONG, b"next"]


def test_buffer_stays_capped_while_a_huge_line_streams_in() -> None:
    splitter = LineSplitter(max_line=16)
    for _ in range(1000):
        splitter.feed(b"z" * 100)
        assert splitter.buffered <= 16 + 100
    assert splitter.next_line() is LINE_TOO_LONG
    assert splitter.next_line() is NEED_DATA
    splitter.feed(b"tail-of-long\nok\n")
    assert splitter.next_line() == b"ok"


def test_last_line_without_newline_is_delivered_at_end() -> None:
    splitter = LineSplitter()
    splitter.feed(b'{"a":1}')
    assert splitter.next_line() is NEED_DATA
    splitter.feed(b"")
    assert splitter.next_line() == b'{"a":1}'
    assert splitter.next_line() is END


def test_line_exactly_at_the_cap_is_accepted() -> None:
    splitter = LineSplitter(max_line=4)
    splitter.feed(b"abcd\nabcde\n")
    assert splitter.next_line() == b"abcd"
    assert splitter.next_line() is LINE_TOO_LONG
