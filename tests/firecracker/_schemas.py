"""JSON Schemas of the Firecracker response bodies squibd serves.

Transcribed (as facts: names, types, enums, required fields) from the
definitions of Firecracker's published API description,
``src/firecracker/swagger/firecracker.yaml`` (v1.13 to v1.16):
``InstanceInfo``, ``FirecrackerVersion``, ``MachineConfiguration``,
``BootSource``, ``FullVmConfiguration`` and ``Error``. The swagger allows
extra properties; these schemas do not, so a field squibd invents fails.
"""

from __future__ import annotations

from typing import Any, Final

import jsonschema

_STRING: Final = {"type": "string"}
_BOOL: Final = {"type": "boolean"}

ERROR: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"fault_message": _STRING},
    "required": ["fault_message"],  # optional in the swagger; squibd always sends it
    "additionalProperties": False,
}

INSTANCE_INFO: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["app_name", "id", "state", "vmm_version"],
    "properties": {
        "app_name": _STRING,
        "id": _STRING,
        "state": {"type": "string", "enum": ["Not started", "Running", "Paused"]},
        "vmm_version": _STRING,
    },
    "additionalProperties": False,
}

FIRECRACKER_VERSION: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["firecracker_version"],
    "properties": {"firecracker_version": _STRING},
    "additionalProperties": False,
}

MACHINE_CONFIGURATION: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["mem_size_mib", "vcpu_count"],
    "properties": {
        "cpu_template": {
            "type": "string",
            "enum": ["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"],
        },
        "smt": _BOOL,
        "mem_size_mib": {"type": "integer"},
        "track_dirty_pages": _BOOL,
        "vcpu_count": {"type": "integer", "minimum": 1, "maximum": 32},
        "huge_pages": {"type": "string", "enum": ["None", "Transparent", "2M"]},
    },
    "additionalProperties": False,
}

BOOT_SOURCE: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["kernel_image_path"],
    "properties": {"boot_args": _STRING, "initrd_path": _STRING, "kernel_image_path": _STRING},
    "additionalProperties": False,
}

#: FullVmConfiguration: only the members squibd can have (the device members
#: are objects or arrays of device descriptors squibd never reports).
FULL_VM_CONFIGURATION: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "boot-source": BOOT_SOURCE,
        "machine-config": MACHINE_CONFIGURATION,
        "drives": {"type": "array", "maxItems": 0},
        "network-interfaces": {"type": "array", "maxItems": 0},
        "pmem": {"type": "array", "maxItems": 0},
    },
    "additionalProperties": False,
}

#: (method, path) -> schema of a 200 answer.
RESPONSES: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("GET", "/"): INSTANCE_INFO,
    ("GET", "/version"): FIRECRACKER_VERSION,
    ("GET", "/machine-config"): MACHINE_CONFIGURATION,
    ("GET", "/vm/config"): FULL_VM_CONFIGURATION,
}


def check(schema: dict[str, Any], body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` when ``body`` does not follow ``schema``."""
    jsonschema.Draft7Validator(schema).validate(body)
