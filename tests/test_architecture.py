"""The house rules, checked over the source with ``ast`` (no module is imported to read its imports):

* no import circles among raeflow's modules, lazy (function-level) imports included;
* nothing outside ``raeflow/models/`` compares a model's variant with a name or a list of names;
* every plain module (models, data, the artifact, the encoder, the readers, search, the service, eval's
  measures, the trainer) imports without Ray.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"raeflow": ROOT / "raeflow", "raeflow.cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGES.items():
        for f in base.rglob("*.py"):
            parts = [p for p in f.relative_to(base).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """The raeflow modules ``name`` imports anywhere in its body. ``from pkg import sub`` counts as importing
    ``pkg.sub`` when that is a module (a package's own ``__init__`` is not an edge back to its submodules)."""
    is_pkg = f.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    out = set()
    for d in found:
        while d and d not in mods:
            d = d.rpartition(".")[0]
        if d and d != name:
            out.add(d)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert graph["raeflow.serve.service"] >= {"raeflow.serve.endpoints"}  # the graph sees real edges
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _variant_comparisons(tree: ast.AST) -> list[int]:
    """Lines comparing something named ``variant`` (``m.variant``, ``cfg["variant"]``, ``variant``) with a string
    or a collection of strings."""

    def is_variant(e: ast.expr) -> bool:
        if isinstance(e, ast.Attribute):
            return e.attr in ("variant", "base_variant")
        if isinstance(e, ast.Name):
            return e.id in ("variant", "base_variant")
        if isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Constant):
            return e.slice.value in ("variant", "base_variant")
        return False

    def is_names(e: ast.expr) -> bool:
        if isinstance(e, ast.Constant):
            return isinstance(e.value, str)
        if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
            return bool(e.elts) and all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in e.elts)
        return isinstance(e, ast.Name) and e.id.isupper()  # a module constant such as ROBUST_VARIANTS

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_variant(s) for s in sides) and any(is_names(s) for s in sides):
                hits.append(node.lineno)
    return hits


def test_nothing_after_models_reads_a_variant_name():
    bad = []
    for name, f in _modules().items():
        if name.startswith("raeflow.models"):
            continue
        bad += [f"{f.relative_to(ROOT)}:{line}" for line in _variant_comparisons(ast.parse(f.read_text()))]
    assert bad == [], "variant names compared outside raeflow/models/ (ask the capabilities instead): " + str(bad)


def test_the_variant_name_check_catches_the_old_patterns():
    code = ('if m.variant in ("dae", "cae"): pass\nif cfg["variant"] != "classifier": pass\n'
            'if model.variant in ROBUST_VARIANTS: pass\nif x.kind == "image": pass\n')
    assert _variant_comparisons(ast.parse(code)) == [1, 2, 3]


PLAIN = ["raeflow", "raeflow.models", "raeflow.models.capabilities", "raeflow.losses", "raeflow.data",
         "raeflow.data.catalog", "raeflow.data.user", "raeflow.data.decode", "raeflow.data.text", "raeflow.io", "raeflow.artifact",
         "raeflow.train.loop", "raeflow.train.report", "raeflow.train.rundir", "raeflow.train.run",
         "raeflow.evaluate", "raeflow.plots", "raeflow.finetune", "raeflow.capability_table",
         "raeflow.embed.encoder", "raeflow.data.readers", "raeflow.embed.output", "raeflow.embed.search",
         "raeflow.embed.retrieval", "raeflow.serve.errors", "raeflow.serve.schemas", "raeflow.serve.codec",
         "raeflow.serve.endpoints", "raeflow.serve.service", "raeflow.serve.api", "raeflow.serve.search",
         "raeflow.serve.options"]


def test_plain_modules_import_without_ray():
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {PLAIN!r}:
            importlib.import_module(name)
        import raeflow
        for name in raeflow.list_variants():
            raeflow.build_model(name, input_shape=[1, 8, 8])
        leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not leaked, leaked[:5]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"


#: What every Ray Data task process imports to run a data rule (reading, splitting, scaling rows).
DATA_RULES = ["raeflow.data.stream", "raeflow.data.sources", "raeflow.data.readers", "raeflow.data.rows"]


def test_data_rules_import_without_torch_or_sklearn():
    # Each Ray Data task process imports these; torch and scikit-learn were ~240 MiB PSS more per process
    # (measured), paid by every streamed epoch's decoding workers.
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {DATA_RULES!r}:
            importlib.import_module(name)
        heavy = sorted(m for m in ("torch", "sklearn", "ray") if m in sys.modules)
        assert not heavy, heavy
        import raeflow
        assert "build_model" in raeflow.__all__ and callable(raeflow.build_model)  # served lazily
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"
