"""The repository keeps its promises: the README's test command is what CI runs."""

import ast
import re
from pathlib import Path

import jax_orthopenalty as jop

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2, blocks
    demo, tests = blocks
    assert demo.endswith("-m jax_orthopenalty")
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [tests]


def test_changelog_has_the_package_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{jop.__version__}]" in changelog
    assert "Keep a Changelog" in changelog


def test_public_names_are_exported_and_documented():
    for name in jop.__all__:
        obj = getattr(jop, name)
        if name in ("Norm", "Subgradient"):  # type aliases: documented in the API page
            continue
        assert obj.__doc__ and "Examples:" in obj.__doc__, name


def test_readme_python_blocks_run():
    # The quick start and recipes run as written, in order, in one namespace.
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["err"].shape == (8,)


def _package_imports() -> dict[str, set[str]]:
    """For each module of the package, the package modules it imports: every import
    statement in the source, ``if TYPE_CHECKING:`` blocks and function bodies included."""
    package = ROOT / "jax_orthopenalty"
    names = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").exists()
    }
    graph: dict[str, set[str]] = {}
    for path in [*package.glob("*.py"), *package.glob("*/*.py")]:
        module = path.stem if path.parent == package else path.parent.name
        found = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = (node.module or "").split(".")[0]
                targets = [base] if base else [a.name for a in node.names]
                found.update(t for t in targets if t in names and t != module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "jax_orthopenalty."
            ):
                found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return graph


def test_package_has_no_import_cycle():
    graph = _package_imports()
    assert {"_layout", "_contract", "_penalty", "_rules", "_transform"} <= graph.keys()
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, "import cycle: " + " -> ".join((*stack, module))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, (*stack, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
    # The data path reads one way: layout, then the contractions, then the penalty.
    assert "_penalty" not in graph["_contract"] and "_contract" not in graph["_layout"]
