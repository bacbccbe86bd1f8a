"""Golden tests of the 14 error kinds (SPEC section 2) and protocol/errors.json."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from squibd.snapshot import errors
from squibd.snapshot.errors import (
    TEMPLATES,
    AtomicCommitCrossFs,
    AtomicCommitFailed,
    Bitcode,
    Capture,
    CrcMismatch,
    Incompatible,
    InvalidPath,
    Io,
    MagicMismatch,
    MemoryIo,
    QuiesceTimeout,
    SizeLimitExceeded,
    SnapshotError,
    TooShort,
    VersionMismatch,
)

REPO = Path(__file__).resolve().parents[2]
ERRORS_JSON = REPO / "protocol" / "errors.json"
SPEC = REPO.parent / "shared" / "SPEC.md"

#: (error instance, the byte-exact wire message of SPEC section 2).
GOLDEN: list[tuple[SnapshotError, str]] = [
    (QuiesceTimeout(), "a vCPU did not ack quiesce within the timeout"),
    (
        MagicMismatch(0xDEADBEEF, 0x0710_1984_8664_0000),
        "snapshot magic mismatch (file: 0xdeadbeef, expected: 0x710198486640000)",
    ),
    (VersionMismatch("2.0.0", "1.0.0"),
     "snapshot version 2.0.0 is incompatible with squib's 1.0.0"),
    (CrcMismatch(), "snapshot CRC64 mismatch"),
    (TooShort(), "snapshot file is too short to contain a CRC trailer"),
    (
        Incompatible("vcpu_states.0.lapic is 12 bytes"),
        "snapshot is from a different VMM (sysreg or GIC blob shape mismatch)",
    ),
    (
        AtomicCommitFailed(OSError(errno.ENOSPC, "ignored")),
        "atomic commit (rename) failed: No space left on device (os error 28)",
    ),
    (
        AtomicCommitCrossFs('/srv/a "b"\\c\n\t\x1b.snap', "/tmp/stage"),
        'snapshot temp-file path is on a different filesystem from the destination '
        '(dest="/srv/a \\"b\\"\\\\c\\n\\t\\u{1b}.snap", temp_dir="/tmp/stage"); '
        "rename(2) cannot be atomic across mounts",
    ),
    (InvalidPath("snapshot_path must be absolute"),
     "invalid snapshot path: snapshot_path must be absolute"),
    (Bitcode("vcpu_states.0.regs.rip: expected an integer, got str"),
     "snapshot encoding error: vcpu_states.0.regs.rip: expected an integer, got str"),
    (SizeLimitExceeded(10_000_000), "snapshot exceeds 10000000 byte deserialization limit"),
    (MemoryIo(errno.EIO), "memory file I/O error: Input/output error (os error 5)"),
    (Io(OSError(errno.ENOENT, "x")), "snapshot I/O error: No such file or directory (os error 2)"),
    (Capture("KVM_GET_REGS failed"), "snapshot capture/restore failure: KVM_GET_REGS failed"),
]  # fmt: skip


@pytest.mark.parametrize(("error", "message"), GOLDEN, ids=lambda v: getattr(v, "kind", ""))
def test_every_kind_has_its_exact_wire_message(error: SnapshotError, message: str) -> None:
    assert str(error) == message
    assert error.wire_message() == message
    assert error.kind == type(error).__name__
    assert isinstance(error, SnapshotError)


def test_golden_covers_all_fourteen_kinds() -> None:
    assert len(TEMPLATES) == 14
    assert [error.kind for error, _ in GOLDEN] == list(TEMPLATES)


@pytest.mark.parametrize(("error", "message"), GOLDEN, ids=lambda v: getattr(v, "kind", ""))
def test_message_matches_its_template(error: SnapshotError, message: str) -> None:
    # Every placeholder of the template becomes a non-empty run of text.
    parts = re.split(r"\{[a-z_]+\}", TEMPLATES[error.kind])
    pattern = "(.+)".join(re.escape(part) for part in parts)
    assert re.fullmatch(pattern, message, flags=re.DOTALL)


def render_errors_json() -> str:
    """The content protocol/errors.json must have (generated from errors.TEMPLATES)."""
    return json.dumps({"kinds": TEMPLATES}, indent=2, ensure_ascii=False) + "\n"


def test_protocol_errors_json_equals_the_code() -> None:
    if os.environ.get("SQUIBD_REGENERATE") == "1":
        ERRORS_JSON.write_text(render_errors_json(), encoding="utf-8")
    assert ERRORS_JSON.read_text(encoding="utf-8") == render_errors_json(), (
        "protocol/errors.json is stale; regenerate it with "
        "`SQUIBD_REGENERATE=1 pytest tests/snapshot/test_errors.py`"
    )


@pytest.mark.skipif(not SPEC.exists(), reason="../shared/SPEC.md is not beside this clone")
def test_templates_equal_the_spec_table() -> None:
    rows = re.findall(r"^\| (\w+) \| `(.+)` \|$", SPEC.read_text(encoding="utf-8"), re.M)
    assert dict(rows) == TEMPLATES


def test_io_error_from_a_real_failed_open_uses_os_error_format(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        os.open(tmp_path / "missing", os.O_RDONLY)
    assert str(Io(info.value)) == "snapshot I/O error: No such file or directory (os error 2)"
    assert "[Errno" not in str(Io(info.value))


def test_fixed_kinds_keep_detail_out_of_the_wire_message() -> None:
    error = Incompatible("gic_blob is empty")
    assert error.detail == "gic_blob is empty"
    assert "gic_blob" not in error.wire_message()


def test_quote_path_escapes_non_utf8_bytes() -> None:
    assert errors.quote_path(b"/a\xff") == '"/a\\xff"'
    assert errors.quote_path("/\x7f") == '"/\\u{7f}"'
