"""The protocol documents shipped with squibd (``protocol/`` of the source tree).

An installed squibd carries them as package data (``squibd/protocol/``); a
source checkout without them generates the two JSON documents from the code,
which is what they are generated from anyway.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Final

__all__ = ["DOCUMENTS", "packaged_document", "protocol_document"]

#: The documents by name.
DOCUMENTS: Final = ("openrpc.json", "errors.json")


def _generated(name: str) -> str:
    if name == "openrpc.json":
        from squibd.api.openrpc import render_document

        return render_document()
    from squibd.snapshot.errors import TEMPLATES

    return json.dumps({"kinds": TEMPLATES}, indent=2, ensure_ascii=False) + "\n"


def packaged_document(name: str) -> str | None:
    """The text of a document installed as package data, or None (a source checkout)."""
    resource = importlib.resources.files("squibd").joinpath("protocol", name)
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


def protocol_document(name: str) -> str:
    """The text of ``openrpc.json`` or ``errors.json``.

    Raises:
        ValueError: an unknown document name.
    """
    if name not in DOCUMENTS:
        raise ValueError(f"unknown protocol document {name!r}; one of {', '.join(DOCUMENTS)}")
    packaged = packaged_document(name)
    return packaged if packaged is not None else _generated(name)
