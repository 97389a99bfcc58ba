"""Mid-training: the SFT demonstrations mixed into the pretraining decay phase, against pretraining then SFT, at
equal compute (the lecture; MiniCPM's warmup-stable-decay runs with SFT data in the decay, Hu et al. 2024; OLMo 2's
mid-training, OLMo et al. 2024).

    python -m experiments.midtraining --seeds 0 1 2              # ~10 min a seed on 2 CPU cores
    python -m experiments.midtraining --quick --out /tmp/mid      # smoke test

Every arm trains the main job's model (its `PipelineConfig` at the seed: width, depth, batch, corpus, the same
demonstrations) for the main job's pretrain_steps + sft_steps optimizer steps of batch_size packed rows of seq_len
bytes: equal compute. They share one warmup-stable prefix and branch where the decay begins:

* stable (shared): warmup and constant lr 1e-3 on the web corpus, pretrain_steps - decay steps;
* "pretrain-sft": the decay on the web corpus, then the main job's SFT (sft_steps, lr 3e-4 cosine): the usual
  recipe, with a WSD instead of a cosine pretraining schedule;
* "midtrain": one longer decay (decay + sft_steps steps) on a mixture of web documents and demonstrations
  (`demo_fraction` of the documents), and no SFT stage;
* "midtrain-sft": the decay on the mixture, then the same SFT.

Each branch continues the stable phase's optimizer state (Adam moments, update count) with its own WSD schedule, so
each arm is exactly one warmup-stable-decay run of its length. Demonstrations in the mixture keep SFT's loss mask
(the answers), so the arms differ only in when the demonstrations are seen and at what learning rate.
`demo_fraction` and the decay length were set before any run, not tuned. "pretrain" (the first arm's model before
its SFT) is scored for reference; it has less compute.

Scored on every distinct test-key prompt, `eval_samples` answers each at the main job's temperature (the main job's
table: gold reward, skills and safety groups, refusal rates), with paired bootstrap differences from
"pretrain-sft" per seed and t-intervals across seeds. Finished seeds are kept in midtraining.json and reused by a
rerun with the same settings. Writes midtraining.json, .md and midtraining.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes import TOK, document_example, packed_batches
from rlhf_jax.recipes import midtraining as mt
from rlhf_jax.recipes.midtraining import ARMS
from rlhf_jax.recipes.models import kept_seeds, script_main, write_report
from rlhf_jax.recipes.evaluate import test_evaluator, test_tasks
from rlhf_jax.recipes.stages import train_sft
from rlhf_jax.recipes.stats import across_seeds
from rlhf_jax.train.state import create_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class MidtrainingConfig:
    """Mid-training against pretraining then SFT at equal compute (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """World and training seeds (each trains its own models: nothing of the main job is reused)."""
    out: str = "runs/midtraining"
    """Output folder."""
    quick: bool = False
    """The main job's quick sizes, 2 answers per prompt on 64 prompts: a smoke test, not a measurement."""
    decay_fraction: float = 0.2
    """Length of the pretraining decay as a fraction of the main job's pretrain_steps (MiniCPM decays over about
    10%, OLMo 2's mid-training is about 5% of its tokens; a larger share gives the mixture room here)."""
    demo_fraction: float = 0.5
    """Share of the documents in the mid-training decay that are demonstrations (the rest: the web corpus)."""
    eval_samples: int = 8
    """Answers per test prompt (the main job's eval_samples)."""

    def __post_init__(self):
        check_ranges(self, positive=("eval_samples",))
        config_check(self, 0 < self.decay_fraction < 1, f"decay_fraction = {self.decay_fraction} must be in (0, 1)")
        config_check(self, 0 < self.demo_fraction < 1, f"demo_fraction = {self.demo_fraction} must be in (0, 1)")
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")


def decay_steps(cfg: MidtrainingConfig, pcfg) -> int:
    """The pretraining decay's length: `decay_fraction` of the main job's pretrain_steps."""
    return max(1, int(round(cfg.decay_fraction * pcfg.pretrain.num_steps)))


def train_arms(cfg: MidtrainingConfig, pcfg, mc: ModelConfig, log=None) -> dict:
    """{"pretrain", *ARMS: params} of one seed (see the module docstring)."""
    log = log or (lambda msg: None)
    P, S, D = pcfg.pretrain.num_steps, pcfg.sft.num_steps, decay_steps(cfg, pcfg)
    web = [document_example(d) for d in world.web_corpus(pcfg.pretrain_docs, pcfg.seed)]
    demos = mt.demo_examples(pcfg)
    k_init = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[0]
    t = time.time()
    stable = create_train_state(init_params(mc, k_init), mt.schedule_config(pcfg, P, D), jax.random.fold_in(k_init, 1),
                                total_steps=P)
    stable = mt.train_steps(stable, packed_batches(web, pcfg, pcfg.seed), P - D, mc)
    log(f"stable phase {P - D} steps ({time.time() - t:.0f} s)")
    decay_web = lambda: packed_batches(web, pcfg, pcfg.seed + 1000)          # the decay's own shuffle of the web
    decay_mix = lambda: mt.mixed_batches(web, demos, cfg.demo_fraction, pcfg, pcfg.seed + 1000)
    out = {}
    t = time.time()
    out["pretrain"] = mt.train_steps(mt.branch(stable, mt.schedule_config(pcfg, P, D), P), decay_web(), D, mc).params
    out["pretrain-sft"] = train_sft(pcfg, out["pretrain"], mc, pcfg.sft_safety, pcfg.sft_benign)
    log(f"pretrain-sft: decay {D} + SFT {S} steps ({time.time() - t:.0f} s)")
    t = time.time()
    out["midtrain"] = mt.train_steps(mt.branch(stable, mt.schedule_config(pcfg, P + S, D + S), P + S), decay_mix(),
                                     D + S, mc).params
    log(f"midtrain: decay {D + S} steps on the mixture ({time.time() - t:.0f} s)")
    t = time.time()
    mid = mt.train_steps(mt.branch(stable, mt.schedule_config(pcfg, P, D), P), decay_mix(), D, mc).params
    out["midtrain-sft"] = train_sft(pcfg, mid, mc, pcfg.sft_safety, pcfg.sft_benign)
    log(f"midtrain-sft: decay {D} on the mixture + SFT {S} steps ({time.time() - t:.0f} s)")
    return out


def _log(msg: str) -> None:
    print(f"[midtraining] {msg}", file=sys.stderr, flush=True)


def _settings(cfg: MidtrainingConfig) -> dict:
    return {"quick": cfg.quick, "decay_fraction": cfg.decay_fraction, "demo_fraction": cfg.demo_fraction,
            "eval_samples": cfg.eval_samples}


def run(cfg: MidtrainingConfig) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    path = os.path.join(cfg.out, "midtraining.json")
    done = kept_seeds(path, _settings(cfg))
    tasks, samples = test_tasks(64 if cfg.quick else None), 2 if cfg.quick else cfg.eval_samples
    result = {"settings": _settings(cfg), "seeds": list(cfg.seeds), "prompts": len(tasks),
              "samples_per_prompt": samples, "per_seed": {}}
    for seed in cfg.seeds:
        if str(seed) in done:
            _log(f"seed {seed}: kept from {path}")
            result["per_seed"][str(seed)] = done[str(seed)]
            continue
        t0 = time.time()
        pcfg = recipes.PipelineConfig(seed=seed, quick=cfg.quick).scaled()
        mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=pcfg.d_model, num_layers=pcfg.num_layers,
                         num_heads=pcfg.num_heads, mlp_dim=4 * pcfg.d_model, max_seq_len=128)
        models = train_arms(cfg, pcfg, mc, log=lambda msg: _log(f"seed {seed} {msg}"))
        evaluate = test_evaluator(mc, pcfg.sampling.max_new_tokens, samples, pcfg.sampling.temperature,
                                  prompts=64 if cfg.quick else None)
        rng = jax.random.PRNGKey(7000 + seed)
        rows, gold = {}, {}
        for arm in ("pretrain", *ARMS):
            metrics, gold[arm] = evaluate(models[arm], ref_params=models["pretrain-sft"], rng=rng)
            rows[arm] = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}
            _log(f"seed {seed} {arm}: gold {rows[arm]['gold_reward']:.3f} (skills {rows[arm]['gold/skills']:.3f}, "
                 f"safety {rows[arm]['gold/safety']:.3f})")
        vs = {arm: recipes.compare_to(evaluate, tasks, gold[arm], gold["pretrain-sft"], seed) for arm in ARMS[1:]}
        result["per_seed"][str(seed)] = {"arms": rows, "vs_pretrain_sft": vs, "pretrain_steps": pcfg.pretrain.num_steps,
                                         "sft_steps": pcfg.sft.num_steps,
                                         "decay_steps": decay_steps(cfg, pcfg),
                                         "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = across_seeds({s: r["arms"] for s, r in result["per_seed"].items()},
                                          ("pretrain", *ARMS), mt.METRICS, "pretrain-sft")
    write_report(cfg.out, "midtraining", result, mt.markdown(result), lambda: mt.plot(result, cfg.out))
    return result


def main(argv=None) -> int:
    return script_main(MidtrainingConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
