"""The package layering (docs/ARCHITECTURE.md), checked on the source: no import cycle anywhere.

* ``rcsr_deploy`` (the quantizer library) imports neither ``vllm_plugin`` nor ``rcsr_cli``;
* ``vllm_plugin`` imports from ``rcsr_deploy`` only the pure modules ``format``, ``moe_format``, ``packing``,
  ``errors``
  and never ``rcsr_cli``;
* ``rcsr_cli`` (command line, benchmark harness, server lifecycle) may import both;
* the module-level import graph inside and across the three packages has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rcsr_deploy", "vllm_plugin", "rcsr_cli")
#: the contract (format, and the MoE tensor names of moe_format), the bit layout, the errors: torch only
PURE = {"rcsr_deploy", "rcsr_deploy.format", "rcsr_deploy.moe_format", "rcsr_deploy.packing", "rcsr_deploy.errors"}
#: compiled extension modules (setup.py): leaves of the graph, importing nothing of the project
EXTENSIONS = {"vllm_plugin._rcsr_cpu"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level and inside functions)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(base)
                names = [f"{base}.{node.module}" if node.module else base]
                if not node.module:
                    names = [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    graph = {e: set() for e in EXTENSIONS}
    mods.update({e: None for e in EXTENSIONS})
    for m, p in mods.items():
        if p is None:
            continue
        deps = set()
        for imp in _imports(p):
            while imp and imp not in mods:  # ``from pkg.mod import name``: keep the module
                imp = imp.rpartition(".")[0]
            if imp and imp != m:
                deps.add(imp)
        graph[m] = deps
    return graph


def test_library_does_not_import_the_plugin_or_the_cli():
    for m, deps in _graph().items():
        if m.startswith("rcsr_deploy"):
            bad = [d for d in deps if not d.startswith("rcsr_deploy")]
            assert not bad, f"{m} imports {bad}"


def test_plugin_imports_only_pure_library_modules():
    for m, deps in _graph().items():
        if m.startswith("vllm_plugin"):
            bad = [d for d in deps if d.startswith("rcsr_cli") or (d.startswith("rcsr_deploy") and d not in PURE)]
            assert not bad, f"{m} imports {bad}"


def test_no_import_cycle():
    graph = _graph()
    # package __init__ files are implicit parents of every submodule: count their own imports only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
