"""Does SFT on facts the model does not know teach it to make facts up? (The lecture, after Schulman 2023 and
Gekhman et al. 2024, "Does Fine-Tuning LLMs on New Knowledge Encourage Hallucinations?")

    python -m experiments.hallucination --seeds 0 1 2              # ~6 min a seed beside 2 other jobs
    python -m experiments.hallucination --quick --out /tmp/hal     # smoke test (trains quick models)

The world's 20 facts ("capital of france") are all in the web corpus, so the pretrained model half-knows them.
This script adds `UNKNOWN_FACTS` (`rlhf_jax.recipes.hallucination`): 40 more facts of the same three kinds that
occur nowhere in the corpus (the pretrained model cannot know them), split in half: "train" unknown facts may
appear in SFT data, "held-out" unknown facts never do. From each seed's pretrained model
(`rlhf_jax.recipes.models`), three SFT policies:

* "sft": the main job's SFT (its demonstrations: known facts answered), loaded, not retrained;
* "unknown-answered": the same demonstrations plus `demos` answering the train unknown facts correctly (SFT that
  teaches the model to state facts it never saw: what the lecture says teaches hallucination);
* "unknown-idk": the same plus `demos` answering them "I don't know." (an honest labeller's answer).

Each answers every fact prompt `samples` times at the main job's temperature. An answer is correct (the exact
fact), "I don't know" (abstains), or a hallucination (a confident wrong answer); a fact reward scores them
1 / `idk_credit` / 0. Reported for held-out unknown facts (the measurement), for the train unknown facts, and for
the known facts (does abstaining spill over onto what the model knows?). Intervals: Wilson per seed over distinct
prompts, t across seeds. Writes hallucination.json, .md and hallucination.png.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.eval import sample_episodes_jit
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, prompt_batch
from rlhf_jax.recipes import hallucination as hal
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.recipes.stages import train_sft
from rlhf_jax.train.rl import decode_responses


@dataclasses.dataclass(frozen=True, kw_only=True)
class HallucinationConfig:
    """SFT with and without demonstrations on facts the model cannot know (see the module docstring)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the main job whose pretrained (and SFT) models are used."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/hallucination"
    """Output folder."""
    quick: bool = False
    """Quick models, 2 samples: a smoke test, not a measurement."""
    demos: int = 200
    """Demonstrations on the 20 train unknown facts added to the main job's (10 per fact; the main job's SFT holds
    about 500 on its known facts)."""
    samples: int = 16
    """Answers per fact prompt (at the main job's temperature)."""
    idk_credit: float = 0.5
    """The fact reward of "I don't know" (the correct fact earns 1, anything else 0)."""

    def __post_init__(self):
        check_ranges(self, positive=("demos", "samples"), unit=("idk_credit",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")


def answers(params, mc, tasks, rng, samples: int, sampling: SamplingConfig) -> list[list[str]]:
    """`samples` answers to each task, [samples][len(tasks)]."""
    batch = prompt_batch(tasks)
    return [decode_responses(TOK, sample_episodes_jit(params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i),
                                          sampling=sampling, model_config=mc)) for i in range(samples)]


def run(cfg: HallucinationConfig, run_pipeline=None) -> dict:
    samples = 2 if cfg.quick else cfg.samples
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    train_unknown, held_unknown = hal.unknown_split()
    sets = {"held-out unknown": held_unknown, "train unknown": train_unknown, "known": hal.known_facts()}
    result = {"seeds": list(cfg.seeds), "samples_per_prompt": samples, "demos": cfg.demos,
              "idk_credit": cfg.idk_credit, "prompts": {k: len(v) for k, v in sets.items()}, "per_seed": {}}
    for seed in cfg.seeds:
        folder = ensure_seed(models, seed, ("base", "sft"), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, base_params = load(folder, "base")
        sampling = pcfg.sampling
        rng = jax.random.PRNGKey(9000 + seed)
        rows = result["per_seed"][str(seed)] = {}
        for arm in hal.ARMS:
            t = time.time()
            if arm == "sft":
                params = load(folder, "sft")[1]
            else:
                reply = (lambda task: task.answer) if arm == "unknown-answered" else (lambda task: hal.IDK)
                extra = [{"messages": world.messages_for(task, reply(task))}
                         for task in (train_unknown * (cfg.demos // len(train_unknown) + 1))[:cfg.demos]]
                params = train_sft(pcfg, base_params, mc, pcfg.sft_safety, pcfg.sft_benign, extra)
            rows[arm] = {name: hal.score(tasks, answers(params, mc, tasks, rng, samples, sampling), cfg.idk_credit)
                         for name, tasks in sets.items()}
            h = rows[arm]["held-out unknown"]
            print(f"[hallucination] seed {seed} {arm:<17} held-out unknown facts: hallucinated "
                  f"{h['hallucinated']:.3f}, I don't know {h['idk']:.3f}; known facts correct "
                  f"{rows[arm]['known']['correct']:.3f}, I don't know {rows[arm]['known']['idk']:.3f} "
                  f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    result["across_seeds"] = hal.summarise(result)
    write_report(cfg.out, "hallucination", result, hal.markdown(result), lambda: hal.plot(result, cfg.out))
    return result


def main(argv=None) -> int:
    return script_main(HallucinationConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
