"""The repository keeps its promises: the README's commands work, CI runs the second one,
and the package builds into a distribution PyPI would accept."""

import ast
import email.parser
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

import jax_orthopenalty as jop

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        # bash .ci/install-chromium: the browser for the rendered-site test, not a test.
        if line and not line.startswith(("#", "set ", "cd ", "bash .ci/install-chromium"))
    ]
    assert ci == [tests]
    assert "bash .ci/install-chromium" in (ROOT / ".ci" / "run").read_text()


def _demo_command() -> tuple[str, str, str]:
    """The README's first command, split into its three steps: venv, install, run."""
    demo = _bash_blocks((ROOT / "README.md").read_text())[0]
    steps = demo.split(" && ")
    assert len(steps) == 3, demo
    venv, install, run = steps
    assert venv == "python3 -m venv .venv", demo
    assert run.startswith(".venv/bin/python -m jax_orthopenalty"), demo
    return venv, install, run


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_readme_demo_command_installs_the_extra_that_brings_matplotlib():
    """Without matplotlib the demo skips its plot, so the first command installs it."""
    _, install, _ = _demo_command()
    match = re.fullmatch(r'\.venv/bin/pip install "\.\[(\w+)\]"', install)
    assert match, install
    project = _pyproject()["project"]
    extra = project["optional-dependencies"][match.group(1)]
    assert "matplotlib" in {Requirement(r).name for r in extra}, extra
    # Runtime dependencies stay jax, jaxlib and optax.
    assert {Requirement(r).name for r in project["dependencies"]} == {"jax", "jaxlib", "optax"}


def _fresh_checkout(dest: Path) -> Path:
    """What a fresh clone of the tree about to be committed holds: every file git tracks,
    copied from the working tree (so uncommitted edits are tested, untracked and ignored
    files, such as a .venv or an old orthopenalty_demo.png, are not there)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_readme_demo_command_writes_the_png_in_a_fresh_checkout(tmp_path: Path):
    """The README's first command, minus the install: its last step runs in a fresh
    checkout with this interpreter (the test environment has the extras installed), and
    the PNG it names appears in the checkout. Creating a venv and installing jax from PyPI
    takes minutes and the network; test_readme_demo_command_verbatim does that on demand."""
    clone = _fresh_checkout(tmp_path / "clone")
    *_, run = _demo_command()
    argv = [sys.executable, *shlex.split(run)[1:]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c", "import jax_orthopenalty as j; print(j.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    # `python -m` puts the working directory first on sys.path: the clone's code runs.
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout
    result = subprocess.run(
        argv, cwd=clone, env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    png = clone / "orthopenalty_demo.png"
    assert f"wrote the plot to {png}" in result.stdout, result.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000


@pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("JAX_ORTHOPENALTY_TEST_INSTALL") != "1",
    reason="installs from PyPI: runs in CI (CI=true) or with JAX_ORTHOPENALTY_TEST_INSTALL=1",
)
def test_readme_demo_command_verbatim(tmp_path: Path):
    """The README's first command exactly as written, in a fresh checkout: a new venv,
    the package and its demo extra from the package index, the demo. About 30 s where
    pip finds the wheels cached, minutes where it downloads jaxlib."""
    clone = _fresh_checkout(tmp_path / "clone")
    command = _bash_blocks((ROOT / "README.md").read_text())[0]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(
        ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    png = clone / "orthopenalty_demo.png"
    assert f"wrote the plot to {png}" in result.stdout, result.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE


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


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
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


def test_sdist_and_wheel_build_offline_and_pass_twine_check(tmp_path: Path):
    """``python -m build --no-isolation`` (no download: hatchling from this environment),
    then ``twine check --strict``; the wheel carries the metadata PyPI shows."""
    for module in ("build", "hatchling", "twine"):
        pytest.importorskip(module)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert sdist.name == f"jax_orthopenalty-{jop.__version__}.tar.gz"
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = f"jax_orthopenalty-{jop.__version__}.dist-info"
        meta = email.parser.Parser().parsestr(whl.read(f"{info}/METADATA").decode())
    assert {"jax_orthopenalty/py.typed", "jax_orthopenalty/demo/__init__.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert f"{info}/licenses/LICENSE" in names
    assert meta["Requires-Python"] == ">=3.11"
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    assert sorted(r.name for r in requires if r.marker is None) == ["jax", "jaxlib", "optax"]
    demo = [r.name for r in requires if r.marker and r.marker.evaluate({"extra": "demo"})]
    assert demo == ["matplotlib"]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier")
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    for classifier in (
        "License :: OSI Approved :: Apache Software License",
        "Typing :: Typed",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Mathematics",
    ):
        assert classifier in classifiers
    assert meta["Author"] or meta["Author-email"]
    assert meta["Description-Content-Type"] == "text/markdown"


def test_readme_design_section_names_every_module():
    """The map is true: the README's Design block lists every file of the package."""
    readme = (ROOT / "README.md").read_text()
    design = readme[readme.index("## Design") :]
    block = re.search(r"```\n(.*?)```", design, flags=re.S)
    assert block, "the Design section has no file tree"
    listed = set(re.findall(r"^\s{2}(\S+\.py|\S+/)", block.group(1), flags=re.M))
    package = ROOT / "jax_orthopenalty"
    files = {p.name for p in package.glob("*.py")} | {
        f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()
    }
    assert files - listed == set(), f"modules missing from the README's Design: {files - listed}"
    assert listed - files == set(), f"the README's Design lists what is gone: {listed - files}"


def _function_bodies() -> list[tuple[str, int, int]]:
    """(where, body lines, docstring lines) of every function in the package."""
    out = []
    for path in (ROOT / "jax_orthopenalty").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                body = node.body[1:] if doc is not None else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0  # type: ignore[operator]
                where = f"{path.relative_to(ROOT)}:{node.name}"
                out.append((where, lines, len(doc.splitlines()) if doc else 0))
    return out


def test_module_function_and_docstring_sizes():
    """No module over 600 lines, no function body over 60, no docstring over ~100: long
    logic goes into named helpers, recipes into the docs pages."""
    for path in (ROOT / "jax_orthopenalty").rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines"
    for where, body, doc in _function_bodies():
        assert body <= 60, f"{where}: body of {body} lines"
        assert doc <= 100, f"{where}: docstring of {doc} lines"


def test_no_module_imports_another_modules_private_names():
    """``from ._x import _y`` is a private import: what is shared is public in its module."""
    for path in (ROOT / "jax_orthopenalty").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            # ``from . import _contract`` imports a module: that is not a private name.
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private}"
