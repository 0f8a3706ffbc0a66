"""Shape bugs fail loudly, and no test leaks jax configuration into the next."""

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_ranks() -> Iterator[None]:
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(autouse=True)
def _no_x64_leak() -> Iterator[None]:
    # float64 only ever inside `with jax.enable_x64(True):`, never left on.
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 on"
