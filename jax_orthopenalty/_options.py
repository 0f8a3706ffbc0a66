r"""The static options of a penalty, validated once, and the check of one leaf against them.

:func:`make_options` turns the keywords every entry point shares (``norm``,
``subgradient``, ``precision``, the family flags) into a frozen, hashable
:class:`Options`, without looking at ``phi``: the public functions call it once per call,
the transforms once when the factory is called. :func:`make_spec` then checks one
leaf against them (complex support, the einsum letters of the double-sided term) and
bundles the two into the :class:`Spec` the math runs on.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._layout import DEFAULT_PRECISION, NORMALIZE_EPS, Layout
from ._rules import Norm, Rule, Subgradient, make_rule

__all__ = ["Options", "Spec", "check_flag", "check_normalize_eps", "make_options", "make_spec"]


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything static about a penalty but the layout: hashable, compared by value."""

    rule: Rule
    precision: Any = DEFAULT_PRECISION
    off_diagonal: bool = False
    normalize: bool = False
    double_sided: bool = False
    normalize_eps: float = NORMALIZE_EPS


def make_options(
    *,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float = NORMALIZE_EPS,
) -> Options:
    """Validates the options that do not depend on ``phi``.

    Raises:
      ValueError: an unknown ``norm`` or ``subgradient`` name, a ``normalize_eps`` that
        is not finite and positive, ``double_sided`` with a norm that has no row term.
      TypeError: an option of the wrong type.
    """
    options = Options(
        rule=make_rule(norm, subgradient),
        precision=precision,
        off_diagonal=check_flag("off_diagonal", off_diagonal),
        normalize=check_flag("normalize", normalize),
        double_sided=check_flag("double_sided", double_sided),
        normalize_eps=check_normalize_eps(normalize_eps),
    )
    if options.double_sided and options.rule.row_form is None:
        # The row term of a matrix norm is not a sum over entries of the l x l residual:
        # for the spectral norm it is max(column term, [l > n]), so it adds nothing but a
        # constant; the max norm's would be one more arg-max. Neither is implemented.
        raise ValueError(
            f"`double_sided=True` is not supported with norm={norm!r}: it is defined for "
            "the entrywise norms ('l1', 'squared', huber). For the spectral norm the row "
            "term ||Phi Phi^T - I||_2 equals the column term (or 1 when l > n)."
        )
    return options


@dataclasses.dataclass(frozen=True)
class Spec:
    """A leaf's :class:`Layout` and the :class:`Options`: the static argument of the math."""

    layout: Layout
    options: Options

    @property
    def rule(self) -> Rule:
        return self.options.rule

    @property
    def precision(self) -> Any:
        return self.options.precision

    @property
    def off_diagonal(self) -> bool:
        return self.options.off_diagonal

    @property
    def normalize(self) -> bool:
        return self.options.normalize

    @property
    def double_sided(self) -> bool:
        return self.options.double_sided

    @property
    def normalize_eps(self) -> float:
        return self.options.normalize_eps


def make_spec(phi: jax.Array, layout: Layout, options: Options) -> Spec:
    """Checks a leaf (its dtype and rank) against the options, at trace time."""
    rule = options.rule
    if jnp.issubdtype(phi.dtype, jnp.complexfloating) and not rule.complex_ok:
        raise TypeError(
            f"norm={rule.name} does not support complex `phi` ({jnp.dtype(phi.dtype)}): the "
            "unitary penalty on Phi^H Phi - I is defined for the entrywise norms ('l1', "
            "'squared', huber(delta))."
        )
    letters = len(string.ascii_letters)
    if options.double_sided and phi.ndim + 1 + len(layout.vector_axes) > letters:
        raise ValueError(
            f"`double_sided=True` supports `phi` of rank at most "
            f"{letters - 1 - len(layout.vector_axes)} with "
            f"{len(layout.vector_axes)} vector axes (one einsum letter per axis), "
            f"got rank {phi.ndim}."
        )
    return Spec(layout, options)


def check_normalize_eps(value: object) -> float:
    """``normalize_eps``: a static, finite, positive Python float (or int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "`normalize_eps` must be a Python float (static, the floor on the squared "
            f"column norm), got {value!r} of type {type(value).__name__}. Under "
            "optax.inject_hyperparams, name it in static_args: "
            'static_args=("normalize_eps",).'
        )
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`normalize_eps` must be finite and > 0, got {value!r}.")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a Python bool, got {value!r}.")
    return value
