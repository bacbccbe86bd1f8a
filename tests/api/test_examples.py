"""Replay protocol/examples/*.jsonl against a live daemon (see protocol/examples/README.md)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import pytest
import trio

from tests.server.helpers import read_lines, running_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "protocol", "examples", "*.jsonl")))
ANY = "<any>"


def _substitute(value: Any, directory: str) -> Any:
    if isinstance(value, str):
        return value.replace("{dir}", directory)
    if isinstance(value, list):
        return [_substitute(v, directory) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, directory) for k, v in value.items()}
    return value


def _matches(expected: Any, actual: Any) -> bool:
    if expected == ANY:
        return True
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and set(expected) == set(actual)
                and all(_matches(v, actual[k]) for k, v in expected.items()))  # fmt: skip
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(expected) == len(actual)
                and all(_matches(e, a) for e, a in zip(expected, actual, strict=True)))  # fmt: skip
    return type(expected) is type(actual) and expected == actual


def _params() -> list[Any]:
    out = []
    for path in EXAMPLES:
        marks = [pytest.mark.kvm] if path.endswith(".kvm.jsonl") else []
        out.append(pytest.param(path, id=os.path.basename(path), marks=marks))
    return out


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("example", _params())
async def test_example_transcript_replays(example: str, sockdir: str) -> None:
    with open(example) as f:
        exchanges = [json.loads(line) for line in f if line.strip()]
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            for number, exchange in enumerate(exchanges, 1):
                send = _substitute(exchange["send"], sockdir)
                line = send if isinstance(send, str) else json.dumps(send)
                await stream.send_all(line.encode() + b"\n")
                expected = _substitute(exchange["expect"], sockdir)
                if expected is None:
                    continue
                [actual] = await read_lines(stream, 1)
                assert _matches(expected, actual), (
                    f"{os.path.basename(example)} line {number} ({exchange['note']}): "
                    f"got {json.dumps(actual)}"
                )
