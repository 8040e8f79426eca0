"""The tree shows the architecture: hsci's modules import down the layers only, never in a circle (imports inside
functions included), each package says what lives there and what it may import, and settings travel in objects."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsci"
# From the bottom up; a module may import its own layer's modules and those below. The builders that configs name
# (hsci.data, hsci.models, hsci.schedulers) are the parts' public face.
LAYERS = [("base", ("hsci", "hsci.interrupt", "hsci.report")),
          ("parts", ("hsci.parts", "hsci.data", "hsci.models", "hsci.schedulers")),
          ("record", ("hsci.record",)),
          ("analysis", ("hsci.analysis",)),
          ("integrations", ("hsci.integrations",)),
          ("loop", ("hsci.loop",)),
          ("jobs", ("hsci.jobs",)),
          ("door", ("hsci.cli", "hsci.completion", "hsci.__main__"))]
BUILDERS = ("hsci.data", "hsci.models", "hsci.schedulers")  # public functions whose parameters are their YAML keys
SCHEMA = "hsci.parts.schema"  # dataclasses whose fields are YAML keys (trainer.*, the top level)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def layer(module: str) -> int:
    """The layer of a module: the one whose longest prefix names it."""
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    return max(found)[1]


def imports(name: str) -> set[str]:
    """The hsci modules that module `name` imports anywhere in it, at its top or inside a function."""
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from hsci.record import rundir` imports hsci.record.rundir; `from hsci import flat`, hsci itself
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_has_a_layer_and_imports_only_its_own_and_those_below():
    upward = [f"{name} ({LAYERS[layer(name)][0]}) imports {other} ({LAYERS[layer(other)][0]})"
              for name, others in GRAPH.items() for other in others if layer(other) > layer(name)]
    assert not upward


def test_no_import_circles_anywhere():
    def circle_from(start: str, path: list[str]) -> list[str] | None:
        for other in sorted(GRAPH[path[-1]]):
            if other == start:
                return path + [other]
            if other not in path and other > start:  # each circle is found once, from its smallest module
                found = circle_from(start, path + [other])
                if found:
                    return found
        return None

    circles = [" -> ".join(circle) for start in MODULES if (circle := circle_from(start, [start]))]
    assert not circles


@pytest.mark.parametrize("package", [name for name, path in MODULES.items() if path.name == "__init__.py"
                                     and name != "hsci"])
def test_each_package_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(TREES[package])
    assert doc and "Imports:" in doc
    for module in (name for name in MODULES if name.startswith(package + ".")):
        assert module.rsplit(".", 1)[1] in doc, f"{package}'s docstring does not name {module}"


def test_no_function_outside_the_config_builders_takes_more_than_eight_parameters():
    crowded = []
    for name, tree in TREES.items():
        builders = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                    and not node.name.startswith("_")} if name in BUILDERS else set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in builders:
                a = node.args
                params = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [p.arg for p in (a.vararg, a.kwarg) if p]
                params = [p for p in params if p not in ("self", "cls")]
                if len(params) > 8:
                    crowded.append(f"{name}.{node.name}({', '.join(params)})")
            if isinstance(node, ast.ClassDef) and name != SCHEMA and any(  # a dataclass's fields: its constructor's
                    "dataclass" in ast.unparse(d) for d in node.decorator_list):
                fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                if len(fields) > 8:
                    crowded.append(f"{name}.{node.name}({', '.join(fields)})")
    assert not crowded
