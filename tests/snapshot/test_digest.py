"""Chunk digests: algorithm names, sizes, and agreement with the reference hash."""

from __future__ import annotations

import errno
import os
import tempfile
import threading

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.digest import (
    DEFAULT_ALGORITHM,
    UnknownDigestAlgorithm,
    available_algorithms,
    digest,
    digest_function,
    file_chunk_digests,
    manifest_digests,
)
from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.manifest import DIGEST_SIZES, Extent


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=10_000))
def test_xxh3_matches_reference_and_accepts_memoryviews(data: bytes) -> None:
    expected = xxhash.xxh3_64(data).digest()
    assert digest("xxh3-64", data) == expected
    assert digest("xxh3-64", memoryview(bytearray(data))) == expected


def test_known_xxh3_vector() -> None:
    # XXH3_64bits("") = 0x2d06800538d394c2 (xxHash reference test vector)
    assert digest("xxh3-64", b"") == bytes.fromhex("2d06800538d394c2")


def test_every_available_algorithm_has_the_manifest_size() -> None:
    assert DEFAULT_ALGORITHM in available_algorithms()
    for name in available_algorithms():
        assert len(digest(name, b"abc")) == DIGEST_SIZES[name]


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(UnknownDigestAlgorithm, match="unknown digest algorithm"):
        digest_function("md5")


def test_digests_from_many_threads_agree() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    expected = digest("xxh3-64", data)
    results: list[bytes] = []
    lock = threading.Lock()

    def work() -> None:
        value = digest("xxh3-64", memoryview(data))
        with lock:
            results.append(value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 4


def test_manifest_digests_hash_each_chunk_of_each_extent() -> None:
    mib = 1024 * 1024
    data = bytes(range(256)) * (5 * mib // 256)
    # The first extent crosses the 2 MiB boundary, so it is two chunks.
    extents = (Extent(mib, 2 * mib), Extent(4 * mib, 4096))
    got = manifest_digests(lambda offset, length: data[offset : offset + length], extents)
    expected = b"".join(
        xxhash.xxh3_64_digest(data[start:end])
        for start, end in ((mib, 2 * mib), (2 * mib, 3 * mib), (4 * mib, 4 * mib + 4096))
    )
    assert got == expected


def _memory_file(data: bytes) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    return fd


def test_file_chunk_digests_read_back_what_manifest_digests_compute() -> None:
    mib = 1024 * 1024
    data = os.urandom(5 * mib)
    extents = (Extent(4096, 4096), Extent(mib, 2 * mib), Extent(4 * mib + 8192, 4096))
    fd = _memory_file(data)
    try:
        expected = manifest_digests(lambda offset, length: data[offset : offset + length], extents)
        assert file_chunk_digests(fd, extents) == expected
        # A chunk with a known digest is not read: a wrong known digest shows up as is.
        wrong = b"\xff" * 8
        got = file_chunk_digests(fd, extents, known=lambda c: wrong if c.offset == mib else None)
        assert got[8:16] == wrong and got[:8] == expected[:8] and got[16:] == expected[16:]
    finally:
        os.close(fd)


def test_file_chunk_digests_fail_typed_on_a_short_file_and_on_cancel() -> None:
    fd = _memory_file(b"x" * 8192)
    try:
        with pytest.raises(MemoryIo) as short:
            file_chunk_digests(fd, (Extent(4096, 8192),))
        assert short.value.errno == errno.EIO
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(MemoryIo) as cancelled:
            file_chunk_digests(fd, (Extent(0, 4096),), cancel=cancel)
        assert cancelled.value.errno == errno.ECANCELED
        with pytest.raises(KeyboardInterrupt):
            file_chunk_digests(fd, (Extent(0, 4096),), cancel=cancel, cancelled=KeyboardInterrupt)
    finally:
        os.close(fd)
