"""Mid-training's pieces (rlhf_jax.recipes.midtraining): a branch of the stable phase is exactly one warmup-stable-decay run, the
mid-training mixture holds the asked share of demonstrations with their answer-only loss mask, and bad settings
fail in one line. The script runs end to end (--quick) in tests/_pipeline_e2e.py."""
import dataclasses
import itertools

import jax
import numpy as np
import pytest

from experiments import midtraining                      # run only (main(argv))
from rlhf_jax import tasks as world
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes import TOK, PipelineConfig, document_example, packed_batches
from rlhf_jax.recipes import midtraining as mt
from rlhf_jax.train.state import create_train_state

PCFG = dataclasses.replace(PipelineConfig(quick=True).scaled(), batch_size=4, seq_len=96)
MC = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_seq_len=128)


def _web(n=60):
    return [document_example(d) for d in world.web_corpus(n, 0)]


def test_branch_of_the_stable_phase_is_one_wsd_run():
    batches = list(itertools.islice(packed_batches(_web(), PCFG, 0), 8))
    params = init_params(MC, jax.random.PRNGKey(0))
    optim = mt.schedule_config(PCFG, 8, 3)
    whole = mt.train_steps(create_train_state(params, optim, 1, total_steps=8), iter(batches), 8, MC)
    # The stable phase under another total length: the same lr until its decay would begin.
    stable = create_train_state(params, mt.schedule_config(PCFG, 20, 3), 1, total_steps=20)
    stable = mt.train_steps(stable, iter(batches[:5]), 5, MC)
    branched = mt.branch(stable, optim, 8)
    assert float(branched.learning_rate()) == pytest.approx(1e-3)                 # step 5: still stable
    branched = mt.train_steps(branched, iter(batches[5:]), 3, MC)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(branched.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(branched.step) == 8
    # The stable state is still usable (the branch trained a copy; the steps donate their state).
    assert np.isfinite(float(sum(np.sum(x) for x in jax.tree.leaves(stable.params))))
    lrs = [float(optim_lr) for optim_lr in map(branched.lr_schedule, range(5, 9))]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3 * (1 - 0.9 / 3), 1e-3 * (1 - 1.8 / 3), 1e-4], rtol=1e-5)


def test_mixed_batches_hold_the_share_of_demonstrations_with_their_masks():
    demos = mt.demo_examples(dataclasses.replace(PCFG, sft_demos=300, sft_safety=30, sft_benign=30))
    assert all(0 < sum(e.mask) < len(e.ids) for e in demos)               # answers only: SFT's loss mask
    docs = with_prompt = 0
    for batch in itertools.islice(mt.mixed_batches(_web(300), demos, 0.3, PCFG, 0), 100):
        for r in range(batch["segment_ids"].shape[0]):
            seg, mask = batch["segment_ids"][r], batch["loss_mask"][r]
            for s in set(seg.tolist()) - {0}:
                docs += 1
                with_prompt += bool((mask[seg == s] == 0).any())     # web documents train on every token
    share = with_prompt / docs
    assert docs > 400 and abs(share - 0.3) < 3 * np.sqrt(0.3 * 0.7 / docs), (share, docs)


def test_script_rejects_bad_values_in_one_line(capsys):
    for argv, field in ((["--demo-fraction", "1.0"], "demo_fraction"), (["--decay-fraction", "0.0"], "decay_fraction"),
                        (["--eval-samples", "0"], "eval_samples"), (["--seeds", "1", "1"], "seeds")):
        with pytest.raises(SystemExit) as stop:
            midtraining.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and field in err[0], err
