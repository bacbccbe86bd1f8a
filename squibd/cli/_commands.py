"""squibctl's commands and the JSON-RPC methods they call, derived from the method table.

The method ``AREA.NAME`` is the command ``squibctl AREA NAME``, with ``_``
spelled ``-`` (``vm.read_memory`` is ``squibctl vm read-memory``), except the
methods in :data:`COMMAND_EXCEPTIONS`. A method without a command is listed in
:data:`NO_COMMAND` with the reason (``squibctl call METHOD PARAMS`` reaches
it); ``tests/cli/test_commands.py`` checks that every method of
``squibd.api.methods.METHODS`` is one or the other.

Each command's help line is its method's ``MethodSpec.summary``, read from
the OpenRPC document shipped with squibd (generated from the method table;
a test keeps it fresh), so squibctl does not import the daemon's API (it
runs on hosts without KVM).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "COMMAND_EXCEPTIONS",
    "LOCAL_COMMANDS",
    "NO_COMMAND",
    "command_of",
    "help_of",
    "long_running_methods",
    "method_of",
    "method_summaries",
]

#: Methods whose command is not ``AREA NAME``.
COMMAND_EXCEPTIONS: Final[dict[str, tuple[str, ...]]] = {"daemon.status": ("status",)}
#: Methods deliberately without a command, and why.
NO_COMMAND: Final[dict[str, str]] = {}
#: Commands that call no method of their own (``call`` takes the method as an argument).
LOCAL_COMMANDS: Final = frozenset({("call",), ("completion",), ("protocol",)})

_BY_COMMAND: Final = {words: method for method, words in COMMAND_EXCEPTIONS.items()}
#: The OpenRPC document in a source checkout (an installed squibd has it as package data).
_SOURCE_DOCUMENT: Final = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "protocol",
    "openrpc.json",
)


def command_of(method: str) -> tuple[str, ...]:
    """The squibctl command of ``method``: ``vm.read_memory`` -> ``("vm", "read-memory")``."""
    if method in COMMAND_EXCEPTIONS:
        return COMMAND_EXCEPTIONS[method]
    area, _, name = method.partition(".")
    return area, name.replace("_", "-")


def method_of(words: Sequence[str]) -> str:
    """The method a command calls: the inverse of :func:`command_of`."""
    key = tuple(words)
    if key in _BY_COMMAND:
        return _BY_COMMAND[key]
    area, verb = key
    return f"{area}.{verb.replace('-', '_')}"


@functools.cache
def _documented_methods() -> tuple[dict[str, Any], ...]:
    """The ``methods`` of the shipped OpenRPC document; empty when none can be read."""
    from squibd.protocol_files import packaged_document

    text = packaged_document("openrpc.json")
    if text is None:
        try:
            with open(_SOURCE_DOCUMENT, encoding="utf-8") as file:
                text = file.read()
        except OSError:
            return ()
    try:
        methods = json.loads(text)["methods"]
        return tuple(m for m in methods if isinstance(m, dict) and isinstance(m.get("name"), str))
    except (ValueError, KeyError, TypeError):
        return ()


def method_summaries() -> dict[str, str]:
    """Method name -> ``MethodSpec.summary`` (empty without a document: help shows names only)."""
    return {m["name"]: str(m.get("summary", "")) for m in _documented_methods()}


def long_running_methods() -> frozenset[str]:
    """Methods with ``MethodSpec.long_running`` (tagged ``long-running`` in the document)."""
    return frozenset(
        m["name"] for m in _documented_methods()
        if any(isinstance(t, dict) and t.get("name") == "long-running" for t in m.get("tags", ()))
    )  # fmt: skip


def help_of(method: str, note: str = "") -> str:
    """The help line of ``method``'s command: ``METHOD: SUMMARY`` plus an optional note."""
    summary = method_summaries().get(method, "").rstrip(".")
    text = f"{method}: {summary}" if summary else method
    return f"{text} ({note})" if note else text
