"""The wire converter and the error mapping: strict params, readable paths, SPEC messages."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.api import make_wire_converter, map_exception, structure_params
from squibd.api.methods import METHODS
from squibd.api.models import SnapshotCreateParams, SnapshotLoadParams, VmCreateParams
from squibd.api.openrpc import build_document, render_document
from squibd.rpc import RpcError
from squibd.snapshot import errors as snap_errors
from squibd.vm import errors as vm_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERTER = make_wire_converter()

_VALID_CREATE = {
    "vm_id": "vm-1", "vcpu_count": 2, "mem_size_mib": 64,
    "guest": {"program": "memwriter", "working_set_mib": 8},
}  # fmt: skip


def _invalid(params: Any, cls: type) -> str:
    with pytest.raises(RpcError) as info:
        structure_params(CONVERTER, params, cls)
    assert info.value.error.code == -32602
    return info.value.error.message


def test_valid_params_are_structured() -> None:
    params = structure_params(CONVERTER, _VALID_CREATE, VmCreateParams)
    assert params.vm_id == "vm-1" and params.track_dirty_pages is False
    assert params.guest.program == "memwriter"
    assert params.guest.params == {"working_set_mib": 8}


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"vcpu_count": 0}, "params.vcpu_count"),
        ({"vcpu_count": 33}, "params.vcpu_count"),
        ({"vcpu_count": "2"}, "params.vcpu_count"),
        ({"vcpu_count": True}, "params.vcpu_count"),
        ({"vm_id": "has space"}, "params.vm_id"),
        ({"vm_id": "x" * 65}, "params.vm_id"),
        ({"track_dirty_pages": 1}, "params.track_dirty_pages"),
        ({"guest": {"program": "doom"}}, "params.guest.program"),
        ({"guest": {"program": "counter", "speed": 1}}, "params.guest.speed: unknown field"),
        ({"guest": {"program": "memwriter", "stride_pages": -1}}, "params.guest.stride_pages"),
        ({"guest": {"program": "memwriter", "stride_pages": "2"}}, "params.guest.stride_pages"),
        ({"guest": {}}, "params.guest"),
        ({"surprise": 1}, "params.surprise"),
    ],
)
def test_invalid_params_name_the_field_path(change: dict[str, Any], path: str) -> None:
    message = _invalid({**_VALID_CREATE, **change}, VmCreateParams)
    assert path in message


def test_nested_literal_error_names_full_path() -> None:
    params = {"vm_id": "v", "snapshot_path": "/a.snap",
              "mem_backend": {"backend_type": "Disk", "backend_path": "/a.mem"}}  # fmt: skip
    message = _invalid(params, SnapshotLoadParams)
    assert "params.mem_backend.backend_type" in message and "'File', 'Uffd'" in message


def test_missing_required_field_is_named() -> None:
    message = _invalid({"vm_id": "v", "snapshot_path": "/a.snap"}, SnapshotCreateParams)
    assert "params.mem_file_path: required field missing" in message


def test_positional_params_are_refused() -> None:
    assert "by-name" in _invalid([1, 2], SnapshotCreateParams)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_any_unknown_key_is_rejected_by_name(key: str) -> None:
    fields = {"vm_id", "vcpu_count", "mem_size_mib", "guest", "track_dirty_pages"}
    if key in fields:
        return
    assert f"params.{key}: unknown field" in _invalid({**_VALID_CREATE, key: 1}, VmCreateParams)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=4) | st.none(),
                       max_size=5))  # fmt: skip
def test_structuring_never_fails_with_anything_but_invalid_params(params: dict[str, Any]) -> None:
    for spec in METHODS.values():
        try:
            structure_params(CONVERTER, params, spec.params)
        except RpcError as exc:
            assert exc.error.code == -32602


_SNAPSHOT_ERRORS = [
    snap_errors.QuiesceTimeout(),
    snap_errors.MagicMismatch(0xDEADBEEF, 0x710198486640000),
    snap_errors.VersionMismatch("2.0.0", "1.0.0"),
    snap_errors.CrcMismatch(),
    snap_errors.TooShort(),
    snap_errors.Incompatible(),
    snap_errors.AtomicCommitFailed(errno.EXDEV),
    snap_errors.AtomicCommitCrossFs("/a/b.snap", "/tmp"),
    snap_errors.InvalidPath("snapshot_path must be absolute"),
    snap_errors.Bitcode("field x"),
    snap_errors.SizeLimitExceeded(10_000_000),
    snap_errors.MemoryIo(errno.ENOSPC),
    snap_errors.Io(errno.EIO),
    snap_errors.Capture("vcpu 0"),
]


@pytest.mark.parametrize("error", _SNAPSHOT_ERRORS, ids=lambda e: e.kind)
def test_every_snapshot_kind_maps_to_32001_with_spec_message(
    error: snap_errors.SnapshotError,
) -> None:
    mapped = map_exception(error)
    assert mapped is not None
    assert mapped.error.code == -32001
    assert mapped.error.data == {"kind": error.kind, "fault_message": str(error)}
    assert mapped.error.message == str(error)


def test_all_fourteen_kinds_are_covered() -> None:
    assert {e.kind for e in _SNAPSHOT_ERRORS} == set(snap_errors.TEMPLATES)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (vm_errors.UnknownVm("v"), -32002),
        (vm_errors.WrongVmState("v", "Running", "load a snapshot into"), -32003),
        (vm_errors.Busy("v", "snapshot save"), -32004),
        (vm_errors.DiffNotAllowed("v"), -32003),
    ],
)
def test_vm_errors_map_to_their_codes(error: Exception, code: int) -> None:
    mapped = map_exception(error)
    assert mapped is not None and mapped.error.code == code
    assert mapped.error.data["fault_message"] == str(error)


def test_unknown_exception_is_not_mapped() -> None:
    assert map_exception(RuntimeError("bug")) is None


def test_committed_openrpc_matches_the_code() -> None:
    with open(os.path.join(REPO, "protocol", "openrpc.json")) as f:
        committed = f.read()
    assert committed == render_document(), "run: python scripts/gen_openrpc.py"


def test_openrpc_lists_every_method_with_strict_params() -> None:
    document = build_document()
    assert [m["name"] for m in document["methods"]] == list(METHODS)
    create = next(m for m in document["methods"] if m["name"] == "vm.create")
    vcpus = next(p for p in create["params"] if p["name"] == "vcpu_count")
    assert vcpus["schema"] == {"type": "integer", "description": "vCPUs",
                               "minimum": 1, "maximum": 32}  # fmt: skip
    for schema in document["components"]["schemas"].values():
        for variant in schema.get("oneOf", [schema]):
            assert variant["additionalProperties"] is False
    json.dumps(document)  # JSON-ready
