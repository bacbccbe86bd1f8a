"""Errors of the snapshot stores; each has a ``kind`` (the wire ``data.kind``)."""

from __future__ import annotations

__all__ = [
    "ChunkInvalid",
    "InvalidStoreName",
    "ParentNotInStore",
    "StoreConfigInvalid",
    "StoreError",
    "StoreSnapshotNotFound",
    "StoreUnavailable",
    "UnknownStore",
]


class StoreError(Exception):
    """Base of every store error."""

    kind = "StoreError"


class StoreConfigInvalid(StoreError):
    """A ``[stores.NAME]`` table is wrong (bad url, missing bucket, ...)."""

    kind = "StoreConfigInvalid"


class UnknownStore(StoreError):
    """No ``[stores.NAME]`` of that name in the configuration."""

    kind = "UnknownStore"

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none configured"
        super().__init__(f"unknown store {name!r} (stores: {listed})")


class InvalidStoreName(StoreError):
    """A snapshot name outside ``[A-Za-z0-9._/-]{1,200}`` (or a prefix likewise)."""

    kind = "InvalidStoreName"


class StoreSnapshotNotFound(StoreError):
    """No snapshot of that name in the store."""

    kind = "StoreSnapshotNotFound"

    def __init__(self, store: str, name: str) -> None:
        super().__init__(f"store {store!r} holds no snapshot named {name!r}")


class ParentNotInStore(StoreError):
    """A Diff is pushed before the snapshot it applies to."""

    kind = "ParentNotInStore"


class StoreUnavailable(StoreError):
    """The object store failed a request (after retries)."""

    kind = "StoreUnavailable"


class ChunkInvalid(StoreError):
    """A chunk is missing from the store or its bytes do not match its address."""

    kind = "ChunkInvalid"

    def __init__(self, snapshot: str, address: str, offset: int, reason: str) -> None:
        self.snapshot = snapshot
        self.address = address
        self.offset = offset
        super().__init__(
            f"chunk {address} of snapshot {snapshot!r} (memory offset {offset:#x}) {reason}; "
            "refusing to use it"
        )
