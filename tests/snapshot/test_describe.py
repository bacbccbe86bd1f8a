"""``squibd --describe-snapshot``: what it shows for good, damaged and foreign files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.cli import daemon
from squibd.cli import describe as describe_cli
from squibd.snapshot.compat import MIB
from squibd.snapshot.describe import (
    FORMAT_FIRECRACKER,
    FORMAT_SQUIBD,
    default_memory_path,
    describe_snapshot,
    render_text,
)
from squibd.snapshot.envelope import MAGIC_X86_64, crc64, encode_state
from tests.snapshot._states import pattern_memory, sample_manifest, sample_x86_state

MEM_MIB = 2
MEMORY = pattern_memory(MEM_MIB * MIB)
STATE = sample_x86_state(2, MEM_MIB, manifest=sample_manifest(MEM_MIB, memory=MEMORY))
STATE_BYTES = encode_state(STATE)


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    path = tmp_path / "vm.snap"
    path.write_bytes(STATE_BYTES)
    (tmp_path / "vm.mem").write_bytes(MEMORY)
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """Run the describe CLI in this process through the ``squibd`` dispatcher."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = daemon.main(list(args))
    return code, out.getvalue()


def test_good_pair_is_described_and_exits_0(snap: Path) -> None:
    code, out = run_cli("--describe-snapshot", str(snap), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["magic"] == "0x710198486640000" and data["arch"] == "x86_64"
    assert (data["version"], data["expected_version"]) == ("1.1.0", "1.1.0")
    assert data["format"] == FORMAT_SQUIBD and data["crc_ok"] is True
    assert (data["vcpu_count"], data["mem_size_mib"], data["track_dirty_pages"]) == (2, 2, True)
    assert [d["kind"] for d in data["devices"]] == ["serial", "virtio-block", "virtio-net"]
    assert data["mmds_present"] is True
    assert data["manifest"]["kind"] == "Full"
    assert data["manifest"]["extents"] == 1
    assert data["manifest"]["pair_id"] == STATE.memory.pair_id
    assert data["memory_file"]["exists"] and data["memory_file"]["matches"]
    assert data["errors"] == [] and data["ok"] is True


def test_text_output_names_every_field(snap: Path) -> None:
    code, out = run_cli("--describe-snapshot", str(snap))
    assert code == 0
    for needle in ("0x710198486640000 (x86_64)", "1.1.0 (squibd reads 1.1.0)", "crc_ok: yes",
                   "vCPUs: 2", "2 MiB", "dirty tracking: yes", "MMDS: present",
                   "virtio-net 'eth0'", "manifest: Full", STATE.memory.pair_id,
                   "vm.mem: matches", "status: ok"):  # fmt: skip
        assert needle in " ".join(out.split())


def test_damaged_file_still_shows_what_it_can_and_exits_1(snap: Path) -> None:
    data = bytearray(STATE_BYTES)
    data[len(data) // 2] ^= 0x01  # inside a blob: the body still decodes
    snap.write_bytes(bytes(data))
    code, out = run_cli("--describe-snapshot", str(snap), "--json")
    assert code == 1
    result = json.loads(out)
    assert result["crc_ok"] is False
    assert result["vcpu_count"] == 2  # shown despite the damage
    assert [e["kind"] for e in result["errors"]] == ["CrcMismatch"]
    assert any("damaged" in note for note in result["notes"])


def test_truncated_file_is_too_short(snap: Path) -> None:
    snap.write_bytes(STATE_BYTES[:5])
    description = describe_snapshot(str(snap))
    assert [e.kind for e in description.errors] == ["TooShort"]
    assert description.file_size == 5
    assert "file is too short" in render_text(description)


def test_unknown_magic_is_reported(snap: Path) -> None:
    data = struct.pack("<QQ", 0xDEADBEEF, 5) + b"1.0.0" + b"\x80"
    snap.write_bytes(data + struct.pack("<Q", crc64(data)))
    description = describe_snapshot(str(snap))
    assert description.magic == 0xDEADBEEF and description.arch is None
    assert description.errors[0].message == (
        "snapshot magic mismatch (file: 0xdeadbeef, expected: 0x710198486640000)"
    )


@pytest.mark.parametrize("version", [b"4.0.0", b"1.0.0"])
def test_firecracker_bincode_era_file_is_recognised(snap: Path, version: bytes) -> None:
    # Firecracker's header (magic, u64 length, version) followed by a bincode body:
    # VmInfo starts with mem_size_mib as a u64, then bools and enums.
    body = struct.pack("<QB", 128, 0) + bytes(range(40))
    data = struct.pack("<QQ", MAGIC_X86_64, len(version)) + version + body
    snap.write_bytes(data + struct.pack("<Q", crc64(data)))
    description = describe_snapshot(str(snap))
    assert description.format == FORMAT_FIRECRACKER
    assert description.version == version.decode() and description.crc_ok is True
    assert description.vcpu_count is None
    assert any("Firecracker" in note for note in description.notes)
    assert not description.ok
    if version == b"4.0.0":
        assert description.errors[0].kind == "VersionMismatch"


def test_memory_file_of_wrong_size_does_not_match(snap: Path) -> None:
    Path(default_memory_path(str(snap))).write_bytes(MEMORY[:4096])
    description = describe_snapshot(str(snap))
    assert description.memory_file is not None
    assert description.memory_file.size_ok is False and not description.memory_file.matches
    assert not description.ok


def test_memory_file_of_another_pair_does_not_match(snap: Path) -> None:
    mem = default_memory_path(str(snap))
    try:
        os.setxattr(mem, "user.squibd.pair", b"another-pair")
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    description = describe_snapshot(str(snap))
    assert description.memory_file is not None
    assert description.memory_file.pair_ok is False
    assert run_cli("--describe-snapshot", str(snap))[0] == 1


def test_missing_memory_file(snap: Path, tmp_path: Path) -> None:
    os.unlink(default_memory_path(str(snap)))
    description = describe_snapshot(str(snap))
    assert description.memory_file is not None and not description.memory_file.exists
    assert description.ok  # the state file itself is fine
    code, out = run_cli("--describe-snapshot", str(snap), "--memory-file", str(tmp_path / "x"))
    assert code == 1 and "missing" in out


def test_verify_full_catches_a_corrupt_memory_byte(snap: Path) -> None:
    assert run_cli("--describe-snapshot", str(snap), "--verify", "full")[0] == 0
    mem = default_memory_path(str(snap))
    with open(mem, "r+b") as f:
        f.seek(MIB + 100)
        f.write(b"\xff")
    # Without the pair xattr even the size check verifies the content (as load does).
    assert run_cli("--describe-snapshot", str(snap), "--verify", "size")[0] == 1
    try:
        os.setxattr(mem, "user.squibd.pair", STATE.memory.pair_id.encode())
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    assert run_cli("--describe-snapshot", str(snap), "--verify", "size")[0] == 0
    code, out = run_cli("--describe-snapshot", str(snap), "--verify", "full")
    assert code == 1
    assert "memory file I/O error" in out and "FAILED" in out


def test_default_memory_path() -> None:
    assert default_memory_path("/a/vm.snap") == "/a/vm.mem"
    assert default_memory_path("/a/vm.state") == "/a/vm.state.mem"


@pytest.mark.parametrize(
    "argv",
    [["--describe-snapshot"], ["--describe-snapshot", "/x", "--verify", "bogus"],
     ["--describe-snapshot", "/x", "--unknown"]],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert run_cli(*argv)[0] == 2


def test_help_exits_0() -> None:
    code, out = run_cli("--describe-snapshot", "--help")
    assert code == 0 and "--memory-file" in out


def test_console_script_in_a_real_process(snap: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "squibd.cli.daemon", "--describe-snapshot", str(snap), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["vcpu_count"] == 2
    assert describe_cli.EXIT_DAMAGED == 1 and describe_cli.EXIT_USAGE == 2


def test_format_demo_writes_describes_and_detects_the_corrupted_copy(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "demo_format.py"
    run = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert describe_snapshot(str(tmp_path / "demo.snap"), verify="full").ok
    damaged = describe_snapshot(str(tmp_path / "damaged.snap"))
    assert damaged.crc_ok is False and not damaged.ok
    assert "result: as expected" in run.stdout


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"header"]))
def test_describe_never_raises_on_arbitrary_files(data: bytes, mode: bytes) -> None:
    import tempfile

    if mode:  # a valid header and CRC around random bytes reaches the body decoder
        data = struct.pack("<QQ", MAGIC_X86_64, 5) + b"1.0.0" + data
        data += struct.pack("<Q", crc64(data))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x.snap")
        Path(path).write_bytes(data)
        description = describe_snapshot(path)
    assert not description.ok
    assert render_text(description)
    json.dumps(description.to_json())


def test_describe_of_a_damaged_body_with_valid_crc_names_the_field(snap: Path) -> None:
    import msgpack

    from squibd.snapshot.codec import encode_body

    body = msgpack.unpackb(encode_body(STATE), raw=False)
    body["vcpu_states"][1]["regs"]["rip"] = "oops"
    data = STATE_BYTES[:21] + msgpack.packb(body, use_bin_type=True)
    snap.write_bytes(data + struct.pack("<Q", crc64(data)))
    description = describe_snapshot(str(snap))
    assert description.crc_ok is True and description.format == FORMAT_SQUIBD
    assert description.errors[0].kind == "Bitcode"
    assert "vcpu_states.1.regs.rip" in description.errors[0].message
