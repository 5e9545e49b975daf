"""The package's layout, read from the source with `ast` (nothing is imported): layers depend
downward only, no import cycles, no module too long to read in one sitting, and test files that
pytest can tell apart."""

from __future__ import annotations

import ast
import collections
import functools
import pathlib

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPOSITORY / "bart_jax"
TESTS_DIR = REPOSITORY / "tests"
MAX_MODULE_LINES = 400

# Each layer (a top-level module, a family of them or a subpackage) by rank: a module may import
# its own layer and any layer of lower rank, never a higher one nor another layer of its rank.
LAYER_RANKS = {
    "config": 0,
    "tokenizer": 0,  # tokenizer.py and the tokenizer_*.py modules split out of it
    "model": 1,
    "checkpoints": 2,
    "generation": 2,
    "parallel": 3,
    "training": 4,
    "pretrained": 5,
    "apps": 6,
    "bart_jax": 7,  # bart_jax/__init__.py (the public API) and __main__.py
}


def module_name(path: pathlib.Path) -> str:
    """`bart_jax/model/heads.py` -> `bart_jax.model.heads`; a package's __init__.py is the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module's name."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "bart_jax"
    if parts[1].startswith("tokenizer_"):
        return "tokenizer"
    return parts[1]


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


@functools.cache
def imported_modules(module: str) -> list[tuple[int, str]]:
    """(line, module) of every bart_jax module that `module` imports, at module level or in a function.

    `from bart_jax.x import y` imports the module bart_jax.x.y where there is one, else bart_jax.x.
    """
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module, `level - 1` packages up
                package = module.split(".") if is_package(module) else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in MODULES else base))
    return sorted({(line, name) for line, name in found if name in MODULES})


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPOSITORY)}:{line}"


def test_every_module_belongs_to_a_layer():
    unknown = sorted(module for module in MODULES if layer(module) not in LAYER_RANKS)
    assert not unknown, f"modules of no layer (give their layer a rank in LAYER_RANKS): {unknown}"


def forbidden(source: str, target: str) -> str | None:
    """Why module `source` may not import module `target`, or None where it may."""
    source_layer, target_layer = layer(source), layer(target)
    if source_layer not in LAYER_RANKS or target_layer not in LAYER_RANKS:
        return None  # test_every_module_belongs_to_a_layer names it
    source_rank, target_rank = LAYER_RANKS[source_layer], LAYER_RANKS[target_layer]
    if target_layer == source_layer or target_rank < source_rank:
        return None
    if target_rank > source_rank:
        return f"a higher layer ({target_layer} has rank {target_rank}, {source_layer} {source_rank})"
    return f"another layer of the same rank ({target_layer} and {source_layer} have rank {source_rank})"


def test_layers_depend_downward_only():
    violations = [
        f"{where(module, line)}: {module} imports {target}, {why}"
        for module in MODULES
        for line, target in imported_modules(module)
        if (why := forbidden(module, target))
    ]
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, target, allowed", [
    ("bart_jax.model.heads", "bart_jax.config", True),
    ("bart_jax.model.heads", "bart_jax.model.layers", True),
    ("bart_jax.tokenizer", "bart_jax.tokenizer_files", True),
    ("bart_jax.tokenizer", "bart_jax.model", False),
    ("bart_jax.checkpoints.files", "bart_jax.generation.config", False),
    ("bart_jax.apps.cli", "bart_jax.training", True),
    ("bart_jax.training.loop", "bart_jax", False),
])
def test_layering_rule(source, target, allowed):
    # The rule test_layers_depend_downward_only applies, on pairs whose answer is known.
    assert (forbidden(source, target) is None) is allowed, forbidden(source, target)


def import_cycles() -> list[tuple[set[str], list[str]]]:
    """The strongly connected components of the import graph with more than one module (Tarjan),
    each with one cycle through it: [a, b, ..., a]."""
    graph = {module: sorted({target for _, target in imported_modules(module)} - {module}) for module in MODULES}
    index, lowlink, on_stack, stack, components = {}, {}, set(), [], []

    def visit(module):
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                lowlink[module] = min(lowlink[module], lowlink[target])
            elif target in on_stack:
                lowlink[module] = min(lowlink[module], index[target])
        if lowlink[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(set(component))

    for module in graph:
        if module not in index:
            visit(module)
    return [(component, shortest_cycle(graph, component)) for component in components]


def shortest_cycle(graph: dict[str, list[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the first module of `component` back to itself (breadth first)."""
    start = min(component)
    parents = {start: None}
    queue = collections.deque([start])
    while queue:
        module = queue.popleft()
        for target in graph[module]:
            if target == start:
                path = [module]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if target in component and target not in parents:
                parents[target] = module
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_no_import_cycles():
    cycles = import_cycles()
    described = []
    for component, cycle in cycles:
        steps = []
        for module, target in zip(cycle, cycle[1:]):
            line = min(line for line, name in imported_modules(module) if name == target)
            steps.append(f"{module} imports {target} ({where(module, line)})")
        described.append(f"{sorted(component)} import each other, e.g. " + "; ".join(steps))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_modules_are_short():
    long_modules = {
        str(path.relative_to(REPOSITORY)): lines
        for path in MODULES.values()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines (split them): {long_modules}"


def test_test_files_have_unique_names():
    # tests/ has no __init__.py files: pytest imports each test file by its bare name, so two files
    # of one name in different folders would clash.
    by_name = collections.defaultdict(list)
    for path in TESTS_DIR.rglob("*.py"):
        if path.name != "conftest.py":
            by_name[path.name].append(str(path.relative_to(REPOSITORY)))
    duplicates = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not duplicates, f"test files of the same name: {duplicates}"
