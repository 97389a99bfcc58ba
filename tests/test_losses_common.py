"""Masked reductions vs numpy loops; padding garbage (inf/nan) never leaks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import masked_mean, masked_sum, masked_var


def ragged(rng, b, t, min_len=0):
    lengths = rng.integers(min_len, t + 1, size=b)
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 9)])
def test_masked_reductions_match_loops(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    mask = ragged(rng, *shape, min_len=1)
    vals = [x[b, t] for b in range(shape[0]) for t in range(shape[1]) if mask[b, t]]
    n = len(vals)
    ref_mean = sum(vals) / n
    ref_var_b = sum((v - ref_mean) ** 2 for v in vals) / n
    ref_var_u = ref_var_b * n / (n - 1) if n > 1 else ref_var_b
    f = jax.jit(lambda x, m: (masked_sum(x, m), masked_mean(x, m), masked_var(x, m),
                              masked_var(x, m, unbiased=False), masked_mean(x, m, axis=1)))
    s, mean, var_u, var_b, row_mean = f(x, mask)
    np.testing.assert_allclose(s, sum(vals), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var_u, ref_var_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var_b, ref_var_b, rtol=1e-5, atol=1e-6)
    for b in range(shape[0]):
        row = [x[b, t] for t in range(shape[1]) if mask[b, t]]
        np.testing.assert_allclose(row_mean[b], sum(row) / len(row), rtol=1e-5, atol=1e-6)


def test_garbage_and_empty_mask():
    x = np.array([[1.0, 2.0, np.inf], [np.nan, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    assert float(masked_sum(x, mask)) == 3.0
    assert float(masked_mean(x, mask)) == 1.5
    np.testing.assert_allclose(masked_mean(x, mask, axis=1), [1.5, 0.0])
    assert float(masked_mean(x, np.zeros_like(mask))) == 0.0
    g = jax.grad(lambda x: masked_mean(x, mask))(jnp.asarray(x))
    np.testing.assert_array_equal(g, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_float_weights():
    x = np.array([1.0, 3.0, 5.0], np.float32)
    w = np.array([0.5, 1.5, 0.0], np.float32)
    np.testing.assert_allclose(masked_mean(x, w), (0.5 + 4.5) / 2.0)
