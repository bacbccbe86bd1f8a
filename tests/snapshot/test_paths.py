"""Client path validation (SPEC section 10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.errors import InvalidPath
from squibd.snapshot.paths import MAX_PATH_BYTES, MAX_SOCKET_PATH_BYTES, validate_path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "snapshot_path is empty"),
        ("relative/x.snap", "snapshot_path must be absolute"),
        ("/a/../etc/passwd", "snapshot_path must not contain a '..' component"),
        ("/a/b/..", "must not contain a '..' component"),
        ("/a\0b", "snapshot_path contains a NUL byte"),
        ("/a/\udcff", "snapshot_path is not valid UTF-8"),
        ("/" + "a" * MAX_PATH_BYTES, f"is {MAX_PATH_BYTES + 1} bytes long, more than 1024"),
        ("/srv/snaps/", "names a directory"),
        (5, "snapshot_path must be a string"),
    ],
)
def test_bad_paths_are_refused_with_a_reason(path: object, reason: str) -> None:
    with pytest.raises(InvalidPath) as info:
        validate_path(path)
    assert reason in str(info.value)
    assert str(info.value).startswith("invalid snapshot path: ")


def test_good_paths_pass_unchanged() -> None:
    for path in ("/x.snap", "/srv/a..b/c.snap", "/srv/./x", "/" + "é" * 511):
        assert validate_path(path) == path


def test_multibyte_limit_counts_utf8_bytes() -> None:
    with pytest.raises(InvalidPath, match="1025 bytes"):
        validate_path("/" + "é" * 512)


def test_socket_paths_are_limited_to_107_bytes() -> None:
    ok = "/" + "s" * (MAX_SOCKET_PATH_BYTES - 1)
    assert validate_path(ok, what="backend_path", socket=True) == ok
    with pytest.raises(InvalidPath, match="backend_path is 108 bytes long, more than 107"):
        validate_path(ok + "s", what="backend_path", socket=True)


def test_allowed_roots_use_the_resolved_parent(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    assert validate_path(f"{root}/a.snap", allowed_roots=[str(root)])
    (root / "sub").mkdir()
    assert validate_path(f"{root}/sub/a.snap", allowed_roots=[str(outside), str(root)])
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        validate_path(f"{root}/escape/a.snap", allowed_roots=[str(root)])
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        validate_path(f"{tmp_path}/rootx/a.snap", allowed_roots=[str(root)])
    with pytest.raises(InvalidPath, match="mem_file_path is outside"):
        validate_path(f"{outside}/a.mem", what="mem_file_path", allowed_roots=[str(root)])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_accepted_or_refused_with_invalid_path(path: str) -> None:
    try:
        result = validate_path(path)
    except InvalidPath:
        return
    assert result == path
    assert os.path.isabs(path) and ".." not in path.split("/") and "\0" not in path
