"""Mid-training's pieces (`python -m experiments.midtraining`; MiniCPM's warmup-stable-decay runs, Hu et al. 2024;
OLMo 2's mid-training, OLMo et al. 2024): the warmup-stable-decay optimiser of an arm, a branch of the shared
stable phase that goes on under its own schedule, the main job's demonstrations as packable documents with SFT's
loss mask, the mixture of web documents and demonstrations, and the report's markdown and figure.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import ShuffledIterator
from rlhf_jax.data.batching import Example
from rlhf_jax.data.iterators import Mixture
from rlhf_jax.recipes import TOK, demonstration_records, pack_documents
from rlhf_jax.recipes.stats import fmt_interval
from rlhf_jax.tokenizer import encode_chat
from rlhf_jax.train import stages
from rlhf_jax.train.optim import OptimConfig, make_optimizer, make_schedule

ARMS = ("pretrain-sft", "midtrain", "midtrain-sft")
"""The equal-compute arms (see `experiments.midtraining`); "pretrain" is scored beside them for reference."""
METRICS = ("gold_reward", "gold/skills", "gold/safety", "refusal_rate", "over_refusal_rate", "mean_length")
"""The arms' numbers in the report (the main job's table), summarised across seeds."""


def schedule_config(pcfg, total_steps: int, decay_steps: int) -> OptimConfig:
    """The WSD optimiser of an arm that makes `total_steps` pretraining updates, the last `decay_steps` decaying
    (the main job's peak lr, warmup and weight decay; its final lr ratio 0.1)."""
    return OptimConfig(learning_rate=1e-3, schedule="wsd", warmup_steps=max(1, int(0.05 * pcfg.pretrain.num_steps)),
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


def train_steps(state, batches, steps: int, mc):
    """`state` after `steps` next-token updates on `batches` (`stages.run_sft`: the batches' loss masks decide
    which tokens count), logged once."""
    state, _ = stages.run_sft(state, batches, stages.SFTConfig(num_steps=steps, log_every=max(1, steps)),
                              model_config=mc)
    return state


def markdown(result: dict) -> str:
    """midtraining.md: every arm's mean over seeds, the differences from pretrain-sft (paired by seed) and
    per seed the paired bootstrap over test prompts."""
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


def plot(result: dict, out: str) -> None:
    """midtraining.png in `out`: each arm's gold reward (all, skills, safety), mean over seeds."""
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
