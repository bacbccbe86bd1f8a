"""Child process of I-SNAP-1: load a pair in a NEW process, check it, run it.

Usage: python _restore_child.py SNAPSHOT MEMORY SAVED_PROGRESS_JSON
Prints one JSON object with what it observed; the parent test asserts.
"""

from __future__ import annotations

import json
import sys

import trio

from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.models import X86MicrovmState
from squibd.vm.models import MemBackend
from squibd.vm.runtime import Runtime

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _helpers import first_memory_difference, wait_progress_beyond


async def main(snap: str, mem: str, saved: list[int]) -> dict[str, object]:
    runtime = Runtime()
    try:
        vm = await runtime.load("restored", snap, MemBackend("File", mem))
        state = read_state_file(snap)
        assert isinstance(state, X86MicrovmState)
        captured = await trio.to_thread.run_sync(vm.capture_state)
        regs_equal = all(
            now.regs == then.regs and now.sregs == then.sregs
            for now, then in zip(captured.vcpu_states, state.vcpu_states, strict=True)
        )
        before = vm.guest_progress()
        memory_difference = first_memory_difference(mem, vm)
        state_before_resume = runtime.describe("restored").state
        await runtime.resume("restored")
        first = await wait_progress_beyond(vm, saved)
        second = await wait_progress_beyond(vm, first)
        return {
            "regs_equal": regs_equal,
            "memory_difference": memory_difference,
            "progress_before_run": before,
            "state_before_resume": state_before_resume,
            "progress_after": [first, second],
            "error": runtime.describe("restored").error,
        }
    finally:
        await runtime.aclose()


if __name__ == "__main__":
    result = trio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    print(json.dumps(result))
