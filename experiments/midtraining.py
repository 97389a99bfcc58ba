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
import jax.numpy as jnp
import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.data import ShuffledIterator
from rlhf_jax.data.batching import Example
from rlhf_jax.data.iterators import Mixture
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes import (
    TOK,
    demonstration_records,
    document_example,
    pack_documents,
    packed_batches,
)
from rlhf_jax.recipes.models import kept_seeds, script_main, write_report
from rlhf_jax.recipes.populations import test_evaluator, test_tasks
from rlhf_jax.recipes.stages import train_sft
from rlhf_jax.recipes.stats import across_seeds, fmt_interval
from rlhf_jax.tokenizer import encode_chat
from rlhf_jax.train import stages
from rlhf_jax.train.optim import OptimConfig, make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state

ARMS = ("pretrain-sft", "midtrain", "midtrain-sft")
"""The equal-compute arms (see the module docstring); "pretrain" is scored beside them for reference."""
METRICS = ("gold_reward", "gold/skills", "gold/safety", "refusal_rate", "over_refusal_rate", "mean_length")


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


def schedule_config(pcfg, total_steps: int, decay_steps: int) -> OptimConfig:
    """The WSD optimiser of an arm that makes `total_steps` pretraining updates, the last `decay_steps` decaying
    (the main job's peak lr, warmup and weight decay; its final lr ratio 0.1)."""
    return OptimConfig(learning_rate=1e-3, schedule="wsd", warmup_steps=max(1, int(0.05 * pcfg.pretrain_steps)),
                       weight_decay=0.01, decay_fraction=decay_steps / total_steps)


def branch(stable, optim: OptimConfig, total_steps: int):
    """A copy of the stable phase's state (params, Adam moments, update count, rng) that goes on under `optim`
    with `total_steps` updates in all: the stable state stays valid (the steps donate their state)."""
    state = jax.tree.map(jnp.copy, stable)
    return state.replace(tx=make_optimizer(optim, total_steps=total_steps),
                         lr_schedule=make_schedule(optim, total_steps=total_steps))


def demo_examples(pcfg) -> list[Example]:
    """The main job's demonstrations as packable documents with SFT's loss mask (the answers)."""
    out = []
    for record in demonstration_records(pcfg):
        ids, mask = encode_chat(TOK, record.messages)
        out.append(Example(tuple(ids), tuple(mask), 0))
    return out


def mixed_batches(web: list[Example], demos: list[Example], fraction: float, pcfg, seed: int):
    """Endless packed batches of documents drawn from `demos` with probability `fraction`, else from `web`, each
    source reshuffled every epoch (`rlhf_jax.data.Mixture`)."""
    stream = Mixture({"web": ShuffledIterator(web, seed=seed), "demos": ShuffledIterator(demos, seed=seed + 1)},
                     {"web": 1.0 - fraction, "demos": fraction}, seed=seed)
    return pack_documents(stream, pcfg)


def _train(state, batches, steps: int, mc):
    state, _ = stages.run_sft(state, batches, stages.SFTConfig(num_steps=steps, log_every=max(1, steps)),
                              model_config=mc)
    return state


def decay_steps(cfg: MidtrainingConfig, pcfg) -> int:
    """The pretraining decay's length: `decay_fraction` of the main job's pretrain_steps."""
    return max(1, int(round(cfg.decay_fraction * pcfg.pretrain_steps)))


def train_arms(cfg: MidtrainingConfig, pcfg, mc: ModelConfig, log=None) -> dict:
    """{"pretrain", *ARMS: params} of one seed (see the module docstring)."""
    log = log or (lambda msg: None)
    P, S, D = pcfg.pretrain_steps, pcfg.sft_steps, decay_steps(cfg, pcfg)
    web = [document_example(d) for d in world.web_corpus(pcfg.pretrain_docs, pcfg.seed)]
    demos = demo_examples(pcfg)
    k_init = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[0]
    t = time.time()
    stable = create_train_state(init_params(mc, k_init), schedule_config(pcfg, P, D), jax.random.fold_in(k_init, 1),
                                total_steps=P)
    stable = _train(stable, packed_batches(web, pcfg, pcfg.seed), P - D, mc)
    log(f"stable phase {P - D} steps ({time.time() - t:.0f} s)")
    decay_web = lambda: packed_batches(web, pcfg, pcfg.seed + 1000)          # the decay's own shuffle of the web
    decay_mix = lambda: mixed_batches(web, demos, cfg.demo_fraction, pcfg, pcfg.seed + 1000)
    out = {}
    t = time.time()
    out["pretrain"] = _train(branch(stable, schedule_config(pcfg, P, D), P), decay_web(), D, mc).params
    out["pretrain-sft"] = train_sft(pcfg, out["pretrain"], mc, pcfg.sft_safety, pcfg.sft_benign)
    log(f"pretrain-sft: decay {D} + SFT {S} steps ({time.time() - t:.0f} s)")
    t = time.time()
    out["midtrain"] = _train(branch(stable, schedule_config(pcfg, P + S, D + S), P + S), decay_mix(), D + S,
                             mc).params
    log(f"midtrain: decay {D + S} steps on the mixture ({time.time() - t:.0f} s)")
    t = time.time()
    mid = _train(branch(stable, schedule_config(pcfg, P, D), P), decay_mix(), D, mc).params
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
        evaluate = test_evaluator(mc, pcfg.max_new_tokens, samples, pcfg.temperature,
                                  prompts=64 if cfg.quick else None)
        rng = jax.random.PRNGKey(7000 + seed)
        rows, gold = {}, {}
        for arm in ("pretrain", *ARMS):
            metrics, gold[arm] = evaluate(models[arm], ref_params=models["pretrain-sft"], rng=rng)
            rows[arm] = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}
            _log(f"seed {seed} {arm}: gold {rows[arm]['gold_reward']:.3f} (skills {rows[arm]['gold/skills']:.3f}, "
                 f"safety {rows[arm]['gold/safety']:.3f})")
        vs = {arm: recipes.compare_to(evaluate, tasks, gold[arm], gold["pretrain-sft"], seed) for arm in ARMS[1:]}
        result["per_seed"][str(seed)] = {"arms": rows, "vs_pretrain_sft": vs, "pretrain_steps": pcfg.pretrain_steps,
                                         "sft_steps": pcfg.sft_steps,
                                         "decay_steps": decay_steps(cfg, pcfg),
                                         "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = across_seeds({s: r["arms"] for s, r in result["per_seed"].items()},
                                          ("pretrain", *ARMS), METRICS, "pretrain-sft")
    write_report(cfg.out, "midtraining", result, _markdown(result), lambda: _plot(result, cfg.out))
    return result


def _markdown(result: dict) -> str:
    a, n = result["across_seeds"], len(result["per_seed"])
    first = next(iter(result["per_seed"].values()))
    s = result["settings"]
    lines = ["# Mid-training against pretraining then SFT, at equal compute", "",
             f"{n} seed(s) ({', '.join(result['per_seed'])}); each arm {first['pretrain_steps']} + "
             f"{first['sft_steps']} optimizer steps; decay {first['decay_steps']} steps (mid-training: "
             f"{first['decay_steps'] + first['sft_steps']}), {s['demo_fraction']:.0%} demonstrations in the mixture; "
             f"{result['prompts']} distinct test prompts, {result['samples_per_prompt']} answers each. Mean over "
             "seeds (t-interval across seeds when there are 2 or more); \"pretrain\" has less compute (no SFT).",
             "",
             "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm in ("pretrain", *ARMS):
        lines.append(f"| {arm} | " + " | ".join(f"{a[f'{arm}|{k}']['mean']:.3f}" for k in METRICS) + " |")
    lines += ["", "Differences from pretrain-sft (paired by seed):", "",
              "| arm - pretrain-sft | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm in ARMS[1:]:
        lines.append(f"| {arm} | " + " | ".join(fmt_interval(a[f"{arm}-pretrain-sft|{k}"]) for k in METRICS) + " |")
    lines += ["", "Per seed, paired bootstrap over distinct test prompts (95%), difference from pretrain-sft:", "",
              "| seed | arm | gold | skills | safety |", "|---|---|---|---|---|"]
    for seed, row in result["per_seed"].items():
        for arm in ARMS[1:]:
            vs = row["vs_pretrain_sft"][arm]
            lines.append(f"| {seed} | {arm} | " + " | ".join(
                f"{vs[g]['delta']:+.3f} [{vs[g]['low']:+.3f}, {vs[g]['high']:+.3f}]"
                for g in ("all", "skills", "safety")) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = ("pretrain", *ARMS)
    keys = ("gold_reward", "gold/skills", "gold/safety")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        cis = [result["across_seeds"][f"{arm}|{key}"] for arm in arms]
        means = np.asarray([c["mean"] for c in cis])
        err = None
        if cis[0]["n"] >= 2:
            err = np.asarray([[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]])
        ax.bar(np.arange(len(arms)) + (j - 1) * width, means, width, yerr=err, capsize=3, label=key)
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel("gold reward (test keys)")
    ax.legend(fontsize="x-small")
    ax.set_title(f"Mid-training vs pretraining then SFT, equal compute ({len(result['per_seed'])} seed(s))",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "midtraining.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    return script_main(MidtrainingConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
