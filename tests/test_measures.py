"""The measures behind the lecture-claims experiments: calibration error and reliability bins, the unbiased
best-of-n estimator and the analytic best-of-n KL, each against an independent re-derivation;
and the seed-models cache that the experiments share."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from experiments import calibration, grpo_transfer, grpo_variants, hallucination, safety_data  # run only
from rlhf_jax.eval import best_of_n_expectation, expected_calibration_error, reliability_bins
from rlhf_jax.recipes import models as seed_models
from rlhf_jax.recipes.stats import across_seeds, fmt_interval, wilson
from rlhf_jax.stats import bon_kl


def _ece_loops(conf, correct, num_bins):
    """ECE by explicit loops over bins (a confidence of exactly 1 belongs to the last bin)."""
    total, n = 0.0, len(conf)
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        members = [i for i in range(n) if lo <= conf[i] < hi or (b == num_bins - 1 and conf[i] == 1.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("num_bins", [1, 5, 10, 15])
def test_ece_matches_loops(num_bins):
    rng = np.random.default_rng(num_bins)
    conf = np.concatenate([rng.uniform(size=300), [0.0, 1.0, 0.5]])
    correct = (rng.uniform(size=conf.size) < conf ** 2).astype(float)
    assert expected_calibration_error(conf, correct, num_bins=num_bins) == pytest.approx(
        _ece_loops(conf, correct, num_bins), abs=1e-12)
    bins = reliability_bins(conf, correct, num_bins=num_bins)
    assert bins["count"].sum() == conf.size and len(bins["edges"]) == num_bins + 1


def test_ece_properties():
    # confidence c on every answer, all correct: ECE = 1 - c; all wrong: c
    assert expected_calibration_error([0.7] * 10, [1] * 10) == pytest.approx(0.3)
    assert expected_calibration_error([0.7] * 10, [0] * 10) == pytest.approx(0.7)
    # calibrated by construction: each bin's accuracy equals its confidence
    conf = np.repeat([0.05, 0.25, 0.45, 0.85], 20)
    correct = np.concatenate([np.arange(20) < k for k in (1, 5, 9, 17)]).astype(float)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    bins = reliability_bins(conf, correct, num_bins=10)
    assert np.isnan(bins["accuracy"][1]) and bins["count"][1] == 0          # empty bins are NaN, not 0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        expected_calibration_error([1.2], [1])


@pytest.mark.parametrize("N", [1, 5, 8])
def test_best_of_n_is_the_mean_over_every_subset(N):
    rng = np.random.default_rng(N)
    proxy, value = rng.normal(size=N), rng.uniform(size=N)
    for n in range(1, N + 1):
        subsets = list(itertools.combinations(range(N), n))
        want = np.mean([value[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert best_of_n_expectation(proxy, value, n) == pytest.approx(want, abs=1e-12)
    assert best_of_n_expectation(proxy, value, 1) == pytest.approx(value.mean())
    assert best_of_n_expectation(proxy, value, N) == pytest.approx(value[np.argmax(proxy)])
    # the proxy's own expected maximum never falls with n
    ups = [best_of_n_expectation(proxy, proxy, n) for n in range(1, N + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(ups, ups[1:]))


def test_best_of_n_large_pool_is_finite_and_rejects_bad_n():
    rng = np.random.default_rng(0)
    proxy, value = rng.normal(size=1024), rng.uniform(size=1024)
    got = [best_of_n_expectation(proxy, value, n) for n in (1, 256, 1024)]
    assert all(math.isfinite(g) for g in got) and got[-1] == pytest.approx(value[np.argmax(proxy)])
    with pytest.raises(ValueError):
        best_of_n_expectation(proxy, value, 0)


def test_best_of_n_kl():
    # KL(best-of-n || base) = log n - (n-1)/n: 0 at n = 1; Stiennon et al.'s n = 2 value
    np.testing.assert_allclose(bon_kl([1, 2, 64]), [0.0, math.log(2) - 0.5, math.log(64) - 63 / 64])


def test_seed_models_cache_runs_the_main_job_only_when_a_stage_is_missing(tmp_path):
    calls = []
    template = str(tmp_path / "seed{seed}")

    def fake_pipeline(cfg):
        calls.append((cfg.seed, cfg.out, cfg.quick, cfg.resume))
        os.makedirs(os.path.join(cfg.out, "sft", "final", "params"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"seed": cfg.seed, "quick": cfg.quick}, f)

    folder = seed_models.ensure_seed(template, 3, ("sft",), quick=True, run_pipeline=fake_pipeline)
    assert folder == str(tmp_path / "seed3") and calls == [(3, folder, True, False)]
    seed_models.ensure_seed(template, 3, ("sft",), quick=True, run_pipeline=fake_pipeline)
    assert len(calls) == 1                                                  # cached
    seed_models.ensure_seed(template, 3, ("sft", "base"), quick=True, run_pipeline=fake_pipeline)
    assert calls[-1] == (3, folder, True, True)                             # completed with --resume
    with pytest.raises(seed_models.ModelsError, match="config.json: made with quick=True"):
        seed_models.ensure_seed(template, 3, ("sft",), quick=False, run_pipeline=fake_pipeline)
    (tmp_path / "seed3" / "config.json").write_text(json.dumps({"seed": 3, "quick": True, "extra_words": 0,
                                                                "max_operand": 20}))
    seed_models.ensure_seed(template, 3, ("sft",), quick=True, run_pipeline=fake_pipeline)   # the default world
    (tmp_path / "seed3" / "config.json").write_text(json.dumps({"seed": 3, "quick": True, "extra_words": 400}))
    with pytest.raises(seed_models.ModelsError, match="another world .extra_words=400"):
        seed_models.ensure_seed(template, 3, ("sft",), quick=True, run_pipeline=fake_pipeline)
    assert seed_models.final_params(folder, "base").endswith(os.path.join("pretrain", "final"))


def test_experiment_scripts_report_a_models_mismatch_in_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / "seed0")
    (tmp_path / "seed0" / "config.json").write_text(json.dumps({"seed": 0, "quick": True}))
    for module in (calibration, safety_data, grpo_transfer, hallucination, grpo_variants):
        seeds = ["--seed", "0"] if module is grpo_transfer else ["--seeds", "0"]
        assert module.main(["--models", str(tmp_path / "seed{seed}"), *seeds, "--out",
                            str(tmp_path / module.__name__)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "pass --models" in err[0]


def test_wilson_interval():
    # Wilson (1927) for 5 of 10: 0.2366 to 0.7634; 0 of 20: [0, 0.161]; it stays inside [0, 1]
    low, high = wilson(0.5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0.0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.1611, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0.5, 0))


def test_across_seeds_and_kept_seeds(tmp_path):
    rows = {"0": {"a": {"g": 0.5}, "b": {"g": 0.7}}, "1": {"a": {"g": 0.3}, "b": {"g": 0.2}},
            "2": {"a": {"g": 0.4}, "b": {"g": 0.6}}}
    out = across_seeds(rows, ("a", "b"), ("g",), "a")
    assert set(out) == {"a|g", "b|g", "b-a|g"}
    d = np.array([0.2, -0.1, 0.2])                                      # paired by seed
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)                           # t(0.975, 2 dof)
    assert out["b-a|g"]["mean"] == pytest.approx(d.mean())
    assert out["b-a|g"]["high"] - out["b-a|g"]["mean"] == pytest.approx(half, rel=1e-3)
    assert fmt_interval(out["b|g"]).startswith("+0.500 [")
    assert fmt_interval({"mean": -0.25, "n": 1}) == "-0.250"
    path = str(tmp_path / "r.json")
    assert seed_models.kept_seeds(path, {"x": 1}) == {}
    (tmp_path / "r.json").write_text(json.dumps({"settings": {"x": 1}, "per_seed": {"0": {"v": 2}}}))
    assert seed_models.kept_seeds(path, {"x": 1}) == {"0": {"v": 2}}
    assert seed_models.kept_seeds(path, {"x": 2}) == {}                # other settings: measured again


