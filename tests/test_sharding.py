"""Sharded parameters: the penalty, its gradient and the optax update on 8 host devices.

The checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
first imported, and the other test modules import jax first in the same pytest
process. So this file is also a script: the tests run it once in a subprocess with the
flag set (``python tests/test_sharding.py``), it prints one JSON record per case, and
each test asserts on its record. Nothing leaks into the parent process.

Every case compares the sharded result with the same function on one device, reads
the output's sharding, and lists the collectives in the compiled HLO
(``jax.jit(f).lower(...).compile().as_text()``) with their per-device shapes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from host_devices import print_records, run_as_script

N_DEVICES = 8
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\S+)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(op, per-device result shape) for every collective in a compiled HLO module."""
    return [(m["op"], m["shape"].split("{")[0]) for m in _COLLECTIVE.finditer(hlo)]


@pytest.fixture(autouse=True)
def _x64_stays_off() -> Iterator[None]:
    # This module runs after most others (alphabetically): a leaked
    # jax.config.update("jax_enable_x64", True) anywhere before it fails here.
    import jax

    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64


def test_collective_parser_sees_an_all_gather() -> None:
    # The assertions below are "no all-gather"; make sure the parser would see one.
    hlo = (
        "  %all-gather = f32[16,32,8]{2,1,0} all-gather(f32[2,32,8]{2,1,0} %p), "
        "channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}\n"
        "  %ar = f32[] all-reduce-start(f32[] %x), to_apply=%add\n"
    )
    assert collectives(hlo) == [("all-gather", "f32[16,32,8]"), ("all-reduce", "f32[]")]


# --------------------------------------------------------------------------- child


def _child() -> None:  # pragma: no cover - runs in the subprocess
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_orthopenalty as jop

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    records: dict[str, dict[str, Any]] = {}

    def spec_of(x: Any) -> str:
        # P(None, 'x') and P(None, 'x', None) are the same sharding: drop trailing Nones.
        spec = list(getattr(x.sharding, "spec", ()))
        while spec and spec[-1] is None:
            spec.pop()
        return str(P(*spec))

    references: dict[str, Any] = {}

    def check(
        name: str,
        f: Callable[..., Any],
        args: tuple[Any, ...],
        shardings: tuple[Any, ...],
    ) -> None:
        try:
            sharded = tuple(jax.device_put(a, s) for a, s in zip(args, shardings, strict=True))
            compiled = jax.jit(f).lower(*sharded).compile()  # compiled once, run as is
            hlo = compiled.as_text()
            got = compiled(*sharded)
            # One device: the unsharded result, the same for every mesh and sharding of
            # this function and input (the name without its mode and sharded axis).
            ref_key = name.split("-", 2)[-1] if name.startswith(("auto-", "explicit-")) else name
            if ref_key not in references:
                references[ref_key] = jax.jit(f)(*args)
            want = references[ref_key]
            leaves_got = jax.tree.leaves(got)
            leaves_want = jax.tree.leaves(want)
            err = max(
                float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
                for g, w in zip(leaves_got, leaves_want, strict=True)
            )
            scale = max(float(np.max(np.abs(np.asarray(w, np.float64)))) for w in leaves_want)
            records[name] = {
                "ok": True,
                "err": err,
                "scale": scale,
                "out_specs": [spec_of(g) for g in leaves_got],
                "in_specs": [spec_of(a) for a in jax.tree.leaves(sharded)],
                "collectives": collectives(hlo),
            }
        except Exception as e:
            records[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}

    key = jax.random.key(0)
    # (l, m, n) = (16, 32, 8): m = 32 groups, 4 per device.
    phi = jax.random.normal(key, (16, 32, 8))
    wide = jax.random.normal(key, (16, 32, 12))
    families: dict[str, dict[str, Any]] = {
        "l1": {},
        "squared": {"norm": "squared"},
        "huber": {"norm": jop.huber(0.5)},
        "family": {"off_diagonal": True, "normalize": True},
        "double": {"double_sided": True},
    }
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((N_DEVICES,), ("x",), axis_types=(axis_type,))
        mode = axis_type.name.lower()
        layouts = {
            "group": P(None, "x", None),
            "vector": P("x", None, None),
            "column": P(None, None, "x"),
        }
        for where, pspec in layouts.items():
            sh = NamedSharding(mesh, pspec)
            for fam, opts in families.items():
                if where != "group" and fam not in ("l1", "double"):
                    continue
                o = dict(opts)
                check(
                    f"{mode}-{where}-{fam}-value",
                    lambda p, o=o: jop.orthogonality_penalty(p, 0.5, **o),
                    (phi,),
                    (sh,),
                )
                check(
                    f"{mode}-{where}-{fam}-grad",
                    jax.grad(lambda p, o=o: jop.orthogonality_penalty(p, 0.5, **o)),
                    (phi,),
                    (sh,),
                )
                check(
                    f"{mode}-{where}-{fam}-closed",
                    lambda p, o=o: jop.orthogonality_penalty_grad(p, 0.5, **o),
                    (phi,),
                    (sh,),
                )
            # n = 12 columns: a second shape, in case the matmul formulation is
            # chosen per shape (small n may be unrolled, larger n a batched dot).
            check(
                f"{mode}-{where}-wide-grad",
                jax.grad(lambda p: jop.orthogonality_penalty(p, 0.5)),
                (wide,),
                (sh,),
            )

    # Group axes elsewhere, tuple vector axes, a 2-D mesh with groups on one mesh axis
    # and vectors on the other, and a traced beta (replicated) next to sharded phi.
    mesh = jax.make_mesh((N_DEVICES,), ("x",), axis_types=(AxisType.Auto,))
    conv = jax.random.normal(key, (3, 3, 4, 8, 16))  # (kh, kw, cin, cout, groups)
    conv_opts = {"vector_axis": (0, 1, 2), "column_axis": 3}
    check(
        "auto-group-last-conv-grad",
        jax.grad(lambda p: jop.orthogonality_penalty(p, **conv_opts)),
        (conv,),
        (NamedSharding(mesh, P(None, None, None, None, "x")),),
    )
    mid = jax.random.normal(key, (6, 16, 5, 4))  # (l1, groups, l2, n)
    mid_opts = {"vector_axis": (0, 2), "column_axis": -1, "normalize": True}
    check(
        "auto-group-middle-tuple-grad",
        jax.grad(lambda p: jop.orthogonality_penalty(p, **mid_opts)),
        (mid,),
        (NamedSharding(mesh, P(None, "x", None, None)),),
    )
    check(
        "auto-group-beta-grad",
        jax.grad(lambda p, b: jop.orthogonality_penalty(p, b), argnums=(0, 1)),
        (phi, jnp.float32(0.3)),
        (NamedSharding(mesh, P(None, "x", None)), NamedSharding(mesh, P())),
    )
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    check(
        "auto-2d-grad",
        jax.grad(lambda p: jop.orthogonality_penalty(p)),
        (phi,),
        (NamedSharding(mesh2, P("model", "data", None)),),
    )
    # jit with explicit in/out shardings (the pre-sharding-in-types API).
    psh = NamedSharding(mesh, P(None, "x", None))
    check(
        "auto-jit-shardings-closed",
        jax.jit(
            lambda p: jop.orthogonality_penalty_grad(p),
            in_shardings=psh,
            out_shardings=psh,
        ),
        (phi,),
        (psh,),
    )

    # The optax update: a default-layout leaf sharded over its groups, a conv leaf
    # (groups last) with OrthoDims, a replicated bias, a schedule (a step count in the
    # state), under jit, on Auto and Explicit meshes.
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((N_DEVICES,), ("x",), axis_types=(axis_type,))
        mode = axis_type.name.lower()
        params = {"w": phi, "conv": conv, "b": jnp.ones((8,))}
        grads = jax.tree.map(jnp.cos, params)
        dims = {"w": jop.OrthoDims(), "conv": jop.OrthoDims(**conv_opts), "b": None}
        tx = optax.chain(
            jop.add_orthogonality_penalty(
                optax.linear_schedule(0.1, 0.2, 10), dimension_numbers=dims
            ),
            optax.sgd(1e-2),
        )
        state = tx.init(params)
        tree_sh = {
            "w": NamedSharding(mesh, P(None, "x", None)),
            "conv": NamedSharding(mesh, P(None, None, None, None, "x")),
            "b": NamedSharding(mesh, P()),
        }

        def step(g: Any, p: Any, tx: Any = tx, state: Any = state) -> Any:
            updates, _ = tx.update(g, state, p)
            return optax.apply_updates(p, updates)

        check(f"{mode}-group-optax-update", step, (grads, params), (tree_sh, tree_sh))
        check(
            f"{mode}-group-tree-penalty-grad",
            jax.grad(
                lambda p, dims=dims: jop.tree_orthogonality_penalty(p, 0.1, dimension_numbers=dims)
            ),
            (params,),
            (tree_sh,),
        )

    print_records(records)


# --------------------------------------------------------------------------- parent


@functools.lru_cache(maxsize=1)
def _records() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = run_as_script(__file__, devices=N_DEVICES)
    for rec in out.values():
        rec["collectives"] = [tuple(c) for c in rec.get("collectives", [])]
    return out


def _record(name: str) -> dict[str, Any]:
    records = _records()
    assert name in records, f"the child wrote no record {name!r} (it has {sorted(records)})"
    rec = records[name]
    assert rec["ok"], rec["error"]
    return rec


def _assert_matches_unsharded(rec: dict[str, Any]) -> None:
    # Sharding changes only the order of the sums: float32 rounding, relative.
    assert rec["err"] <= 1e-5 * max(rec["scale"], 1.0), rec


def _ops(rec: dict[str, Any]) -> list[str]:
    return [op for op, _ in rec["collectives"]]


GROUP_CASES = [
    f"{mode}-group-{fam}-{what}"
    for mode in ("auto", "explicit")
    for fam in ("l1", "squared", "huber", "family", "double")
    for what in ("value", "grad", "closed")
] + ["auto-group-wide-grad", "explicit-group-wide-grad"]


@pytest.mark.parametrize("name", GROUP_CASES)
def test_group_sharded_no_gather(name: str) -> None:
    """Groups sharded: nothing but the scalar sum of the value crosses devices."""
    rec = _record(name)
    _assert_matches_unsharded(rec)
    for op, shape in rec["collectives"]:
        # The only communication allowed is the all-reduce of the scalar value.
        assert (op, shape) == ("all-reduce", "f32[]"), rec["collectives"]
    if name.endswith("-value"):
        assert rec["out_specs"] == ["P()"]
    else:
        assert rec["out_specs"] == rec["in_specs"] == ["P(None, 'x')"]


_MOVES_DATA = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.mark.parametrize(
    ("name", "gram"),
    [
        ("auto-vector-l1-value", "f32[32,8,8]"),
        ("auto-vector-l1-grad", "f32[32,8,8]"),
        ("auto-vector-l1-closed", "f32[32,8,8]"),
        ("auto-vector-wide-grad", "f32[32,12,12]"),
    ],
)
def test_vector_sharded_all_reduces_the_gram(name: str, gram: str) -> None:
    """Vectors sharded: correct, and what crosses devices is the all-reduce of the
    (m, n, n) Gram, nothing that moves phi itself (no gather, permute or all-to-all
    of its rows); the gradient keeps phi's sharding."""
    rec = _record(name)
    _assert_matches_unsharded(rec)
    assert ("all-reduce", gram) in rec["collectives"], rec["collectives"]
    assert not set(_ops(rec)) & set(_MOVES_DATA), rec["collectives"]
    if not name.endswith("-value"):
        assert rec["out_specs"] == ["P('x',)"]


@pytest.mark.parametrize("where", ["vector", "column"])
@pytest.mark.parametrize("what", ["value", "grad", "closed"])
def test_other_shardings_are_correct(where: str, what: str) -> None:
    """Columns sharded (and the double-sided l x l term with vectors sharded) need
    the whole group on each device: XLA gathers it, and the result is still right."""
    for fam in ("l1", "double"):
        _assert_matches_unsharded(_record(f"auto-{where}-{fam}-{what}"))


@pytest.mark.parametrize(
    "name",
    [
        "auto-group-last-conv-grad",
        "auto-group-middle-tuple-grad",
        "auto-group-beta-grad",
        "auto-jit-shardings-closed",
    ],
)
def test_group_sharded_layouts(name: str) -> None:
    rec = _record(name)
    _assert_matches_unsharded(rec)
    assert "all-gather" not in _ops(rec), rec["collectives"]
    assert "all-to-all" not in _ops(rec), rec["collectives"]
    assert rec["out_specs"][0] == rec["in_specs"][0], rec


def test_two_dimensional_mesh() -> None:
    """Groups over "data" (4), vectors over "model" (2): each device all-reduces its
    own 32 / 4 = 8 groups' Gram matrices over "model", nothing more."""
    rec = _record("auto-2d-grad")
    _assert_matches_unsharded(rec)
    assert rec["collectives"] == [("all-reduce", "f32[8,8,8]")], rec["collectives"]
    assert rec["out_specs"] == ["P('model', 'data')"]


@pytest.mark.parametrize("where", ["vector", "column"])
@pytest.mark.parametrize("what", ["value", "grad", "closed"])
def test_explicit_mesh_contracted_sharding(where: str, what: str) -> None:
    for fam in ("l1", "double"):
        rec = _record(f"explicit-{where}-{fam}-{what}")
        _assert_matches_unsharded(rec)
        if what != "value":
            assert rec["out_specs"] == rec["in_specs"], rec


@pytest.mark.parametrize(
    "name",
    [
        f"{mode}-group-{what}"
        for mode in ("auto", "explicit")
        for what in ("optax-update", "tree-penalty-grad")
    ],
)
def test_optax_update_group_sharded(name: str) -> None:
    """The optax update and the tree penalty's gradient: same numbers as on one
    device, no gather, and every leaf keeps its sharding."""
    rec = _record(name)
    _assert_matches_unsharded(rec)
    assert "all-gather" not in _ops(rec), rec["collectives"]
    assert "all-to-all" not in _ops(rec), rec["collectives"]
    assert rec["out_specs"] == rec["in_specs"][: len(rec["out_specs"])], rec


if __name__ == "__main__":
    _child()
