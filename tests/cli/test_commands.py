"""squibctl's commands are derived from the method table: one per method, help = summary."""

from __future__ import annotations

import argparse

import pytest

from squibd.api.methods import METHODS
from squibd.cli import _commands, ctl
from squibd.cli._commands import (
    LOCAL_COMMANDS,
    NO_COMMAND,
    command_of,
    help_of,
    long_running_methods,
    method_of,
    method_summaries,
)


def _commands_of(parser: argparse.ArgumentParser) -> dict[tuple[str, ...], str]:
    """Every leaf command of the parser (words -> its help line)."""
    out: dict[tuple[str, ...], str] = {}

    def walk(p: argparse.ArgumentParser, words: tuple[str, ...], help_line: str) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[words] = help_line
            return
        helps = {c.dest: c.help or "" for c in subs[0]._choices_actions}
        for name, child in subs[0].choices.items():
            walk(child, (*words, name), helps.get(name, ""))

    walk(parser, (), "")
    return out


COMMANDS = _commands_of(ctl.build_parser())


def test_every_method_has_a_command_or_is_listed_without_one() -> None:
    for name in METHODS:
        if name in NO_COMMAND:
            assert NO_COMMAND[name], f"{name}: say why it has no command"
            assert command_of(name) not in COMMANDS
        else:
            assert command_of(name) in COMMANDS, f"{name} has no squibctl command"
    assert set(NO_COMMAND) <= set(METHODS)


def test_every_command_calls_the_method_it_is_named_after() -> None:
    for words in COMMANDS:
        if words in LOCAL_COMMANDS:
            continue
        method = method_of(words)
        assert method in METHODS, f"squibctl {' '.join(words)} names no method"
        assert command_of(method) == words


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(NO_COMMAND)))
def test_help_is_the_method_summary(method: str) -> None:
    summary = METHODS[method].summary.rstrip(".")
    assert COMMANDS[command_of(method)].startswith(f"{method}: {summary}")


def test_the_shipped_document_agrees_with_the_method_table() -> None:
    assert method_summaries() == {name: spec.summary for name, spec in METHODS.items()}
    assert long_running_methods() == {n for n, spec in METHODS.items() if spec.long_running}


def test_parsed_command_lines_ask_for_the_derived_method() -> None:
    parser = ctl.build_parser()
    cases = {
        ("status",): "daemon.status",
        ("vm", "read-memory", "a", "0", "8"): "vm.read_memory",
        ("vm", "pause", "a"): "vm.pause",
        ("snapshot", "delete", "/x.snap"): "snapshot.delete",
        ("snapshot", "rebase", "--base", "/b", "--diff", "/d", "--output", "/o"): "snapshot.rebase",
        ("store", "gc", "--store", "s"): "store.gc",
    }
    for argv, method in cases.items():
        assert ctl.request_of(parser.parse_args(argv))[0] == method


def test_fake_missing_document_help_falls_back_to_the_method_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_commands, "_documented_methods", lambda: ())
    assert help_of("vm.list") == "vm.list"
    assert help_of("vm.read_memory", "note") == "vm.read_memory (note)"
    assert long_running_methods() == frozenset()
