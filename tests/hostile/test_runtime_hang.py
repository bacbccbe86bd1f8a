"""Issue 10, "a hang of the event loop": a lazy VM whose page server stalls.

The page server takes the handshake and the userfaultfd and then never
serves: the lazy guest's first memory access blocks forever. Before the
fix, vm.describe / vm.list read guest memory on the trio thread (with the
GIL held), so the whole daemon froze and ignored SIGTERM. Now every other
call answers, the stalled VM is described with its progress flagged stale,
the debug memory methods refuse with a typed error, and SIGTERM stops the
daemon (its teardown releases the pages nobody serves).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from ..server.helpers import blocking_call, start_daemon
from ._peers import StallingPageServer, save_counter_pair

pytestmark = pytest.mark.kvm

#: Hang guard of each call (the daemon bounds its own waits at 2 s).
_CALL_TIMEOUT_S = 60.0


def _call(path: str, method: str, params: Any = None) -> Any:
    answer = blocking_call(path, method, params, timeout=_CALL_TIMEOUT_S)
    assert "error" not in answer, answer
    return answer["result"]


def _error(path: str, method: str, params: Any = None) -> Any:
    answer = blocking_call(path, method, params, timeout=_CALL_TIMEOUT_S)
    assert "error" in answer, answer
    return answer["error"]


def test_stalled_page_server_does_not_freeze_the_daemon(sockdir: str, tmp_path: Path) -> None:
    snap, _mem = save_counter_pair(tmp_path)
    page_server = StallingPageServer(f"{sockdir}/ps.sock")
    proc, path = start_daemon(sockdir, "--debug-api")
    try:
        _call(path, "vm.create", {"vm_id": "other", "vcpu_count": 1, "mem_size_mib": 16,
                                   "guest": {"program": "counter"}})
        _call(path, "vm.start", {"vm_id": "other"})
        loaded = _call(path, "snapshot.load", {
            "vm_id": "lazy", "snapshot_path": snap, "resume_vm": True,
            "mem_backend": {"backend_type": "Uffd", "backend_path": page_server.path},
        })  # fmt: skip
        assert page_server.handshakes == 1
        # The guest's memory never answers: no progress was ever read.
        assert loaded["vm"]["guest_progress"] is None
        assert loaded["vm"]["guest_progress_stale"] is True

        assert _call(path, "daemon.status")["vm_count"] == 2
        other = _call(path, "vm.describe", {"vm_id": "other"})
        assert other["state"] == "Running" and other["guest_progress_stale"] is False
        listed = {vm["vm_id"]: vm for vm in _call(path, "vm.list")["vms"]}
        assert listed["other"]["guest_progress_stale"] is False
        assert listed["lazy"]["guest_progress_stale"] is True
        assert listed["lazy"]["state"] == "Running"
        described = _call(path, "vm.describe", {"vm_id": "lazy"})
        assert described["guest_progress"] is None and described["guest_progress_stale"]

        # A Full save must read every page: it refuses before writing anything
        # (the memory writer's scans would otherwise wait on the page with the GIL held).
        out = tmp_path / "out"
        out.mkdir()
        error = _error(path, "snapshot.create", {
            "vm_id": "lazy", "snapshot_type": "Full",
            "snapshot_path": str(out / "o.snap"), "mem_file_path": str(out / "o.mem"),
        })  # fmt: skip
        assert error["code"] == -32004 and error["data"]["kind"] == "GuestMemoryUnavailable"
        assert list(out.iterdir()) == []
        assert _call(path, "daemon.status")["vm_count"] == 2

        # The debug memory methods wait for the page at most a bound, then refuse.
        error = _error(path, "vm.read_memory", {"vm_id": "lazy", "guest_addr": 0, "length": 8})
        assert error["code"] == -32004
        assert error["data"]["kind"] == "GuestMemoryUnavailable"
        assert "did not answer" in error["message"]
        error = _error(path, "vm.write_memory",
                       {"vm_id": "lazy", "guest_addr": 0, "data_base64": "AAAA"})  # fmt: skip
        assert error["data"]["kind"] == "GuestMemoryUnavailable"
        # The healthy VM's memory still answers.
        _call(path, "vm.read_memory", {"vm_id": "other", "guest_addr": 0, "length": 8})

        # Destroying the stalled VM releases its pages; the rest goes on.
        _call(path, "vm.destroy", {"vm_id": "lazy"})
        assert [vm["vm_id"] for vm in _call(path, "vm.list")["vms"]] == ["other"]

        # A second stalled VM stays loaded at SIGTERM: the daemon still stops.
        _call(path, "snapshot.load", {
            "vm_id": "lazy2", "snapshot_path": snap, "resume_vm": True,
            "mem_backend": {"backend_type": "Uffd", "backend_path": page_server.path},
        })  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        page_server.close()


