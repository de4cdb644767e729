"""The shape of a Python package, counted: modules and their sizes, import cycles, imports of another
module's private names, function-level imports of the package's own modules, the largest module and the
largest function.

    python tools/code_shape.py [PACKAGE_DIR]      # default: moesift
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def modules(pkg: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def target(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def graph(mods: dict[str, Path], root: str):
    edges: dict[str, set[str]] = defaultdict(set)
    private, fn_level = [], 0
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                tgt = target(mod, path, node)
                names = [(f"{tgt}.{a.name}" if f"{tgt}.{a.name}" in mods else tgt, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            else:
                continue
            for t, name in names:
                if not (t == root or t.startswith(root + ".")) or t == mod:
                    continue
                fn_level += id(node) in inner
                if t in mods:
                    edges[mod].add(t)
                if name and name.startswith("_") and not name.startswith("__") and f"{t}.{name}" not in mods:
                    private.append(f"{mod} imports {t}.{name}")
    return edges, private, fn_level


def cycles(mods, edges) -> list[list[str]]:
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in mods:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    pkg = Path(sys.argv[1] if len(sys.argv) > 1 else "moesift").resolve()
    mods = modules(pkg)
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    edges, private, fn_level = graph(mods, pkg.name)
    cyc = cycles(mods, edges)
    funcs = []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{m}.{node.name}"))
    print(f"modules: {len(mods)}, {sum(sizes.values())} lines")
    for m in sorted(sizes, key=lambda k: -sizes[k]):
        print(f"  {sizes[m]:5d}  {m}")
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print(f"  {' <-> '.join(c)}")
    print(f"cross-module private imports: {len(private)}")
    for x in private:
        print(f"  {x}")
    print(f"function-level imports of {pkg.name}'s own modules: {fn_level}")
    big = max(sizes, key=sizes.get)
    print(f"largest module: {big} ({sizes[big]} lines)")
    n, name = max(funcs)
    print(f"largest function: {name} ({n} lines)")


if __name__ == "__main__":
    main()
