"""Issue 10, wire mapping: every error class squibd exports maps to a typed code and kind."""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import pkgutil

import pytest

import squibd
from squibd.api import errors as api_errors
from squibd.api.errors import internal_error, map_exception, wire_mapping
from squibd.api.methods import UnexpectedHandlerError
from squibd.kvm.errors import KvmIoctlError, KvmUnavailable, VcpuLimitExceeded
from squibd.rpc import RpcError
from squibd.uffd.errors import HandshakeFailed, PageServerUnavailable, UffdUnsupported

#: Codes a typed error may carry: -32602 and the application codes (issue 5).
TYPED_CODES = {-32602, -32001, -32002, -32003, -32004, -32005}
#: The wire errors themselves: RpcError is the answer, UnexpectedHandlerError wraps a bug.
WIRE_WRAPPERS = {RpcError, UnexpectedHandlerError}


def _exported_error_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    modules = [squibd.__name__]
    modules += [m.name for m in pkgutil.walk_packages(squibd.__path__, "squibd.")]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a platform-only module (none on Linux today)
            continue
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr, None)
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.startswith("squibd")
                and value not in WIRE_WRAPPERS
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


EXPORTED = _exported_error_classes()


def test_the_walk_finds_every_package_s_errors() -> None:
    packages = {cls.__module__.split(".")[1] for cls in EXPORTED}
    assert {"snapshot", "vm", "kvm", "uffd", "api", "server"} <= packages
    assert PageServerUnavailable in EXPORTED and HandshakeFailed in EXPORTED


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_exported_error_class_has_a_typed_mapping(cls: type[BaseException]) -> None:
    mapping = wire_mapping(cls)
    assert mapping is not None, f"{cls.__qualname__} would be answered -32603"
    assert mapping.code in TYPED_CODES
    assert mapping.kind and mapping.kind.isidentifier()


def test_a_new_error_class_maps_without_editing_the_mapping() -> None:
    # What another part adds later: by rpc_code, by its base class, or by its package.
    class StoreQuotaExceeded(Exception):
        rpc_code = -32004
        kind = "StoreQuotaExceeded"

    class NewUffdFailure(PageServerUnavailable):
        pass

    class NewSnapshotThing(Exception):
        pass

    NewSnapshotThing.__module__ = "squibd.store.errors"
    assert wire_mapping(StoreQuotaExceeded) == api_errors.WireMapping(-32004, "StoreQuotaExceeded")
    assert wire_mapping(NewUffdFailure) == api_errors.WireMapping(-32001, "NewUffdFailure")
    assert wire_mapping(NewSnapshotThing) == api_errors.WireMapping(-32001, "NewSnapshotThing")
    assert wire_mapping(KeyError) is None, "a standard-library exception is a bug"


@pytest.mark.parametrize(
    ("error", "code", "kind"),
    [
        (PageServerUnavailable("/run/ps.sock", "connection refused"), -32001,
         "PageServerUnavailable"),
        (HandshakeFailed("/run/ps.sock", "closed"), -32001, "HandshakeFailed"),
        (UffdUnsupported("userfaultfd()", "EPERM"), -32001, "UffdUnsupported"),
        (VcpuLimitExceeded(400, 240), -32602, "VcpuLimitExceeded"),
        (KvmIoctlError("KVM_CREATE_VM", errno.EINVAL), -32003, "KvmIoctlError"),
        (KvmIoctlError("KVM_CREATE_VCPU", errno.EMFILE), -32004, "ResourceExhausted"),
        (KvmUnavailable("/dev/kvm", OSError(errno.ENFILE, "x")), -32004, "ResourceExhausted"),
        (OSError(errno.EMFILE, "Too many open files"), -32004, "ResourceExhausted"),
        (OSError(errno.ENFILE, "x"), -32004, "ResourceExhausted"),
        (OSError(errno.ENOMEM, "x"), -32004, "ResourceExhausted"),
        (MemoryError(), -32004, "ResourceExhausted"),
        (PermissionError(errno.EACCES, "x", "/dev/kvm"), -32005, "PermissionDenied"),
        (OSError(errno.EIO, "x"), -32003, "OsError"),
    ],
)  # fmt: skip
def test_instances_map_to_typed_codes_and_readable_messages(
    error: BaseException, code: int, kind: str
) -> None:
    mapped = map_exception(error)
    assert mapped is not None
    assert (mapped.error.code, mapped.error.kind) == (code, kind)
    assert mapped.error.data["fault_message"] == mapped.error.message
    assert "[Errno" not in mapped.error.message, "OS errors as SPEC section 2 formats them"
    json.dumps(mapped.error.to_json())


def test_snapshot_errors_keep_their_spec_kind_even_for_resource_errnos() -> None:
    from squibd.snapshot.errors import Io

    mapped = map_exception(Io(errno.ENOSPC))
    assert mapped is not None and (mapped.error.code, mapped.error.kind) == (-32001, "Io")


def test_internal_error_names_no_python_class() -> None:
    error = internal_error(ZeroDivisionError("division by zero")).error
    text = json.dumps(error.to_json())
    assert error.code == -32603
    assert "ZeroDivisionError" not in text and "division" not in text
    assert error.data["incident"] in error.message


def test_standard_library_exceptions_stay_bugs() -> None:
    assert map_exception(KeyError("x")) is None
    assert map_exception(RecursionError()) is None
