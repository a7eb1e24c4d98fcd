"""The import rules of ARCHITECTURE.md, checked on the source with ``ast``.

Every ``import`` in every module under ``partialstore/`` and ``backends/`` is
read, at module level and inside functions alike (a function-local import is
still a dependency), and must point down the layers::

    contract (backend, errors, registry)
      <- _runtime <- _pytree <- _arrays <- _commit <- _lifecycle <- _api
      <- facade (__init__) <- _cli

``backends/`` may import only the contract and each other; ``testing/`` only
the contract, ``_runtime``, ``_pytree``, ``_arrays`` and itself. No module of
the core imports ``backends/`` (the registry names them by string), and only
``_cli`` imports ``testing/``. Within a layer, modules must not import each
other in a cycle either.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONTRACT = "contract"
#: Layer of each module name prefix (longest prefix wins).
LAYER_OF_PREFIX = {
    "partialstore": "facade",  # the package itself: partialstore/__init__.py
    "partialstore.backend": CONTRACT,
    "partialstore.errors": CONTRACT,
    "partialstore.observe": CONTRACT,
    "partialstore.registry": CONTRACT,
    "partialstore._runtime": "_runtime",
    "partialstore._pytree": "_pytree",
    "partialstore._arrays": "_arrays",
    "partialstore._commit": "_commit",
    "partialstore._lifecycle": "_lifecycle",
    "partialstore._api": "_api",
    "partialstore._cli": "_cli",
    "partialstore.testing": "testing",
    "partialstore.backends": "backends",
}
_CORE = [
    CONTRACT,
    "_runtime",
    "_pytree",
    "_arrays",
    "_commit",
    "_lifecycle",
    "_api",
    "facade",
    "_cli",
]
#: The layers each layer may import (its own included).
ALLOWED = {layer: set(_CORE[: rank + 1]) for rank, layer in enumerate(_CORE)}
ALLOWED["_cli"].add("testing")  # the demo starts the local test servers
ALLOWED["testing"] = {CONTRACT, "_runtime", "_pytree", "_arrays", "testing"}
ALLOWED["backends"] = {CONTRACT, "backends"}


def module_files() -> dict[str, Path]:
    """Every module's dotted name (as installed) and its file."""
    found: dict[str, Path] = {}
    for top, package in (("partialstore", "partialstore"), ("backends", "partialstore.backends")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


#: Modules that are packages (``__init__.py``): relative imports resolve from them.
PACKAGES = {module for module, path in module_files().items() if path.name == "__init__.py"}


def layer_of(module: str) -> str | None:
    """The layer of ``module``, or ``None`` outside partialstore."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF_PREFIX.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def imports_of(
    module: str, source: str, known: set[str], is_package: bool
) -> list[tuple[int, str]]:
    """(line, imported module) for every partialstore import in ``source``, at any depth."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == "backends" or base.startswith("backends."):
                base = "partialstore." + base  # how backends/ is installed
            for alias in node.names:
                # ``from pkg import mod`` depends on pkg.mod when that is a module.
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in known else base))
    return [(line, name) for line, name in found if layer_of(name) is not None]


def violations(files: dict[str, str]) -> list[str]:
    """Each import against the layer rules, as ``module:line imports target (A -> B)``."""
    known = set(files)
    bad: list[str] = []
    for module, source in sorted(files.items()):
        source_layer = layer_of(module)
        assert source_layer is not None, f"{module} is in no layer: add it to LAYER_OF_PREFIX"
        for line, target in imports_of(module, source, known, module in PACKAGES):
            target_layer = layer_of(target)
            if target_layer not in ALLOWED[source_layer]:
                bad.append(
                    f"{module}:{line} imports {target} ({source_layer} -> {target_layer}; "
                    f"{source_layer} may import only {sorted(ALLOWED[source_layer])})"
                )
    return bad


def read_sources() -> dict[str, str]:
    """Source of every module, by dotted name."""
    return {module: path.read_text() for module, path in module_files().items()}


def find_cycle(files: dict[str, str]) -> list[str] | None:
    """One import cycle among the modules (function-local imports included), or ``None``."""
    known = set(files)
    edges = {
        module: sorted(
            {t for _, t in imports_of(module, src, known, module in PACKAGES) if t in known}
            - {module}
        )
        for module, src in files.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_every_import_points_down_the_layers() -> None:
    bad = violations(read_sources())
    assert not bad, "Imports against ARCHITECTURE.md's layer rules:\n" + "\n".join(bad)


def test_no_import_cycles_even_through_function_local_imports() -> None:
    cycle = find_cycle(read_sources())
    assert cycle is None, "Import cycle: " + " -> ".join(cycle or [])


def test_every_module_belongs_to_a_layer() -> None:
    top_level = {
        module
        for module in module_files()
        if layer_of(module) in ("facade", CONTRACT, "_api") and module.count(".") <= 1
    }
    assert top_level == {
        "partialstore",
        "partialstore._api",
        "partialstore.backend",
        "partialstore.errors",
        "partialstore.observe",
        "partialstore.orbax",
        "partialstore.registry",
    }


def test_pyproject_installs_every_package() -> None:
    # setuptools installs only the packages listed: a new subpackage left out
    # would be missing from a wheel although every test here passes.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(config["tool"]["setuptools"]["packages"]) == PACKAGES


def test_the_checks_catch_a_back_edge_and_a_cycle() -> None:
    # The rules themselves are tested: a function-local import of the commit
    # layer from the runtime layer, and a cycle inside one layer, are caught.
    sources = read_sources()
    back_edge = dict(sources)
    back_edge["partialstore._runtime.aio"] += (
        "\n\ndef _late():\n    from partialstore._commit import txlog\n"
    )
    (found,) = violations(back_edge)
    assert found.startswith("partialstore._runtime.aio:") and "partialstore._commit.txlog" in found
    assert "(_runtime -> _commit;" in found
    backend_edge = dict(sources)
    backend_edge["partialstore.backends.memory"] += "\nfrom partialstore._runtime import aio\n"
    assert [v for v in violations(backend_edge) if "backends.memory" in v]
    cyclic = dict(sources)
    cyclic["partialstore._commit.formats"] += "\n\ndef _late():\n    from . import txlog\n"
    cycle = find_cycle(cyclic)
    assert cycle is not None and "partialstore._commit.txlog" in cycle
