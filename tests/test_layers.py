"""The package's layers: no import circles, and no import from a lower layer to a higher one.

Every `import` and `from ... import` in exvae_dist/ counts, also those inside functions (a
lazy import is still a dependency). Entry points (the `python -m exvae_dist.<command>` files
at the top and `__main__` modules) sit above every layer.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exvae_dist"
# lowest first; a module may import its own layer and the layers before it
LAYERS = ("common", "config", "core", "retrieval", "data", "runs", "evaluation", "train", "api",
          "commands")
# the commands that use a trained run (evaluate, generate, explain, ...) need no trainer: only
# the command line of training itself (cli.py) reaches into train/
TRAINING_COMMANDS = ("exvae_dist.commands.cli",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set) -> set:
    """The exvae_dist modules `path` imports (a name imported from a package counts as its
    submodule when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "exvae_dist"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "exvae_dist":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return out - {name}


def graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def layer(module: str):
    """The index of a module's layer in LAYERS, or None for an entry point."""
    parts = module.split(".")
    if parts[-1] == "__main__" or len(parts) <= 2 and parts[-1] not in LAYERS:
        return None  # exvae_dist/__init__, the command shims, __main__ modules
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def without_package_inits(edges: dict) -> dict:
    """A package's __init__ re-exporting its submodules is not a circle with them."""
    return {m: {t for t in ts if not (m.startswith(t + ".") or t.startswith(m + "."))}
            for m, ts in edges.items()}


def test_every_module_belongs_to_a_layer_or_is_an_entry_point():
    for module in graph():
        parts = module.split(".")
        assert len(parts) <= 2 or parts[1] in LAYERS, f"{module}: add its package to LAYERS"


def test_no_import_circles():
    assert cycles(without_package_inits(graph())) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = []
    for module, targets in graph().items():
        here = layer(module)
        if here is None:
            continue
        for target in targets:
            there = layer(target)
            if there is None and target != "exvae_dist":  # an entry point is above them all
                upward.append(f"{module} -> {target} (an entry point)")
            elif there is not None and there > here:
                upward.append(f"{module} -> {target} ({LAYERS[here]} below {LAYERS[there]})")
    assert upward == []


def test_only_the_training_command_imports_a_trainer():
    reach = [f"{m} -> {t}" for m, ts in graph().items() for t in ts
             if m.startswith("exvae_dist.commands.") and m not in TRAINING_COMMANDS
             and t.startswith("exvae_dist.train")]
    assert reach == []


def test_the_walk_sees_circles_and_upward_imports():
    """The checks themselves, on a made-up graph: what they must catch."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("exvae_dist.core.loop") < layer("exvae_dist.train.local")
    assert layer("exvae_dist.evaluate") is None and layer("exvae_dist.train.__main__") is None
