"""The entrywise norms and kink conventions, exactly at and around the kink."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_orthopenalty as jop
from jax_orthopenalty._rules import make_rule

X = jnp.array([-2.0, -1e-30, 0.0, -0.0, 1e-30, 0.5, 3.0])


@pytest.mark.parametrize(
    ("subgradient", "at_zero"),
    [("zero", 0.0), ("positive", 1.0), ("negative", -1.0), (jop.deadzone(0.0), 0.0)],
)
def test_named_conventions_exact_at_the_kink(subgradient, at_zero):
    d = make_rule("l1", subgradient).derivative(X)
    expected = np.array([-1.0, -1.0, at_zero, at_zero, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(d), expected)


def test_positive_is_what_autodiff_of_abs_does():
    # The pitfall in one line: autodiff picks +1 at 0, so "positive" reproduces it.
    assert jax.grad(jnp.abs)(0.0) == 1.0
    rule = make_rule("l1", "positive")
    np.testing.assert_array_equal(
        np.asarray(rule.derivative(X)), np.asarray(jax.vmap(jax.grad(jnp.abs))(X))
    )


def test_deadzone_band_is_closed():
    d = jop.deadzone(0.5)(jnp.array([-0.6, -0.5, -0.1, 0.0, 0.5, 0.50001]))
    np.testing.assert_array_equal(np.asarray(d), [-1.0, 0.0, 0.0, 0.0, 0.0, 1.0])


def test_squared_value_and_derivative():
    rule = make_rule("squared", "zero")
    np.testing.assert_array_equal(np.asarray(rule.value(X)), np.asarray(X) ** 2)
    np.testing.assert_array_equal(np.asarray(rule.derivative(X)), 2 * np.asarray(X))


@pytest.mark.parametrize("delta", [0.1, 1.0, 2.5])
def test_huber_is_the_moreau_envelope_of_abs(delta):
    # h(x) = min_y |y| + (x - y)^2 / (2 delta), evaluated on a fine grid of y.
    xs = np.linspace(-3, 3, 61)
    ys = np.linspace(-4, 4, 160001)
    envelope = [np.min(np.abs(ys) + (x - ys) ** 2 / (2 * delta)) for x in xs]
    rule = make_rule(jop.huber(delta), "zero")
    np.testing.assert_allclose(np.asarray(rule.value(jnp.asarray(xs))), envelope, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    x=st.floats(-10, 10, allow_nan=False, width=32),
    delta=st.floats(0.01, 5.0),
)
def test_huber_derivative_is_the_derivative_of_its_value(x, delta):
    rule = make_rule(jop.huber(delta), "zero")
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        assert float(rule.derivative(x64)) == pytest.approx(
            float(jax.grad(rule.value)(x64)), abs=1e-12
        )


def test_huber_tends_to_l1():
    rule = make_rule(jop.huber(1e-6), "zero")
    np.testing.assert_allclose(np.asarray(rule.value(X)), np.abs(np.asarray(X)), atol=1e-6)


@pytest.mark.parametrize("subgradient", ["zero", "positive", "negative", jop.deadzone(0.1)])
def test_nan_propagates_through_every_convention(subgradient):
    d = make_rule("l1", subgradient).derivative(jnp.array([jnp.nan, 1.0]))
    assert math.isnan(float(d[0])) and float(d[1]) == 1.0


@pytest.mark.parametrize("norm", ["squared", jop.huber(0.5)])
def test_nan_propagates_through_smooth_norms(norm):
    rule = make_rule(norm, "zero")
    assert math.isnan(float(rule.value(jnp.nan)))
    assert math.isnan(float(rule.derivative(jnp.nan)))


@pytest.mark.parametrize("tol", [-1.0, math.nan, math.inf])
def test_deadzone_rejects_bad_tol(tol):
    with pytest.raises(ValueError, match="`tol` must be finite and >= 0"):
        jop.deadzone(tol)


@pytest.mark.parametrize("delta", [0.0, -1.0, math.nan, math.inf])
def test_huber_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="`delta` must be finite and > 0"):
        jop.huber(delta)


@pytest.mark.parametrize("bad", ["0.1", None, True, jnp.array(0.1)])
def test_rejects_non_real_parameters(bad):
    with pytest.raises(TypeError, match="`tol` must be a real number"):
        jop.deadzone(bad)
    with pytest.raises(TypeError, match="`delta` must be a real number"):
        jop.huber(bad)


def test_options_are_hashable_values():
    # Static options: equal by value, so jit caches hit for equal options.
    assert jop.deadzone(0.1) == jop.deadzone(0.1)
    assert hash(jop.huber(0.5)) == hash(jop.huber(0.5))
    assert make_rule("l1", "zero") == make_rule("l1", "zero")


def test_unknown_names_and_kinds():
    with pytest.raises(ValueError, match="`norm` must be 'l1', 'squared'"):
        make_rule("l2", "zero")
    with pytest.raises(TypeError, match="`norm` must be"):
        make_rule(2, "zero")
    with pytest.raises(ValueError, match="`subgradient` must be 'zero', 'positive'"):
        make_rule("l1", "sign")
    with pytest.raises(TypeError, match="`subgradient` must be"):
        make_rule("l1", 0.0)
    with pytest.raises(TypeError, match="`subgradient` must be static"):
        make_rule("l1", jnp.zeros(()))
