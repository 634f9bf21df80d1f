"""The import direction of the package (design.md, architecture review 4.13), as a test.

- models, ops, state and config never import the runtime accelerators, the
  checkpoint readers or anything above them: a model gets its accelerator
  through ``runtime.accelerate``;
- library code never imports the command-line layer (``commands``, ``cli``);
- no module imports the package root;
- there is no import circle, function-local imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rwkvkit"
PKG = "rwkvkit"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = [PKG, *f.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in names:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
    return edges


MODS = _modules()
EDGES = _imports(MODS)

LOW = ("rwkvkit.models", "rwkvkit.ops", "rwkvkit.state", "rwkvkit.config", "rwkvkit.errors")
HIGH = ("rwkvkit.runtime", "rwkvkit.checkpoint", "rwkvkit.rwkvcpp", "rwkvkit.generate", "rwkvkit.serve",
        "rwkvkit.train", "rwkvkit.eval", "rwkvkit.commands", "rwkvkit.cli", "rwkvkit.tokenizer")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_models_and_ops_never_import_upward():
    bad = sorted((m, t) for m, ts in EDGES.items() if _under(m, LOW) for t in ts if _under(t, HIGH))
    assert not bad, f"low-level modules import upward: {bad}"


def test_library_never_imports_the_cli_layer():
    cli = ("rwkvkit.commands", "rwkvkit.cli", "rwkvkit.__main__")
    bad = sorted((m, t) for m, ts in EDGES.items() if not _under(m, cli) for t in ts if _under(t, cli))
    assert not bad, f"library modules import the command-line layer: {bad}"


def test_no_module_imports_the_package_root():
    bad = sorted(m for m, ts in EDGES.items() if m != PKG and PKG in ts)
    assert not bad, f"modules import the package root: {bad}"


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in EDGES[v]:
            if w == PKG:
                continue
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
                circles.append(sorted(comp))

    for v in EDGES:
        if v not in index and v != PKG:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_every_registered_generation_has_its_module_parts():
    import importlib

    from rwkvkit import models

    for gen, name in models.REGISTRY.items():
        mod = importlib.import_module(f"rwkvkit.models.{name}")
        for attr in ("CONFIG", "MODEL", "FP32_PARAMS", "LR_SCALES", "LORA_TARGETS", "init_weights", "random_state_dict"):
            assert hasattr(mod, attr), f"rwkvkit.models.{name} (generation {gen}) lacks {attr}"
