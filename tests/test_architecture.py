"""The package's shape, read from its source: no import loops, one reader of Optuna's attributes, and no branch on
which deployment target a study uses outside `targets/`."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from autocompress.targets import TARGET_NAMES

PACKAGE = Path(__file__).resolve().parent.parent / "autocompress"
LOW_FLOORS = ("autocompress.plan", "autocompress.models", "autocompress.config", "autocompress.codecs")
OPTUNA_ATTRIBUTE_READERS = {"autocompress.record", "autocompress.search.storage"}
OUR_KEY = re.compile(r"(autocompress|heldout):[\w{}]+")  # how our own attribute keys are spelled


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def modules() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in sources().items()}


def type_checking_only(tree: ast.Module) -> set[int]:
    """The nodes under `if TYPE_CHECKING:`, which only a type checker runs, so they cannot make an import loop."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` (at `path`) imports anywhere in its source, function bodies
    included: `from X import y` imports X.y when that is a module, else X (a package's `__init__`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sources()
    return {name: imported(name, path, set(paths)) for name, path in paths.items()}


def strongly_connected(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Tarjan's strongly connected groups of the graph, each of two modules or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[list[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                yield from visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                yield sorted(group)

    for node in sorted(graph):
        if node not in index:
            yield from visit(node)


def test_no_modules_import_each_other_round_a_loop_counting_imports_inside_functions() -> None:
    assert list(strongly_connected(import_graph())) == []


def test_the_loop_finder_finds_a_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert list(strongly_connected(graph)) == [["a", "b", "c"]]


def test_low_floors_import_no_target_but_the_registry() -> None:
    for name, imports in import_graph().items():
        if name.startswith(LOW_FLOORS):
            targets = {module for module in imports if module.startswith("autocompress.targets")}
            assert targets <= {"autocompress.targets"}, (name, targets)


def test_method_and_codec_families_import_their_registry_not_their_package() -> None:
    graph = import_graph()
    for package in ("autocompress.methods", "autocompress.codecs"):
        for name, imports in graph.items():
            if name.startswith(package + "."):
                assert package not in imports, name


def optuna_attribute_keys(tree: ast.Module) -> list[str]:
    """The string keys a module names Optuna user or system attributes by: literals subscripting or looked up in
    `user_attrs` / `system_attrs`, given to `set_user_attr` / `set_system_attr`, or spelled as our own keys."""
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
            if node.value.attr in ("user_attrs", "system_attrs"):
                key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            receiver = node.func.value
            if node.func.attr in ("set_user_attr", "set_system_attr"):
                key = node.args[0]
            elif node.func.attr == "get" and isinstance(receiver, ast.Attribute):
                key = node.args[0] if receiver.attr in ("user_attrs", "system_attrs") else None
        elif isinstance(node, ast.Constant) and OUR_KEY.fullmatch(str(node.value)):
            found.append(node.value)
        if isinstance(key, ast.Constant):
            found.append(str(key.value))
    return found


def test_only_the_record_and_the_bulk_storage_name_optuna_attribute_keys() -> None:
    naming = {name: keys for name, tree in modules().items() if (keys := optuna_attribute_keys(tree))}
    assert set(naming) <= OPTUNA_ATTRIBUTE_READERS, naming


def test_the_key_finder_finds_keys() -> None:
    source = 'trial.user_attrs["seed"]; trial.system_attrs.get("fixed_params"); s.set_user_attr("k", 1); "heldout:3"'
    assert sorted(optuna_attribute_keys(ast.parse(source))) == ["fixed_params", "heldout:3", "k", "seed"]


def target_branches(tree: ast.Module) -> list[str]:
    """Where a module tells targets apart: a comparison with a target's name spelled as a literal (`==`, `in`), or
    an attribute named after a target (`session.gguf`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            literals = []
            for operand in [node.left, *node.comparators]:
                literals += operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            if any(isinstance(item, ast.Constant) and item.value in TARGET_NAMES for item in literals):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr in TARGET_NAMES:
            found.append(ast.unparse(node))
    return found


def test_no_module_outside_targets_branches_on_the_target_in_use() -> None:
    branching = {
        name: places
        for name, tree in modules().items()
        if not name.startswith("autocompress.targets") and (places := target_branches(tree))
    }
    assert branching == {}, branching


def test_the_branch_finder_finds_branches() -> None:
    source = 'if config.target == "gguf": pass\nif target in ("artifact", "vllm"): pass\nif session.gguf: pass'
    assert len(target_branches(ast.parse(source))) == 3
