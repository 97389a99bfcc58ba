"""Distillation in the rule world: a post-trained teacher into a smaller student, on held-out keys.

    rlhf-jax rule-world --seeds 0 1 2 --out runs/rule_world        # first: the teachers (OUT/seed<N>/grpo)
    python -m experiments.distill_world --teachers runs/rule_world --seeds 0 1 2 --out runs/distill_world
    python -m experiments.distill_world --teachers runs/rule_world --eval-split dev --seeds 0   # choosing
    python -m experiments.distill_world --quick --teachers /tmp/rule --seeds 0 --eval-split dev  # smoke test

Teacher: the rule world's GRPO policy of the same seed (width 96, 3 layers; it reverses the strings the
demonstrator truncated). Student: width 64, 2 layers, pretrained on the same seed's corpus and SFT'd on the same
flawed demonstrations (its own SFT, the baseline). From the student's SFT, on the RL stages' train-key prompts:

* `seq_kd`: SFT on the teacher's greedy answers to `prompts` prompts (sequence-level KD, Kim & Rush 2016);
* `on_policy`: on-policy distillation (GKD with lambda 1: the student samples, the teacher scores the same tokens,
  reverse KL per token, Agarwal et al. 2024), `distill_steps` steps of 16 prompts at `distill_lr`;
* `gkd`: GKD with lambda 0.5 and beta 0.5 (half the steps on the teacher's answers, generalised JSD).

Each is read on `eval_split` keys drawn per seed (greedy exact match, flaw keys apart), with the student's training
tokens (its compute: 6 x parameters x tokens, the teacher's forward passes counted apart) and the KL from the
student to the teacher on the student's temperature-1 samples. Writes OUT/seed<N>.json per seed (read back when
its settings are the same), OUT/distill_world.json, a markdown table and OUT/card.json (a result card's JSON);
a difference to the student's SFT carries a seeds-and-prompts interval (`stats.seed_prompt_bootstrap`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Literal

import jax
import numpy as np

from rlhf_jax.config_cli import check_ranges, parse_cli
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, count_params
from rlhf_jax.recipes import TOK, rule_world as rw
from rlhf_jax.stats import seed_prompt_bootstrap
from rlhf_jax.tasks import skills
from rlhf_jax.train.checkpoint import load_params
from rlhf_jax.train.distill import DistillConfig, run_distill
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import create_train_state

ARMS = ("student_sft", "seq_kd", "on_policy", "gkd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillWorldConfig:
    """A rule-world teacher distilled into a smaller student (see the module docstring)."""

    teachers: str = "runs/rule_world"
    """A `rlhf-jax rule-world` output folder: the teacher of seed N is TEACHERS/seed<N>/grpo."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the rule world's seed: the same corpus, demonstrations and prompt pool)."""
    out: str = "runs/distill_world"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys the students are read on."""
    quick: bool = False
    """The rule world's --quick sizes and a few steps (a smoke test)."""
    student_width: int = 64
    """Student width (4 heads, MLP 4x)."""
    student_layers: int = 2
    """Student depth."""
    prompts: int = 512
    """Train-key prompts of the distillation stages (the rule world's RL pool)."""
    distill_steps: int = 300
    """Steps of on-policy distillation and GKD (16 prompts each); chosen on dev keys (seed 0: 150 steps at 1e-4
    left the on-policy student at 0.289, 300 at 3e-4 reached 0.996)."""
    distill_lr: float = 3e-4
    """Learning rate of on-policy distillation and GKD (constant); chosen with `distill_steps`."""

    def __post_init__(self):
        check_ranges(self, positive=("student_width", "student_layers", "prompts", "distill_steps", "distill_lr"))


def student_config(cfg: DistillWorldConfig, world: rw.RuleWorldConfig) -> ModelConfig:
    if cfg.quick:
        return world.model_config()
    return ModelConfig(vocab_size=TOK.vocab_size, d_model=cfg.student_width, num_layers=cfg.student_layers,
                       num_heads=4, mlp_dim=4 * cfg.student_width, max_seq_len=128)


def distill(student, sc, teacher, tc, tasks, *, lmbda, beta, steps, lr, seed, max_new_tokens):
    """GKD from `student` on prompts of `tasks`; the dataset responses are the teacher's greedy answers."""
    answers = rw.answers(teacher, tasks, tc, max_new_tokens=max_new_tokens, temperature=0.0,
                         rng=jax.random.PRNGKey(seed))
    ids = [TOK.encode(a) + [TOK.eos_id] for a in answers]
    rng = np.random.default_rng(seed)
    dcfg = DistillConfig(num_steps=steps, log_every=steps, batch_size=16, lmbda=lmbda, beta=beta, temperature=1.0,
                         max_prompt_len=64, sampling=SamplingConfig(max_new_tokens=max_new_tokens, eos_id=TOK.eos_id,
                                                                    pad_id=TOK.pad_id),
                         optim=OptimConfig(learning_rate=lr))

    def batches():
        while True:
            pick = rng.choice(len(tasks), 16, replace=False)
            b = rw.prompt_batch([tasks[i] for i in pick])
            resp = np.full((16, max_new_tokens), TOK.pad_id, np.int32)
            mask = np.zeros((16, max_new_tokens), np.int32)
            for r, i in enumerate(pick):
                n = min(len(ids[i]), max_new_tokens)
                resp[r, :n], mask[r, :n] = ids[i][:n], 1
            yield {"prompts": np.asarray(b["prompts"]), "prompt_mask": np.asarray(b["prompt_mask"]),
                   "responses": resp, "response_mask": mask}

    state = create_train_state(student, dcfg.optim, jax.random.PRNGKey(seed + 1), total_steps=steps)
    state, _ = run_distill(state, batches(), dcfg, model_config=sc, teacher_params=teacher, teacher_config=tc)
    return state.params


def one_seed(cfg: DistillWorldConfig, seed: int) -> dict:
    world = dataclasses.replace(rw.RuleWorldConfig(seed=seed, quick=cfg.quick, eval_split=cfg.eval_split)).scaled()
    tc, teacher = load_params(os.path.join(cfg.teachers, f"seed{seed}", "grpo"))
    teacher = jax.tree.map(np.asarray, teacher)
    sc = student_config(cfg, world)
    sk, ops, base = skills.RULE_WORLD, list(world.ops), 1000 * seed
    draw = lambda n, k, split: skills.skill_set(ops, n, base + k, split, sk)  # noqa: E731
    demo_tasks, evals = draw(world.demos, 1, "train"), draw(world.eval_prompts, 3, cfg.eval_split)
    pool = draw(cfg.prompts if not cfg.quick else world.rl_prompts, 7, "train")
    flawed = np.array([skills.demonstrate(world.demonstrator, t) != t.answer for t in evals])
    gen = dict(max_new_tokens=world.max_new_tokens)
    steps = 4 if cfg.quick else cfg.distill_steps
    sft_kw = dict(steps=world.sft_steps, batch_size=world.batch_size, seq_len=world.seq_len, seed=base + 20)
    rng = jax.random.PRNGKey(9000 + seed)
    t0 = time.time()
    docs = rw.rule_corpus(ops, docs=world.corpus_docs, web_fraction=world.web_fraction, p_correct=world.p_correct,
                          prompt_loss=False, seed=base, config=sk)
    pre = rw.pretrain(docs, sc, steps=world.pretrain_steps, batch_size=world.batch_size, seq_len=world.seq_len,
                      seed=base + 50)
    demo_rng = np.random.default_rng(base + 4)
    student = rw.sft(pre, sc, [(t, skills.demonstrate(world.demonstrator, t, demo_rng, world.flaw_rate))
                               for t in demo_tasks], **sft_kw)
    n_student, n_teacher = count_params(student), count_params(teacher)
    tokens_pre = world.pretrain_steps * world.batch_size * world.seq_len
    tokens_sft = world.sft_steps * world.batch_size * world.seq_len
    resp_tokens = steps * 16 * world.max_new_tokens                  # at most: the response budget per step
    arms = {"student_sft": (student, tokens_pre + tokens_sft, 0)}
    teacher_answers = rw.answers(teacher, pool, tc, temperature=0.0, rng=rng, **gen)
    arms["seq_kd"] = (rw.sft(student, sc, list(zip(pool, teacher_answers)), **sft_kw),
                      tokens_pre + 2 * tokens_sft, len(pool))
    arms["on_policy"] = (distill(student, sc, teacher, tc, pool, lmbda=1.0, beta=1.0, steps=steps,
                                 lr=cfg.distill_lr, seed=base + 60, **gen), tokens_pre + tokens_sft + resp_tokens,
                         steps * 16)
    arms["gkd"] = (distill(student, sc, teacher, tc, pool, lmbda=0.5, beta=0.5, steps=steps, lr=cfg.distill_lr,
                           seed=base + 70, **gen), tokens_pre + tokens_sft + resp_tokens, steps * 16)
    out = {"seed": seed, "student_params": n_student, "teacher_params": n_teacher, "arms": {}}
    teacher_exact = rw.scores(evals, rw.answers(teacher, evals, tc, temperature=0.0, rng=rng, **gen))[0]
    out["teacher"] = {"mean": float(teacher_exact.mean()), "flaw_keys": float(teacher_exact[flawed].mean())}
    for name, (params, tokens, teacher_calls) in arms.items():
        ex = rw.scores(evals, rw.answers(params, evals, sc, temperature=0.0, rng=rng, **gen))[0]
        out["arms"][name] = {"exact": ex.tolist(), "mean": float(ex.mean()),
                             "flaw_keys": float(ex[flawed].mean()) if flawed.any() else float("nan"),
                             "student_train_flops": 6.0 * n_student * tokens, "teacher_prompts": teacher_calls,
                             "kl_to_teacher": rw.kl_to(params, sc, teacher, tc, evals, rng=jax.random.fold_in(rng, 5),
                                                       max_new_tokens=world.max_new_tokens)}
        print(f"[distill_world] seed {seed} {name}: {cfg.eval_split} {ex.mean():.3f} (flaw keys "
              f"{out['arms'][name]['flaw_keys']:.3f}), KL to teacher {out['arms'][name]['kl_to_teacher']:.2f}",
              file=sys.stderr, flush=True)
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarize(seeds: list[dict]) -> dict:
    per = {a: [np.asarray(s["arms"][a]["exact"]) for s in seeds] for a in ARMS}
    return {a: {"mean": float(np.mean([s["arms"][a]["mean"] for s in seeds])),
                "flaw_keys": float(np.mean([s["arms"][a]["flaw_keys"] for s in seeds])),
                "kl_to_teacher": float(np.mean([s["arms"][a]["kl_to_teacher"] for s in seeds])),
                "student_train_pflops": float(np.mean([s["arms"][a]["student_train_flops"] for s in seeds])) / 1e15,
                "vs_student_sft": None if a == "student_sft" else seed_prompt_bootstrap(
                    per[a], per["student_sft"], bounds=(-1.0, 1.0))} for a in ARMS}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Distillation in the rule world ({result['eval_split']} keys, seeds {result['seeds']})", "",
             f"Teacher (GRPO, {result['per_seed'][0]['teacher_params']:,} parameters): "
             f"{np.mean([x['teacher']['mean'] for x in result['per_seed']]):.3f} greedy exact; student "
             f"{result['per_seed'][0]['student_params']:,} parameters.", "",
             "| student | greedy exact | flaw keys | vs its own SFT (95%, seeds and prompts) | KL to teacher | "
             "student training PFLOPs |", "|---|---|---|---|---|---|"]
    for a in ARMS:
        v = s[a]["vs_student_sft"]
        lines.append(f"| {a} | {s[a]['mean']:.3f} | {s[a]['flaw_keys']:.3f} | "
                     + (f"{v['delta']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" if v else "") +
                     f" | {s[a]['kl_to_teacher']:.2f} | {s[a]['student_train_pflops']:.4f} |")
    return "\n".join(lines)


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout) of `result`: the primary comparison and every arm."""
    s, per = result["summary"], result["per_seed"]
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    primary = s["on_policy"]["vs_student_sft"]
    return {
        "title": f"Distillation in the rule world: a GRPO teacher into a smaller student, {result['eval_split']} keys, "
                 f"{len(per)} seed(s)",
        "provenance": result["provenance"],
        "summary": [f"`experiments/distill_world.py` (docs/distill.md): the rule world's GRPO policy of each seed "
                    f"({per[0]['teacher_params']:,} parameters, {np.mean([x['teacher']['mean'] for x in per]):.3f} "
                    f"greedy exact match on these keys) distilled into a student of {per[0]['student_params']:,} "
                    f"parameters pretrained on the same corpus and SFT'd on the same truncating demonstrations. "
                    f"Greedy exact match on {len(per[0]['arms']['student_sft']['exact'])} {result['eval_split']} "
                    "keys per seed; intervals: 95%, seeds and prompts resampled together, clipped to [-1, 1]."],
        "sections": [{"title": "Primary comparison (named before the test keys were read)",
                      "tables": [{"columns": ["comparison", "estimate [95%]", "holds"],
                                  "rows": [["on-policy student - student's own SFT", ci(primary),
                                            primary["low"] > 0 or primary["high"] < 0]],
                                  "formats": [None, "+.3f", None]}]},
                     {"title": "Every arm",
                      "text": ["KL to teacher: mean over prompts of log pi_student(y|x) - log pi_teacher(y|x) on one "
                               "student sample at temperature 1 (nats per answer); student training FLOPs: 6 x "
                               "parameters x tokens of pretraining, SFT and the arm (the teacher's forward passes "
                               "not counted)."],
                      "tables": [{"columns": ["student", "greedy exact", "flaw keys", "vs its own SFT",
                                              "KL to teacher", "student training PFLOPs"],
                                  "rows": [[a, s[a]["mean"], s[a]["flaw_keys"],
                                            ci(s[a]["vs_student_sft"]) if s[a]["vs_student_sft"] else None,
                                            s[a]["kl_to_teacher"], s[a]["student_train_pflops"]] for a in ARMS],
                                  "formats": [None, ".3f", ".3f", "+.3f", ".2f", ".4f"]}]},
                     {"title": "Per seed",
                      "tables": [{"columns": ["seed", "teacher", *ARMS],
                                  "rows": [[x["seed"], x["teacher"]["mean"], *[x["arms"][a]["mean"] for a in ARMS]]
                                           for x in per], "formats": [None, ".3f", *[".3f"] * len(ARMS)]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("distill_world", parse_cli(DistillWorldConfig, argv), argv, one_seed, summarize, markdown, card,
                      ignore=("seeds",))


if __name__ == "__main__":
    main()
