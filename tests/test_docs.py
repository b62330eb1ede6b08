"""The README and docs cannot drift from the result files, and the package keeps its shape
(issues 18, 32): no import circle (annotation-only and deferred imports count), no class over
300 lines, no import of the lab from the runtime package."""

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


def _imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import: module level, deferred (function bodies) and
    ``if TYPE_CHECKING:`` blocks alike (an annotation-only import is still a dependency)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_Import(self, node):
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node):
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return found


def test_no_import_circle_inside_the_package():
    mods = _modules()
    graph = {m: (_imports(p) & set(mods)) - {m} for m, p in mods.items()}
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


def test_the_runtime_package_never_imports_the_lab():
    """hae_lab (builders, training, probes, harnesses) is not in the wheel: nothing a serving
    user installs may import it."""
    bad = {name: sorted(m for m in _imports(path) if m == "hae_lab" or m.startswith("hae_lab."))
           for name, path in _modules().items()}
    assert not {k: v for k, v in bad.items() if v}


def test_no_class_over_300_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
