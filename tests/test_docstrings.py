"""Every public function, method and class in the package has a docstring (issue 17's habit, kept by this test).

Public: a name without a leading underscore, inside a public class. Exempt: ``forward`` and ``extra_repr`` of modules
(their contract is the class's) and properties."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimkit"
EXEMPT = {"forward", "extra_repr"}


def _missing(tree: ast.AST, path: str) -> list[str]:
    out = []

    def walk(node, prefix):
        for n in ast.iter_child_nodes(node):
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith("_"):
                continue
            is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in n.decorator_list)
            if ast.get_docstring(n) is None and n.name not in EXEMPT and not is_property:
                out.append(f"{path}:{n.lineno} {prefix}{n.name}")
            if isinstance(n, ast.ClassDef):
                walk(n, f"{prefix}{n.name}.")

    walk(tree, "")
    return out


def test_every_public_name_has_a_docstring():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        missing += _missing(ast.parse(path.read_text()), str(path.relative_to(PACKAGE.parent)))
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_docstring():
    tree = ast.parse("class A:\n    def run(self):\n        return 1\n\n    def _hidden(self):\n        pass\n")
    assert _missing(tree, "x.py") == ["x.py:1 A", "x.py:2 A.run"]
