"""Applies to every test pytest collects here: tests/, the docstring examples, the docs.

Shape bugs and silent dtype promotions fail loudly, as in equinox's and lineax's
suites: the package must be clean for users who run under strict promotion.

One exception, named per test: optax's own optimizers and schedules (``scale_by_adam``'s
bias correction, ``linear_schedule``, ...) multiply Python floats by the int32 step
count, which strict promotion rejects inside optax. Tests that run them are marked
``optax_promotion`` and run under standard promotion; so are the docstring examples
that build them. The package's own paths, the transform's update included, are run
under strict promotion by the rest of the suite (tests/test_transformations.py).
"""

import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import jax
import pytest
from _pytest.doctest import DoctestItem

_OPTAX_STEP_COUNT = re.compile(r"optax\.(adam|adamw|scale_by_adam|\w+_schedule)\b")


def pytest_configure(config: pytest.Config) -> None:
    """One persistent compilation cache for the whole run, unless one is set already,
    and one directory for the multi-device scripts' records (tests/host_devices.py).

    The xdist workers and the tests' subprocesses inherit the environment, so a
    program that several tests compile (the matrix's beta kinds often lower to the
    same one) is compiled once, and each multi-device script runs once. Both live for
    this run only.
    """
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made both
        _use_cache()
        return
    _run_directory(config, "JAX_ORTHOPENALTY_RECORDS_DIR", "records")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _run_directory(config, "JAX_COMPILATION_CACHE_DIR", "jax-cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    _use_cache()


def _run_directory(config: pytest.Config, variable: str, what: str) -> None:
    """A fresh temporary directory named in ``os.environ[variable]``, removed at the end."""
    path = tempfile.mkdtemp(prefix=f"jax_orthopenalty-{what}-")
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    os.environ[variable] = path


def _use_cache() -> None:
    # jax read its environment when it was imported, before this hook: set it here too.
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, DoctestItem) and any(
            _OPTAX_STEP_COUNT.search(example.source) for example in item.dtest.examples
        ):
            item.add_marker(pytest.mark.optax_promotion)


@pytest.fixture(autouse=True)
def _strict_promotion(request: pytest.FixtureRequest) -> Iterator[None]:
    dtypes = "standard" if request.node.get_closest_marker("optax_promotion") else "strict"
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion(dtypes):
        yield
