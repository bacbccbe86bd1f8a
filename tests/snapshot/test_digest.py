"""Chunk digests: algorithm names, sizes, and agreement with the reference hash."""

from __future__ import annotations

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
    manifest_digests,
)
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
