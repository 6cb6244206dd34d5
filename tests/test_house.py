"""The house: imports run downward only, cli -> lab -> eval, online -> train -> models -> losses, data.

Every ``import`` and ``from ... import`` of a prefkit module anywhere in ``src/prefkit`` (inside functions
too; ``if TYPE_CHECKING:`` imports are annotations, not dependencies) must name a package below its own,
or its own package. Lower layers reach higher ones only through registration (the ``prefkit.model_sources``
entry points), never by import.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prefkit"

# Higher numbers sit higher. Packages on one level do not import each other.
LAYER = {"ranges": 0, "data": 1, "losses": 1, "models": 2, "train": 3, "eval": 4, "online": 4, "lab": 5, "cli": 6}


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "prefkit"
    if name == "prefkit":
        return name, 0  # the package's __init__: the version only
    return name, LAYER[name]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports() -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if node.lineno in skip if hasattr(node, "lineno") else False:
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefkit"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("prefkit")]
            out.extend((module, name, node.lineno) for name in names)
    return out


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(LAYER) | {"cli"}, (packages | modules) - set(LAYER)


def test_imports_run_downward_only():
    upward = []
    for module, target, line in imports():
        (a, la), (b, lb) = _layer(module), _layer(target)
        if a != b and b != "prefkit" and lb >= la:
            upward.append(f"{module}:{line} imports {target} ({a} may not import {b})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above can fail: the same rule on a made-up arrow."""
    (a, la), (b, lb) = _layer("prefkit.train.trainer"), _layer("prefkit.eval.personalized")
    assert a != b and lb >= la
