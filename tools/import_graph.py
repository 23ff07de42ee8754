"""Print refimpl's module import graph, top layer first, and check it: `python tools/import_graph.py`.

Every import counts, at the top of a file or inside a function. The checks (also run by
tests/test_architecture.py): no cycles; a module imports only from its own layer or below
(LAYERS); nothing but the CLI imports the CLI. Exit status 1 if a check fails.
"""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refimpl"
LAYERS = ["base", "core", "data", "training", "llm", "evaluation", "golden", "app"]   # bottom to top
BASE = {"refimpl", "refimpl.errors", "refimpl.files", "refimpl.backend", "refimpl.config", "refimpl.memory"}
APP = {"refimpl.cli", "refimpl.demo", "refimpl.__main__"}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module):
    return "base" if module in BASE else "app" if module in APP else module.split(".")[1]


def imports(path, module):
    """The refimpl modules that `module` (file `path`) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("refimpl")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:   # `from . import x` may name a module
                path = (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py")
                found.add(f"{target}.{a.name}" if path.exists() else target)
    return {m for m in found if m.startswith("refimpl") and m != module}


def graph():
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: sorted(imports(p, m) & set(files)) for m, p in files.items()}


def problems(g):
    out = []
    for m, deps in g.items():
        for d in deps:
            if LAYERS.index(layer(d)) > LAYERS.index(layer(m)):
                out.append(f"{m} ({layer(m)}) imports {d} ({layer(d)}), a higher layer")
            if d == "refimpl.cli" and m not in APP:
                out.append(f"{m} imports the CLI")
    seen, stack = {}, []

    def visit(m):   # depth-first search for a cycle
        seen[m] = "open"
        stack.append(m)
        for d in g.get(m, []):
            if seen.get(d) == "open":
                out.append("cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = "done"
    for m in g:
        if m not in seen:
            visit(m)
    return out


if __name__ == "__main__":
    g = graph()
    for name in reversed(LAYERS):
        for m in sorted(k for k in g if layer(k) == name):
            print(f"{name:<10} {m:<32} -> {', '.join(d.removeprefix('refimpl.') for d in g[m]) or '-'}")
    bad = problems(g)
    print("\n".join(bad) if bad else "no cycles; every import goes down a layer or stays in its own")
    sys.exit(1 if bad else 0)
