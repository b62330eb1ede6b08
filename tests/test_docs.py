"""The README and docs cannot drift from the result files, and the package keeps its shape
(issue 18): no import circle, no class over 350 lines."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_rendered_docs_match_the_result_files():
    """`python benchmarks/report.py --check` renders README's results block and docs/results.md
    from benchmarks/results/*.json and compares them with the committed files."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


def test_readme_and_docs_links_resolve():
    import re

    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to missing {target}"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (REPO / "hae_vllm").rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _runtime_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``path`` imports when it runs (function bodies included: they run
    too), leaving out ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            t = node.test
            if getattr(t, "id", None) == "TYPE_CHECKING" or getattr(t, "attr", None) == "TYPE_CHECKING":
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node):
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def test_no_import_circle_inside_the_package():
    mods = _modules()
    graph = {m: _runtime_imports(p, set(mods)) - {m} for m, p in mods.items()}
    # Depth-first search for a back edge; report the circle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_class_over_350_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 350:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
