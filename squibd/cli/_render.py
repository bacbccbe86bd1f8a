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


def render(method: str, result: Any) -> str:
    """One method's result as text for a terminal."""
    if not isinstance(result, dict):
        return json.dumps(result)
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
