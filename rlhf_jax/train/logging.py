"""Metrics logging as stage hooks: JSONL, TensorBoard, tqdm progress, and a composite.

Every hook implements the stage hooks protocol: `on_step(step, metrics)` with `metrics` a flat dict of host floats,
`should_stop() -> bool`, plus `close()`. Stages call them after each step; `Hooks([...])` fans out to several.

Layout (per stage): `run_dir/<stage>/metrics.jsonl` (one JSON object per logged step, always with "step" and
"time" = seconds since the hook was created) and `run_dir/<stage>/tb/` (TensorBoard events, tag = metric name).
Metric names are the ones the losses return ("loss", "accuracy", "rewards_margin", "approx_kl", ...) prefixed by
nothing; evaluation metrics conventionally start with "eval/".
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm


def _floats(metrics: dict) -> dict[str, float | None]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = f if math.isfinite(f) else None  # JSON has no NaN; null marks a non-finite value
    return out


class StageHooks:
    """What a stage loop calls, each a no-op here: subclass and override what a hook needs.

    `on_step(step, metrics)` every log period with the window's mean metrics; `should_stop()` before each step;
    `on_state(step, state)` after every step (the only moment the state is visible: a checkpoint hook saves
    there); `on_samples(step, rows)` with a table of sampled completions (dicts of prompt, completion, reward,
    ...) where a stage logs one; `finalize(step, state)` once at the end; `close()` when the run is over.
    """

    def on_step(self, step: int, metrics: dict) -> None:
        pass

    def on_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_state(self, step: int, state: Any) -> None:
        pass

    def finalize(self, step: int, state: Any) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlHook(StageHooks):
    """Append `{"step", "time", **metrics}` to `path` every `every` steps (line-buffered, flushed each write);
    "time" counts seconds of the run, continued from the file's last line when it appends to one."""

    def __init__(self, path: str | os.PathLike, *, every: int = 1, append: bool = True):
        if every < 1:
            raise ValueError(f"JsonlHook: every must be >= 1, got {every}")
        self.path, self.every = os.fspath(path), every
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # Appending to a run's log (a resumed run): its clock goes on from the last logged time.
        last = read_jsonl(self.path)[-1:] if append and os.path.exists(self.path) else []
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        self._t0 = time.time() - float(last[0].get("time", 0.0)) if last else time.time()

    def on_step(self, step: int, metrics: dict) -> None:
        if int(step) % self.every:
            return
        record = {"step": int(step), "time": round(time.time() - self._t0, 6), **_floats(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_samples(self, step: int, rows: list[dict]) -> None:
        """Append `{"step", **row}` per row to completions.jsonl beside the metrics file."""
        path = os.path.join(os.path.dirname(self.path), "completions.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": int(step), **row}) + "\n")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class WandbHook(StageHooks):
    """Weights & Biases logging, optional (`wandb` is imported here only): each logged window's metrics as
    `<stage>/<metric>` at its step, and the sampled-completions tables of the RL stages."""

    def __init__(self, project: str, *, stage: str, name: str | None = None, config: dict | None = None):
        import wandb

        self._wandb, self.stage = wandb, stage
        self._run = wandb.init(project=project, name=name, config=config)

    def on_step(self, step: int, metrics: dict) -> None:
        self._run.log({f"{self.stage}/{k}": v for k, v in _floats(metrics).items()}, step=int(step))

    def on_samples(self, step: int, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            self._run.log({f"{self.stage}/completions": table}, step=int(step))

    def close(self) -> None:
        self._run.finish()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (blank lines skipped). After a resume, later lines win for a step."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Drop the lines of a metrics/completions JSONL file whose "step" is past `last_step` (a resumed run replays
    those steps from its checkpoint, so they would otherwise appear twice); -> lines dropped. No file: 0."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return len(lines) - len(kept)


class TensorBoardHook(StageHooks):
    """Write each metric as a TensorBoard scalar (tag = metric name) under `logdir`."""

    def __init__(self, logdir: str | os.PathLike, *, every: int = 1):
        from tensorboardX import SummaryWriter  # imported lazily: only this hook needs it

        self.every = max(1, every)
        self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def on_step(self, step: int, metrics: dict) -> None:
        if int(step) % self.every:
            return
        for k, v in _floats(metrics).items():
            if v is not None:
                self._writer.add_scalar(k, v, global_step=int(step))

    def on_samples(self, step: int, rows: list[dict]) -> None:
        """The table as TensorBoard text (a markdown table under the tag "completions")."""
        if not rows:
            return
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
        self._writer.add_text("completions", "\n".join(lines), global_step=int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def _quiet_default() -> bool:
    """Progress bars off when stderr is not a terminal or when running in CI."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class ProgressHook(StageHooks):
    """tqdm bar showing the loss (or `key`) and throughput.

    Throughput is `tokens_per_step` tokens/s when given, else `samples_per_step` samples/s, else steps/s.
    `disable=None` disables the bar when stderr is not a TTY or `CI` is set (no log spam in CI); a disabled bar
    prints one plain line per logged window to stderr instead (`lines=True`, the default), so that a run in a
    log file or a pipe still shows where it is.
    """

    def __init__(self, total: int | None, *, desc: str = "", initial: int = 0, key: str = "loss",
                 tokens_per_step: int | None = None, samples_per_step: int | None = None,
                 disable: bool | None = None, mininterval: float = 0.5, lines: bool = True):
        self.key, self.tokens_per_step, self.samples_per_step = key, tokens_per_step, samples_per_step
        disable = _quiet_default() if disable is None else disable
        self.lines, self.desc, self.total = lines and disable, desc, total
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=disable, mininterval=mininterval,
                        dynamic_ncols=True, unit="step")
        self._last_step, self._last_time = initial, time.perf_counter()
        self.rate: float | None = None

    def on_step(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        steps = int(step) - self._last_step
        if steps > 0:
            per_step = self.tokens_per_step or self.samples_per_step or 1
            self.rate = steps * per_step / max(now - self._last_time, 1e-9)
            self.bar.update(steps)
        self._last_step, self._last_time = int(step), now
        unit = "tok/s" if self.tokens_per_step else "samples/s" if self.samples_per_step else "steps/s"
        post = {}
        if self.key in metrics:
            post[self.key] = f"{float(metrics[self.key]):.4f}"
        if self.rate is not None:
            post[unit] = f"{self.rate:.3g}"
        self.bar.set_postfix(post, refresh=False)
        if self.lines:
            of = f"/{self.total}" if self.total else ""
            print(f"[{self.desc}] step {int(step)}{of} " + " ".join(f"{k} {v}" for k, v in post.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class Hooks(StageHooks):
    """Composite hook: every call goes to every child (each a `StageHooks`); `should_stop` is True when any
    child asks to stop."""

    def __init__(self, hooks: Iterable[Any] = ()):
        self.hooks = [h for h in hooks if h is not None]

    def on_step(self, step: int, metrics: dict) -> None:
        for h in self.hooks:
            h.on_step(step, metrics)

    def on_samples(self, step: int, rows: list[dict]) -> None:
        for h in self.hooks:
            if hasattr(h, "on_samples"):          # hooks written before on_samples existed need not have it
                h.on_samples(step, rows)

    def on_state(self, step: int, state: Any) -> None:
        for h in self.hooks:
            h.on_state(step, state)

    def finalize(self, step: int, state: Any) -> None:
        for h in self.hooks:
            h.finalize(step, state)

    def should_stop(self) -> bool:
        return any(h.should_stop() for h in self.hooks)

    def close(self) -> None:
        for h in self.hooks:
            h.close()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_stage_hooks(run_dir: str | os.PathLike, stage: str, *, total_steps: int | None = None,
                     initial_step: int = 0, tokens_per_step: int | None = None,
                     samples_per_step: int | None = None, log_every: int = 1, tensorboard: bool = True,
                     progress: bool | None = None, extra: Iterable[Any] = (), wandb_project: str | None = None,
                     run_config: dict | None = None) -> Hooks:
    """The standard hooks of one stage: JSONL + TensorBoard under `run_dir/<stage>/`, a progress bar, Weights &
    Biases when `wandb_project` is given (run named after the run directory and stage, `run_config` recorded), and
    `extra` (e.g. a CheckpointHook). `progress=None` follows the TTY/CI rule of `ProgressHook`."""
    stage_dir = os.path.join(os.fspath(run_dir), stage)
    hooks = [JsonlHook(os.path.join(stage_dir, "metrics.jsonl"), every=log_every)]
    if tensorboard:
        hooks.append(TensorBoardHook(os.path.join(stage_dir, "tb"), every=log_every))
    hooks.append(ProgressHook(total_steps, desc=stage, initial=initial_step, tokens_per_step=tokens_per_step,
                              samples_per_step=samples_per_step,
                              disable=None if progress is None else not progress, lines=progress is None))
    if wandb_project is not None:
        name = f"{os.path.basename(os.path.abspath(os.fspath(run_dir)))}/{stage}"
        hooks.append(WandbHook(wandb_project, stage=stage, name=name, config=run_config))
    return Hooks([*hooks, *extra])
