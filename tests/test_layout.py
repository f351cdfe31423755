"""The layering a newcomer relies on, read from the source with `ast` (nothing is imported).

- No import circle among compacs's modules, counting imports inside functions too: a lazy
  import that closes a circle still ties the two modules together, it only hides it.
- Nothing below the CLI imports it: the CLI is the top layer, workers must not load argparse
  and the command bodies.
- The domain path (query, retrieval preparation, the encoded parts) imports nothing from
  `dimse/`, so a second face (DICOMweb) reuses it as it is.
- Modules stay small enough to read in one sitting; the few that are larger say why here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> package name, as pyproject.toml's package-dir maps them
PACKAGES = {"service": "compacs.service", "codecs": "compacs.codecs", "models": "compacs.models"}
MAX_LINES = 500
# Modules allowed over MAX_LINES, and why
LARGER: dict[str, str] = {}
DOMAIN = ("compacs.service.query", "compacs.service.retrieve", "compacs.service.parts")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "migrations" in path.parts:
                continue  # alembic's scripts import by convention, not by layer
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The compacs modules `name` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = here[: len(here) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [base]
            names = [alias.name for alias in node.names]
        else:
            continue
        for base in bases:
            if not base.startswith("compacs."):
                continue
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if subs:
                targets.update(subs)
            if not subs or len(subs) < len(names):
                module = base
                while module not in MODULES and "." in module:
                    module = module.rsplit(".", 1)[0]
                if module in MODULES:
                    targets.add(module)
    targets.discard(name)
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_is_read() -> None:
    # A parser that found nothing would pass every rule below
    assert len(MODULES) > 60
    assert "compacs.service.storage.schema" in GRAPH["compacs.service.ingest"] or any(
        _is_under(t, "compacs.service.storage") for t in GRAPH["compacs.service.ingest"]
    )


def test_no_import_circle() -> None:
    assert _cycles() == []


def test_nothing_below_the_cli_imports_it() -> None:
    cli = "compacs.service.cli"
    up = {
        name: sorted(t for t in targets if _is_under(t, cli))
        for name, targets in GRAPH.items()
        if not _is_under(name, cli)
    }
    assert {name: t for name, t in up.items() if t} == {}


def test_the_domain_path_does_not_import_dimse() -> None:
    dimse = "compacs.service.dimse"
    reaches = {
        name: sorted(t for t in targets if _is_under(t, dimse))
        for name, targets in GRAPH.items()
        if any(_is_under(name, d) for d in DOMAIN)
    }
    assert {name: t for name, t in reaches.items() if t} == {}


def test_modules_stay_readable() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LARGER
    }
    assert long == {}
