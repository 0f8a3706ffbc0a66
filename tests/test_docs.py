"""The docs site builds warning-free, documents every public name, shows its math offline,
and its code runs."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import pytest

import jax_orthopenalty as jop

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages whose code blocks are complete programs, run top to bottom.
PAGES_WITH_CODE = [
    "index.md",
    "getting-started.md",
    "conventions.md",
    "layouts.md",
    "optax.md",
    "soft-or-exact.md",
    "failure-modes.md",
    "choosing-beta.md",
]
RAW_REST = re.compile(r"\.\. math::|:(?:func|class|math|meth|attr|mod):`")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict``, once for the tests that read the site: any warning (a
    broken link, a docstring griffe cannot parse, a nav entry without a page, a formula
    that cannot become MathML) fails the build."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("latex2mathml")
    site = tmp_path_factory.mktemp("docs") / "site"
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
    return site


def test_mkdocs_build_strict(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    missing = [name for name in jop.__all__ if f'id="jax_orthopenalty.{name}"' not in api]
    assert not missing, f"public names without an entry on the API page: {missing}"
    # The docstrings' reST (math blocks, roles) is turned into Markdown, then MathML.
    assert 'class="arithmatex"><math' in api
    for page in site.rglob("*.html"):
        leftover = RAW_REST.search(page.read_text())
        assert leftover is None, f"{page.relative_to(site)}: raw reST {leftover.group(0)!r}"


def test_math_is_mathml_and_nothing_is_loaded_from_the_network(site: Path) -> None:
    """Every formula is MathML in the HTML itself, and no page loads a script, a style
    sheet or a font from elsewhere: the site reads the same offline."""
    pages = sorted(site.rglob("*.html"))
    formulas = 0
    for page in pages:
        text = page.read_text()
        name = page.relative_to(site)
        wrappers = re.findall(r'class="arithmatex">(.{0,5})', text)
        assert all(w.startswith("<math") for w in wrappers), (name, wrappers)
        formulas += len(wrappers)
        remote = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"', text)
        assert not remote, (name, remote)
    assert formulas > 100  # the pages and the docstrings have a few hundred
    index = (site / "index.html").read_text()
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in index
    assert "<mfrac>" in index and '<annotation encoding="application/x-tex">' in index


def _mathml_hook() -> Any:
    pytest.importorskip("latex2mathml")
    spec = importlib.util.spec_from_file_location("_mathml", DOCS / "_mathml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mathml_hook_renders_what_latex2mathml_would_garble() -> None:
    hook = _mathml_hook()
    cases = hook.to_mathml(r"s = \begin{cases} a & x \\[4pt] b & y \end{cases}", display=True)
    assert "4pt" not in cases.split("<annotation")[0] and "<mtable" in cases
    norm = hook.to_mathml(r"\lVert X \rVert_F + \lvert x \rvert", display=False)
    fences = re.findall(r"<mo[^>]*>(&#x02016;|&#x0007C;)</mo>", norm)
    assert len(fences) == 4 and norm.count('stretchy="false"') == 4, norm
    assert norm.endswith(
        '<annotation encoding="application/x-tex">'
        "\\lVert X \\rVert_F + \\lvert x \\rvert</annotation></semantics></math>"
    )
    page = hook.on_page_content('<p><span class="arithmatex">\\(a &lt; b\\)</span></p>', page=None)
    assert page.startswith('<p><span class="arithmatex"><math ') and "&#x0003C;" in page


# Injected into a copy of a page: collects script errors (the theme runs its page
# scripts after the load event, so the probe waits 2 s more, virtual time), then measures
# where the browser put the parts of the formulas. Where MathML is laid out, a
# fraction's numerator is above its denominator and a subscript sits below its base;
# where it is not, they run on one line, as the raw TeX did.
PROBE = """<script>
window.probeErrors = [];
addEventListener("error", (e) => probeErrors.push(String(e.message)));
addEventListener("unhandledrejection", (e) => probeErrors.push(String(e.reason)));
const consoleError = console.error;
console.error = (...args) => { probeErrors.push(args.join(" ")); consoleError(...args); };
addEventListener("load", () => setTimeout(() => {
  const box = (el) => el.getBoundingClientRect();
  const maths = [...document.querySelectorAll("math")];
  document.body.dataset.probe = JSON.stringify({
    errors: probeErrors,
    math: maths.length,
    visible: maths.filter((m) => box(m).width > 0 && box(m).height > 0).length,
    fractions: [...document.querySelectorAll("mfrac")].map(
      (f) => box(f.children[0]).bottom <= box(f.children[1]).top + 1),
    subscripts: [...document.querySelectorAll("msub")].map(
      (s) => box(s.children[1]).bottom > box(s.children[0]).bottom + 1),
  });
}, 2000));
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium to render the site with (Debian: apt-get install chromium)")


def _headless(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a file:// page: no network, no GPU; --no-sandbox for root."""
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_math_renders_in_headless_chromium(site: Path, tmp_path: Path) -> None:
    """The home page in headless Chromium, offline: no script error, and every formula
    laid out as mathematics. The screenshot is left in tmp_path for a person to look at:
    ``chromium --headless --no-sandbox --screenshot=shot.png --window-size=1280,1000
    file:///.../site/index.html`` does the same by hand."""
    index = site / "index.html"
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("<head>", "<head>" + PROBE, 1))
    dumped = _headless(probe, tmp_path / "profile", "--dump-dom")
    found = re.search(r'data-probe="([^"]*)"', dumped.stdout)
    assert found, dumped.stdout[-2000:] + dumped.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["errors"] == []
    assert result["math"] >= 9 and result["visible"] == result["math"], result
    assert result["fractions"] and all(result["fractions"]), result
    assert result["subscripts"] and all(result["subscripts"]), result

    shot = tmp_path / "index.png"
    taken = _headless(index, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.exists(), taken.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1280, 1000)


def _python_blocks(markdown: str) -> list[str]:
    """The ```python fences of a page, in order, dedented (tabs indent them)."""
    fence = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.M | re.S)
    return [textwrap.dedent(m.group(2)) for m in fence.finditer(markdown)]


@pytest.mark.parametrize(
    "page",
    [
        # Pages whose examples run optax's Adam or schedules: see conftest.py's
        # optax_promotion (the same pattern marks the doctests).
        pytest.param(p, marks=pytest.mark.optax_promotion)
        if re.search(r"optax\.(adam|adamw|scale_by_adam|\w+_schedule)\b", (DOCS / p).read_text())
        else p
        for p in PAGES_WITH_CODE
    ],
)
def test_page_code_runs(page: str) -> None:
    blocks = _python_blocks((DOCS / page).read_text())
    assert blocks, f"{page} has no python code blocks"
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    # The pages show user code, which may broadcast by rank as users' code does.
    with jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(blocks):
            code = compile(block, f"docs/{page}[block {i}]", "exec")
            exec(code, namespace)


def test_scale_page_single_process_blocks_run() -> None:
    """docs/scale.md's blocks that need no second process (the multi-host one calls
    jax.distributed.initialize and is run for real by tests/test_multiprocess.py)."""
    blocks = [b for b in _python_blocks((DOCS / "scale.md").read_text()) if "distributed" not in b]
    assert any("shard_map" in b for b in blocks)
    namespace: dict[str, object] = {"__name__": "docs_scale"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/scale.md[block {i}]", "exec"), namespace)
