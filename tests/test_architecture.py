"""The layer rule of docs/ARCHITECTURE.md: every import (module level or inside a function) points
down or sideways within a layer, engines and algorithms never import each other, and no two modules
import each other, directly or through others."""
import ast
import os

from conftest import REPO

# Layer of each module (the longest matching prefix decides); docs/ARCHITECTURE.md explains them.
LAYERS = {
    "fasthint_kernels": 0,                       # kernels: math on tensors, nothing from fasthint
    "fasthint.errors": 1, "fasthint.options": 1, "fasthint.hints": 1, "fasthint.hint_json": 1, "fasthint.hint_leak": 1,
    "fasthint.batch": 1, "fasthint.rewards": 1, "fasthint.packing": 1, "fasthint.tables": 1, "fasthint.reward_funcs": 1,
    "fasthint.head": 1, "fasthint.data": 1, "fasthint.dist": 1, "fasthint.engines.base": 1,
    "fasthint.toy.task": 1, "fasthint.precheck": 1,  # foundation: types, data, verifier, collectives, CLI checks
    "fasthint.autoselect": 2, "fasthint.ops": 2,  # ops: dispatch over the kernels
    "fasthint.terms": 3, "fasthint.loss": 3, "fasthint.update": 3,  # the policy objective and its update step
    "fasthint.engines": 4, "fasthint.algorithms": 4,  # rollout engines; algorithms (siblings)
    "fasthint": 5,                               # building, the loop and the CLIs
}
SIBLINGS = ("fasthint.engines", "fasthint.algorithms")


def _modules() -> dict:
    out = {}
    for folder, pkg in (("fasthint", "fasthint"), (os.path.join("kernels", "fasthint_kernels"), "fasthint_kernels")):
        base = os.path.join(REPO, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(dirpath, f)
    return out


def _imports(path: str, name: str, modules: dict) -> set:
    """Every project module ``path`` imports, anywhere in the file."""
    found = set()
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):  # names that are not submodules come from ``mod`` itself
                found.add(mod)
    return {m for m in found if m in modules and m != name}


def _layer(name: str) -> int:
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[key]


def _graph() -> dict:
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_every_import_points_down_or_sideways():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(mod) and mod != "fasthint":  # the package root re-exports the API
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
            for a, b in (SIBLINGS, SIBLINGS[::-1]):
                if mod.startswith(a) and dep.startswith(b) and dep != "fasthint.engines.base":
                    bad.append(f"{mod} imports its sibling {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {m: {d for d in deps if d != "fasthint"} for m, deps in _graph().items() if m != "fasthint"}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_rule_catches_an_upward_import():
    """The checker itself: a kernel importing fasthint, or ops importing the loss, is flagged."""
    assert _layer("fasthint_kernels.chunked") < _layer("fasthint.ops") < _layer("fasthint.loss")
    assert _layer("fasthint.loss") < _layer("fasthint.algorithms.sage") == _layer("fasthint.engines.vllm")
    assert _layer("fasthint.engines.vllm") < _layer("fasthint.train")
    graph = _graph()
    assert "fasthint.ops" in graph["fasthint.loss"] and "fasthint.autoselect" in graph["fasthint.ops"]


# Imports inside a function hide the real graph; they are kept only for optional or heavy packages
# (and the package root's two, which keep ``import fasthint`` light), each with its reason on the line.
LAZY_OK = ("vllm", "fasthint.engines.vllm", "fasthint_kernels.advantages", "fasthint_kernels.logprobs",
           "fasthint_kernels.fused_pg",
           "torch.utils.tensorboard", "torch.utils", "pyarrow", "wandb", "matplotlib", "ninja", "liger_kernel",
           "flash_attn", "fasthint.train", "fasthint")


def _function_imports():
    modules = _modules()
    for name, path in modules.items():
        lines = open(path, encoding="utf-8").read().split("\n")
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        yield name, node.lineno, mod, lines[node.lineno - 1]


def test_function_level_imports_are_optional_packages_with_a_reason():
    bad = []
    for name, line, mod, text in _function_imports():
        allowed = any(mod == k or mod.startswith(k + ".") for k in LAZY_OK)
        if mod == "fasthint" or mod.startswith("fasthint.") and mod not in ("fasthint.train", "fasthint.engines.vllm"):
            allowed = name == "fasthint" and mod == "fasthint"  # only the root's lazy config
        if not allowed or "#" not in text:
            bad.append(f"{name}:{line}: {text.strip()}" + ("" if allowed else "  (import it at module level)"))
    assert not bad, "function-level imports need an optional package and a '# reason':\n" + "\n".join(bad)


def test_no_source_or_test_file_over_500_lines():
    long = []
    for folder in ("fasthint", os.path.join("kernels", "fasthint_kernels"), "tests", "bench", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    n = sum(1 for _ in open(os.path.join(dirpath, f), encoding="utf-8"))
                    if n > 500:
                        long.append(f"{os.path.relpath(os.path.join(dirpath, f), REPO)}: {n} lines")
    assert not long, "split these files (500 lines at most):\n" + "\n".join(long)
