"""The main job's --quick path end to end (every stage runs, the report has the contracted keys and shapes, every
stage's final params are saved, --resume reloads them), and the world's pair helpers it uses."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import parse_cli
from rlhf_jax.tasks import on_policy_records, split_pairs

HERE = os.path.dirname(os.path.abspath(__file__))


def test_quick_pipeline_writes_report_and_resumes():
    """tests/_pipeline_e2e.py in its own pytest process, with XLA's CPU optimisations on (see its docstring)."""
    env = {**os.environ, "RLHF_JAX_TEST_XLA_OPT": "1", "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        os.path.join(HERE, "_pipeline_e2e.py")], cwd=os.path.dirname(HERE), env=env,
                       capture_output=True, text=True, timeout=3000)  # ~25 min alone on 2 cores
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


def test_split_pairs_holds_out_whole_prompts():
    # 40 distinct prompts with 4 distinct responses each: 6 pairs per ranking
    tasks = list({t.prompt: t for t in world.make_tasks(200, 3, mix={"add": 1.0})}.values())[:40]
    resp = [[t.answer, t.answer + "x", "no", "I can't help with that."] for t in tasks]
    ranked = world.label_rankings(tasks, resp, "careful", np.random.default_rng(0))
    off_tasks = list({t.prompt: t for t in world.make_tasks(200, 4, mix={"add": 1.0})
                      if t.prompt not in {u.prompt for u in tasks}}.values())[:30]
    off = world.synthetic_pairs(off_tasks, "careful", np.random.default_rng(1))
    pairs, train, test = split_pairs(ranked, off, len(tasks), len(off_tasks), np.random.default_rng(2))
    assert len(pairs) == len(ranked) + len(off) == len(train) + len(test)
    key = lambda prompt, chosen, rejected: (prompt, chosen, rejected)  # noqa: E731
    test_keys = {key(r.prompt[0]["content"], r.chosen, r.rejected) for r in test}
    train_keys = {key(r.prompt[0]["content"], r.chosen, r.rejected) for r in train}
    # the first 4 of 40 ranked prompts keep all 6 pairs of their ranking out of training (and no other ranked
    # prompt is held out); likewise the first 3 of 30 synthetic prompts
    for p, n_held in [(p, 4) for p in ranked] + [(p, 3) for p in off]:
        k = key(p["prompt"], p["chosen"], p["rejected"])
        assert (k in test_keys, k in train_keys) == ((True, False) if p["group"] < n_held else (False, True))
    assert sum(p["group"] < 4 for p in ranked) == 4 * 6


def test_evaluator_sampled_gold_is_the_mean_over_samples():
    """At temperature 0 every sample is the greedy answer: gold_reward must equal gold_greedy; at temperature 1
    the per-prompt gold is the mean over the samples (recomputed here from the same draws)."""
    import jax

    from rlhf_jax.data import collate_prompts
    from rlhf_jax.eval import PolicyEvaluator
    from rlhf_jax.generation import SamplingConfig
    from rlhf_jax.models import ModelConfig, init_params
    from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt
    tok = ByteTokenizer()
    mc = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=128)
    params = init_params(mc, jax.random.PRNGKey(0))
    tasks = world.prompt_set(16, 0, split="eval")
    batch = collate_prompts([encode_prompt(tok, world.messages_for(t)) for t in tasks], buckets=(64,),
                            pad_id=tok.pad_id)
    rng = jax.random.PRNGKey(1)

    def evaluator(temperature, samples):
        return PolicyEvaluator(batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=tok,
                               sampling=SamplingConfig(max_new_tokens=8, temperature=temperature),
                               gold_fn=lambda texts: world.gold_rewards(tasks, texts), samples=samples)

    m, gold = evaluator(0.0, 2)(params, ref_params=params, rng=rng)
    assert m["gold_reward"] == m["gold_greedy"] and gold.shape == (16,)
    ev = evaluator(1.0, 3)
    m, gold = ev(params, ref_params=params, rng=rng)
    draws = [world.gold_rewards(tasks, ev.texts(ev.generate(params, jax.random.fold_in(rng, 2 + i), 1.0)))
             for i in range(3)]
    np.testing.assert_allclose(gold, np.mean(draws, axis=0))
    assert m["gold_reward"] == np.mean(gold) and m["kl_to_ref"] == 0.0 and np.isnan(m["rm_score"])
    # Weights and groups: gold_reward is the weighted mean over prompts (a metrics_fn's own "gold_reward", an
    # unweighted mean over draws, does not replace it); each group is reported; a copy at temperature 0 is greedy.
    weights = np.arange(1, 17, dtype=np.float64)
    first = np.arange(16) < 5
    weighted = PolicyEvaluator(batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=tok,
                               sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), samples=3,
                               gold_fn=lambda texts: world.gold_rewards(tasks, texts), weights=weights,
                               groups={"first": first}, metrics_fn=lambda idx, texts: {"gold_reward": -1.0})
    m, gold2 = weighted(params, ref_params=params, rng=rng)
    np.testing.assert_allclose(gold2, gold)
    assert m["gold_reward"] == pytest.approx(np.sum(weights * gold) / weights.sum())
    assert m["gold/first"] == pytest.approx(np.sum((weights * gold)[first]) / weights[first].sum())
    greedy = weighted.with_temperature(0.0)
    m0, _ = greedy(params, ref_params=params, rng=rng)
    assert m0["gold_reward"] == pytest.approx(m0["gold_greedy"]) and weighted.sampling.temperature == 1.0


def test_on_policy_records_are_the_training_prompts_pairs():
    """DPO's pairs: the annotated on-policy pairs of the training prompts, in order; the reward model's held-out
    10% of prompts are left out."""
    tasks = world.prompt_set(20, 0, split="train")
    answers = [[t.answer, t.answer + " x", "no", "I can't help with that."] for t in tasks]
    pairs = world.label_rankings(tasks, answers, "careful", np.random.default_rng(0), pairs="best-worst")
    records = on_policy_records(pairs, len(tasks))
    kept = [p for p in pairs if p["group"] >= 2]
    assert len(kept) == 18 and [(r.chosen, r.rejected) for r in records] == [(p["chosen"], p["rejected"]) for p in kept]
    assert [r.prompt[0]["content"] for r in records] == [p["prompt"] for p in kept]


def test_pipeline_world_options_reach_every_data_source():
    """--extra_words / --max_operand change the world of every data source of the main job (web corpus,
    demonstrations, RL and preference prompts, the evaluation keys); the defaults are the default world."""
    from rlhf_jax import recipes
    from rlhf_jax.tokenizer import encode_prompt
    assert recipes.PipelineConfig().world() == world.WorldConfig()
    cfg = recipes.PipelineConfig(extra_words=300, max_operand=40)
    big = cfg.world()
    made_up = set(world.words(big)) - set(world.words())
    assert len(made_up) == 300
    words_of = lambda ts: {t.meta["word"] for t in ts if "word" in t.meta}  # noqa: E731
    assert words_of(recipes.rl_prompts(cfg)) & made_up
    assert words_of(d["task"] for d in world.web_corpus(3000, 0, config=big)) & made_up
    demos = world.sft_demos(500, cfg.seed + 1, config=big)
    assert [r.messages for r in recipes.demonstration_records(dataclasses.replace(cfg, sft_demos=500, sft_safety=0,
                                                                                     sft_benign=0))] == [
        tuple(d["messages"]) for d in demos]
    assert max(t.meta.get("a", 0) for t in recipes.rl_prompts(cfg)) > 20
    from rlhf_jax.generation import SamplingConfig
    _, tasks = recipes.split_evaluator("dev", None, SamplingConfig(), 1, big)
    assert {t.meta["key"] for t in tasks if t.family == "reverse"} == world.held_out_keys("reverse", "dev", big)
    assert all(len(encode_prompt(recipes.TOK, world.messages_for(t))) <= recipes.PROMPT_WIDTH for t in tasks)
    with pytest.raises(SystemExit):
        __import__("rlhf_jax.cli.pipeline", fromlist=["main"]).main(["--extra-words", "-3", "--out", "/nonexistent"])


def test_grpo_stage_shape_options_reach_its_config():
    """The GRPO stage's batch shape comes from the pipeline's options (one update an iteration on 32 x 8 answers by
    default, chosen on the dev keys); `--quick` keeps a small group."""
    from rlhf_jax import recipes
    from rlhf_jax.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=8)
    default = recipes.grpo_config(recipes.PipelineConfig(), sampling)
    assert (default.batch_size, default.num_generations, default.updates_per_iteration) == (32, 8, 1)
    assert default.sampling == sampling and recipes.grpo_config(recipes.PipelineConfig()).sampling.max_new_tokens == 28
    cfg = parse_cli(recipes.PipelineConfig, ["--grpo.batch-size", "16", "--grpo.num-generations", "4",
                                             "--grpo.num-iterations", "3", "--grpo.num-minibatches", "2"])
    g = recipes.grpo_config(cfg, sampling)
    assert (g.batch_size, g.num_generations, g.num_iterations, g.num_minibatches) == (16, 4, 3, 2)
    assert g.updates_per_iteration == 6
    quick = recipes.PipelineConfig(quick=True).scaled()
    assert (quick.grpo.batch_size, quick.grpo.num_generations) == (8, 4)
    assert recipes.with_options(cfg, {"dpo.beta": 0.3, "seed": 2}).dpo.beta == 0.3
    with pytest.raises(ValueError, match="num_iterations"):
        recipes.with_options(recipes.PipelineConfig(), {"grpo.num_iterations": 0})


def test_a_knob_has_one_name_in_the_main_job_and_in_its_stage_command(capsys):
    """The main job nests each stage's own config: --dpo.beta is --dpo.beta of rlhf-jax dpo, and so on."""
    import importlib
    from rlhf_jax import recipes

    for stage, flags in {"sft": ["--sft.num-steps", "--sft.optim.learning-rate"],
                         "reward": ["--reward.num-steps", "--reward.center-coef"],
                         "ppo": ["--ppo.kl-coef", "--ppo.ptx-coef", "--ppo.sampling.temperature"],
                         "dpo": ["--dpo.beta", "--dpo.rpo-alpha", "--dpo.optim.learning-rate"],
                         "grpo": ["--grpo.num-generations", "--grpo.kl-coef", "--grpo.loss-type"]}.items():
        texts = []
        for main in (lambda a: parse_cli(recipes.PipelineConfig, a), importlib.import_module(f"rlhf_jax.cli.{stage}").main):
            with pytest.raises(SystemExit):
                main(["--help"])
            texts.append(" ".join(capsys.readouterr().out.split()))
        for flag in flags:
            assert flag in texts[0] and flag in texts[1], (stage, flag)
    cfg = parse_cli(recipes.PipelineConfig, ["--dpo.beta", "0.25", "--ppo.sampling.temperature", "0.9"])
    assert cfg.dpo.beta == 0.25 and cfg.sampling.temperature == 0.9
