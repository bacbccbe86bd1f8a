"""The userfaultfd constants and struct layouts equal the kernel header's (gcc-compiled check)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from squibd.uffd import _abi

HEADER = Path("/usr/include/linux/userfaultfd.h")


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/userfaultfd.h>",
        "int main(void) {",
    ]
    for name in _abi.CHECKED_CONSTANTS:
        lines.append(f'    printf("%s=%llu\\n", "{name}", (unsigned long long)({name}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(), reason="needs gcc + header")
def test_constants_match_the_kernel_header(tmp_path: Path) -> None:
    source = tmp_path / "abi.c"
    source.write_text(_c_program())
    binary = tmp_path / "abi"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    from_c = dict(line.split("=", 1) for line in output.splitlines())
    mismatches = {
        name: (value, int(from_c[name]))
        for name, value in _abi.CHECKED_CONSTANTS.items()
        if int(from_c[name]) != value
    }
    assert mismatches == {}
    assert len(from_c) == len(_abi.CHECKED_CONSTANTS)
