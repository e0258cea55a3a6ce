"""The import graph of ``sslab/`` is a strict stack: no cycle between modules, and no import from a floor above
the importer's own (the README's "Layout" section describes the floors).

Every ``import`` statement counts, wherever it stands: at module level, inside a function (a lazy import is how
a circle hides), under ``if TYPE_CHECKING``; relative imports are resolved, and ``from sslab.x import y`` is an
import of the submodule ``sslab.x.y`` when there is one, else of the package ``sslab.x`` (whose
``__init__.py`` re-exports count as the package). Importing ``sslab.x.y`` does not count as importing the
parent packages Python initialises on the way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sslab"

# Floors from the top down; a module may import its own floor and the floors below it, never one above.
# A name stands for the module or package and everything under it; the longest matching name decides.
LAYERS: list[tuple[str, ...]] = [
    ("sslab", "sslab.api"),  # the public API (the package's __init__ re-exports sslab.api lazily)
    ("sslab.runs", "sslab.export", "sslab.embed"),  # what runs something end to end, and the python -m tools
    ("sslab.cutler",),  # CutLER: MaskCut, pseudo-masks, the detector and its training
    ("sslab.callbacks",),  # periodic evaluation, pictures and progress during training
    ("sslab.evaluation",),  # metrics and probes on features; never a run
    ("sslab.build",),  # a composed config -> DataModule, backbone (with its weights), method
    ("sslab.methods",),  # one LightningModule per method
    ("sslab.modules",),  # heads, losses, decoders, EMA, schedules (no Lightning)
    # DataModules (uint8 batches), the views, and the tools that write datasets to disk (data=stamps and
    # data=atari call their builder on first use; the builders read through the datasets' readers)
    ("sslab.data", "sslab.augment", "sslab.dataset_builders"),
    ("sslab.init_from", "sslab.official_weights"),  # weights into a backbone
    ("sslab.backbones",),  # encoders behind one interface
    # run-time services that know nothing of models; the training shell (Trainer, checkpoints, step seed, NaN
    # guard) is shared by pretraining and CutLER's detector
    (
        "sslab.rundir",
        "sslab.resume",
        "sslab.precision",
        "sslab.cluster",
        "sslab.loggers",
        "sslab.training_shell",
    ),
    ("sslab.cli", "sslab.checkpoint_io", "sslab.report"),
    (
        "sslab.errors",
        "sslab.progress_lines",
        "sslab.devices",
        "sslab.eval_mode",
        "sslab.hooks",
    ),  # no sslab import
]


# -- the import graph ---------------------------------------------------------------------------------------
def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (``__init__.py`` names the package)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, source: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports anywhere in ``source``."""
    known = set(known)
    own_package = name if is_package else name.rpartition(".")[0]
    found = set()

    def nearest_known(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [nearest_known(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            targets = []
            for alias in node.names:  # a submodule by that name, else a name the module itself defines
                sub = f"{origin}.{alias.name}"
                targets.append(sub if sub in known else nearest_known(origin))
        else:
            continue
        found.update(t for t in targets if t is not None and t != name)
    return found


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the modules it imports, for ``sources`` {name: (source text, is_package)}."""
    return {name: imported_modules(name, text, is_pkg, sources) for name, (text, is_pkg) in sources.items()}


def sslab_sources() -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in module_files().items()}


# -- the checks ---------------------------------------------------------------------------------------------
def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component with more than one module (or a
    self-import), each written from its smallest name, so a failure names exactly which modules go round."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(
        v: str,
    ) -> None:  # Tarjan's algorithm, iterative so deep graphs cannot hit the recursion limit
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == node:
                        break
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        out.append(shortest_path_back(graph, start, component))
    return sorted(out)


def shortest_path_back(graph: Mapping[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest import path from ``start`` back to itself inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in within or child in previous:
                    continue
                previous[child] = node
                if child == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a cycle with no path back to itself")


def floor_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    """Index of the floor (0 = top) whose longest matching name covers ``module``; None if none does."""
    best: tuple[int, int] | None = None
    for floor, names in enumerate(layers):
        for declared in names:
            covers = module == declared or module.startswith(declared + ".")
            if covers and (best is None or len(declared) > best[0]):
                best = (len(declared), floor)
    return None if best is None else best[1]


def upward_imports(graph: Mapping[str, set[str]], layers: list[tuple[str, ...]]) -> list[str]:
    """Every import of a module on a floor above the importer's, as ``importer (floor) -> imported (floor)``."""
    out = []
    for importer in sorted(graph):
        own = floor_of(importer, layers)
        for imported in sorted(graph[importer]):
            theirs = floor_of(imported, layers)
            if own is not None and theirs is not None and theirs < own:
                out.append(f"{importer} (floor {own}) -> {imported} (floor {theirs})")
    return out


def undeclared(graph: Mapping[str, set[str]], layers: list[tuple[str, ...]]) -> list[str]:
    return sorted(m for m in graph if floor_of(m, layers) is None)


# -- sslab itself -------------------------------------------------------------------------------------------
def test_every_module_has_a_floor():
    assert not undeclared(import_graph(sslab_sources()), LAYERS), "add these modules to LAYERS"


def test_no_import_cycle():
    found = cycles(import_graph(sslab_sources()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_from_a_floor_above():
    found = upward_imports(import_graph(sslab_sources()), LAYERS)
    assert not found, "imports from a floor above the importer's:\n" + "\n".join(found)


# -- the checks on a small synthetic graph, so that they cannot pass by finding nothing ------------------------
SYNTHETIC = {
    "pkg": ("from pkg.top import run\n", True),
    "pkg.top": ("import pkg.mid.helper\n", False),
    "pkg.mid": ("from .helper import util\n", True),
    "pkg.mid.helper": ("def util():\n    from pkg import low\n    return low\n", False),
    "pkg.low": ("import os\n\ndef f():\n    from pkg.mid import helper  # up, hidden in a function\n", False),
    "pkg.leaf": ("from pkg.low import f\nfrom . import low\n", False),
}
SYNTHETIC_LAYERS = [("pkg", "pkg.top"), ("pkg.mid",), ("pkg.low", "pkg.leaf")]


def test_the_walker_follows_lazy_relative_and_submodule_imports():
    graph = import_graph(SYNTHETIC)
    assert graph["pkg"] == {"pkg.top"}  # a name the submodule defines: the submodule
    assert graph["pkg.top"] == {"pkg.mid.helper"}  # import a.b.c: the module itself, not its parents
    assert graph["pkg.mid"] == {"pkg.mid.helper"}  # relative: from .helper import util
    assert graph["pkg.mid.helper"] == {"pkg.low"}  # from a package import a submodule, inside a function
    assert graph["pkg.low"] == {"pkg.mid.helper"}  # lazily, in a function
    assert graph["pkg.leaf"] == {"pkg.low"}  # from pkg.low import f; from . import low


def test_the_checks_find_a_planted_cycle_and_upward_import():
    graph = import_graph(SYNTHETIC)
    assert cycles(graph) == [["pkg.low", "pkg.mid.helper", "pkg.low"]]
    assert upward_imports(graph, SYNTHETIC_LAYERS) == ["pkg.low (floor 2) -> pkg.mid.helper (floor 1)"]
    assert undeclared(graph, SYNTHETIC_LAYERS) == []
    assert undeclared({**graph, "other": set()}, SYNTHETIC_LAYERS) == ["other"]
    assert cycles({"a": {"a"}}) == [["a", "a"]]  # a module importing itself
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(ring) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
