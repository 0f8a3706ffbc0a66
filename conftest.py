"""Applies to every test pytest collects here: tests/, the docstring examples, the docs.

Shape bugs and silent dtype promotions fail loudly, as in equinox's and lineax's
suites: the package must be clean for users who run under strict promotion.
"""

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_promotion() -> Iterator[None]:
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield
