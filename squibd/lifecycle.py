"""``[server] on_shutdown``: what SIGTERM does to the VMs, and the restore at the next start.

* ``stop``: the VMs are destroyed with the daemon.
* ``keep``: VM processes are meant to outlive the daemon (issue 11); until
  VMs run in their own processes, ``keep`` behaves as ``stop``.
* ``save``: every started VM is saved as a live Full pair into
  ``<state_dir>/shutdown/<vm_id>.snap`` + ``.mem`` (a pair transaction: an
  interrupted or failed save leaves the previous pair or nothing, never half a
  pair), all VMs concurrently, then destroyed. A VM whose save fails is named
  in the log (it stays running until the daemon exits). Labels in the state
  file record what to restore: ``squibd.on_shutdown=save``, whether it was
  running and whether it tracked dirty pages.

At the next start :func:`restore_saved` loads each such pair (resumed if it
was running), records ``restored_from`` for ``vm.describe``, and deletes the
pair once the VM is back (its memory stays mapped); a pair that fails to load
is kept and logged.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Final

import trio

from squibd.snapshot.commit import recover_directory
from squibd.snapshot.errors import SnapshotError
from squibd.snapshot.inventory import SnapshotEntry, delete_pair, list_pairs

if TYPE_CHECKING:
    from squibd.api.context import ApiContext

__all__ = ["SHUTDOWN_LABEL", "restore_saved", "save_all", "shutdown_dir"]

log = logging.getLogger("squibd.lifecycle")

#: The label marking a pair saved at shutdown, and its value.
SHUTDOWN_LABEL: Final = "squibd.on_shutdown"
_RUNNING_LABEL: Final = "squibd.was_running"
_DIRTY_LABEL: Final = "squibd.track_dirty_pages"
_SUBDIR: Final = "shutdown"


def shutdown_dir(state_dir: str) -> str:
    """Where shutdown saves go."""
    return os.path.join(state_dir, _SUBDIR)


async def _save_one(api: ApiContext, vm_id: str, directory: str, saved: list[str]) -> None:
    from squibd.api.ops import snapshot_metadata

    runtime = api.runtime
    vm = runtime.get(vm_id)
    state = str(vm.state)
    if state == "NotStarted":
        log.warning("on_shutdown=save: VM %s was never started; not saved", vm_id)
        return
    labels = {
        SHUTDOWN_LABEL: "save",
        _RUNNING_LABEL: "true" if state == "Running" else "false",
        _DIRTY_LABEL: "true" if vm.track_dirty_pages else "false",
    }
    snap = os.path.join(directory, f"{vm_id}.snap")
    mem = os.path.join(directory, f"{vm_id}.mem")
    try:
        result = await runtime.save(
            vm_id, "Full", snap, mem, live=state == "Running", resume=False,
            metadata=snapshot_metadata(vm_id, labels),
        )  # fmt: skip
    except Exception as exc:
        log.error("on_shutdown=save: VM %s NOT saved (%s: %s); it runs until squibd exits",
                  vm_id, getattr(exc, "kind", type(exc).__name__), exc)  # fmt: skip
        return
    saved.append(vm_id)
    log.info("on_shutdown=save: VM %s saved to %s (%d bytes, paused %.1f ms)",
             vm_id, snap, result.bytes_written, result.pause_ms)  # fmt: skip


async def save_all(api: ApiContext) -> None:
    """Save every VM into the state directory (concurrently); failures are logged."""
    if api.state_dir is None or api.vm_count == 0:
        return
    directory = shutdown_dir(api.state_dir)
    try:
        await trio.to_thread.run_sync(lambda: os.makedirs(directory, mode=0o700, exist_ok=True))
    except OSError as exc:
        log.error("on_shutdown=save: cannot create %s (%s); no VM saved", directory, exc)
        return
    vm_ids = api.runtime.list()
    saved: list[str] = []
    log.info("on_shutdown=save: saving %d VM(s) into %s", len(vm_ids), directory)
    async with trio.open_nursery() as nursery:
        for vm_id in vm_ids:
            nursery.start_soon(_save_one, api, vm_id, directory, saved)
    log.info("on_shutdown=save: %d of %d VM(s) saved", len(saved), len(vm_ids))


async def restore_saved(api: ApiContext) -> list[str]:
    """Load the VMs saved at the last shutdown; returns the ids restored."""
    from squibd.vm.models import MemBackend

    if api.state_dir is None:
        return []
    directory = shutdown_dir(api.state_dir)
    if not os.path.isdir(directory):
        return []
    def find() -> list[SnapshotEntry]:
        try:
            recover_directory(directory)  # finish or undo a save a crash interrupted
        except (SnapshotError, OSError) as exc:
            log.warning("recovery of %s: %s", directory, exc)
        return list_pairs([directory], label=f"{SHUTDOWN_LABEL}=save")

    entries = await trio.to_thread.run_sync(find)
    restored: list[str] = []
    for entry in entries:
        vm_id = entry.vm_id
        if vm_id is None or entry.mem_file_path is None:
            log.error("cannot restore %s: no VM id or no memory file", entry.snapshot_path)
            continue
        try:
            await api.runtime.load(
                vm_id, entry.snapshot_path, MemBackend("File", entry.mem_file_path),
                track_dirty_pages=entry.labels.get(_DIRTY_LABEL) == "true",
                resume_vm=entry.labels.get(_RUNNING_LABEL) == "true",
            )  # fmt: skip
        except Exception as exc:
            log.error("cannot restore VM %s from %s (%s: %s); the pair is kept",
                      vm_id, entry.snapshot_path, getattr(exc, "kind", type(exc).__name__),
                      exc)  # fmt: skip
            continue
        api.restored_from[vm_id] = entry.snapshot_path
        restored.append(vm_id)
        log.info("restored VM %s from %s", vm_id, entry.snapshot_path)
        path = entry.snapshot_path
        try:
            await trio.to_thread.run_sync(
                functools.partial(delete_pair, path, [directory], force=True)
            )
        except (SnapshotError, OSError) as exc:
            log.warning("restored VM %s, but cannot remove %s: %s", vm_id, path, exc)
    return restored
