"""``jax.set_mesh`` with an Explicit mesh of 8 devices: the family options, sharded.

The transformation matrix's ``set_mesh`` column runs every entry point under a
one-device Explicit mesh (sharding in types, but nothing split). Here the groups, the
columns or the vectors of ``phi`` are split over 8 host devices, inside
``jax.set_mesh``, for the options that touch the layout: ``normalize`` (whose column
scale must keep phi's sharding), ``off_diagonal``, ``double_sided``, the squared,
huber and spectral norms, ``orthogonality_error(normalize=True)`` and the transform.
Each sharding is one jitted program computing all of them, compared with the same
program on one device; the results keep phi's sharding.

The file is also a script: the test runs it in a child process with 8 devices (see
``host_devices.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from host_devices import print_records, run_as_script


def _everything(phi: jax.Array) -> dict[str, Any]:

    import jax_orthopenalty as jop

    options: dict[str, dict[str, Any]] = {
        "l1": {},
        "normalize": {"normalize": True},
        "off_diagonal_normalize": {"off_diagonal": True, "normalize": True},
        "double_sided": {"double_sided": True},
        "squared": {"norm": "squared"},
        "huber": {"norm": jop.huber(0.1)},
        "spectral": {"norm": "spectral"},
    }
    out: dict[str, Any] = {}
    for name, kw in options.items():
        value, grad = jax.value_and_grad(lambda p, kw=kw: jop.orthogonality_penalty(p, 0.5, **kw))(
            phi
        )
        out[f"{name}-value"] = value
        out[f"{name}-grad"] = grad
        out[f"{name}-closed_form"] = jop.orthogonality_penalty_grad(phi, 0.5, **kw)
    out["error-normalize"] = jop.orthogonality_error(phi, normalize=True)
    tx = jop.add_orthogonality_penalty(0.5, normalize=True)
    params = {"w": phi}
    out["transform"] = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)[0]["w"]
    return out


def _child() -> None:  # pragma: no cover - runs in the subprocess
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    # (l, m, n) = (16, 8, 8): vectors, groups or columns split 8 ways.
    phi = jnp.asarray(rng.normal(size=(16, 8, 8)) / 4, jnp.float32)
    want = jax.jit(_everything)(phi)
    records: dict[str, Any] = {}
    for split, spec in {
        "vectors": P("x", None, None),
        "groups": P(None, "x", None),
        "columns": P(None, None, "x"),
    }.items():
        try:
            with jax.set_mesh(mesh):
                sharded = jax.device_put(phi, NamedSharding(mesh, spec))
                got = jax.jit(_everything)(sharded)
            records[split] = {
                "err": {  # in NumPy: eager jnp ops would compile one program each
                    k: float(
                        np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k])))
                        / (1 + np.max(np.abs(np.asarray(want[k]))))
                    )
                    for k in want
                },
                "kept": {
                    k: bool(got[k].sharding.is_equivalent_to(sharded.sharding, 3))
                    for k in want
                    if got[k].ndim == 3
                },
            }
        except Exception as e:
            records[split] = {"error": f"{type(e).__name__}: {e}"[:600]}
    print_records(records)


def test_family_options_under_set_mesh_on_8_devices() -> None:
    records = run_as_script(__file__)
    assert sorted(records) == ["columns", "groups", "vectors"]
    for split, rec in records.items():
        assert "error" not in rec, (split, rec)
        assert len(rec["err"]) == 7 * 3 + 2
        for name, err in rec["err"].items():
            assert err < 1e-5, (split, name, err)
        # Every phi-shaped result (gradients, closed forms, the transform's update)
        # keeps phi's sharding.
        assert len(rec["kept"]) == 7 * 2 + 1 and all(rec["kept"].values()), (split, rec["kept"])


if __name__ == "__main__":
    _child()
