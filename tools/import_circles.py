"""Count import circles among the project's modules: pairs (and longer loops) of modules
that import each other, type-only (`if TYPE_CHECKING:`) and function-local imports
included, because a reader following either import meets the other.

    python3 tools/import_circles.py            # lists each circle, exits 1 if any
    python3 tools/import_circles.py --count    # prints the number only
    python3 tools/import_circles.py --edges    # and the imports that close each circle

A circle is a strongly connected group of modules in the import graph; the count is the
number of such groups. `from package import name` counts as an import of the submodule
when `name` is one, else of the package's __init__.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanovllm_mlx", "cli")


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in known else module)
    # An import of a.b.c also runs a.b's and a's __init__; only edges to project modules
    # (the deepest one named) count.
    return {m for m in out if m in known and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", action="store_true", help="print the number of circles only")
    parser.add_argument("--edges", action="store_true", help="show each circle's imports")
    args = parser.parse_args()
    files = module_files()
    known = set(files)
    graph = {name: imports(name, path, known) for name, path in files.items()}
    found = circles(graph)
    if args.count:
        print(len(found))
    else:
        for group in found:
            print(" <-> ".join(group))
            if args.edges:
                for name in group:
                    print(f"    {name} -> {', '.join(sorted(graph[name] & set(group)))}")
        print(f"{len(found)} import circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
