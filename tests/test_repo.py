"""The repository keeps its promises: the README's test command is what CI runs."""

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
