
"""``store.*``: push, list, pull, restore, delete and gc of snapshots in a snapshot store.

The store work (squibd.store) is synchronous and runs in worker threads; its
progress reaches ``$/progress`` through the trio token. Store errors are
answered -32001 (``data.kind`` the store error kind), unknown stores and bad
names -32602.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import attrs
import trio

from squibd.rpc import INVALID_PARAMS, SNAPSHOT_ERROR, application_error
from squibd.store.child import SpareChildren
from squibd.store.config import NAME_RE, check_name
from squibd.store.errors import InvalidStoreName, StoreError, UnknownStore
from squibd.store.store import PullResult, PushResult, SnapshotStore, StoredSnapshot

from .context import ApiContext, CallInfo, ProgressSink
from .handlers import _info, _path
from .models import VM_ID_PATTERN, VmInfo
from .wire import wire_field

__all__ = ["STORE_METHODS"]

_log = logging.getLogger("squibd.store")
_T = TypeVar("_T")
_MS: Final = 1000.0
_stores: weakref.WeakKeyDictionary[ApiContext, dict[str, SnapshotStore]] = (
    weakref.WeakKeyDictionary()
)
_spares: weakref.WeakKeyDictionary[ApiContext, SpareChildren] = weakref.WeakKeyDictionary()


def _store_field() -> Any:
    return wire_field(description="a store named in the configuration ([stores.NAME])",
                      max_length=200)


def _name_field() -> Any:
    return wire_field(description="the snapshot's name in the store",
                      pattern=NAME_RE.pattern)


@attrs.frozen
class StorePushParams:
    """``store.push``: a local pair, the store, the name."""

    snapshot_path: str = wire_field(description="a committed local state file (.mem beside it)")
    store: str = _store_field()
    name: str = _name_field()
    progress_token: int | str | None = wire_field(default=None, description="$/progress token")


#: ``store.push``'s result: the store's own value (name, pair_id, chunks_total,
#: chunks_uploaded, bytes_uploaded, duration_ms).
StorePushResult = PushResult


@attrs.frozen
class StoreListParams:
    """``store.list``: the store and an optional name prefix."""

    store: str = _store_field()
    prefix: str = wire_field(default="", description="only names starting with this",
                             max_length=200)


@attrs.frozen
class StoredSnapshotInfo:
    """One complete snapshot in a store."""

    name: str
    pair_id: str
    parent_pair_id: str | None
    snapshot_type: str
    vm_id: str | None
    created_at: str
    mem_size_bytes: int


@attrs.frozen
class StoreListResult:
    """``store.list``: the snapshots, by name."""

    snapshots: list[StoredSnapshotInfo]


@attrs.frozen
class StorePullParams:
    """``store.pull``: the stored snapshot and the local pair to write."""

    store: str = _store_field()
    name: str = _name_field()
    snapshot_path: str = wire_field(description="the local state file to write")
    mem_file_path: str = wire_field(description="the local memory file to write")
    progress_token: int | str | None = wire_field(default=None, description="$/progress token")


#: ``store.pull``'s result: the store's own value (name, pair_id, snapshot_path,
#: mem_file_path, chunks_fetched, bytes_fetched, duration_ms).
StorePullResult = PullResult


@attrs.frozen
class StoreRestoreParams:
    """``store.restore``: the VM to create and the stored snapshot."""

    vm_id: str = wire_field(description="the VM's id", pattern=VM_ID_PATTERN)
    store: str = _store_field()
    name: str = _name_field()
    lazy: bool = wire_field(default=True, description="start at once; pages come on demand")
    resume_vm: bool = wire_field(default=False, description="run the VM after restoring")
    track_dirty_pages: bool = wire_field(default=False, description="track dirty pages")
    progress_token: int | str | None = wire_field(default=None, description="$/progress token")


@attrs.frozen
class StoreRestoreResult:
    """``store.restore``: the VM, running or paused."""

    vm: VmInfo
    pair_id: str
    lazy: bool
    duration_ms: float


@attrs.frozen
class StoreNameParams:
    """``store.delete``: the store and the snapshot name."""

    store: str = _store_field()
    name: str = _name_field()


@attrs.frozen
class StoreDeleteResult:
    """``store.delete``: the removed name."""

    name: str
    deleted: bool


@attrs.frozen
class StoreGcParams:
    """``store.gc``: the store and the grace period."""

    store: str = _store_field()
    grace_s: int = wire_field(default=3600, minimum=0,
                              description="keep unreferenced chunks younger than this")


@attrs.frozen
class StoreGcResult:
    """``store.gc``: what was deleted."""

    chunks_deleted: int
    bytes_freed: int


def _store_dir(api: ApiContext, name: str) -> str | None:
    """``<state_dir>/stores/NAME``: squibd's own files for a store (None without a state dir)."""
    return None if api.state_dir is None else os.path.join(api.state_dir, "stores", name)


def _store(api: ApiContext, name: str) -> SnapshotStore:
    if name not in api.stores:
        raise UnknownStore(name, list(api.stores))
    config = api.stores[name]
    own = _store_dir(api, name)
    if config.cache_dir is None and own is not None:
        # The daemon's default chunk cache is in its state directory, which it can
        # always write (systemd's ProtectSystem=strict leaves /var/cache read-only).
        config = attrs.evolve(config, cache_dir=os.path.join(own, "cache"))
    cache = _stores.setdefault(api, {})
    if name not in cache:
        cache[name] = SnapshotStore(name, config)
    # A lazy restore needs a page-server process: have one started ahead.
    _spares.setdefault(api, SpareChildren()).warm(name, config)
    return cache[name]


def _states_dir(api: ApiContext, store: SnapshotStore) -> str:
    """Where restored VMs' state files go: the state directory, which loads may open
    whatever ``allowed_roots`` says (a ``cache_dir`` outside the roots would be refused)."""
    own = _store_dir(api, store.name)
    return os.path.join(store.cache_dir if own is None else own, "states")


def _thread_progress(sink: ProgressSink | None, phase: str) -> Callable[[int, int], None] | None:
    if sink is None:
        return None
    token = trio.lowlevel.current_trio_token()
    lock = threading.Lock()
    last = [-1]

    def report(done: int, total: int) -> None:
        # Worker threads report concurrently and can arrive out of order: a client
        # sees ``done`` only grow (a late, smaller figure is dropped).
        with lock:
            if done < last[0]:
                return
            last[0] = done
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(sink, phase, done, total)

    return report


async def _run(fn: Callable[[], _T]) -> _T:
    return await trio.to_thread.run_sync(fn)


def _mapped(handler: Callable[[ApiContext, CallInfo, Any], Awaitable[_T]]
            ) -> Callable[[ApiContext, CallInfo, Any], Awaitable[_T]]:
    async def wrapper(api: ApiContext, call: CallInfo, params: Any) -> _T:
        try:
            return await handler(api, call, params)
        except (UnknownStore, InvalidStoreName) as exc:
            raise application_error(INVALID_PARAMS, exc.kind, str(exc)) from exc
        except StoreError as exc:
            raise application_error(SNAPSHOT_ERROR, exc.kind, str(exc)) from exc

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _vm_of_pair(api: ApiContext, snapshot_path: str) -> str | None:
    """The VM the pair was saved from: as its state file records it, else a live VM's last save."""
    from squibd.snapshot.envelope import read_state_file

    state = read_state_file(snapshot_path)
    if state.metadata is not None and state.metadata.vm_id is not None:
        return state.metadata.vm_id
    if api.vm_count == 0:
        return None
    pair = state.memory.pair_id
    for vm_id in api.runtime.list():
        if getattr(api.runtime.describe(vm_id), "last_pair_id", None) == pair:
            return vm_id
    return None


@_mapped
async def store_push(api: ApiContext, call: CallInfo, p: StorePushParams) -> StorePushResult:
    """Upload a committed local pair under a name."""
    check_name(p.name)
    snap = _path(api, p.snapshot_path, "snapshot_path")
    store = _store(api, p.store)
    vm_id = await _run(lambda: _vm_of_pair(api, snap))
    progress = _thread_progress(call.progress, "push")
    r = await _run(lambda: store.push(snap, p.name, vm_id=vm_id, progress=progress))
    return r


@_mapped
async def store_list(api: ApiContext, call: CallInfo, p: StoreListParams) -> StoreListResult:
    """Every complete snapshot in a store (optionally under a name prefix)."""
    store = _store(api, p.store)
    listed = await _run(lambda: store.list(p.prefix))
    return StoreListResult([StoredSnapshotInfo(**s) for s in listed])


@_mapped
async def store_pull(api: ApiContext, call: CallInfo, p: StorePullParams) -> StorePullResult:
    """Materialise a stored snapshot as a committed local pair (a Diff as its Full)."""
    check_name(p.name)
    snap = _path(api, p.snapshot_path, "snapshot_path")
    mem = _path(api, p.mem_file_path, "mem_file_path")
    store = _store(api, p.store)
    progress = _thread_progress(call.progress, "pull")
    r = await _run(lambda: store.pull(p.name, snap, mem, progress=progress,
                                      allowed_roots=api.allowed_roots))
    return r


def _fetch_object(store: SnapshotStore, name: str) -> tuple[bytes, StoredSnapshot]:
    raw = store.get_snapshot_raw(name)
    return raw, store.parse(name, raw)


@_mapped
async def store_restore(
    api: ApiContext, call: CallInfo, p: StoreRestoreParams
) -> StoreRestoreResult:
    """Run a VM from a stored snapshot: lazily (page server fed by the store) or pulled first."""
    from squibd.vm.models import MemBackend

    check_name(p.name)
    store = _store(api, p.store)
    started = time.monotonic()
    raw, stored = await _run(lambda: _fetch_object(store, p.name))
    fetched = time.monotonic()
    if call.progress is not None:
        call.progress("state", len(stored.state), len(stored.state))
    states = _states_dir(api, store)
    state_path = os.path.join(states, f"{p.vm_id}-{stored.pair_id}.snap")
    mem_path = os.path.join(states, f"{p.vm_id}-{stored.pair_id}.mem")
    object_path = os.path.join(states, f"{p.vm_id}-{stored.pair_id}.squib")
    if p.lazy:
        def write_state() -> None:
            os.makedirs(states, exist_ok=True)
            for path, data in ((state_path, stored.state), (object_path, raw)):
                tmp = f"{path}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)

        await _run(write_state)
        sockdir = tempfile.mkdtemp(prefix="squibd-store-")
        sock = os.path.join(sockdir, "pages.sock")
        spares = _spares.setdefault(api, SpareChildren())
        try:
            written = time.monotonic()
            child = await _run(lambda: spares.serve(p.store, store.config, p.name, sock,
                                                    snapshot_file=object_path))
            served = time.monotonic()
            try:
                await api.runtime.load(p.vm_id, state_path, MemBackend("Uffd", sock),
                                       track_dirty_pages=p.track_dirty_pages,
                                       resume_vm=p.resume_vm, progress=call.progress)
            except BaseException:
                child.kill()
                raise
            _log.info("store.restore %s: object %.1f ms, state files %.1f ms, page server "
                      "%.1f ms, load %.1f ms", p.vm_id, (fetched - started) * _MS,
                      (written - fetched) * _MS, (served - written) * _MS,
                      (time.monotonic() - served) * _MS)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(sock)
            with contextlib.suppress(OSError):
                os.rmdir(sockdir)
    else:
        progress = _thread_progress(call.progress, "pull")
        await _run(lambda: os.makedirs(states, exist_ok=True))
        await _run(lambda: store.pull(p.name, state_path, mem_path, progress=progress))
        await api.runtime.load(p.vm_id, state_path, MemBackend("File", mem_path),
                               track_dirty_pages=p.track_dirty_pages, resume_vm=p.resume_vm,
                               progress=call.progress)
    elapsed = (time.monotonic() - started) * _MS
    info = await _info(api, p.vm_id)
    if p.lazy:
        # The next restore's page-server process, started once this VM runs (its
        # imports would have competed with this restore for the CPU); Popen off the
        # trio thread, not waited for.
        threading.Thread(target=spares.warm, args=(p.store, store.config),
                         name="store-spare", daemon=True).start()
    return StoreRestoreResult(info, stored.pair_id, p.lazy, round(elapsed, 3))


@_mapped
async def store_delete(api: ApiContext, call: CallInfo, p: StoreNameParams) -> StoreDeleteResult:
    """Remove a snapshot from a store (its chunks go at the next gc)."""
    check_name(p.name)
    store = _store(api, p.store)
    await _run(lambda: store.delete(p.name))
    return StoreDeleteResult(p.name, True)


@_mapped
async def store_gc(api: ApiContext, call: CallInfo, p: StoreGcParams) -> StoreGcResult:
    """Delete unreferenced chunks older than grace_s (never one a running push needs)."""
    store = _store(api, p.store)
    r = await _run(lambda: store.gc(p.grace_s))
    return StoreGcResult(r.chunks_deleted, r.bytes_freed)


#: (name, summary, params, result, handler, long_running)
STORE_METHODS: Final[list[tuple[str, str, type, type, Any, bool]]] = [
    ("store.push", "Upload a committed local snapshot pair to a store under a name.",
     StorePushParams, StorePushResult, store_push, True),
    ("store.list", "The complete snapshots in a store.", StoreListParams, StoreListResult,
     store_list, False),
    ("store.pull", "Materialise a stored snapshot as a local pair (a Diff as its Full).",
     StorePullParams, StorePullResult, store_pull, True),
    ("store.restore", "Run a VM from a stored snapshot, lazily by default.",
     StoreRestoreParams, StoreRestoreResult, store_restore, True),
    ("store.delete", "Remove a snapshot from a store (its chunks go at the next gc).",
     StoreNameParams, StoreDeleteResult, store_delete, False),
    ("store.gc", "Delete unreferenced chunks older than grace_s.", StoreGcParams,
     StoreGcResult, store_gc, False),
]  # fmt: skip
