"""The main job's models per seed, shared by the experiment scripts (calibration, hallucination, ...).

A seed's models are one main-job run folder, `runs/seeds/seed<N>` by default: the folders that `rlhf-jax seeds`
writes, so an experiment run after the seed driver trains nothing. A folder that
lacks a stage an experiment needs is completed with the pipeline's `--resume` (finished stages are reloaded, the
rest run), so the first experiment on a new seed pays for the pipeline once and every later one reads it.
"""
from __future__ import annotations

import json
import os
import sys

from rlhf_jax.config_cli import config_from_dict
from rlhf_jax.recipes.config import WORLD_OPTIONS, PipelineConfig
from rlhf_jax.recipes.pipeline import run_pipeline as main_job
from rlhf_jax.train import checkpoint as ckpt

DEFAULT_MODELS = "runs/seeds/seed{seed}"
"""Where a seed's pipeline run lives ({seed} is replaced), as `rlhf-jax seeds` lays it out."""


class ModelsError(Exception):
    """A models folder that cannot serve the request (the message is one line for the user)."""


def models_template(models: str, out: str, quick: bool) -> str:
    """The run-folder template an experiment reads: `models`, except that --quick with the default reads and
    trains quick models under OUT/models (never mixing them with the full ones in runs/seeds)."""
    return os.path.join(out, "models", "seed{seed}") if quick and models == DEFAULT_MODELS else models


def script_main(config_cls, run, argv=None) -> int:
    """An experiment script's `main`: parse the options, run, and turn a ModelsError into one line and exit 2."""
    from rlhf_jax.config_cli import parse_cli
    cfg = parse_cli(config_cls, argv)
    try:
        run(cfg)
    except ModelsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def seed_folder(template: str, seed: int) -> str:
    return template.format(seed=seed)


FOLDERS = {"base": "pretrain"}
"""Stage names of the report whose run folder is named otherwise."""


def final_params(folder: str, stage: str) -> str:
    """A stage's `final/` params folder in a run folder (the report's "base" is the "pretrain" folder)."""
    return os.path.join(folder, FOLDERS.get(stage, stage), "final")


def ensure_seed(template: str, seed: int, stages: tuple[str, ...], *, quick: bool, run_pipeline=None) -> str:
    """The run folder of `seed` with the `final/` params of every stage in `stages`, running the main job there
    (with --resume when the folder exists) if any is missing. A folder made with the other --quick setting is an
    error: its models are not the ones asked for."""
    folder = seed_folder(template, seed)
    config = os.path.join(folder, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            made = json.load(f)
        if bool(made.get("quick")) != quick or made.get("seed", seed) != seed:
            raise ModelsError(f"{config}: made with quick={made.get('quick')}, seed={made.get('seed')}, but this "
                              f"run asks for quick={quick}, seed={seed}; pass --models with another folder")
        default = PipelineConfig()   # the experiment scripts' prompts and keys are the default world's
        other = {k: made[k] for k in WORLD_OPTIONS if k in made and made[k] != getattr(default, k)}
        if other:
            raise ModelsError(f"{config}: made in another world ({', '.join(f'{k}={v}' for k, v in other.items())}); "
                              "the experiment scripts use the default world; pass --models with a default-world run")
    if all(os.path.isdir(os.path.join(final_params(folder, s), "params")) for s in stages):
        return folder
    print(f"[models] seed {seed}: running the main job in {folder} for {', '.join(stages)}", file=sys.stderr)
    run = run_pipeline or main_job
    run(PipelineConfig(out=folder, seed=seed, quick=quick, resume=os.path.isdir(folder)))
    return folder


def load(folder: str, stage: str):
    """(model_config, params) of a stage's final params."""
    return ckpt.load_params(final_params(folder, stage))


def pipeline_config(folder: str):
    """The PipelineConfig a run folder was made with (its config.json), scaled as that run was."""
    with open(os.path.join(folder, "config.json")) as f:
        made = json.load(f)
    return config_from_dict(PipelineConfig(), made, source=os.path.join(folder, "config.json")).scaled()


def write_report(out: str, name: str, result: dict, text: str, plot=None) -> None:
    """An experiment's outputs: OUT/<name>.json (every number, and the provenance of the run: command, commit,
    package versions, machine, date, seeds), OUT/<name>.md (`text`), the figures of `plot()` when given, and `text`
    on stdout."""
    from rlhf_jax.recipes.cards import command_line, provenance

    result = {**result, "provenance": provenance(command_line(), result.get("seeds", []))}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    if plot is not None:
        plot()
    print(text)


def kept_seeds(path: str, settings: dict) -> dict:
    """The per-seed results an earlier run saved at `path` ({seed: ...} under "per_seed") when it ran with the same
    `settings`; {} otherwise (a rerun then measures every seed again)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    return saved.get("per_seed", {}) if saved.get("settings") == settings else {}
