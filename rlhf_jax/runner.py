"""The runner: what every stage command shares (`rlhf-jax sft`, `dpo`, `ppo`, ... and the main job). Option groups
for the model, data and checkpoints, model and tokenizer init from a preset or a Hugging Face folder, data
loading, LoRA setup, and `run_stage`, the wrapper that adds logging, checkpoints, SIGTERM handling, `--resume` and
the report around a stage function of `rlhf_jax.train.stages`.

Run directory of one command (`--out DIR`):

    DIR/config.json                    the resolved configuration (re-loadable with --config)
    DIR/<stage>/metrics.jsonl          one JSON line per logged step ("step", "time", metrics)
    DIR/<stage>/tb/                    TensorBoard events
    DIR/<stage>/final/                 final params (params/ + model_config.json; load with load_params)
    DIR/checkpoints/<stage>/<step>/    orbax checkpoints (state + data position), newest max_to_keep kept
    DIR/report.json, report.md, <stage>_curves.png

`--mesh DATA FSDP TENSOR` runs the stage sharded over a device mesh (`rlhf_jax.sharding`); multi-host runs start
the same command in every process (`jax.distributed` peers are auto-detected) and each process feeds its own
rows of every global batch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from typing import Annotated, Any, Callable, Literal

import jax
import numpy as np
import tyro

from rlhf_jax.checks import config_check, get_option, load_object, with_options
from rlhf_jax.config_cli import check_ranges, field_docs, save_config, to_dict
from rlhf_jax.data.iterators import ProcessRows
from rlhf_jax.lora import TARGETS, LoraConfig, NF4Tensor, init_lora, quantize_base, save_peft
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train.logging import StageHooks, make_stage_hooks, read_jsonl, truncate_jsonl
from rlhf_jax.train.report import plot_curves, write_report
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.steps import lora_params

log = logging.getLogger("rlhf_jax.runner")


# ---------------------------------------------------------------------------------------------- option groups
def _make_overrides_class():
    docs = field_docs(ModelConfig)
    hints = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    fields = []
    for f in dataclasses.fields(ModelConfig):
        tp = eval(hints[f.name], vars(sys.modules[ModelConfig.__module__])) if isinstance(hints[f.name], str) \
            else hints[f.name]
        help_ = docs.get(f.name, f.name) + " (None: the preset's value)"
        fields.append((f.name, Annotated[tp | None, tyro.conf.arg(help=help_)], dataclasses.field(default=None)))
    cls = dataclasses.make_dataclass("ModelOverrides", fields, frozen=True, kw_only=True)
    cls.__doc__ = "ModelConfig fields replacing the preset's (unset fields keep the preset's values)."
    cls.__module__ = __name__
    return cls


ModelOverrides = _make_overrides_class()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA adapters instead of full fine-tuning (rlhf_jax.lora; docs/lora.md)."""

    rank: int = 0
    """Adapter rank r; 0: full fine-tuning (no adapters)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    targets: tuple[str, ...] = TARGETS
    """Projections that get adapters: q, k, v, o, gate, up, down (gate: SwiGLU models only)."""
    quantize: Literal["none", "nf4"] = "none"
    """nf4: QLoRA, the frozen base's projection kernels stored in 4-bit NF4 with double quantisation
    (rlhf_jax.quant; embeddings, LM head and norms stay as they are); needs --lora.rank > 0."""

    def __post_init__(self):
        check_ranges(self, non_negative=("rank",), positive=("alpha",))
        config_check(self, self.quantize == "none" or self.rank > 0,
                     f"--lora.quantize {self.quantize} quantises the frozen base under adapters: it needs "
                     "--lora.rank > 0")

    def config(self) -> LoraConfig | None:
        return None if self.rank == 0 else LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)

    def base(self, params):
        """The frozen base as the stages hold it: `params`, or with --lora.quantize nf4 its projection kernels
        as NF4Tensors (`rlhf_jax.quant.quantize_base`), which `merge_lora` dequantises inside every step."""
        return quantize_base(params) if self.quantize == "nf4" else params


def trainable_state(cfg, params, model_config, optim, total_steps: int, *, head=None):
    """(train state, stage LoRA keyword arguments): the params themselves, or with --lora.rank R the adapters of
    `params` (plus a reward model's `head`), the stage then getting `lora` (and the frozen params as its base;
    with --lora.quantize nf4 `params` must be `cfg.lora.base(params)`, the adapters taking the NF4 kernels'
    shapes; a command that passes full-precision params with that flag is refused in one line).
    A warmup that does not fit in the run's updates is a setup error naming the stage's flags."""
    if optim.schedule != "constant" and optim.warmup_steps >= total_steps:
        group = next((f.name.replace("_", "-") for f in dataclasses.fields(cfg)
                      if getattr(getattr(cfg, f.name), "optim", None) == optim), "stage")
        raise ValueError(f"--{group}.optim.warmup-steps {optim.warmup_steps} must be below the run's {total_steps} "
                         f"updates for the {optim.schedule} schedule: lower it, raise --{group}.num-steps, or pass "
                         f"--{group}.optim.schedule constant")
    lora = cfg.lora.config()
    if lora is None:
        return create_train_state(params, optim, cfg.seed, total_steps=total_steps), {}
    if cfg.lora.quantize != "none" and getattr(cfg, "mesh", None):
        raise ValueError(f"--lora.quantize {cfg.lora.quantize} with --mesh: the 4-bit base is not sharded yet; "
                         "drop one of them")
    if cfg.lora.quantize != "none" and not any(isinstance(x, NF4Tensor)
                                               for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
                                                   x, NF4Tensor))):
        raise ValueError(f"--lora.quantize {cfg.lora.quantize}: this command does not train over a 4-bit base "
                         "yet; drop --lora.quantize")
    adapters = init_lora(params, model_config, lora, jax.random.fold_in(jax.random.key(cfg.seed), 17))
    if head is not None:
        adapters = {**adapters, "score_head": head}
    return create_train_state(adapters, optim, cfg.seed, total_steps=total_steps), {"lora": lora}


def save_tokenizer(tok, folder: str) -> None:
    """Copy the tokenizer's files (TOKENIZER_FILES that exist) into `folder`; nothing for the byte tokenizer."""
    source = getattr(tok, "source_dir", None)
    if source is None or jax.process_index() != 0:
        return
    os.makedirs(folder, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)) and os.path.abspath(source) != os.path.abspath(folder):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))


SOURCE_FILE = "source.json"
"""Beside a stage's final params: {"hf_base": the Hugging Face folder the chain of stages started from}."""


def hf_base(init: str | None) -> str | None:
    """The Hugging Face folder behind `--init`: the folder itself when it is one (config.json there), or the one
    recorded in a run's final/ (`SOURCE_FILE`) when the chain of stages started from one; else None. A LoRA adapter
    records it as its base model, and the learning rates default to TRL's from it (`checkpoint_defaults`)."""
    if init is None:
        return None
    if os.path.isfile(os.path.join(init, "config.json")):
        return os.path.abspath(init)
    try:
        with open(os.path.join(init, SOURCE_FILE)) as f:
            return json.load(f).get("hf_base")
    except (OSError, ValueError):
        return None


def save_final(out: str, stage: str, state_params, model_config, lora: LoraConfig | None = None, base=None,
               tokenizer=None, init: str | None = None):
    """DIR/<stage>/final: the trained params (with LoRA: merged into the base, so that later stages and the
    export read a whole model), the run's tokenizer files, so that a later stage's --init needs no
    --data.tokenizer, and the `init` folder's generation_config.json (its EOS ids and sampling settings reach the
    export through every stage); with LoRA also DIR/<stage>/adapter in peft's format, its base recorded when
    `init` is a Hugging Face folder (else the chain's first one, carried in `init`'s own adapter base)."""
    params = state_params
    if lora is not None:
        params = lora_params(base, state_params, lora)
        adapters = {k: v for k, v in state_params.items() if k in ("attn", "mlp")}
        save_peft(jax.device_get(adapters), lora, model_config, os.path.join(out, stage, "adapter"),
                  base_model=hf_base(init))
    final = os.path.join(out, stage, "final")
    ckpt.save_params(final, params, model_config=model_config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, final)
    if init is not None and os.path.isfile(os.path.join(init, GENERATION_CONFIG)) and jax.process_index() == 0:
        shutil.copyfile(os.path.join(init, GENERATION_CONFIG), os.path.join(final, GENERATION_CONFIG))
    if hf_base(init) is not None and jax.process_index() == 0:
        with open(os.path.join(final, SOURCE_FILE), "w") as f:
            json.dump({"hf_base": hf_base(init)}, f)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Options every stage command shares; each command adds its data, stage and checkpoint fields."""

    out: str = "runs/run"
    """Run directory (metrics, checkpoints, final params, report)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (state, rng and data position)."""
    seed: int = 0
    """Seed of the model inits, the data order and (PPO) sampling."""
    mesh: tuple[int, int, int] | None = None
    """Device mesh (data, fsdp, tensor) to shard the run over, e.g. --mesh 2 2 2; one entry may be -1 (inferred:
    --mesh -1 1 1 is data parallel over all devices). None: one device, no sharding."""
    preset: str = "tiny"
    """Architecture of fresh models (when no init folder is given): a ModelConfig.preset name (tiny, tiny-llama,
    gpt2-124m, llama-1b, ...)."""
    model: ModelOverrides = ModelOverrides()
    """ModelConfig fields replacing the preset's, e.g. --model.num-layers 4 (unset: the preset's value)."""
    lora: LoraSpec = LoraSpec()
    """LoRA instead of full fine-tuning: --lora.rank R (--lora.alpha, --lora.targets); 0: off."""

    def __post_init__(self):
        check_ranges(self, non_negative=("seed",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where the records come from and how they are batched."""

    path: str | None = None
    """Local JSON / JSONL / JSONL.gz file; None uses built-in demo data from rlhf_jax.tasks (no download)."""
    kind: str | None = None
    """Record kind for rlhf_jax.data.load_records (sft, oasst, preference, unpaired, prompt, text); None: the stage's
    kind. KTO also reads preference files (each pair gives a desirable and an undesirable record)."""
    num_demo: int = 256
    """Records generated for the built-in demo data."""
    limit: int | None = None
    """Read at most this many records from `path`."""
    skip_invalid: bool = False
    """Skip (and count) bad records instead of stopping at the first one."""
    batch_size: int = 8
    """Rows per batch (PPO: overridden by ppo.batch_size)."""
    seq_len: int = 128
    """T: the single bucket length; longer examples are truncated (prompt end and response start kept)."""
    pack: bool = False
    """SFT only: pack several examples per row (segment_ids keep them apart)."""
    tokenizer: str | None = None
    """"byte" (ByteTokenizer, vocab 259) or a tokenizer.json file / folder holding one. None: the --init folder's
    tokenizer when it holds a tokenizer.json (every run saves its tokenizer beside its final params), else "byte"."""

    def __post_init__(self):
        check_ranges(self, positive=("num_demo", "limit", "batch_size", "seq_len"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """Checkpoint schedule."""

    save_every: int = 50
    """Save every this many steps (0: only on stop and at the end)."""
    max_to_keep: int = 2
    """Checkpoints kept per stage (the newest)."""
    tensorboard: bool = True
    """Write TensorBoard events under <out>/<stage>/tb."""
    progress: bool | None = None
    """tqdm progress bar; None: only when stderr is a terminal and CI is unset."""
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (needs `pip install wandb`; None: off, nothing imports it)."""

    def __post_init__(self):
        check_ranges(self, positive=("max_to_keep",), non_negative=("save_every",))


# -------------------------------------------------------------------------------------------------- the model
def _changes(overrides) -> dict:
    return {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}


def model_config(preset: str, overrides=None, *, init: str | None = None) -> ModelConfig:
    """The preset (or the `init` folder's config) with the non-None fields of `overrides` applied."""
    changes = _changes(overrides) if overrides is not None else {}
    if init is not None:
        cfg, _ = ckpt.load_params(init)
        return (cfg or ModelConfig.preset(preset)).replace(**changes)
    return ModelConfig.preset(preset, **changes)


def init_model(preset: str, overrides, rng, *, init: str | None = None, tokenizer=None) -> tuple[ModelConfig, Any]:
    """(config, params) loaded from `init` (a Hugging Face or save_params folder) or randomly initialised; with
    `tokenizer`, a setup error when its ids do not fit the model's vocabulary (`check_vocab`)."""
    from rlhf_jax.models import init_params

    changes = _changes(overrides) if overrides is not None else {}
    if init is not None:
        if not os.path.isdir(init):
            raise ValueError(f"--init {init}: no such folder")
        cfg, params = ckpt.load_params(init)
        if cfg is None:
            raise ValueError(f"--init {init}: no model_config.json beside params/ (save_params writes one; without "
                             "it the architecture is unknown)")
        cfg = cfg.replace(**changes)
        params = jax.tree.map(np.asarray, params)
    else:
        cfg = ModelConfig.preset(preset, **changes)
        params = None
    if tokenizer is not None:
        check_vocab(tokenizer, cfg, init)
    return cfg, (init_params(cfg, rng) if params is None else params)


# --------------------------------------------------------------------------------------------------- the mesh
def make_run_mesh(shape: tuple[int, int, int] | None):
    """None -> None (single device); else `initialize_distributed()` (a no-op on one host) and `make_mesh(shape)`.

    Call it before any other JAX work of the script. Prints the mesh to stderr.
    """
    if shape is None:
        return None
    from rlhf_jax import sharding as S

    S.initialize_distributed()
    mesh = S.make_mesh(shape)
    axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"mesh: {axes} ({mesh.devices.size} devices, {jax.process_count()} processes)", file=sys.stderr)
    return mesh


# --------------------------------------------------------------------------------------------------- the data
GENERATION_CONFIG = "generation_config.json"
"""A Hugging Face folder's generation defaults (EOS ids, sampling settings): carried from --init to every stage's
final/ and from there into the export, unchanged."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""The files of a tokenizer that a run copies beside its final params (those that exist)."""


def tokenizer_source(name: str | None, init: str | None) -> str:
    """--data.tokenizer, or with None the --init folder when it holds a tokenizer.json, else "byte"."""
    if name is not None:
        return name
    if init is not None and os.path.isfile(os.path.join(init, "tokenizer.json")):
        return init
    return "byte"


def make_tokenizer(name: str):
    """"byte" -> ByteTokenizer(); otherwise HFTokenizer.from_file(path) (a tokenizer.json or its folder). The
    tokenizer's folder is kept as `tok.source_dir` (None for "byte"), so that a run can save it with its params."""
    from rlhf_jax.tokenizer import ByteTokenizer, HFTokenizer

    if name == "byte":
        tok = ByteTokenizer()
        tok.source_dir = None
        return tok
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ValueError(f"--data.tokenizer {name}: no tokenizer.json there")
    tok = HFTokenizer.from_file(path)
    tok.source_dir = os.path.dirname(os.path.abspath(path))
    return tok


def check_vocab(tok, model_config, init: str | None) -> None:
    """A setup error when the tokenizer's ids do not fit the model's embedding table (a larger tokenizer would
    index past it; with a byte tokenizer on a large model every id is valid but the model was not trained on
    them: that is allowed, as for a fresh model)."""
    if tok.vocab_size > model_config.vocab_size:
        where = f"the model in {init}" if init else "the model"
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but {where} has a vocabulary of "
                         f"{model_config.vocab_size}: pass the model's own tokenizer (--data.tokenizer FOLDER), or "
                         "leave --data.tokenizer unset to use the one in --init")


def demo_tasks(n: int, seed: int) -> list:
    """The world's tasks behind the built-in prompt records (`demo_records("prompt", n, seed)`)."""
    from rlhf_jax import tasks

    return tasks.prompt_set(n, np.random.default_rng(seed))


def world_judge(spec: DataSpec, seed: int, tok):
    """The world's gold reward of the built-in prompts as a host reward function of (prompt, completion) texts;
    a setup error when a prompt would be cut by --data.seq-len (a cut prompt is no longer the task's)."""
    from rlhf_jax.rewards import chat_prompt_text, world_reward
    from rlhf_jax.tasks import messages_for
    from rlhf_jax.tokenizer import encode_prompt

    tasks = demo_tasks(spec.num_demo, seed)
    longest = max(len(encode_prompt(tok, messages_for(t))) for t in tasks)
    if longest > spec.seq_len:
        raise ValueError(f"--data.seq-len {spec.seq_len} would cut built-in prompts of up to {longest} tokens, which "
                         "the world's reward then cannot look up; raise --data.seq-len")
    return world_reward(tasks, chat_prompt_text(tok))


def demo_records(kind: str, n: int, seed: int) -> list:
    """Built-in records from the synthetic task world (`rlhf_jax.tasks`): SFT demonstrations, labelled
    preference pairs (careful annotator) or RL prompts."""
    from rlhf_jax import tasks
    from rlhf_jax.data import parse_record

    rng = np.random.default_rng(seed)
    if kind in ("sft", "oasst"):
        raw = [{"messages": r["messages"]} for r in tasks.sft_demos(n, rng)]
        kind = "sft"
    elif kind == "preference":
        pairs = tasks.synthetic_pairs(tasks.prompt_set(n, rng), "careful", rng)
        raw = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    elif kind == "prompt":
        raw = [{"prompt": t.prompt} for t in demo_tasks(n, seed)]
    else:
        raise ValueError(f"no demo data for record kind {kind!r}")
    return [parse_record(r, kind) for r in raw]


def read_records(spec: DataSpec, kind: str, *, seed: int, init: str | None = None) -> list:
    """The records of `--data.path` as `kind` (`rlhf_jax.data.load_records`), or without a path the built-in demo
    records of the synthetic world (a console line says so when `init` is a real checkpoint)."""
    from rlhf_jax.data import load_records, unpair

    # Unpaired feedback (KTO) may come from preference pairs, split as TRL's unpair_preference_dataset does.
    source_kind = spec.kind or kind
    if spec.path is None:
        records = demo_records("preference" if kind == "unpaired" else kind, spec.num_demo, seed)
        source_kind = "preference" if kind == "unpaired" else kind
        if init is not None:   # a real checkpoint on toy data is a mistake more often than a choice: say so
            notice(f"[data] no --data.path: training {init} on {len(records)} built-in {kind} records of the "
                   "synthetic world (rlhf_jax.tasks); pass --data.path FILE for your own")
    else:
        records = load_records(spec.path, source_kind, skip_invalid=spec.skip_invalid, limit=spec.limit)
    if kind == "unpaired" and source_kind == "preference":
        records = unpair(records)
    return records


def load_data(spec: DataSpec, kind: str, *, seed: int, batch_size: int | None = None, init: str | None = None):
    """A resumable `rlhf_jax.data.Batches` iterator (infinite, reshuffled every epoch by (seed, epoch)) and the
    tokenizer (`tokenizer_source(spec.tokenizer, init)`). Multi-host (after `make_run_mesh`): each process gets only
    its rows (`ProcessRows`)."""
    from rlhf_jax.data import Batches, ShuffledIterator

    if spec.pack and kind not in ("sft", "oasst"):
        raise ValueError(f"--data.pack packs SFT rows only; this stage reads {kind} records: drop --data.pack")
    tok = make_tokenizer(tokenizer_source(spec.tokenizer, init))
    records = read_records(spec, kind, seed=seed, init=init)
    batch_kind = "sft" if kind in ("sft", "oasst") else kind
    data = Batches(ShuffledIterator(records, seed=seed), tok, kind=batch_kind,
                   batch_size=batch_size or spec.batch_size, buckets=(spec.seq_len,),
                   pack=spec.pack and batch_kind == "sft")
    if jax.process_count() > 1:
        data = ProcessRows(data, process_index=jax.process_index(), process_count=jax.process_count())
    return data, tok


def check_row_length(seq_len: int, model_config) -> None:
    """A setup error (before any compile) when rows of --data.seq-len positions overrun the model's position
    table (its max_seq_len), instead of an error from inside the compiled step."""
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"--data.seq-len {seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}; lower "
                         "--data.seq-len (or raise --model.max-seq-len for a fresh model)")


def check_rollout_length(prompt_len: int, sampling, model_config, stage: str) -> None:
    """A setup error (before any compile) when prompts of `prompt_len` plus the sampled tokens overrun the model."""
    if prompt_len + sampling.max_new_tokens > model_config.max_seq_len:
        raise ValueError(f"--data.seq-len {prompt_len} + --{stage}.sampling.max-new-tokens {sampling.max_new_tokens} "
                         f"exceeds the model's max_seq_len {model_config.max_seq_len}; lower one of them (or raise "
                         "--model.max-seq-len for a fresh model)")


def read_tasks(path: str) -> list:
    """The records of a JSON (a list) or JSONL (optionally .gz) file, each as written: the tasks of --env."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        if path.removesuffix(".gz").endswith(".json"):
            try:
                tasks = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON (line {e.lineno}: {e.msg})") from None
            if not isinstance(tasks, list):
                raise ValueError(f"{path}: expected a JSON list of tasks")
            return tasks
        tasks = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    tasks.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i}: malformed JSON ({e.msg})") from None
        return tasks


def env_tasks(cfg, env, tok, *, batch_size: int, batch_flag: str) -> list:
    """The tasks of `--env` (a command's `env`, `data` and `seed`): the records of --data.path or the environment's
    `tasks(n, seed=)`, each checked by `env.reset` and its opening prompt's length (a setup error naming the record,
    or the longest prompt, instead of a failure mid-run); at least `batch_size` of them (`batch_flag` names it)."""
    from rlhf_jax.tokenizer import encode_prompt

    if cfg.data.path is not None:
        tasks = read_tasks(cfg.data.path)[: cfg.data.limit]
        where = lambda i: f"{cfg.data.path}: record {i + 1}"  # noqa: E731
    elif callable(getattr(env, "tasks", None)):
        tasks = list(env.tasks(cfg.data.num_demo, seed=cfg.seed))
        where = lambda i: f"--env {cfg.env}: task {i + 1}"  # noqa: E731
    else:
        raise ValueError(f"--env {cfg.env}: {type(env).__name__} has no tasks(n, seed=) method; pass --data.path "
                         "(one task per record)")
    if len(tasks) < batch_size:
        raise ValueError(f"--env {cfg.env}: {len(tasks)} tasks, fewer than {batch_flag} {batch_size}")
    schemas = list(getattr(env, "schemas", None) or []) or None
    longest = (0, 0)
    for i, task in enumerate(tasks):
        try:
            messages = env.reset(task)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where(i)}: not a task of --env {cfg.env} ({e})") from None
        longest = max(longest, (len(encode_prompt(tok, messages, tools=schemas)), -i))
    if longest[0] > cfg.data.seq_len:
        raise ValueError(f"{where(-longest[1])}: its opening prompt is {longest[0]} tokens with the chat template and "
                         f"tool schemas, longer than --data.seq-len {cfg.data.seq_len}; raise --data.seq-len")
    return tasks


def env_lengths(cfg, sampling, model_config, stage: str):
    """(EpisodeBudget, episode length) of a command's --env-max-turns / --env-max-tokens / --env-max-len, checked
    against the model's positions and the turn length `sampling.max_new_tokens` (--<stage>.sampling...), and
    its --env-kv-suffix (positive; not with a sliding window)."""
    from rlhf_jax.envs import EpisodeBudget

    for name in ("env_max_turns", "env_max_tokens", "env_max_len", "env_kv_suffix"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    seq_len = cfg.data.seq_len + cfg.env_max_len
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"--data.seq-len {cfg.data.seq_len} + --env-max-len {cfg.env_max_len} exceeds the model's "
                         f"max_seq_len {model_config.max_seq_len}; lower one of them (or raise --model.max-seq-len "
                         "for a fresh model)")
    if sampling.max_new_tokens > cfg.env_max_len:
        raise ValueError(f"--{stage}.sampling.max-new-tokens {sampling.max_new_tokens} (one turn) exceeds "
                         f"--env-max-len {cfg.env_max_len} (the whole episode after its prompt)")
    if cfg.env_kv_suffix is not None and model_config.sliding_window is not None:
        raise ValueError("--env-kv-suffix: a sliding-window model cannot keep a conversation's KV cache; drop the "
                         "flag (every turn then re-prefills the conversation)")
    return EpisodeBudget(max_turns=cfg.env_max_turns, max_tokens=cfg.env_max_tokens), seq_len


def with_tokenizer_ids(stage_config, tok, stage: str):
    """`stage_config` with its `sampling` eos/pad ids set to the tokenizer's (the RL stages sample with them),
    except an id the user set (one other than `SamplingConfig`'s default): that one is kept, and said."""
    from rlhf_jax.generation import SamplingConfig

    s, default = stage_config.sampling, SamplingConfig()
    eos = s.eos_id if s.eos_id not in (default.eos_id, tok.eos_id) else tok.eos_id
    pad = s.pad_id if s.pad_id not in (default.pad_id, tok.pad_id) else tok.pad_id
    for name, ours, theirs in (("eos-id", eos, tok.eos_id), ("pad-id", pad, tok.pad_id)):
        if ours != theirs:
            notice(f"[{stage}] --{stage}.sampling.{name} {ours} as given, not the tokenizer's {theirs}")
    if (eos, pad) == (s.eos_id, s.pad_id):
        return stage_config
    return dataclasses.replace(stage_config, sampling=dataclasses.replace(s, eos_id=eos, pad_id=pad))


# ----------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """The evaluation-set options of the commands that score one during training (SFT, reward, DPO, KTO)."""

    eval_data: str | None = None
    """Records to evaluate during training, in the training data's layout (TRL's eval_dataset): their metrics as
    eval_<name> in <out>/<stage>/eval.jsonl and the report. None: no evaluation."""
    eval_every: int = 0
    """Steps between evaluations of --eval-data (TRL's eval_steps); 0: only at the end."""


class EvalHook(StageHooks):
    """An evaluation set scored during training (TRL's eval_dataset / eval_steps): every `every` steps (0: only at
    the end) and at the last step, `evaluate(params, batch) -> metrics` over one pass of `make_batches()`, the
    batch means averaged, written as TRL's `eval_<metric>` to `<out>/<stage>/eval.jsonl` and printed."""

    def __init__(self, evaluate: Callable, make_batches: Callable, *, every: int, last_step: int, path: str,
                 stage: str, params_of: Callable = lambda state: state.params, args: tuple = ()):
        self.evaluate, self.make_batches, self.every, self.last_step = evaluate, make_batches, every, last_step
        self.path, self.stage, self.params_of, self.args, self.last = path, stage, params_of, args, None
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def on_state(self, step, state):
        if step == self.last_step or (self.every and step % self.every == 0):
            self.last = self.run(step, state)

    def run(self, step: int, state) -> dict:
        sums, batches = {}, 0
        params = self.params_of(state)
        for batch in self.make_batches():
            for k, v in jax.device_get(self.evaluate(params, batch, *self.args)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            batches += 1
        metrics = {f"eval_{k}": v / max(batches, 1) for k, v in sums.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy",
                                                                             "eval_rewards/accuracies"))
        print(f"[{self.stage}] step {step} eval: {shown or 'no batches'}", file=sys.stderr)
        return metrics


def eval_hook(stage: str, eval_data: str | None, every: int, evaluate: Callable, *, kind: str, spec: DataSpec,
              tok, out: str, last_step: int, lora: LoraConfig | None = None, base=None, args: tuple = ()) -> list:
    """[EvalHook] for `--eval-data FILE` (records of the stage's `kind`, batched as the training data), or [] when
    no file is given; `evaluate(params, batch, *args)` is jitted once (`args`, e.g. the reference params, are its
    traced arguments). With `lora` the adapters are merged into `base` for it. A bad file is a setup error
    (DataError) before any training."""
    if eval_data is None:
        if every:
            raise ValueError("--eval-every needs --eval-data FILE (the records to evaluate)")
        return []
    from rlhf_jax.data import Batches, ShuffledIterator, load_records, unpair

    records = load_records(eval_data, spec.kind or kind, skip_invalid=spec.skip_invalid)
    if kind == "unpaired" and (spec.kind or kind) == "preference":
        records = unpair(records)
    batch_kind = "sft" if kind in ("sft", "oasst") else kind
    make = lambda: Batches(ShuffledIterator(records, seed=0, num_epochs=1), tok, kind=batch_kind,  # noqa: E731
                           batch_size=spec.batch_size, buckets=(spec.seq_len,), pack=spec.pack and batch_kind == "sft")
    params_of = (lambda state: state.params) if lora is None else (
        lambda state: lora_params(base, state.params, lora))
    return [EvalHook(jax.jit(evaluate), make, every=every, last_step=last_step, stage=stage, params_of=params_of,
                     path=os.path.join(out, stage, "eval.jsonl"), args=args)]


def eval_summary(hooks: list) -> dict:
    """The last evaluation's metrics of `eval_hook`'s hooks (for the report), {} without one."""
    return dict(hooks[0].last or {}) if hooks else {}


# ------------------------------------------------------------------------------------ real checkpoints
TRL_LEARNING_RATES = {"sft": 2e-5, "reward": 1e-4, "dpo": 1e-6, "kto": 1e-6, "online_dpo": 5e-7, "grpo": 1e-6,
                      "ppo": 3e-6, "distill": 2e-5}
"""TRL's default learning rate of each trainer (SFTConfig, RewardConfig, DPOConfig, ...). The commands' own
defaults suit the tiny models they train from scratch (1e-3 and up), and would wreck a pretrained checkpoint."""


def _config_file_sets(argv: list[str], keys: tuple[str, ...]) -> bool:
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return False
    try:
        with open(argv[argv.index("--config") + 1]) as f:
            node = json.load(f)
    except (OSError, ValueError):
        return False   # parse_cli has already reported a bad file
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


TRL_ROLLOUT_LENGTHS = {"grpo": 256, "online_dpo": 64, "ppo": 53}
"""TRL's default number of sampled tokens of each RL trainer (GRPOConfig.max_completion_length,
OnlineDPOConfig.max_new_tokens, PPOConfig.response_length); prompts get TRL's max_prompt_length, 512, both cut to
fit the checkpoint's max_position_embeddings."""


def _hf_defaults(stage: str, base: str) -> dict:
    """{option path: TRL's default} of `stage` for a checkpoint whose Hugging Face folder is `base`."""
    out = {f"{stage}.optim.learning_rate": TRL_LEARNING_RATES[stage]}
    if stage == "ppo":      # TRL's PPO trains the value model with the policy's optimizer settings
        out["ppo.value_optim.learning_rate"] = TRL_LEARNING_RATES[stage]
    if stage in TRL_ROLLOUT_LENGTHS:
        try:
            with open(os.path.join(base, "config.json")) as f:
                limit = int(json.load(f).get("max_position_embeddings") or 0)
        except (OSError, ValueError, TypeError):
            limit = 0
        prompt, new = 512, TRL_ROLLOUT_LENGTHS[stage]
        if limit and prompt + new > limit:     # a small checkpoint: keep TRL's ratio of prompt to answer
            new = max(1, limit * new // (prompt + new))
            prompt = limit - new
        out.update({"data.seq_len": prompt, f"{stage}.sampling.max_new_tokens": new})
    return out


def checkpoint_defaults(cfg, argv, stage: str):
    """`cfg` with TRL's defaults of the stage when `--init` is a Hugging Face checkpoint (or a run that started
    from one) and neither the command line nor --config sets them: the learning rate (`TRL_LEARNING_RATES`) and,
    for the RL stages, the prompt and answer lengths (`TRL_ROLLOUT_LENGTHS`). A console line says what changed.
    Otherwise `cfg` itself: the commands' own defaults suit the tiny models they train from scratch."""
    base = hf_base(getattr(cfg, "init", None))
    if base is None:
        return cfg
    argv = list(sys.argv[1:] if argv is None else argv)
    changed = []
    for path, value in _hf_defaults(stage, base).items():
        flag = "--" + path.replace("_", "-")
        given = any(a == flag or a.startswith(flag + "=") for a in argv) or _config_file_sets(
            argv, tuple(path.split(".")))
        if given or get_option(cfg, path) == value:
            continue
        changed.append(f"{flag} {value:g} (was {get_option(cfg, path):g})")
        cfg = with_options(cfg, {path: value})
    if changed:
        notice(f"[{stage}] --init {cfg.init} is a Hugging Face checkpoint: TRL's defaults for this trainer, "
               f"{', '.join(changed)}; pass a flag to choose")
    return cfg


def load_function(spec: str, flag: str) -> Callable:
    """`MODULE:FUNCTION` (an importable module) or `FILE.py:FUNCTION` -> the function; a ValueError naming
    `flag` when it cannot be found."""
    fn = load_object(spec, f"{flag} {spec}", "MODULE:FUNCTION or FILE.py:FUNCTION")
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {spec.rpartition(':')[0]} has no function {spec.rpartition(':')[2]}")
    return fn


class RewardFunctionError(ValueError):
    """A user's reward function returned something other than one finite float per completion (mid-run: the
    commands print it as one line and exit 1, the checkpoints so far kept)."""


def prompt_table(records, tok, seq_len: int, source: str) -> dict:
    """{prompt text as the RL stages decode it (`rlhf_jax.train.rl.decode_ids`): its record} for prompt records, so
    that a reward function gets each sampled prompt's record back (its text as written and its other fields).
    A setup error when a prompt with its chat template is longer than `seq_len` (the stage would cut it from the
    front: another prompt, whose record could not be found) or when two records of one text disagree."""
    from rlhf_jax.tokenizer import encode_prompt
    from rlhf_jax.train.rl import decode_ids

    table, too_long = {}, []
    for i, r in enumerate(records):
        ids = encode_prompt(tok, list(r.messages))
        if len(ids) > seq_len:
            too_long.append((len(ids), i + 1))
            continue
        key = decode_ids(tok, ids)
        if key in table and table[key].meta != r.meta:
            raise ValueError(f"{source}: record {i + 1} repeats the prompt of an earlier record with other fields "
                             f"({sorted(r.meta)}); a reward function could not tell them apart: drop one")
        table[key] = r
    if too_long:
        n, i = max(too_long)
        raise ValueError(f"{source}: {len(too_long)} of {len(records)} prompts are longer than --data.seq-len {seq_len} "
                         f"(the longest, record {i}, is {n} tokens with the chat template); raise --data.seq-len to "
                         f"{n} or more, or leave the long prompts out")
    return table


def prompt_text(record):
    """A prompt as its record wrote it (TRL passes it so to reward functions): a single user message's text, else
    the list of messages (the conversational layout)."""
    messages = list(record.messages)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def user_reward(spec: str, flag: str, *, table: dict | None = None) -> Callable:
    """A user's reward function from `MODULE:FUNCTION` as a host reward function of the stage's (prompt,
    completion) texts. It is called by keyword as TRL calls its reward_funcs: `prompts=` (with a `prompt_table`,
    each prompt as its record wrote it, `prompt_text`; else the decoded prompt with its chat template),
    `completions=` (texts), and each other field of the records as a list (e.g. `answer=`) when the function takes
    that name or **kwargs. Checked on every call: a wrong count or a non-finite score is a `RewardFunctionError`
    naming the function, never a silent broadcast."""
    import inspect

    fn = load_function(spec, flag)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):    # a builtin or C function: no signature to read
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def reward(prompts, completions):
        columns = {}
        if table is not None:
            rows = [table[p] for p in prompts]
            prompts = [prompt_text(r) for r in rows]
            names = sorted({k for r in rows for k in r.meta} - {"prompts", "completions"})
            columns = {k: [r.meta.get(k) for r in rows] for k in names if takes_all or k in params}
        out = fn(prompts=list(prompts), completions=list(completions), **columns)   # its own errors: its traceback
        try:
            scores = np.asarray(out, np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"{flag} {spec}: returned {type(out).__name__}, not numbers ({e}); it must "
                                      "return one float per completion") from None
        if scores.shape[0] != len(completions) or not np.all(np.isfinite(scores)):
            raise RewardFunctionError(
                f"{flag} {spec}: returned {scores.shape[0]} scores for {len(completions)} completions"
                f"{'' if np.all(np.isfinite(scores)) else ' (some not finite)'}; it must return one finite float "
                "per completion")
        return scores

    return reward


# ------------------------------------------------------------------------------------------------ the run
_NOTICES: list[str] = []


def notice(line: str) -> None:
    """A line about a default the command chose for the user, printed when the run starts (`run_stage`), so that
    a setup error stays the only line of a run that never starts."""
    _NOTICES.append(line)


def print_notices() -> None:
    """Print (to stderr) and forget the pending `notice` lines; write the config.json `start_run` checked."""
    while _NOTICES:
        print(_NOTICES.pop(0), file=sys.stderr)
    while _PENDING_CONFIG:
        config, path = _PENDING_CONFIG.pop()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_config(config, path)


def setup_error(e: Exception) -> int:
    """Print a setup problem (bad data file, incompatible options) as one line and return exit status 2."""
    _NOTICES.clear()
    _PENDING_CONFIG.clear()
    print(f"error: {e}", file=sys.stderr)
    return 2


STOPPED = 143
"""Exit status of a command that a signal stopped before its last step (128 + SIGTERM, as a shell reports a
killed job): `cmd1 && cmd2` and schedulers then see an unfinished run as failed. `--resume` continues it."""

RESUME_MAY_CHANGE = ("resume", "checkpoint.progress", "checkpoint.tensorboard", "checkpoint.wandb_project")
RESUME_MAY_CHANGE_LEAVES = ("num_steps", "log_every")
"""Fields of any stage config that --resume may change: train longer (or stop sooner), log more or less often."""
"""Settings that `--resume` may change (besides a stage's `num_steps`: train longer, or stop sooner)."""


def config_changes(first: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs as saved in config.json, except those `--resume`
    may change: RESUME_MAY_CHANGE and a stage's `num_steps`."""
    changed = []
    for key in sorted(set(first) | set(now)):
        name, a, b = prefix + key, first.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, name + ".")
        elif a != b and name not in RESUME_MAY_CHANGE and not (
                key in RESUME_MAY_CHANGE_LEAVES and isinstance(a, int) and isinstance(b, int)):
            changed.append(f"{name} ({a!r} -> {b!r})")
    return changed


_PENDING_CONFIG: list = []


def start_run(config: Any, out: str) -> str:
    """Check that a run can start in `out`; config.json is written there when it does start (`run_stage`), so that
    a refused or failed setup leaves `out` as it was. With `config.resume`, the run in `out` must exist and have
    been made with the same settings (`config_changes`); an allowed resume (another num_steps) records the new
    settings. Without it, an `out` holding checkpoints is refused."""
    path = os.path.join(out, "config.json")
    checkpoints = os.path.join(out, "checkpoints")
    if not getattr(config, "resume", False) and os.path.isdir(checkpoints) and any(
            os.listdir(os.path.join(checkpoints, d)) for d in os.listdir(checkpoints)
            if os.path.isdir(os.path.join(checkpoints, d))):
        raise ValueError(f"{checkpoints} already holds checkpoints; pass --resume with the same flags to continue "
                         f"that run (or --config {path} --resume), or choose another --out")
    checkpoint = getattr(config, "checkpoint", None)
    if getattr(checkpoint, "wandb_project", None) is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--checkpoint.wandb-project needs the wandb package (pip install wandb); it is optional: "
                             "drop the flag to log to metrics.jsonl and TensorBoard only")
    if getattr(config, "resume", False):
        if not os.path.isfile(path):
            raise ValueError(f"--resume: {out} holds no run to continue (no config.json there); drop --resume to "
                             "start one, or pass the --out of the run to continue")
        with open(path) as f:
            first = json.load(f)
        changed = config_changes(first, json.loads(json.dumps(to_dict(config), default=str)))
        if changed:
            raise ValueError(f"--resume with settings that differ from the run in {path}: {'; '.join(changed)}. "
                             "Pass the same flags (only num-steps may change), or start a new --out")
    _PENDING_CONFIG[:] = [(config, path)]
    return out


def run_stage(stage: str, stage_fn: Callable, state: Any, data: Any, stage_config: Any, *, out: str,
              resume: bool, checkpoint: CheckpointSpec, tokens_per_step: int | None = None,
              samples_per_step: int | None = None, metadata: dict | None = None, extra_hooks=()):
    """Run `stage_fn(state, data, stage_config, hooks=...)` with JSONL/TensorBoard/progress hooks (and
    `extra_hooks`), checkpoints every `checkpoint.save_every` steps and on SIGTERM/SIGINT, resuming from the last
    checkpoint (state and data position) if `resume`.

    Returns `(state, history, finished)`; `finished` is False when a signal stopped the run early.
    """
    print_notices()
    manager = ckpt.make_checkpoint_manager(ckpt.stage_checkpoint_dir(out, stage),
                                           max_to_keep=checkpoint.max_to_keep)
    start = 0
    if resume:
        state, extra = ckpt.restore_or_init(manager, state, data)
        if extra is not None:
            start = int(extra["step"])
            log.warning("resuming %s from step %d (%s)", stage, start, ckpt.stage_checkpoint_dir(out, stage))
    elif manager.latest_step() is not None:
        raise SystemExit(f"error: {ckpt.stage_checkpoint_dir(out, stage)} already holds checkpoints; pass --resume "
                         "to continue that run or choose another --out")
    # The logs keep what the restored state has seen: steps logged after its checkpoint are replayed.
    for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
        truncate_jsonl(os.path.join(out, stage, name), start)
    remaining = max(0, stage_config.num_steps - start)
    with ckpt.GracefulExit() as exit_flag:
        ck_hook = ckpt.CheckpointHook(manager, save_every=checkpoint.save_every, data=data, exit=exit_flag,
                                      metadata={"stage": stage, **(metadata or {})})
        hooks = make_stage_hooks(out, stage, total_steps=stage_config.num_steps, initial_step=start,
                                 tokens_per_step=tokens_per_step, samples_per_step=samples_per_step,
                                 tensorboard=checkpoint.tensorboard, progress=checkpoint.progress,
                                 extra=[*extra_hooks, ck_hook], wandb_project=checkpoint.wandb_project,
                                 run_config=_saved_config(out))
        try:
            state, history = stage_fn(state, data, dataclasses.replace(stage_config, num_steps=remaining),
                                      hooks=hooks)
        finally:
            hooks.close()
    finished = not exit_flag.requested
    if not finished:
        print(f"stopped by signal after step {ck_hook.last_saved}; continue with the same command plus --resume "
              f"(or: --config {os.path.join(out, 'config.json')} --resume)",
              file=sys.stderr)
    return state, history, finished


def batch_stats(data) -> dict | None:
    """The tokenising counters of a `Batches` stream (also inside `ProcessRows`): examples, truncated, tokens cut."""
    for obj in (data, getattr(data, "batches", None)):
        stats = getattr(obj, "stats", None)
        if isinstance(stats, dict) and "truncated" in stats:
            return stats
    return None


def truncation_line(stage: str, stats: dict) -> str | None:
    """One console line when examples were cut to fit --data.seq-len (None when none was)."""
    if not stats.get("truncated"):
        return None
    return (f"[{stage}] {stats['truncated']} of {stats['examples']} examples were longer than --data.seq-len and "
            f"cut ({stats['prompt_tokens_cut']} prompt tokens from the front, {stats['response_tokens_cut']} response "
            "tokens from the end); raise --data.seq-len to keep them")


def _saved_config(out: str) -> dict | None:
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finish_report(out: str, stage: str, history: list[dict], *, keys: tuple[str, ...] = ("loss",),
                  summary: dict | None = None, data=None) -> None:
    """report.json / report.md with the final metrics, and a PNG of the `keys` curves from metrics.jsonl; with
    `data` (the stage's batch stream) its truncation counts too, and a console line when examples were cut."""
    stats = batch_stats(data) if data is not None else None
    if stats is not None:
        summary = {**(summary or {}), **{f"data/{k}": stats[k] for k in
                                         ("examples", "truncated", "prompt_tokens_cut", "response_tokens_cut")}}
        line = truncation_line(stage, stats)
        if line:
            print(line, file=sys.stderr)
    jsonl = os.path.join(out, stage, "metrics.jsonl")
    records = read_jsonl(jsonl) if os.path.exists(jsonl) else []
    images = []
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    if present:
        images.append(plot_curves({stage: jsonl}, present, os.path.join(out, f"{stage}_curves.png")))
    last = records[-1] if records else {}
    table = [{k: v for k, v in r.items() if k != "time"} for r in records[-10:]]
    write_report(out, {"stage": stage, "steps": last.get("step", 0), **(summary or {}),
                       **{f"final/{k}": v for k, v in last.items() if k not in ("step", "time")}},
                 {"last logged steps": table}, title=f"{stage} run", images=[os.path.basename(p) for p in images])
    finals = ", ".join(f"{k} {last[k]:.4g}" for k in keys if isinstance(last.get(k), (int, float)))
    print(f"[{stage}] {last.get('step', 0)} steps{'; ' + finals if finals else ''}; run directory {out} "
          f"(report.md, {stage}/metrics.jsonl{', ' + stage + '/final' if (summary or {}).get('finished') else ''})",
          file=sys.stderr)
