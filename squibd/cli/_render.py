"""Human-readable rendering of method results for squibctl."""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["render"]

_MIB: Final = 1024 * 1024


def _vm_line(vm: dict[str, Any]) -> str:
    dirty = "dirty-tracking" if vm.get("track_dirty_pages") else "no-dirty-tracking"
    progress = ",".join(str(p) for p in vm.get("guest_progress", []))
    line = (
        f"{vm['vm_id']}: {vm['state']}, {vm['vcpu_count']} vCPU, {vm['mem_size_mib']} MiB, "
        f"{dirty}, guest progress [{progress}]"
    )
    if vm.get("error"):
        line += f", error: {vm['error']}"
    return line


def _kv(result: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_kv(value, indent + "  "))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}:")
            lines += [f"{indent}  - {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_snapshot_list(result: dict[str, Any]) -> str:
    """``snapshot.list`` as a table (newest last)."""
    snapshots = result.get("snapshots", [])
    if not snapshots:
        return "no snapshots"
    rows = [["SNAPSHOT", "TYPE", "VM", "CREATED", "SIZE", "LABELS", "PARENT"]]
    for s in snapshots:
        labels = ",".join(f"{k}={v}" for k, v in sorted((s.get("labels") or {}).items()))
        parent = s.get("parent_pair_id") or "-"
        rows.append([
            s["snapshot_path"], s["snapshot_type"], s.get("vm_id") or "-",
            s.get("created_at") or "-", _size(int(s.get("size_bytes", 0))), labels or "-",
            parent[:8],
        ])  # fmt: skip
    return _table(rows)


def _describe(result: dict[str, Any]) -> str:
    lines = [_kv({k: v for k, v in result.items() if k != "errors"})]
    for error in result.get("errors") or []:
        lines.append(f"ERROR {error.get('kind')}: {error.get('message')}"
                     + (f" ({error['detail']})" if error.get("detail") else ""))  # fmt: skip
    memory = result.get("memory_file") or {}
    if memory and not memory.get("exists", True):
        lines.append(f"memory file {memory.get('path')} is missing")
    if result.get("file_size") is None:
        lines.append(f"state file {result.get('path')} cannot be read (missing or unreadable)")
    if not result.get("ok", True):
        lines.append(f"{result.get('path')}: NOT loadable as it is")
    return "\n".join(lines)


def render(method: str, result: Any) -> str:
    """One method's result as text for a terminal."""
    if not isinstance(result, dict):
        return json.dumps(result)
    if method == "snapshot.list":
        return render_snapshot_list(result)
    if method == "snapshot.delete":
        mem = result.get("mem_file_path") or "(no memory file)"
        return f"deleted {result['snapshot_path']} + {mem}"
    if method == "snapshot.describe":
        return _describe(result)
    if method == "daemon.status":
        kvm = "available" if result["kvm_available"] else "NOT available"
        return (
            f"squibd {result['version']} (pid {result['pid']}), up {result['uptime_s']:.1f} s, "
            f"{result['vm_count']} VM(s), KVM {kvm}"
            + (", debug API on" if result.get("debug_api") else "")
        )
    if method in ("vm.create", "vm.start", "vm.pause", "vm.resume", "vm.describe"):
        return _vm_line(result)
    if method == "vm.list":
        vms = result["vms"]
        return "\n".join(_vm_line(vm) for vm in vms) if vms else "no VMs"
    if method == "vm.destroy":
        return f"{result['vm_id']}: destroyed"
    if method == "snapshot.create":
        return (
            f"{result['snapshot_type']} snapshot {result['snapshot_path']} + "
            f"{result['mem_file_path']}: {result['pages_written']} pages, "
            f"{result['bytes_written'] / _MIB:.1f} MiB in {result['duration_ms']:.1f} ms "
            f"(guest paused {result['pause_ms']:.1f} ms, {result['passes']} pass(es))"
        )
    if method == "snapshot.load":
        return f"{_vm_line(result['vm'])}; loaded in {result['duration_ms']:.1f} ms"
    if method == "snapshot.rebase":
        return (
            f"rebased into {result['output_snapshot_path']} + "
            f"{result['output_mem_file_path']} in {result['duration_ms']:.1f} ms"
        )
    return _kv(result)
