"""The package's shape: one-way dependencies, no private cross-imports, one walk
over params. Static checks of the source (no import of lora_jax needed)."""

import ast
import os
import re
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lora_jax")


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _modules() -> dict:
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


MODS = _modules()


def _imports(mod: str):
    """``(target module, imported name or None)`` for every import, at any depth."""
    path = MODS[mod]
    tree = ast.parse(_read(path), path)
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("lora_jax"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, None) if full in MODS else (base, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_jax"):
                    yield alias.name, None


def _graph() -> dict:
    edges = defaultdict(set)
    for mod in MODS:
        for target, _ in _imports(mod):
            # a package re-exporting its children is not a dependency cycle
            if target in MODS and target != mod and not target.startswith(mod + ".") \
                    and not mod.startswith(target + "."):
                edges[mod].add(target)
    return edges


def test_no_import_cycles():
    edges, state, cycles = _graph(), {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(MODS):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles (function-level imports count): " + "; ".join(
        " -> ".join(c) for c in cycles)


def test_no_module_imports_anothers_private_names():
    bad = [f"{mod} imports {target}.{name}" for mod in MODS for target, name in _imports(mod)
           if name is not None and name.startswith("_") and not name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_core_imports_nothing_else_of_lora_jax():
    bad = [f"{mod} -> {t}" for mod in MODS if mod.startswith("lora_jax._core")
           for t, _ in _imports(mod) if not t.startswith("lora_jax._core")]
    assert not bad, bad


# The layers, lowest first; a module may import only from its own layer or lower ones.
LAYERS = ["lora_jax._core", "lora_jax._variants", "lora_jax._init", "lora_jax._merge",
          "lora_jax._report", "lora_jax._apply", "lora_jax._optim", "lora_jax._adalora",
          "lora_jax._checkpoint",
          "lora_jax._shard", "lora_jax._analysis", "lora_jax._multi", "lora_jax.interop",
          "lora_jax.plot", "lora_jax.__main__", "lora_jax"]


def _layer(mod: str) -> int:
    best = None
    for i, prefix in enumerate(LAYERS):
        if mod == prefix or mod.startswith(prefix + "."):
            if best is None or len(prefix) > len(LAYERS[best]):
                best = i
    assert best is not None, f"{mod} is in no layer; add it to LAYERS"
    return best


def test_dependencies_flow_down_the_layers():
    edges = _graph()
    bad = [f"{m} ({LAYERS[_layer(m)]}) imports {t} ({LAYERS[_layer(t)]})"
           for m, ts in edges.items() for t in ts if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


_WALKS = {"tree_flatten_with_path", "tree_map_with_path", "tree_leaves_with_path",
          "tree_flatten", "tree_leaves", "tree_map", "tree_structure", "map", "leaves",
          "structure", "flatten"}


def _walks_over_params(path: str):
    """Calls of a jax tree walk whose first argument names a params tree."""
    tree = ast.parse(_read(path), path)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _WALKS):
            continue
        owner = ast.unparse(node.func.value)
        if owner not in ("jax.tree_util", "jax.tree", "tree_util"):
            continue
        args = node.args[1:] if node.func.attr in ("tree_map", "map", "tree_map_with_path") \
            else node.args[:1]
        for a in args:
            if re.search(r"params|base|\blike\b", ast.unparse(a)):
                yield node.lineno, ast.unparse(node)


def test_one_flattener_for_params():
    """Every walk over a params tree goes through lora_jax._core.paths (quantized
    containers, and any future container, stay whole)."""
    hits = []
    for mod, path in MODS.items():
        if mod == "lora_jax._core.paths":
            continue
        src = _read(path)
        if "tree_flatten_with_path(params" in src:
            hits.append(f"{mod}: tree_flatten_with_path(params")
        hits += [f"{mod}:{line}: {call}" for line, call in _walks_over_params(path)]
    assert not hits, "walk params with lora_jax._core.paths helpers:\n" + "\n".join(hits)


# Exceptions that are control flow inside lora_jax, not messages to users.
_INTERNAL = {"NotLowRank", "_Contradiction", "RuntimeError"}


def _template_violations(path: str):
    tree = ast.parse(_read(path), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            name = ast.unparse(node.exc.func)
            short = name.split(".")[-1]
            # error() and the module-local builders around it (_field_error, ...)
            if short == "error" or short.endswith("_error") or short in _INTERNAL:
                continue
            if any(isinstance(a, (ast.JoinedStr, ast.Constant, ast.BinOp)) for a in node.exc.args):
                yield node.lineno, f"raise {name}(<text>)"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn" and \
                node.args and isinstance(node.args[0], (ast.JoinedStr, ast.Constant)):
            if not (isinstance(node.args[0], ast.Constant) and
                    "deprecated" in str(node.args[0].value)):
                yield node.lineno, "warnings.warn(<text>)"


def test_errors_and_warnings_come_from_one_template():
    """Messages are built by lora_jax._core.errors (what, where, how to fix)."""
    bad = [f"{mod}:{line}: {what}" for mod, path in MODS.items()
           for line, what in _template_violations(path)]
    assert not bad, "use lora_jax._core.errors.error/message:\n" + "\n".join(bad)
