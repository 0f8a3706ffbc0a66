"""Two processes, one global mesh: the penalty under ``jax.distributed`` on one machine.

Two local processes join through ``jax.distributed.initialize`` on 127.0.0.1, each
with 4 CPU devices (``--xla_force_host_platform_device_count=4``) and gloo as the CPU
collectives, so ``jax.devices()`` is 8 devices of which 4 are addressable per process:
what every host of a multi-host run sees. Over that global mesh the workers run the
penalty under ``jax.jit`` on global arrays, each process building its part of the
input from its own data, and write the shards they hold to ``.npz`` files. This
process reassembles them and compares with the one-device result.

This file is also the worker: ``python tests/test_multiprocess.py PROCESS_ID PORT DIR``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

N_PROCESSES = 2
LOCAL_DEVICES = 4
N_DEVICES = N_PROCESSES * LOCAL_DEVICES
SHAPE = (16, 32, 8)  # (l, m, n): 32 groups of 16 x 8, 4 groups per device
BETA = 0.5
LR = 1e-2
STEPS = 3
TIMEOUT_S = 40.0  # both workers, start to exit; then both are killed
INIT_TIMEOUT_S = 20  # jax.distributed.initialize's own bound
RTOL = 1e-5  # float32: sharding changes only the order of sums

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\("
)
# A jaxlib without gloo fails where the CPU backend makes its collectives
# (`make_gloo_tcp_collectives`), or leaves the backend without cross-process
# collectives, so that the first one fails ("Multiprocess computations aren't
# implemented on the CPU backend", as without a collectives implementation). The
# workers report those as "unavailable", and the test fails saying so, not skips: the
# Linux jaxlib wheels the package supports (>= 0.10) have gloo, so a CPU-only CI
# machine runs this test. Any other error (a gloo connection that fails, a wrong
# number) is a failure too, with its traceback.
_NO_GLOO = re.compile(r"gloo|cpu[ _]collectives", re.IGNORECASE)
_NO_COLLECTIVES = re.compile(r"UNIMPLEMENTED|n't implemented|not implemented", re.IGNORECASE)


def _data() -> dict[str, np.ndarray]:
    """The inputs, the same in every process and in the reference: fixed seeds."""
    rng = np.random.default_rng(20261125)
    return {
        "phi": rng.standard_normal(SHAPE).astype(np.float32),
        "bias": rng.standard_normal((8,)).astype(np.float32),
    }


def _loss(params: dict[str, Any]) -> Any:
    """A data loss for the optax case: the penalty comes from the transform."""
    import jax.numpy as jnp

    return jnp.sum(jnp.sin(params["w"])) + jnp.sum(params["b"] ** 2)


def _optax_steps(params: dict[str, Any]) -> dict[str, Any]:
    """STEPS steps of ``chain(add_orthogonality_penalty(BETA), adam(LR))``."""
    import jax
    import optax

    import jax_orthopenalty as jop

    tx = optax.chain(jop.add_orthogonality_penalty(BETA), optax.adam(LR))
    state = tx.init(params)
    for _ in range(STEPS):
        grads = jax.grad(_loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _cases() -> dict[str, Callable[..., Any]]:
    """name -> function of the inputs; run sharded in the workers, unsharded here."""
    import jax

    import jax_orthopenalty as jop

    def value(p: Any) -> Any:
        return jop.orthogonality_penalty(p, BETA)

    return {"value": value, "grad": jax.grad(value), "optax": _optax_steps}


# --------------------------------------------------------------------------- worker


def _worker(process_id: int, port: int, out: Path) -> None:  # pragma: no cover
    """One of the two processes; writes out/p{process_id}.json and .npz."""
    status: dict[str, Any] = {"process_id": process_id, "records": {}}
    shards: dict[str, np.ndarray] = {}
    path = out / f"p{process_id}"

    def write() -> None:
        np.savez(path.with_suffix(".npz"), **shards)
        path.with_suffix(".json").write_text(json.dumps(status))

    t0 = time.monotonic()
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            coordinator_bind_address=f"127.0.0.1:{port}",
            num_processes=N_PROCESSES,
            process_id=process_id,
            initialization_timeout=INIT_TIMEOUT_S,
            heartbeat_timeout_seconds=INIT_TIMEOUT_S,
            shutdown_timeout_seconds=INIT_TIMEOUT_S,
        )
        devices = jax.devices()  # creates the CPU backend with gloo collectives
    except Exception as e:
        if not _NO_GLOO.search(str(e)):
            raise
        status["unavailable"] = f"gloo CPU collectives unavailable: {type(e).__name__}: {e}"[:600]
        write()
        return
    status["init_s"] = time.monotonic() - t0

    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.process_count() == N_PROCESSES, jax.process_count()
    assert len(devices) == N_DEVICES, devices
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()

    data = _data()
    cases = _cases()
    auto = AxisType.Auto
    mesh = jax.make_mesh((N_DEVICES,), ("x",), axis_types=(auto,))
    # The layout docs/scale.md recommends: the process axis on the groups, the
    # vectors within a process.
    mesh2 = jax.make_mesh((N_PROCESSES, LOCAL_DEVICES), ("hosts", "local"), axis_types=(auto,) * 2)
    status["mesh2_rows"] = [sorted({d.process_index for d in row}) for row in mesh2.devices]

    def local_block(sharding: Any, full: np.ndarray) -> np.ndarray:
        """This process's data: the smallest box around its devices' indices."""
        idx = list(sharding.addressable_devices_indices_map(full.shape).values())
        box = tuple(
            slice(
                min(ix[a].indices(n)[0] for ix in idx),
                max(ix[a].indices(n)[1] for ix in idx),
            )
            for a, n in enumerate(full.shape)
        )
        return full[box]

    def from_local(sharding: Any, full: np.ndarray) -> Any:
        # What a data loader does: each process holds only its own block.
        return jax.make_array_from_process_local_data(
            sharding, local_block(sharding, full), full.shape
        )

    def from_callback(sharding: Any, full: np.ndarray) -> Any:
        return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])

    def save(name: str, x: Any) -> None:
        """Every shard this process holds, as a full-shape array and a mask."""
        buf = np.zeros(x.shape, np.float32)
        mask = np.zeros(x.shape, np.bool_)
        for s in x.addressable_shards:
            buf[s.index] = np.asarray(s.data)
            mask[s.index] = True
        shards[name] = buf
        shards[name + "#mask"] = mask

    def spec_of(x: Any) -> str:
        spec = list(getattr(x.sharding, "spec", ()))
        while spec and spec[-1] is None:
            spec.pop()
        return str(P(*spec))

    def run(name: str, f: Callable[..., Any], *args: Any) -> None:
        t = time.monotonic()
        try:
            jf = jax.jit(f)
            hlo = jf.lower(*args).compile().as_text()
            got = jf(*args)
            leaves = jax.tree.leaves_with_path(got)
            for kp, leaf in leaves:
                save(name + jax.tree_util.keystr(kp), leaf)
            status["records"][name] = {
                "ok": True,
                "leaves": [name + jax.tree_util.keystr(kp) for kp, _ in leaves],
                "in_specs": [spec_of(a) for a in jax.tree.leaves(args)],
                "out_specs": [spec_of(leaf) for _, leaf in leaves],
                "collectives": [
                    (m["op"], m["shape"].split("{")[0]) for m in _COLLECTIVE.finditer(hlo)
                ],
                "seconds": time.monotonic() - t,
            }
        except Exception as e:
            status["records"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:800]}

    # A probe of the collectives themselves, before any of the library: the sum of
    # a global array with one element per device, four in each process.
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("x")), np.ones(LOCAL_DEVICES, np.float32), (N_DEVICES,)
    )
    try:
        total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))
    except Exception as e:
        if not _NO_COLLECTIVES.search(str(e)):
            raise
        status["unavailable"] = f"no cross-process CPU collectives: {type(e).__name__}: {e}"[:600]
        write()
        return
    assert total == N_DEVICES, total

    phi = data["phi"]
    by_group = NamedSharding(mesh, P(None, "x", None))
    by_vector = NamedSharding(mesh, P("x", None, None))
    two_d = NamedSharding(mesh2, P("local", "hosts", None))
    replicated = NamedSharding(mesh, P())

    # (a) groups sharded across both processes: value and gradient.
    phi_g = from_local(by_group, phi)
    run("group-value", cases["value"], phi_g)
    run("group-grad", cases["grad"], phi_g)
    # (b) vectors sharded: every Gram is a sum over both processes' rows.
    phi_v = from_callback(by_vector, phi)
    run("vector-value", cases["value"], phi_v)
    run("vector-grad", cases["grad"], phi_v)
    # Groups over the processes, vectors over each process's devices.
    run("2d-grad", cases["grad"], from_callback(two_d, phi))
    # (c) the optax step on group-sharded params, with a replicated bias.
    params = {"w": phi_g, "b": from_callback(replicated, data["bias"])}
    run("group-optax", cases["optax"], params)
    # The transforms' init and summary on params that span the other process's devices:
    # their zero check fetched every leaf to the host ("non-addressable devices").
    try:
        import jax_orthopenalty as jop

        jop.landing().init(params)
        jop.project_orthonormal().init(params)
        status["init_summary"] = {"ok": True, "last": jop.summary(params).splitlines()[-1]}
    except Exception as e:
        status["init_summary"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:800]}
    # jax.grad inside jax.shard_map, the per-device program written by hand.
    run(
        "shard-map-grad",
        jax.shard_map(cases["grad"], mesh=mesh, in_specs=P(None, "x"), out_specs=P(None, "x")),
        phi_g,
    )

    status["seconds"] = time.monotonic() - t0
    write()
    jax.distributed.shutdown()


# --------------------------------------------------------------------------- parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_workers(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]], str]:
    """Start both workers, wait at most TIMEOUT_S, kill both on timeout or error."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "0",
    }
    # The workers import the same checkout as this process, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    port = _free_port()
    script = str(Path(__file__).resolve())
    procs: list[subprocess.Popen[bytes]] = []
    logs = [out / f"p{i}.log" for i in range(N_PROCESSES)]
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        for i in range(N_PROCESSES):
            with logs[i].open("wb") as log:  # the child keeps its own descriptor
                procs.append(
                    subprocess.Popen(
                        [sys.executable, script, str(i), str(port), str(out)],
                        env=env,
                        cwd=root,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(
        f"--- worker {i} (exit {p.returncode}) ---\n{logs[i].read_text(errors='replace')[-4000:]}"
        for i, p in enumerate(procs)
    )
    if timed_out:
        pytest.fail(f"workers killed after {TIMEOUT_S:.0f} s\n{report}")
    failed = [p.returncode for p in procs if p.returncode != 0]
    assert not failed, report
    statuses = [json.loads((out / f"p{i}.json").read_text()) for i in range(N_PROCESSES)]
    arrays = []
    for i in range(N_PROCESSES):
        with np.load(out / f"p{i}.npz") as z:
            arrays.append({k: z[k] for k in z.files})
    return statuses, arrays, report


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("multiprocess")
    t0 = time.monotonic()
    statuses, arrays, report = _run_workers(out)
    unavailable = [s["unavailable"] for s in statuses if "unavailable" in s]
    assert not unavailable, f"this jaxlib has no cross-process CPU collectives: {unavailable}"
    yield {
        "statuses": statuses,
        "arrays": arrays,
        "report": report,
        "seconds": time.monotonic() - t0,
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The one-device results in this process, from the same seeded data."""
    import jax
    import jax.numpy as jnp

    data = _data()
    cases = _cases()
    phi = jnp.asarray(data["phi"])
    params = {"w": phi, "b": jnp.asarray(data["bias"])}
    return {
        "value": jax.jit(cases["value"])(phi),
        "grad": jax.jit(cases["grad"])(phi),
        "optax": jax.jit(cases["optax"])(params),
    }


def _gathered(run: dict[str, Any], name: str) -> list[np.ndarray]:
    """Each output of a case, reassembled from the shards of both processes."""
    recs = [s["records"][name] for s in run["statuses"]]
    for r in recs:
        if not r["ok"]:
            raise CaseFailed(r["error"])
    assert recs[0]["leaves"] == recs[1]["leaves"], recs
    out = []
    for leaf in recs[0]["leaves"]:
        bufs = [a[leaf] for a in run["arrays"]]
        masks = [a[leaf + "#mask"] for a in run["arrays"]]
        assert np.all(masks[0] | masks[1]), f"{leaf}: some entries are on no process"
        both = masks[0] & masks[1]
        # Replicated entries (a replicated value, the bias) agree bit for bit.
        np.testing.assert_array_equal(bufs[0][both], bufs[1][both], err_msg=leaf)
        out.append(np.where(masks[0], bufs[0], bufs[1]))
    return out


class CaseFailed(Exception):
    """A case raised in the workers (the message is the workers' error)."""


def _assert_close(got: list[np.ndarray], want: Any) -> None:
    """Every leaf to float32 tolerance, relative to the leaf's largest entry."""
    import jax

    leaves = [np.asarray(w, np.float64) for w in jax.tree.leaves(want)]
    assert len(got) == len(leaves)
    for g, w in zip(got, leaves, strict=True):
        assert g.shape == w.shape
        scale = max(float(np.max(np.abs(w))), 1.0)
        err = float(np.max(np.abs(g.astype(np.float64) - w)))
        assert err <= RTOL * scale, (err, scale)


def _record(run: dict[str, Any], name: str) -> dict[str, Any]:
    """Process 0's record of a compiled case (both compile the same program)."""
    rec: dict[str, Any] = dict(run["statuses"][0]["records"][name])
    rec["collectives"] = [tuple(c) for c in rec["collectives"]]
    return rec


def test_two_processes_eight_devices(run: dict[str, Any]) -> None:
    """The run itself: both processes joined, and it fits the CI budget."""
    assert [s["process_id"] for s in run["statuses"]] == [0, 1]
    # In the (hosts, local) mesh each row is one process's devices.
    assert run["statuses"][0]["mesh2_rows"] == [[0], [1]]
    assert run["seconds"] < TIMEOUT_S, run["report"]


def test_init_and_summary_on_params_across_processes(run: dict[str, Any]) -> None:
    """landing's and the projection's init, and summary, on params whose leaves span
    both processes' devices: no host copy of what this process does not hold."""
    for status in run["statuses"]:
        record = status["init_summary"]
        assert record["ok"], record.get("error")
        assert record["last"] == "selected: 1 of 2 leaves, 32 groups", record


@pytest.mark.parametrize("what", ["value", "grad"])
def test_group_sharded(run: dict[str, Any], reference: dict[str, Any], what: str) -> None:
    """(a) Groups across both processes: the one-device numbers; the gradient keeps
    the sharding and needs no collective, the value is a replicated scalar."""
    _assert_close(_gathered(run, f"group-{what}"), reference[what])
    rec = _record(run, f"group-{what}")
    if what == "grad":
        assert rec["out_specs"] == rec["in_specs"] == ["P(None, 'x')"], rec
        assert rec["collectives"] == [], rec
    else:
        assert rec["out_specs"] == ["P()"], rec
        assert set(rec["collectives"]) <= {("all-reduce", "f32[]")}, rec


@pytest.mark.parametrize("what", ["value", "grad"])
def test_vector_sharded(run: dict[str, Any], reference: dict[str, Any], what: str) -> None:
    """(b) Vectors across both processes: each Gram is all-reduced over all 8
    devices (gloo between the processes), and the result is the one-device one."""
    _assert_close(_gathered(run, f"vector-{what}"), reference[what])
    rec = _record(run, f"vector-{what}")
    assert ("all-reduce", f"f32[{SHAPE[1]},{SHAPE[2]},{SHAPE[2]}]") in rec["collectives"], rec
    if what == "grad":
        assert rec["out_specs"] == rec["in_specs"] == ["P('x',)"], rec


def test_two_dimensional_mesh(run: dict[str, Any], reference: dict[str, Any]) -> None:
    """Groups over the processes, vectors over each process's 4 devices: one Gram
    all-reduce, of each device's 16 groups. Each mesh row is one process and the rows
    hold different groups, so a result equal to the one-device one means that
    all-reduce summed within a process only."""
    _assert_close(_gathered(run, "2d-grad"), reference["grad"])
    rec = _record(run, "2d-grad")
    assert rec["collectives"] == [("all-reduce", f"f32[16,{SHAPE[2]},{SHAPE[2]}]")], rec
    assert rec["out_specs"] == rec["in_specs"] == ["P('local', 'hosts')"], rec


def test_optax_group_sharded(run: dict[str, Any], reference: dict[str, Any]) -> None:
    """(c) ``chain(add_orthogonality_penalty, adam)``, group-sharded params and a
    replicated bias: the one-device params after STEPS steps, shardings kept."""
    _assert_close(_gathered(run, "group-optax"), reference["optax"])
    rec = _record(run, "group-optax")
    assert rec["out_specs"] == rec["in_specs"], rec
    assert rec["collectives"] == [], rec


def test_shard_map_grad(run: dict[str, Any], reference: dict[str, Any]) -> None:
    """jax.grad of the penalty inside jax.shard_map, over both processes: each shard's
    penalty is a per-shard value, and beta's cotangent is reduced by autodiff."""
    _assert_close(_gathered(run, "shard-map-grad"), reference["grad"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
