"""The object stores behind a snapshot store: S3 (through obstore) and a local directory.

Both offer the same small synchronous, thread-safe interface (:class:`Objects`):
whole-object put/get, existence, listing with sizes and modification times,
delete. Keys are ``/``-separated relative paths. S3 requests are signed by
obstore (the client library measured fastest here, see bench/store.py); a
bucket is created, when configured, with boto3's ``create_bucket`` (obstore
has no bucket calls). Transient failures are retried a few times, then
raised as :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol, TypeVar

import attrs

from .config import StoreConfig
from .errors import StoreConfigInvalid, StoreUnavailable

__all__ = ["FileObjects", "ObjectInfo", "Objects", "S3Objects", "open_objects"]

_RETRIES: Final = 3
_T = TypeVar("_T")


@attrs.frozen
class ObjectInfo:
    """One listed object: key (relative to the store prefix), size, modification time (s)."""

    key: str
    size: int
    mtime: float


class Objects(Protocol):
    """The object store interface the snapshot store needs (thread-safe)."""

    description: str

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def get_buffer(self, key: str) -> memoryview | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...


@attrs.define(eq=False)
class FileObjects:
    """A directory as an object store (``file:///dir``): objects are files, written atomically."""

    root: str
    description: str = ""

    def __attrs_post_init__(self) -> None:
        self.description = f"file://{self.root}"
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def get_buffer(self, key: str) -> memoryview | None:
        data = self.get(key)
        return None if data is None else memoryview(data)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        start = base if os.path.isdir(base) else os.path.dirname(base)
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))


@attrs.define(eq=False)
class S3Objects:
    """A bucket (and key prefix) of an S3-compatible store, through obstore."""

    config: StoreConfig
    bucket: str
    prefix: str
    description: str = ""
    _store: Any = None
    _bucket_checked: bool = False
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def __attrs_post_init__(self) -> None:
        from obstore.store import S3Store

        self.description = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        kwargs: dict[str, Any] = {}
        if self.config.endpoint:
            kwargs["endpoint"] = self.config.endpoint
            kwargs["virtual_hosted_style_request"] = False
        for key in ("region", "access_key_id", "secret_access_key"):
            value = getattr(self.config, key)
            if value:
                kwargs[key] = value
        options: Any = {"timeout": "60s", "connect_timeout": "5s"}
        if (self.config.endpoint or "").startswith("http://"):
            options["allow_http"] = True
        try:
            self._store = S3Store(self.bucket, client_options=options, **kwargs)
        except Exception as exc:  # obstore's configuration errors
            raise StoreConfigInvalid(f"store {self.description}: {exc}") from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, call: Callable[[], _T]) -> _T:
        for attempt in range(_RETRIES):
            try:
                return call()
            except FileNotFoundError:
                raise
            except Exception as exc:
                if attempt == _RETRIES - 1 or _permanent(exc):
                    raise StoreUnavailable(f"{self.description}: {what} failed: {exc}") from exc
                time.sleep(0.05 * 2**attempt)  # back off before retrying a failed request
        raise AssertionError("unreachable")

    def ensure_bucket(self) -> None:
        """Create the bucket when missing (``create_bucket = true``), once per process."""
        with self._lock:
            if self._bucket_checked or not self.config.create_bucket:
                return
            import boto3
            import botocore.exceptions

            client = boto3.client(
                "s3",
                endpoint_url=self.config.endpoint,
                region_name=self.config.region,
                aws_access_key_id=self.config.access_key_id,
                aws_secret_access_key=self.config.secret_access_key,
            )
            try:
                client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError:
                try:
                    client.create_bucket(Bucket=self.bucket)
                except botocore.exceptions.ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise StoreUnavailable(
                            f"cannot create bucket {self.bucket!r}: {exc}"
                        ) from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise StoreUnavailable(f"cannot reach {self.description}: {exc}") from exc
            self._bucket_checked = True

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        import obstore

        self._retry(f"PUT {key}", lambda: obstore.put(self._store, self._key(key), data))

    def get(self, key: str) -> bytes | None:
        import obstore

        try:
            result = self._retry(
                f"GET {key}", lambda: obstore.get(self._store, self._key(key)).bytes()
            )
        except FileNotFoundError:
            return None
        return bytes(result)

    def get_buffer(self, key: str) -> memoryview | None:
        """The object's bytes without a copy (obstore's buffer)."""
        import obstore

        try:
            result = self._retry(
                f"GET {key}", lambda: obstore.get(self._store, self._key(key)).bytes()
            )
        except FileNotFoundError:
            return None
        return memoryview(result)

    def exists(self, key: str) -> bool:
        import obstore

        try:
            self._retry(f"HEAD {key}", lambda: obstore.head(self._store, self._key(key)))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        import obstore

        full = self._key(prefix)
        skip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for batch in obstore.list(self._store, prefix=full):
                for meta in batch:
                    stamp = meta["last_modified"]
                    mtime = stamp.timestamp() if isinstance(stamp, datetime.datetime) else 0.0
                    yield ObjectInfo(str(meta["path"])[skip:], int(meta["size"]), mtime)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise StoreUnavailable(f"{self.description}: LIST {prefix} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._retry(f"DELETE {key}", lambda: obstore.delete(self._store, self._key(key)))


def _permanent(exc: Exception) -> bool:
    name = type(exc).__name__
    return name in ("PermissionDeniedError", "UnauthenticatedError", "InvalidPathError",
                    "UnknownConfigurationKeyError", "NotSupportedError")


def open_objects(config: StoreConfig, *, create: bool = True) -> FileObjects | S3Objects:
    """The object store of ``config``.

    ``create``: create the bucket when configured and missing (a reader of an
    existing snapshot skips that request).
    """
    scheme, where, prefix = config.parsed()
    if scheme == "file":
        return FileObjects(where)
    objects = S3Objects(config, where, prefix)
    if create:
        objects.ensure_bucket()
    return objects
