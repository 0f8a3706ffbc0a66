"""The training-step benchmarks run: benchmarks/bench_train.py and bench_every.py, ``--quick``.

Each script runs in a subprocess (its own jax configuration, as a user runs it) and
writes its JSON; the tests check that every model and configuration is there and that
every number is what it claims to be. No timing thresholds: the numbers of a smoke run
on a shared machine mean nothing, only that they were measured.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "transformer")
TRAIN_CONFIGS = (
    "adam",
    "penalty every=1",
    "penalty every=4",
    "penalty every=16",
    "sgd",
    "landing",
    "projection",
)
BASE = {
    name: "sgd" if name in ("sgd", "landing", "projection") else "adam" for name in TRAIN_CONFIGS
}
EVERY_CONFIGS = (
    "adam",
    *(f"{p} every={k}" for p in ("coupled", "decoupled") for k in (1, 4, 16)),
)


def _run(script: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        # About 30 s of CPU; generous for the suite's parallel run on a loaded machine.
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["quick"] is True
    return report


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.optax_promotion
def test_bench_train_quick(tmp_path: Path) -> None:
    report = _run("bench_train.py", tmp_path / "train.json")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["settings"]["reps"] == 2 and report["settings"]["compile_reps"] == 1
    results = {r["model"]: r for r in report["results"]}
    assert tuple(results) == MODELS
    for model, r in results.items():
        assert r["parameters"] > 0 and r["parameter_bytes"] == 4 * r["parameters"], model
        # Every kernel is constrained, nothing else is (biases, norms, the embedding).
        for path, layout in r["layouts"].items():
            assert layout.endswith(": None") != ("'kernel'" in path), (model, path, layout)

        times, compiled = r["times"], r["compile"]
        assert set(times) == set(compiled) == set(TRAIN_CONFIGS), model
        for name in TRAIN_CONFIGS:
            t = times[name]
            assert all(_positive(t[k]) for k in ("median_s", "min_s", "max_s")), (model, name)
            assert t["min_s"] <= t["median_s"] <= t["max_s"], (model, name)
            assert t["reps"] == 2 and t["steps_per_sample"] == 16, (model, name)
            c = compiled[name]
            assert _positive(c["lower_s"]) and _positive(c["compile_s"]), (model, name)
            assert c["total_s"] == pytest.approx(c["lower_s"] + c["compile_s"]), (model, name)
            assert _positive(c["flops"]), (model, name)
            memory = c["memory"]
            assert all(_positive(memory[k]) for k in ("argument_bytes", "temp_bytes")), memory
            assert memory["argument_bytes"] >= r["parameter_bytes"], (model, name)
            assert math.isfinite(r["final_loss"][name]), (model, name)
        # Adam's state (two moments) is in its arguments, sgd's is not.
        adam_args = compiled["adam"]["memory"]["argument_bytes"]
        sgd_args = compiled["sgd"]["memory"]["argument_bytes"]
        assert adam_args - sgd_args >= 2 * r["parameter_bytes"], model

        # The ratios are the medians' ratios, each against its own base.
        median = {name: times[name]["median_s"] for name in TRAIN_CONFIGS}
        derived = [name for name in TRAIN_CONFIGS if BASE[name] != name]
        assert set(r["ratios"]) == {f"{name}/{BASE[name]}" for name in derived}
        assert set(r["compile_ratios"]) == set(r["ratios"])
        for name in derived:
            key = f"{name}/{BASE[name]}"
            assert r["ratios"][key] == pytest.approx(median[name] / median[BASE[name]])
            assert _positive(r["compile_ratios"][key]), (model, key)
        assert set(r["penalty_overhead"]) == {"every=1", "every=4", "every=16"}
        for k in (1, 4, 16):
            overhead = r["penalty_overhead"][f"every={k}"]
            assert overhead == pytest.approx(median[f"penalty every={k}"] / median["adam"] - 1)

        f = r["flops"]
        for key in ("penalty_update_flops", "landing_update_flops", "adam_step_flops"):
            assert _positive(f[key]), (model, key)
        assert 0 < f["penalty_floor"] < 1, (model, f)
        assert f["penalty_floor"] == pytest.approx(
            f["penalty_update_flops"] / f["adam_step_flops"]
        )
        assert _positive(f["landing_floor"]), (model, f)

        expected_targets = {
            "overhead every=1 / flop floor",
            "overhead every=4",
            "overhead every=16",
            *(f"compile penalty every={k} / adam" for k in (1, 4, 16)),
        }
        assert set(r["targets"]) == expected_targets, model
        for target, v in r["targets"].items():
            assert math.isfinite(v["value"]) and math.isfinite(v["bound"]), (model, target)
            assert v["met"] == (v["value"] <= v["bound"]), (model, target, v)


@pytest.mark.optax_promotion
def test_bench_every_quick(tmp_path: Path) -> None:
    report = _run("bench_every.py", tmp_path / "every.json")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    settings = report["settings"]
    assert settings["seeds"] == 1 and settings["reps"] == 1
    results = report["results"]
    assert tuple(results) == EVERY_CONFIGS
    for name, r in results.items():
        for key in ("train_loss_last_100", "test_loss"):
            assert _positive(r[key]), (name, key, r[key])  # cross-entropy: finite, > 0
        assert 0 <= r["test_accuracy"] <= 1, (name, r["test_accuracy"])
        assert math.isfinite(r["orthogonality_error"]) and r["orthogonality_error"] >= 0, name
        assert _positive(r["seconds_per_step"]), name
        assert r["cost_over_adam"] == pytest.approx(
            r["seconds_per_step"] / results["adam"]["seconds_per_step"]
        )
        assert len(r["seeds"]) == 1 and r["seeds"][0]["test_loss"] == r["test_loss"], name
    assert results["adam"]["cost_over_adam"] == 1.0


def test_projection_step_cost_rows() -> None:
    # benchmarks/bench_manifold.py --step-cost on tiny leaves: every target distance is
    # reached by its step size, its route is the one polar takes there, and both sides
    # were timed.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_manifold
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    targets = (1e-4, 3e-2, 0.4)
    cost = bench_manifold.run_step_cost(reps=1, leaves=((12, 4), (8, 8)), distances=targets)
    rows = cost["rows"]
    assert [r["target"] for r in rows] == list(targets)
    for r in rows:
        assert math.isclose(r["distance"], r["target"], rel_tol=1e-3), r
        assert r["penalty_ms"] > 0 and r["project_ms"] > 0, r
        assert math.isclose(r["ratio"], r["project_ms"] / r["penalty_ms"], rel_tol=1e-9), r
    assert [r["route"] for r in rows] == ["series, degree <= 1", "series, degree <= 4", "eigh"]
    assert bench_manifold.report_step_cost(cost).count("\n") == 1 + len(targets)


def test_bench_conv_grad_rows() -> None:
    # benchmarks/bench_conv.py's gradient comparison on one small kernel per case: the
    # closed form and autodiff agree (bench_grad asserts it), both sides were timed at
    # least 5 times, the ratio is theirs, and the table has a row per kernel and the
    # geometric mean.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_conv
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shapes = [("3x3x4x4 s1", (3, 3, 4, 4), 1), ("3x3x4x8 s2", (3, 3, 4, 8), 2)]
    rows = bench_conv.bench_grad(shapes, reps=5)
    assert [r["shape"] for r in rows] == [name for name, _, _ in shapes]
    for r in rows:
        assert r["closed_ms"] > 0 and r["autodiff_ms"] > 0 and r["reps"] == 5, r
        assert math.isclose(r["ratio"], r["autodiff_ms"] / r["closed_ms"], rel_tol=1e-9), r
    text = bench_conv.table(rows, {"none": 2.0, "kernel": 2.5, "operator": 3.0})
    assert "| geometric mean |" in text and "| operator | 3.00 | 1.50x |" in text
    assert text.count("\n") == (2 + len(rows) + 1) + 1 + (2 + 3) - 1
