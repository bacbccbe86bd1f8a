"""``[stores.NAME]`` configuration: where a store lives and how to reach it."""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Final

import attrs

from .errors import InvalidStoreName, StoreConfigInvalid

__all__ = ["NAME_RE", "StoreConfig", "check_name", "check_prefix", "default_cache_dir"]

#: Snapshot names (issue 12): ``[A-Za-z0-9._/-]``, 1 to 200 characters.
NAME_RE: Final = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid snapshot name.

    Raises:
        InvalidStoreName: naming the rule.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidStoreName(
            f"{what} {name!r} is not 1-200 characters of A-Z a-z 0-9 . _ / -"
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidStoreName(f"{what} {name!r} has an empty, '.' or '..' path component")
    return name


def check_prefix(prefix: str) -> str:
    """A list prefix: empty, or the characters of a name."""
    if prefix and not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", prefix):
        raise InvalidStoreName(f"prefix {prefix!r} is not up to 200 characters of "
                               "A-Z a-z 0-9 . _ / -")
    return prefix


def default_cache_dir(store: str) -> str:
    """``$XDG_CACHE_HOME/squibd/stores/NAME`` (``~/.cache``), ``/var/cache/squibd/...`` as root."""
    if os.geteuid() == 0 and "XDG_CACHE_HOME" not in os.environ:
        base = "/var/cache/squibd"
    else:
        base = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "squibd"
        )
    return os.path.join(base, "stores", store)


@attrs.frozen
class StoreConfig:
    """One ``[stores.NAME]`` table (every key but ``url`` optional)."""

    url: str
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    create_bucket: bool = False
    #: Local chunk cache and restored state files (default: :func:`default_cache_dir`).
    cache_dir: str | None = None
    #: Requests in flight per push/pull (2 cores here: 4 was the fastest, STORE-NOTES).
    max_requests: int = 4

    def __attrs_post_init__(self) -> None:
        self.parsed()
        if not 1 <= self.max_requests <= 256:
            raise StoreConfigInvalid(f"max_requests must be 1..256, got {self.max_requests}")

    def parsed(self) -> tuple[str, str, str]:
        """``(scheme, bucket or directory, prefix)``.

        Raises:
            StoreConfigInvalid: not ``s3://BUCKET[/PREFIX]`` or ``file:///abs/dir``.
        """
        url = urllib.parse.urlsplit(self.url)
        if url.scheme == "s3":
            if not url.netloc:
                raise StoreConfigInvalid(f"store url {self.url!r} names no bucket")
            return "s3", url.netloc, url.path.strip("/")
        if url.scheme == "file":
            if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
                raise StoreConfigInvalid(
                    f"store url {self.url!r}: a file store is file:///absolute/dir"
                )
            return "file", os.path.normpath(url.path), ""
        raise StoreConfigInvalid(
            f"store url {self.url!r}: the scheme must be s3:// or file://"
        )
