"""The `rlhf-jax` command: one subcommand per stage, the main job, and the tools around them.

    rlhf-jax sft --data.path train.jsonl --init HF_DIR --out runs/sft
    rlhf-jax dpo --init runs/sft/sft/final --data.path pairs.jsonl --out runs/dpo
    rlhf-jax rule-world --quick --out runs/quick

Each subcommand is a module of this package with a `main(argv) -> exit status` (also runnable as
`python -m rlhf_jax.cli.NAME`); `rlhf-jax NAME --help` lists its options.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": ("sft", "supervised fine-tuning on demonstrations (loss on the responses)"),
    "reward": ("reward", "a Bradley-Terry reward model on preference pairs"),
    "ppo": ("ppo", "PPO against a reward model, KL-penalised towards the initial policy (InstructGPT)"),
    "dpo": ("dpo", "DPO and its variants (IPO, hinge, robust; SimPO, ORPO) on preference pairs"),
    "kto": ("kto", "KTO on unpaired desirable / undesirable answers"),
    "online-dpo": ("online_dpo", "online DPO: fresh samples of the policy, labelled by a judge"),
    "grpo": ("grpo", "the GRPO family, RLOO and REINFORCE++ against a reward function or model"),
    "distill": ("distill", "distillation into a student: GKD, on-policy distillation, supervised KD"),
    "export": ("export", "a run's final params as a Hugging Face folder (or its LoRA adapters for peft)"),
    "generate": ("generate", "sample completions from a run's final params or a Hugging Face folder"),
    "benchmark": ("benchmark", "time the compiled steps and report tokens/s and MFU"),
    "rule-world": ("rule_world", "the main job: post-training measured in the rule world, on one or more seeds"),
    "pipeline": ("pipeline", "the first world's whole pipeline (the lecture experiments run on its models)"),
    "seeds": ("seeds", "the first world's pipeline on several seeds, and the gains that hold across them"),
}
"""Subcommand -> (module of rlhf_jax.cli, one line of help)."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-jax COMMAND [OPTIONS]   (rlhf-jax COMMAND --help lists a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """The console entry point: `rlhf-jax COMMAND [OPTIONS]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: rlhf-jax has no command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"rlhf_jax.cli.{COMMANDS[name][0]}")
    return module.main(rest)
