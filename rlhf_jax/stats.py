"""Paired comparisons and calibration of per-prompt numbers, in numpy only (no model, no jax).

* `win_rate`, `paired_bootstrap`: two policies' per-prompt rewards on the same prompts (AlpacaEval-style win rate,
  judged by a reward; the mean paired difference with a percentile bootstrap interval, Efron & Tibshirani 1993).
* `seed_prompt_bootstrap`, `seed_prompt_replicates`: the same over several seeds, each with its own prompts: seeds and prompts resampled
  together (a two-stage bootstrap, Davison & Hinkley 1997, section 3.8), so the interval carries both the
  training variance across seeds and the sampling variance of the evaluation prompts.
* `reliability_bins`, `expected_calibration_error`: a predictor's calibration (Naeini et al. 2015; Guo et al. 2017).
* `best_of_n_expectation`: the unbiased best-of-n estimator over a pool of samples (Nakano et al. 2021);
  `bon_kl`: best-of-n's analytic KL to its base policy.
* `rise_and_fall`: whether a training curve of per-prompt reads rose then fell beyond the evaluation's noise
  (over-optimisation's shape); `break_even`: where one gold-against-count curve reaches a given gold.

`rlhf_jax.eval` (model-side evaluation) and `rlhf_jax.tasks` (the synthetic world) re-export them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def win_rate(gold_a: Any, gold_b: Any) -> float:
    """Fraction of prompts where a beats b on gold reward, ties counting one half. Inputs: [B] each."""
    a, b = np.asarray(gold_a, dtype=np.float64), np.asarray(gold_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate needs two non-empty [B] arrays of equal shape, got {a.shape} and {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def paired_bootstrap(gold_a: Any, gold_b: Any, *, num_samples: int = 2000, level: float = 0.95,
                     seed: int = 0, strata: Any = None, weights: Any = None) -> dict[str, float]:
    """Weighted mean paired difference of a - b and its percentile bootstrap interval over prompts.

    Both arrays hold per-prompt rewards on the same prompts, [B] each (one entry per distinct prompt: resampling
    draws of one prompt as if independent makes the interval too narrow). Each replicate resamples prompts with
    replacement, within each stratum when `strata` [B] labels are given (e.g. task families: each keeps its size),
    and takes the `weights`-weighted mean (default equal). Returns {"delta", "low", "high", "level"}; an
    interval that excludes 0 means the difference is larger than what resampling the evaluation prompts produces.
    """
    a, b = np.asarray(gold_a, dtype=np.float64), np.asarray(gold_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two non-empty [B] arrays of equal shape, got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    labels = np.zeros(a.size, int) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
    if w.shape != a.shape or labels.shape != a.shape:
        raise ValueError(f"paired_bootstrap: weights and strata must have shape {a.shape}")
    diff, rng = a - b, np.random.default_rng(seed)
    idx = np.empty((num_samples, diff.size), int)
    for s in np.unique(labels):
        members = np.flatnonzero(labels == s)
        idx[:, members] = members[rng.integers(0, members.size, size=(num_samples, members.size))]
    means = np.sum(diff[idx] * w[idx], axis=1) / np.sum(w[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    return {"delta": float(np.sum(diff * w) / np.sum(w)), "low": float(np.quantile(means, alpha)),
            "high": float(np.quantile(means, 1.0 - alpha)), "level": level}


def seed_prompt_replicates(gold_a: Any, gold_b: Any, *, num_samples: int = 2000, seed: int = 0) -> np.ndarray:
    """[num_samples] bootstrap replicates of the mean paired difference a - b over seeds and prompts.

    `gold_a`, `gold_b`: one [B_s] array per seed (a sequence of S arrays; seeds may have different prompts and
    counts, a and b share them within a seed). Each replicate draws S seeds with replacement, then, within each
    drawn seed, its B_s prompts with replacement (a seed drawn twice gets two independent resamples), and averages
    the drawn seeds' mean differences (each seed weighs the same, as in the estimate). Two calls with the same
    seed and the same shapes draw the same resamples, so replicates of two comparisons can be divided (a ratio's
    interval).
    """
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(gold_a, gold_b, strict=True)]
    if not pairs or any(a.shape != b.shape or a.ndim != 1 or a.size == 0 for a, b in pairs):
        raise ValueError("seed_prompt_bootstrap needs one non-empty [B] array per seed, equal in a and b")
    diffs = [a - b for a, b in pairs]
    rng, S = np.random.default_rng(seed), len(diffs)
    seed_means = np.stack([d[rng.integers(0, d.size, size=(num_samples, S, d.size))].mean(axis=2) for d in diffs])
    drawn = rng.integers(0, S, size=(num_samples, S))                                          # [R, S]
    return seed_means[drawn, np.arange(num_samples)[:, None], np.arange(S)[None, :]].mean(axis=1)


def seed_prompt_bootstrap(gold_a: Any, gold_b: Any, *, num_samples: int = 2000, level: float = 0.95,
                          seed: int = 0, bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean paired difference of a - b over seeds and prompts, with a two-stage percentile bootstrap interval.

    Inputs and resampling as `seed_prompt_replicates`. `bounds` (e.g. (-1, 1) for a difference of rates) clips
    the interval to the metric's range. Returns {"delta", "low", "high", "level", "seeds"}; with one seed it is
    `paired_bootstrap`'s interval over prompts only.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = seed_prompt_replicates(gold_a, gold_b, num_samples=num_samples, seed=seed)
    alpha = (1.0 - level) / 2.0
    low, high = float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    delta = float(np.mean([np.mean(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           for a, b in zip(gold_a, gold_b)]))
    return {"delta": delta, "low": low, "high": high, "level": level, "seeds": len(gold_a)}


def reliability_bins(confidence: Any, correct: Any, *, num_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width confidence bins over [0, 1] (the last one closed): per bin the count, the mean confidence and
    the accuracy (NaN where empty): the points of a reliability diagram. `confidence` and `correct` are [N]."""
    conf, ok = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if conf.shape != ok.shape or conf.ndim != 1 or conf.size == 0:
        raise ValueError(f"reliability_bins needs two non-empty [N] arrays of equal shape, got {conf.shape} and "
                         f"{ok.shape}")
    if num_bins < 1 or not np.all((conf >= 0.0) & (conf <= 1.0)):
        raise ValueError("reliability_bins: num_bins must be >= 1 and every confidence in [0, 1]")
    which = np.minimum((conf * num_bins).astype(int), num_bins - 1)
    count = np.bincount(which, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=num_bins) / count
        accuracy = np.bincount(which, ok, minlength=num_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, num_bins + 1)}


def expected_calibration_error(confidence: Any, correct: Any, *, num_bins: int = 10) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): sum over equal-width bins of |bin| / N *
    |accuracy(bin) - mean confidence(bin)|; 0 for a calibrated predictor, at most 1."""
    b = reliability_bins(confidence, correct, num_bins=num_bins)
    full = b["count"] > 0
    return float(np.sum(b["count"][full] / b["count"].sum() * np.abs(b["accuracy"][full] - b["confidence"][full])))


def bon_kl(n) -> np.ndarray:
    """The analytic KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022, sec. 2)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def best_of_n_expectation(proxy: Any, value: Any, n: int) -> float:
    """E[value of the proxy's argmax among n draws without replacement from a pool of N samples]: the unbiased
    estimator of best-of-n of Nakano et al. 2021 (appendix) and Gao et al. 2022 (sec. 3.1), exact over every
    n-subset. Sorted by proxy ascending, the i-th sample (1-based) is the subset's best with probability
    C(i-1, n-1) / C(N, n). Ties in the proxy keep the pool's order. `proxy`, `value`: [N]."""
    proxy, value = np.asarray(proxy, np.float64), np.asarray(value, np.float64)
    N = proxy.size
    if proxy.shape != value.shape or proxy.ndim != 1 or not 1 <= n <= N:
        raise ValueError(f"best_of_n_expectation needs [N] arrays of equal shape and 1 <= n <= N, got "
                         f"{proxy.shape}, {value.shape}, n={n}")
    order = np.argsort(proxy, kind="stable")
    i = np.arange(n, N + 1)               # only the ranks >= n can be a subset's maximum
    lgam = np.vectorize(math.lgamma)
    log_p = (lgam(i) - lgam(n) - lgam(i - n + 1)) - (lgam(N + 1) - lgam(n + 1) - lgam(N - n + 1))
    return float(np.sum(np.exp(log_p) * value[order][n - 1:]))


def rise_and_fall(curve: list[dict], *, level: float = 0.95) -> dict:
    """Whether a curve of reads rose then fell on the eval keys: the peak (after the start) against the start
    and the last read against the peak, each a paired bootstrap over prompts at a Bonferroni level over the
    curve's reads (the peak is picked after the fact). `curve`: reads {"iteration", "exact" [B], "mean"}, the
    first the start; fewer than two reads have no shape."""
    if len(curve) < 2:
        return {"peak_iteration": None, "peak_minus_start": None, "end_minus_peak": None, "rose_then_fell": False}
    peak = max(range(1, len(curve)), key=lambda i: curve[i]["mean"])
    k = len(curve) - 1
    bonf = 1.0 - (1.0 - level) / k
    up = paired_bootstrap(curve[peak]["exact"], curve[0]["exact"], level=bonf)
    down = paired_bootstrap(curve[-1]["exact"], curve[peak]["exact"], level=bonf)
    return {"peak_iteration": curve[peak]["iteration"], "peak_minus_start": up, "end_minus_peak": down,
            "rose_then_fell": bool(up["low"] > 0 and down["high"] < 0 and peak < k)}


def break_even(k_gold: float, demo_counts: list[int], demo_gold: list[float]) -> float | None:
    """The demonstrations m* that reach `k_gold` by log-linear interpolation of (count, gold), or None when it
    lies outside the measured range (gold must rise between the two counts that bracket it)."""
    for (m0, g0), (m1, g1) in zip(zip(demo_counts, demo_gold), list(zip(demo_counts, demo_gold))[1:]):
        if min(g0, g1) <= k_gold <= max(g0, g1) and g0 != g1:
            t = (k_gold - g0) / (g1 - g0)
            return float(np.exp(np.log(m0) + t * (np.log(m1) - np.log(m0))))
    return None
