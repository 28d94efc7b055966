"""Imports flow one way: contracts <- blueprints <- execution <- operators <- core (which opens
urza and oona for wrap's defaults); urza and oona import only contracts (and errors); tasks
(datasets, hosts, evaluation) only contracts; tezzeret builds on
blueprints, urza and oona; tamiyo on everything below it but never tolaria or cli (and its runtime
never imports its offline learning, ``tamiyo.learning``); tolaria on everything but cli.

Every module under ``src/esper`` is parsed with ``ast``; every import (top level or inside a
function, absolute or relative) of an ``esper`` module is checked against the allowed set.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "esper"

ALLOWED: dict[str, set[str]] = {
    "contracts": {"contracts", "errors"},
    "errors": set(),
    "blueprints": {"contracts", "errors", "blueprints"},
    "execution": {"contracts", "errors", "blueprints", "execution"},
    "operators": {"contracts", "errors", "blueprints", "execution", "operators"},
    # core.sdk_defaults opens the user's default library (urza) and a telemetry bus (oona) when
    # first used: esper.wrap(model) needs no source, esper.wrap(model, telemetry="redis://…").
    "core": {"contracts", "errors", "blueprints", "execution", "operators", "core", "urza", "oona"},
    "urza": {"contracts", "errors", "urza"},
    "oona": {"contracts", "errors", "oona"},
    "tasks": {"contracts", "errors", "tasks"},
    "tezzeret": {"contracts", "errors", "blueprints", "urza", "oona", "tezzeret"},
}
_BELOW_TAMIYO = {
    "contracts",
    "errors",
    "blueprints",
    "execution",
    "operators",
    "core",
    "urza",
    "oona",
}
ALLOWED["tamiyo"] = _BELOW_TAMIYO | {"tezzeret", "tasks", "tamiyo"}
ALLOWED["tolaria"] = ALLOWED["tamiyo"] | {"tolaria"}
UNRESTRICTED = {"cli", "__init__"}
"""``__init__``: the top-level ``esper`` package, which re-exports the public API."""

MODULES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def _component(module: str) -> str:
    """``esper.execution.kernel_cache`` -> ``execution``; ``esper`` -> ``__init__``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return "__init__"
    return parts[1]


def imported_esper_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every ``esper`` module imported by ``source``.

    Args:
        source: Python source text.
        module: its dotted name (``esper.contracts.lifecycle``; ``….__init__`` for a package),
            to resolve relative imports.
    """
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            if base == "esper":  # from esper import contracts, wrap, ...
                found += [(node.lineno, f"esper.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "esper" or name.startswith("esper.")]


def test_every_package_is_classified() -> None:
    components = {_component(_module_name(p)) for p in MODULES}

    assert components <= set(ALLOWED) | UNRESTRICTED, components - set(ALLOWED) - UNRESTRICTED


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path: Path) -> None:
    module = _module_name(path)
    component = _component(module)
    if component in UNRESTRICTED:
        return
    allowed = ALLOWED[component]

    violations = [
        f"line {line}: {name}"
        for line, name in imported_esper_modules(path.read_text(), module)
        if _component(name) not in allowed
    ]

    assert violations == [], f"{module} ({component}) may import only {sorted(allowed)}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if _module_name(p).startswith("esper.tamiyo.")
     and not _module_name(p).startswith("esper.tamiyo.learning")],
    ids=lambda p: str(p.relative_to(SRC)),
)  # fmt: skip
def test_tamiyos_runtime_never_imports_its_offline_learning(path: Path) -> None:
    found = imported_esper_modules(path.read_text(), _module_name(path))

    assert [n for _, n in found if n.startswith("esper.tamiyo.learning")] == []


def test_the_checker_sees_relative_lazy_and_package_imports() -> None:
    source = (
        "import torch\n"
        "from . import base\n"
        "from .kernels import KernelId\n"
        "def f():\n"
        "    from ..execution import KernelCache\n"
        "    import esper.core\n"
        "    from esper import wrap\n"
    )

    found = imported_esper_modules(source, "esper.contracts.lifecycle")

    assert [name for _, name in found] == [
        "esper.contracts",
        "esper.contracts.kernels",
        "esper.execution",
        "esper.core",
        "esper.wrap",
    ]
    assert [_component(name) for _, name in found] == [
        "contracts",
        "contracts",
        "execution",
        "core",
        "wrap",
    ]
