"""The module layers of docs/architecture.md, checked on the import graph of the source.

Every ``import`` counts, also the lazy ones inside functions: a lazy import still makes
the dependency, it only moves its cost. The one rule about *when* modules load (the
long-lived process stays free of httpx/jwt/cryptography) is checked by importing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Dependencies point downward only: a module may import its own layer or lower ones.
LAYERS: Dict[str, int] = {
    "jobtoken": 0, "jobtoken._errors": 0,  # the package re-exports only the error tree
    "jobtoken._version": 0,
    "jobtoken._clock": 1, "jobtoken._logs": 1, "jobtoken._hardening": 1,
    "jobtoken._waiter": 1, "jobtoken._logsetup": 1,
    "jobtoken._policy": 1, "jobtoken._scopes": 1, "jobtoken._config": 1,
    "jobtoken._formats": 1, "jobtoken._brokerproto": 1,
    "jobtoken._tokens": 2, "jobtoken._jwks": 2, "jobtoken._http": 2, "jobtoken._mytoken": 2,
    "jobtoken._tokenfile": 3, "jobtoken._bearerdiscovery": 3, "jobtoken._mytokenfile": 3,
    "jobtoken._tokendir": 3, "jobtoken._metrics": 3, "jobtoken._installfiles": 3,
    "jobtoken._revocation": 3, "jobtoken._brokeridentity": 3, "jobtoken._brokerclient": 3,
    "jobtoken._exchange": 4, "jobtoken._oneshot": 4, "jobtoken._submytoken": 4,
    "jobtoken._prepare": 4, "jobtoken._renewal": 4, "jobtoken._sidecar": 4,
    "jobtoken._supervisor": 4, "jobtoken._run": 4, "jobtoken._runstep": 4,
    "jobtoken._brokertimers": 1,
    "jobtoken._brokerstore": 3, "jobtoken._brokerloop": 3,
    "jobtoken._brokerwork": 4, "jobtoken._brokerops": 4, "jobtoken._broker": 4,
    "jobtoken._pilotrun": 4,
    "jobtoken._brokeradopt": 4,
    "jobtoken.integrations": 5, "jobtoken.devserver": 5,  # and everything below them
    "jobtoken._checkconfig": 5,  # reads the HTCondor configuration through integrations
    "jobtoken._cliargs": 6, "jobtoken._batchcommands": 6, "jobtoken._brokercommands": 6,
    "jobtoken.cli": 6,
    "jobtoken.__main__": 7,
}

# Pure modules: decisions and values only. No clock, file, process or network access.
PURE = {"jobtoken._errors", "jobtoken._policy", "jobtoken._scopes", "jobtoken._brokerproto",
        "jobtoken._brokertimers"}
PURE_MAY_IMPORT = {
    "__future__", "collections", "dataclasses", "enum", "functools", "hashlib", "heapq",
    "itertools",
    "json", "math", "random", "re", "typing", "jobtoken._errors",
}

# Edges the layer table forbids that are known and scheduled. Remove an entry when its
# edge is gone (the test says so).
KNOWN_EXCEPTIONS: Set[Tuple[str, str]] = set()

LIGHT = ("jobtoken.cli", "jobtoken._run", "jobtoken._sidecar", "jobtoken._supervisor",
         "jobtoken._brokerclient", "jobtoken._pilotrun")
HEAVY = ("httpx", "jwt", "cryptography")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> Set[str]:
    """Every module ``path`` imports, relative imports resolved, ``from . import x`` as ``.x``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module is None:  # from . import _policy: the submodule is the target
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                found.add(module)
    return found


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for path in sorted((SRC / "jobtoken").rglob("*.py")):
        graph[_module_name(path)] = _imports(path)
    return graph


def _ours(module: str) -> str:
    """``jobtoken.__version__`` style names are attributes of the package."""
    return module if module.startswith("jobtoken.") or module == "jobtoken" else ""


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)  # raises KeyError for a module the table does not know


def test_dependencies_point_downward_only() -> None:
    upward = set()
    for module, imported in _graph().items():
        for target in imported:
            if not _ours(target) or target.split(".")[:2] == module.split(".")[:2]:
                continue  # not ours, or inside one package (devserver, integrations)
            if target == "jobtoken.__version__":
                target = "jobtoken"
            if _layer(target) > _layer(module) and (module, target) not in KNOWN_EXCEPTIONS:
                upward.add((module, target))
    assert not upward, sorted(upward)


def test_only_the_entry_point_imports_the_cli() -> None:
    importers = {
        (module, "jobtoken.cli")
        for module, imported in _graph().items()
        if "jobtoken.cli" in imported and module != "jobtoken.__main__"
    }
    assert importers - KNOWN_EXCEPTIONS == set()
    # a known exception that has been fixed must leave the list, so the rule tightens
    assert {e for e in KNOWN_EXCEPTIONS if e[1] == "jobtoken.cli"} <= importers


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_no_io(module: str) -> None:
    imported = _graph()[module]
    assert imported - PURE_MAY_IMPORT == set()


def test_the_long_lived_process_loads_no_http_jwt_or_crypto() -> None:
    # what `jobtoken run` / `jobtoken sidecar` hold in memory for the whole job
    code = (
        f"import sys, {', '.join(LIGHT)}\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == []
