"""The package's imports run one way: down the layers the README's layout section documents,
with no cycle between modules. Imports deferred into functions count like any other (a
deferred import that dodges a cycle is still a cycle in the design); only `if TYPE_CHECKING:`
blocks are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gradwatch"

#: What each subsystem may import (besides itself). The top-level modules (the public API,
#: the command line, the demo, gradwatch.testing) may import anything below them.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "engine": {"common"},
    "alerts": {"common"},
    "record": {"common", "engine"},
    "dashboard": {"common", "engine", "record"},
    "monitor": {"common", "engine", "record", "alerts"},
    "watch": {"common", "engine", "record", "alerts", "dashboard"},
}
TOP = {"__init__", "__main__", "cli", "demo", "testing"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """The gradwatch modules `path` imports anywhere (functions included), except under
    `if TYPE_CHECKING:`. `from gradwatch.x import y` counts as gradwatch.x.y when that is a
    module, else as gradwatch.x."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gradwatch"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("gradwatch"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
MODULES = {module_name(p): p for p in FILES}


def subsystem(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "top"


def graph() -> dict[str, set[str]]:
    return {name: {m for m in imports_of(path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def test_every_module_is_in_a_documented_subsystem() -> None:
    for name in MODULES:
        kind = subsystem(name)
        assert kind in ALLOWED or name.split(".")[-1] in TOP or name == "gradwatch", name


def test_imports_run_down_the_layers() -> None:
    wrong = []
    for name, targets in graph().items():
        source = subsystem(name)
        for target in sorted(targets):
            if target == "gradwatch.cli" and name != "gradwatch.__main__":
                wrong.append(f"{name} -> {target} (nothing imports the command line)")
            elif target == "gradwatch" and name != "gradwatch":
                wrong.append(f"{name} -> gradwatch (import from the defining module)")
            elif source != "top":
                goal = subsystem(target)
                if goal != source and goal not in ALLOWED[source]:
                    wrong.append(f"{name} -> {target} ({source} may import "
                                 f"{sorted(ALLOWED[source]) or 'nothing else'})")
    assert not wrong, "imports against the documented direction:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_deferred_imports_and_skips_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gradwatch.watch.callback import GradWatch\n"
        "def f():\n    from gradwatch.record import writer\n    import gradwatch.engine.core\n",
        encoding="utf-8")
    assert imports_of(source) == {"gradwatch.record.writer", "gradwatch.engine.core"}


# -- the README's layout section, regenerated from the tree --------------------------------------

README = ROOT / "README.md"
START = "<!-- layout: generated by `python tests/package/test_layout.py --write` -->"
END = "<!-- /layout -->"
#: The folders beside the package, which have no docstrings to read.
OTHERS = [
    ("dashboards/", "Vega-Lite specs, Prometheus rules (+ promtool tests), Grafana JSON, "
                    "metrics.json (the /metrics contract); installed as gradwatch.dashboards"),
    ("examples/", "jax_optax_loop.py: an optax training loop with gradwatch"),
    ("docs/numerics.md", "the maths"),
    ("benchmarks/", "scripts that print measured tables"),
    ("tests/", "pytest, one folder per subsystem; fixtures in conftest.py, helpers in support/"),
]
WIDTH = 22


def summary(path: Path) -> str:
    """The first line of a module's docstring: what it is, in one line."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def layout_section() -> str:
    lines = ["```"]

    def entry(indent: int, name: str, text: str) -> None:
        label = " " * indent + name
        lines.append(f"{label:<{WIDTH}}{text}".rstrip() if len(label) < WIDTH
                     else f"{label}\n{'':<{WIDTH}}{text}".rstrip())

    entry(0, "gradwatch/", summary(PACKAGE / "__init__.py"))
    for path in sorted(PACKAGE.iterdir(), key=lambda p: (p.is_dir(), p.name)):
        if path.suffix == ".py" and path.name != "__init__.py":
            entry(2, path.name, summary(path))
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        entry(2, package.name + "/", summary(package / "__init__.py"))
        for path in sorted(package.glob("*.py")):
            if path.name != "__init__.py":
                entry(4, path.name, summary(path))
    entry(0, "integrations/", summary(ROOT / "integrations" / "__init__.py"))
    for path in sorted((ROOT / "integrations").glob("*.py")):
        if path.name != "__init__.py":
            entry(2, path.name, summary(path))
    for name, text in OTHERS:
        entry(0, name, text)
    lines.append("```")
    return "\n".join(lines)


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index(START) + len(START):text.index(END)].strip()


def test_every_module_says_what_it_is_and_what_it_may_import() -> None:
    """The first line says what the module is; a line "Imports: …" what it may import."""
    wrong = []
    for path in [*FILES, *sorted((ROOT / "integrations").glob("*.py"))]:
        first = summary(path)
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if not (0 < len(first) <= 92 and first.endswith(".")):
            wrong.append(f"{path.relative_to(ROOT)}: first line {first!r}")
        if "Imports:" not in doc and path.name != "__main__.py":
            wrong.append(f"{path.relative_to(ROOT)}: no 'Imports:' line")
    assert not wrong, ("each module's docstring starts with one sentence (≤ 92 characters) "
                       "saying what it is, and has a line 'Imports: …':\n" + "\n".join(wrong))


def test_the_readme_layout_section_matches_the_tree() -> None:
    assert readme_section() == layout_section(), (
        "README.md's layout section is out of date: run "
        "`python tests/package/test_layout.py --write`")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/package/test_layout.py --write  (rewrites the README's "
                 "layout section)")
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{layout_section()}\n{END}{tail}", encoding="utf-8")
