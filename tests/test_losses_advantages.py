"""Group advantage estimators and reward-to-go against numpy loops, and the properties that must hold."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import discounted_returns, group_advantages, overlong_penalty, rloo_advantages


def np_group(r, G, scale, eps):
    out = np.zeros(len(r))
    all_std = np.std(r, ddof=1)
    for g in range(0, len(r), G):
        grp = r[g:g + G]
        for i in range(G):
            centred = grp[i] - np.mean(grp)
            den = {"group": np.std(grp, ddof=1) + eps, "batch": all_std + eps, "none": 1.0}[scale]
            out[g + i] = centred / den
    return out


def np_rloo(r, G):
    out = np.zeros(len(r))
    for g in range(0, len(r), G):
        for i in range(G):
            others = [r[g + j] for j in range(G) if j != i]
            out[g + i] = r[g + i] - sum(others) / len(others)
    return out


def np_returns(r, mask, gamma):
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            if mask[b, t]:
                out[b, t] = sum(gamma ** (k - t) * r[b, k] for k in range(t, r.shape[1]) if mask[b, k])
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), G=st.sampled_from([2, 3, 4]), scale=st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_vs_numpy(seed, G, scale):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=3 * G).astype(np.float32)
    got = jax.jit(lambda r: group_advantages(r, group_size=G, scale=scale))(r)
    np.testing.assert_allclose(got, np_group(r.astype(np.float64), G, scale, 1e-4), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rloo_advantages(r, group_size=G), np_rloo(r.astype(np.float64), G), rtol=1e-5,
                               atol=1e-5)


def test_equal_rewards_in_a_group_give_zero_advantage():
    r = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 1.0], np.float32)                   # group 0 all equal
    for scale in ("group", "batch", "none"):
        assert np.all(np.asarray(group_advantages(r, group_size=3, scale=scale))[:3] == 0.0)
    assert np.all(np.asarray(rloo_advantages(r, group_size=3))[:3] == 0.0)
    # RLOO is the group-mean baseline scaled by G / (G - 1); advantages of a group sum to 0
    np.testing.assert_allclose(rloo_advantages(r, group_size=3), 1.5 * group_advantages(r, group_size=3, scale="none"),
                               rtol=1e-6)
    assert abs(float(np.sum(np.asarray(group_advantages(r, group_size=3))[3:]))) < 1e-5


def test_group_estimators_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(np.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(np.zeros(6), group_size=3, scale="std")
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(np.zeros(6), group_size=1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_vs_numpy_on_ragged_rows(gamma):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 7)).astype(np.float32)
    mask = (np.arange(7)[None] < np.array([7, 3, 1, 5])[:, None]).astype(np.int32)
    r_padded = np.where(mask > 0, r, np.float32(1e30))                          # padding never leaks in
    got = jax.jit(lambda r, m: discounted_returns(r, m, gamma=gamma))(r_padded, mask)
    np.testing.assert_allclose(got, np_returns(r.astype(np.float64), mask, gamma), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[mask == 0] == 0.0)
    holed = mask.copy()
    holed[0, 2] = 0                                                             # a masked token inside a row
    got = discounted_returns(np.where(holed > 0, r, np.float32(1e30)), holed, gamma=gamma)
    np.testing.assert_allclose(got, np_returns(r.astype(np.float64), holed, gamma), rtol=1e-5, atol=1e-5)


def test_overlong_penalty_vs_the_dapo_formula():
    lengths = np.arange(0, 25)
    got = np.asarray(overlong_penalty(lengths, max_len=20, cache_len=4))
    want = [0.0 if L <= 16 else (16 - L) / 4 if L <= 20 else -1.0 for L in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[16] == 0.0 and got[20] == -1.0 and got[18] == -0.5
    with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
        overlong_penalty(lengths, max_len=4, cache_len=5)
