"""rlhf_jax.recipes.grpo_variants: each variant is the main job's GRPO stage with only its named components changed.
The script runs end to end (--quick) in tests/_pipeline_e2e.py."""
import dataclasses

import pytest

from experiments import grpo_variants  # run only (main(argv))
from rlhf_jax import recipes
from rlhf_jax.recipes import grpo_variants as gv

CHANGED = {"grpo": set(), "dr_grpo": {"scale", "loss_type"},
           "dapo": {"loss_type", "clip_eps_high", "kl_coef", "batch_size", "dynamic_sampling_groups",
                    "overlong_buffer"},
           "rloo": {"advantage"}}


def test_each_variant_changes_only_its_components():
    pcfg = recipes.PipelineConfig()
    sampling = pcfg.sampling
    main = recipes.grpo_config(pcfg, sampling)
    assert set(gv.VARIANTS) == set(CHANGED)
    for name, changed in CHANGED.items():
        cfg, grpo_cfg = gv.variant_config(pcfg, name, sampling)
        diff = {f.name for f in dataclasses.fields(main) if getattr(main, f.name) != getattr(grpo_cfg, f.name)}
        assert diff == changed, name
        assert grpo_cfg.updates_per_iteration == main.updates_per_iteration and cfg.grpo.optim.learning_rate == pcfg.grpo.optim.learning_rate
    _, dapo = gv.variant_config(pcfg, "dapo", sampling)
    assert (dapo.batch_size, dapo.dynamic_sampling_groups) == (2 * main.batch_size, main.batch_size)
    assert not dapo.uses_reference and main.uses_reference           # DAPO: no KL, no reference forward
    _, dr = gv.variant_config(pcfg, "dr_grpo", sampling)
    assert (dr.scale, dr.loss_type) == ("none", "dr_grpo")


def test_script_rejects_bad_values_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        grpo_variants.main(["--eval-samples", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "eval_samples" in err[0], err
