"""The docs site builds warning-free, documents every public name, and its code runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

import jax_orthopenalty as jop

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages whose code blocks are complete programs, run top to bottom.
PAGES_WITH_CODE = ["index.md", "getting-started.md", "conventions.md", "layouts.md", "optax.md"]
RAW_REST = re.compile(r"\.\. math::|:(?:func|class|math|meth|attr|mod):`")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: any warning (a broken link, a docstring griffe cannot
    parse, a nav entry without a page) fails the build."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr

    api = (site / "api" / "index.html").read_text()
    missing = [name for name in jop.__all__ if f'id="jax_orthopenalty.{name}"' not in api]
    assert not missing, f"public names without an entry on the API page: {missing}"
    # The docstrings' reST (math blocks, roles) is turned into Markdown and MathJax.
    assert 'class="arithmatex"' in api
    for page in site.rglob("*.html"):
        leftover = RAW_REST.search(page.read_text())
        assert leftover is None, f"{page.relative_to(site)}: raw reST {leftover.group(0)!r}"


def _python_blocks(markdown: str) -> list[str]:
    """The ```python fences of a page, in order, dedented (tabs indent them)."""
    fence = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.M | re.S)
    return [textwrap.dedent(m.group(2)) for m in fence.finditer(markdown)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_code_runs(page: str) -> None:
    blocks = _python_blocks((DOCS / page).read_text())
    assert blocks, f"{page} has no python code blocks"
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    # The pages show user code, which may broadcast by rank as users' code does.
    with jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(blocks):
            code = compile(block, f"docs/{page}[block {i}]", "exec")
            exec(code, namespace)
