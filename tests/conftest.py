"""No test leaks jax configuration into the next (strict promotion: ../conftest.py)."""

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture(autouse=True)
def _no_x64_leak() -> Iterator[None]:
    # float64 only ever inside `with jax.enable_x64(True):`, never left on.
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 on"
