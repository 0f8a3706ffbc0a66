"""jop.summary: what the transforms select, checked against what they really do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty import OrthoDims


def _rows(text: str) -> dict[str, list[str]]:
    """The table as {leaf: cells}, split on the header's column starts."""
    lines = text.splitlines()
    header, body, last = lines[0], lines[1:-1], lines[-1]
    assert last.startswith("selected: ")
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    out = {}
    for line in body:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        out[cells[0]] = cells
    return out


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(72, 16)), jnp.float32),
            "bias": jnp.zeros(16),
        },
        "head": jnp.asarray(rng.normal(size=(16, 40)), jnp.float32),
        "steps": jnp.zeros((2, 2), jnp.int32),
        "stack": jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32),
        "nothing": None,
    }


def test_selected_rows_are_exactly_the_leaves_the_transform_changes() -> None:
    params = _params()
    tx = jop.add_orthogonality_penalty(1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    changed = {
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(u)[0]
        if bool(jnp.any(x != 0))
    }
    rows = _rows(jop.summary(params))
    assert {k for k, r in rows.items() if r[3] == "yes"} == changed
    # Every leaf is listed but None, which holds no parameter (equinox's empty fields).
    assert set(rows) == {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_default_selection_reasons_and_sizes() -> None:
    rows = _rows(jop.summary(_params()))
    assert rows["['dense']['bias']"][3] == "no: rank 1 < 2"
    assert rows["['steps']"][3] == "no: dtype int32 is not floating"
    assert "['nothing']" not in rows  # None holds no parameter: not listed, not counted
    # (72, 16): one group of 16 columns of length 72, vectors on axis 0.
    assert rows["['dense']['kernel']"][3:9] == ["yes", "0", "1", "1", "72", "16"]
    assert rows["['dense']['kernel']"][9] == ""
    # The conv kernel in the default layout: 3 * 4 groups of 8 columns of length 3.
    conv = rows["['conv']['kernel']"]
    assert conv[3:9] == ["yes", "0", "3", "12", "3", "8"]
    assert "n > l" in conv[9] and "dimension_numbers_for" in conv[9]
    assert "n > l" in rows["['head']"][9]
    # A (layers, in, out) stack: the default takes the 2 layers for the vectors.
    assert rows["['stack']"][3:9] == ["yes", "0", "2", "6", "2", "5"]
    assert "dimension_numbers_for" in rows["['stack']"][9]
    assert (
        jop.summary(_params()).splitlines()[-1] == "selected: 4 of 6 leaves, 20 groups"
    )  # 1 + 12 + 1 + 6


def test_explicit_layouts_tuple_vectors_and_rows() -> None:
    dims = {
        "conv": {"kernel": OrthoDims(vector_axis=(0, 1, 2), column_axis=3)},
        "dense": {"kernel": OrthoDims(), "bias": None},
        "head": OrthoDims(vector_axis=1, column_axis=0),
        "steps": None,
        "stack": OrthoDims(vector_axis=1, column_axis=2),
        "nothing": None,
    }
    rows = _rows(jop.summary(_params(), dimension_numbers=dims))
    assert rows["['conv']['kernel']"][3:10] == ["yes", "(0, 1, 2)", "3", "1", "36", "8", ""]
    assert rows["['head']"][3:10] == ["yes", "1", "0", "1", "40", "16", ""]
    assert rows["['stack']"][3:10] == ["yes", "1", "2", "2", "6", "5", ""]
    assert rows["['dense']['bias']"][3] == "no: `dimension_numbers` gives None"
    # No default-layout hint with explicit dimension numbers.
    assert "dimension_numbers_for" not in jop.summary(_params(), dimension_numbers=dims)


def test_mask_prefix_and_callable_dimension_numbers() -> None:
    mask = {
        "conv": False,
        "dense": True,
        "head": True,
        "steps": True,
        "stack": True,
        "nothing": True,
    }
    rows = _rows(jop.summary(_params(), mask=mask))
    assert rows["['conv']['kernel']"][3] == "no: masked out by `mask`"
    assert rows["['dense']['kernel']"][3] == "yes"
    only_2d = lambda p: jax.tree.map(  # noqa: E731
        lambda x: OrthoDims() if x.ndim == 2 and x.dtype == jnp.float32 else None, p
    )
    rows = _rows(jop.summary(_params(), dimension_numbers=only_2d))
    assert [k for k, r in rows.items() if r[3] == "yes"] == ["['dense']['kernel']", "['head']"]


def test_abstract_params_and_zero_groups() -> None:
    params = {"w": jnp.zeros((4, 3, 2)).at[:, 0].set(1.0)}
    rows = _rows(jop.summary(params))
    assert "2 all-zero groups: landing can't move" in rows["['w']"][9]
    abstract = jax.eval_shape(lambda: params)
    rows = _rows(jop.summary(abstract))
    assert rows["['w']"][3:9] == ["yes", "0", "2", "3", "4", "2"]
    assert "all-zero" not in rows["['w']"][9]  # shapes only: nothing to look at


def test_a_layout_that_does_not_fit_is_shown_with_the_transforms_error() -> None:
    params = {"w": jnp.ones((4, 3))}
    text = jop.summary(params, dimension_numbers={"w": OrthoDims(column_axis=2)})
    row = _rows(text)["['w']"]
    assert row[3] == "error" and "`column_axis`=2 is out of range" in row[9]
    assert text.splitlines()[-1] == "selected: 0 of 1 leaves, 0 groups"
    tx = jop.add_orthogonality_penalty(1.0, dimension_numbers={"w": OrthoDims(column_axis=2)})
    with pytest.raises(ValueError, match="`column_axis`=2 is out of range"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": {"other": True}}, "`mask` does not match"),
        ({"dimension_numbers": {"other": OrthoDims()}}, "`dimension_numbers` does not match"),
        ({"mask": True}, "single value"),
    ],
)
def test_mismatched_mask_or_dimension_numbers_raise_as_the_transforms(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        jop.summary({"w": jnp.ones((3, 2))}, **kwargs)


def test_the_readme_shows_the_real_output() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"print\(jop\.summary\(params\)\)\n((?:# .*\n)+)", readme)
    assert block is not None
    shown = "\n".join(line[2:] for line in block.group(1).splitlines())
    params = {"conv": jnp.ones((3, 3, 3, 8)), "bias": jnp.zeros(8), "head": jnp.ones((8, 10))}
    assert shown == jop.summary(params)


def test_python_numbers_and_keys_are_listed_as_the_transforms_skip_them() -> None:
    # The transforms take params with Python-number and PRNG-key leaves (and skip
    # them): the summary lists them with the same reasons instead of failing.
    params = {
        "lr": 1.5,
        "key": jax.random.key(0),
        "keys": jax.random.split(jax.random.key(1), (2, 2)),
        "w": jnp.ones((3, 2)),
    }
    rows = _rows(jop.summary(params))
    assert rows["['lr']"][1:4] == ["()", "float32", "no: rank 0 < 2"]
    assert rows["['key']"][3] == "no: rank 0 < 2"
    assert rows["['keys']"][3] == "no: dtype key<fry> is not floating"
    assert rows["['w']"][3] == "yes"
    tx = jop.add_orthogonality_penalty(1.0)
    u, _ = tx.update({**params, "w": jnp.zeros((3, 2))}, tx.init(params), params)
    assert bool(jnp.any(u["w"] != 0))
    assert u["lr"] == 1.5 and u["key"] is params["key"] and u["keys"] is params["keys"]
