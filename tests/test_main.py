"""The demo, ``python -m jax_orthopenalty``: run small, and read what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jax_orthopenalty.demo import main

TINY = ["--shape", "6", "3", "2", "--steps", "150", "--samples", "32", "--seed", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _step_table(out: str) -> list[tuple[int, float, float, float]]:
    """The rows of section 2's table: step, task loss, beta*penalty, orth. error."""
    section = out.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
    rows = re.findall(r"^\s+(\d+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s*$", section, re.M)
    return [(int(s), float(a), float(b), float(c)) for s, a, b, c in rows]


def _number_after(label: str, out: str) -> float:
    match = re.search(re.escape(label) + r"\s+([\d.e+-]+)", out)
    assert match, f"{label!r} not in the output"
    return float(match.group(1))


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_demo_trains_compares_and_writes_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out" / "demo.png"
    png.parent.mkdir()
    assert main([*TINY, "--output", str(png)]) == 0
    out = capsys.readouterr().out

    # 1. The gradient agrees with autodiff (float32) and finite differences (float64).
    assert _number_after("jax.grad(plain |.| expression)| / max|grad|", out) < 1e-5
    assert _number_after("finite difference| / max|<grad, v>| (float64)", out) < 1e-6
    closed = re.search(r"closed form\s+(\[.*\])", out)
    fd = re.search(r"finite differences\s+(\[.*\])", out)
    assert closed and fd and closed.group(1) == fd.group(1)

    # 2. The progress table: every tenth step and the last, task loss and error falling.
    rows = _step_table(out)
    assert [r[0] for r in rows] == [*range(0, 150, 15), 149]
    assert rows[-1][1] < 0.1 * rows[0][1], rows
    assert rows[-1][3] < 0.1 * rows[0][3], rows

    # 3. Every convention is trained and compared; the kink column tells them apart.
    table = out.split("\n3. ", 1)[1].split("\n4. ", 1)[0]
    kink = {}
    for label in [
        "no penalty",
        '"zero"',
        '"positive"',
        '"negative"',
        "deadzone(0.001)",
        "huber(0.001)",
        '"squared"',
        "jax.grad(plain |.|)",
    ]:
        line = next(x for x in table.splitlines() if x.strip().startswith(label))
        kink[label] = line.split()[-1]
    assert kink['"zero"'] == kink["deadzone(0.001)"] == kink['"squared"'] == "0"
    assert float(kink['"positive"']) > 0
    assert kink['"positive"'] == kink["jax.grad(plain |.|)"]

    # 4. The plot is a real PNG at the path printed.
    assert f"wrote the plot to {png}" in out
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_demo_without_matplotlib_skips_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import matplotlib...` raise ImportError, even when an
    # earlier test has imported it.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "demo.png"
    assert main([*TINY, "--no-compare", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed, so no plot was written" in out
    assert 'pip install "jax_orthopenalty[demo]"' in out  # and how to get it
    assert "wrote" not in out
    assert not png.exists()
    rows = _step_table(out)
    assert rows[-1][1] < rows[0][1]


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ["--shape", "--beta", "--steps", "--subgradient", "--seed", "--output"]:
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps: expected a positive integer, got 0"),
        (["--shape", "4", "2"], "--shape: expected 3 arguments"),
        (["--shape", "3", "2", "4"], "n = 4 orthonormal vectors do not fit in R^l with l = 3"),
        (["--beta", "-1"], "--beta: expected a finite number >= 0, got -1"),
        (["--beta", "nan"], "--beta: expected a finite number >= 0, got nan"),
        (["--subgradient", "sideways"], "--subgradient: invalid choice: 'sideways'"),
        (["--output", "/no/such/dir/demo.png"], "the directory /no/such/dir does not exist"),
    ],
)
def test_bad_options_exit_nonzero_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: python -m jax_orthopenalty")


def test_module_entry_point() -> None:
    """``python -m jax_orthopenalty`` is the command the README gives."""
    result = subprocess.run(
        [sys.executable, "-m", "jax_orthopenalty", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m jax_orthopenalty" in result.stdout
