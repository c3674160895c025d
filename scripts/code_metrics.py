"""The figures of the code's shape: lines and files, function lengths, import cycles among
strata's modules and imports that point up its inner layers, `# fmt: skip` markers.

Usage: python scripts/code_metrics.py [--long 50] [--list]

Layers, top to bottom, in each chain: an import from a package to one above it in its chain
is an upward arrow. Imports inside functions count (a lazy import is still an arrow).
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("strata", "gateway", "services", "launch")
CHAINS = (
    ("engine", "model", "attention", "kernels"),
    ("cache", "kv"),
)


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module this one imports, anywhere in the file (relative imports resolved)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent if is_package else parent[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> tuple[int, int] | None:
    """(chain, depth) of a strata module's inner package, None outside every chain."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "strata":
        return None
    for c, chain in enumerate(CHAINS):
        if parts[1] in chain:
            return c, chain.index(parts[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", type=int, default=50, help="report functions over this many lines")
    ap.add_argument("--list", action="store_true", help="name the long functions and arrows")
    a = ap.parse_args()
    files = python_files()
    modules = {module_name(p): p for p in files}
    lines, lengths, long, skips = 0, [], [], 0
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        text = path.read_text()
        lines += sum(1 for line in text.splitlines() if line.strip())
        skips += text.count("# fmt: skip")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                lengths.append(n)
                if n > a.long:
                    long.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
        targets = imports_of(tree, name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in modules and t != name}
    cycles = strongly_connected(graph)
    upward = []
    for src, targets in graph.items():
        ls = layer(src)
        for dst in targets:
            ld = layer(dst)
            if ls and ld and ls[0] == ld[0] and ld[1] < ls[1]:
                upward.append(f"{src} -> {dst}")
    other = sorted(
        p for pkg in PACKAGES for ext in ("*.c", "*.cpp", "*.h") for p in (ROOT / pkg).rglob(ext)
    )
    lengths.sort()
    p95 = lengths[int(0.95 * (len(lengths) - 1))]
    print(f"python files {len(files)}, non-blank lines {lines}")
    print(f"C/C++ files {len(other)}, lines {sum(len(p.read_text().splitlines()) for p in other)}")
    print(
        f"functions {len(lengths)}: median {statistics.median(lengths):g} lines, p95 {p95}, "
        f"longest {lengths[-1]}; over {a.long} lines: {len(long)}"
    )
    print(f"import cycles {len(cycles)} (modules in them: {sum(len(c) for c in cycles)})")
    print(f"upward arrows in {' / '.join(' -> '.join(c) for c in CHAINS)}: {len(upward)}")
    print(f"'# fmt: skip' markers {skips}")
    if a.list:
        for n, where in sorted(long, reverse=True):
            print(f"  {n:4d} {where}")
        for c in cycles:
            print("  cycle: " + " <-> ".join(c))
        for arrow in sorted(upward):
            print("  up: " + arrow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
