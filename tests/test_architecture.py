"""The one-way import arrows of docs/ARCHITECTURE.md, checked by an AST scan of squibd/.

Every ``import`` and ``from ... import`` counts, wherever it is (module level,
inside a function, under ``TYPE_CHECKING``): a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "squibd"

#: (packages of squibd, modules they must never import).
RULES: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (
        frozenset({"snapshot", "store", "rpc"}),
        ("trio", "squibd.vm", "squibd.vmm", "squibd.kvm", "squibd.server", "squibd.api"),
    ),
    (frozenset({"vm", "vmm", "kvm"}), ("squibd.rpc", "squibd.server", "squibd.api")),
)


def imported_modules(
    source: str, module: str, is_package: bool = False
) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in ``source`` of module ``module``."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                yield node.module, node.lineno
                continue
            base = here[: len(here) - (node.level - 1)]
            if node.module is None:  # from . import x: x may be a module
                for alias in node.names:
                    yield ".".join([*base, alias.name]), node.lineno
            else:
                yield ".".join([*base, node.module]), node.lineno


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    parts = module.split(".")
    if len(parts) < 2:
        return []
    found = []
    for packages, banned in RULES:
        if parts[1] not in packages:
            continue
        for name, line in imported_modules(source, module, is_package):
            for ban in banned:
                if name == ban or name.startswith(ban + "."):
                    found.append(f"{module}:{line} imports {name}")
    return found


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if path.name == "__init__.py" else rel.parts
        yield ".".join(parts), path


def test_the_import_arrows_point_one_way() -> None:
    found = []
    for module, path in _modules():
        found += violations(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert found == []


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("squibd.snapshot.x", "import trio\n", True),
        ("squibd.snapshot.x", "def f():\n    from ..vm import runtime\n", True),
        ("squibd.store.x", "from squibd.api.models import A\n", True),
        ("squibd.rpc", "from .server import s\n", False),  # squibd.rpc.server is not squibd.server
        ("squibd.vm.x", "from .. import api\n", True),
        ("squibd.kvm.x", "from ..snapshot.models import X\n", False),
        ("squibd.api.x", "import trio\nfrom squibd.vm import Runtime\n", False),
    ],
)
def test_the_scan_sees_relative_lazy_and_absolute_imports(
    module: str, source: str, bad: bool
) -> None:
    assert bool(violations(source, module, module == "squibd.rpc")) is bad
