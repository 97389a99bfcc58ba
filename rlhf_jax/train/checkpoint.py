"""Checkpoints, graceful exit on SIGTERM/SIGINT, and exact resume.

A checkpoint is one orbax step directory `run_dir/checkpoints/<stage>/<step>/` with two items:

* `state`: the stage's pytree state (any `flax.struct.dataclass`: params, optimizer state, step, rng, ...), written
  with `StandardSave` and read back with `StandardRestore` against an abstract target built from a state template,
  so dataclasses, optax namedtuples and typed PRNG keys come back with their structure.
* `extra`: a JSON dict with the host-side position: `{"step": int, "data": iterator.state(), "metadata": {...}}`.

Saves are asynchronous (the step loop continues while the arrays are written) and keep the newest `max_to_keep`.
Only finite states are written: a state with a NaN/Inf leaf is refused, so the latest checkpoint is always usable.

Resume = restore the latest state and call `iterator.restore(extra["data"])`; because the rng lives in the state
and the data order is a function of the iterator position, the continued run repeats an uninterrupted run exactly.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.train.logging import StageHooks

log = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax manager over `directory` (created if missing) keeping the newest `max_to_keep` steps."""
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def stage_checkpoint_dir(run_dir: str | os.PathLike, stage: str) -> str:
    """`run_dir/checkpoints/<stage>`: one manager (and one step numbering) per stage."""
    return os.path.join(os.fspath(run_dir), "checkpoints", stage)


def is_finite(tree: Any) -> bool:
    """True when every floating-point leaf of `tree` is free of NaN and Inf (integer/key leaves are skipped)."""
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        if jax.dtypes.issubdtype(dtype, np.inexact) and not bool(np.all(np.isfinite(np.asarray(leaf)))):
            return False
    return True


def save(manager: ocp.CheckpointManager, step: int, state: Any, extra: dict | None = None) -> bool:
    """Start an async save of `state` and the JSON-serialisable `extra` at `step`; False if refused.

    Refuses (with a warning) a state holding NaN/Inf and a step that is already saved.
    """
    step = int(step)
    if not is_finite(state):
        log.warning("checkpoint at step %d not written: the state holds NaN or Inf", step)
        return False
    if step in manager.all_steps():
        return False
    payload = {"step": step, "time": time.time(), **(extra or {})}
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(payload)})
    return bool(manager.save(step, args=args, force=True))


def abstract_state(state_template: Any) -> Any:
    """`jax.ShapeDtypeStruct` tree (with shardings) describing `state_template`: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)


def restore(manager: ocp.CheckpointManager, step: int, state_template: Any) -> tuple[Any, dict]:
    """Read checkpoint `step` into the structure, dtypes and shardings of `state_template`."""
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state(state_template)),
                                 _EXTRA: ocp.args.JsonRestore()})
    restored = manager.restore(int(step), args=args)
    return restored[_STATE], dict(restored[_EXTRA])


def restore_latest(manager: ocp.CheckpointManager, state_template: Any) -> tuple[Any, dict] | None:
    """`(state, extra)` from the newest checkpoint, or None when the directory holds none."""
    manager.wait_until_finished()
    step = manager.latest_step()
    if step is None:
        return None
    return restore(manager, step, state_template)


def restore_or_init(manager: ocp.CheckpointManager, state: Any, data: Any = None) -> tuple[Any, dict | None]:
    """Resume: the latest checkpoint's state (and `data.restore(position)`) if there is one, else `state`.

    Returns `(state, extra)` with `extra` None on a fresh start. `state` is also the restore template.
    """
    found = restore_latest(manager, state)
    if found is None:
        return state, None
    restored, extra = found
    if data is not None and extra.get("data") is not None:
        if not hasattr(data, "restore"):
            raise TypeError(f"cannot resume the data position: {type(data).__name__} has no restore() method")
        data.restore(extra["data"])
    return restored, extra


def wait(manager: ocp.CheckpointManager) -> None:
    """Block until pending async saves are on disk (call before exit and before reading checkpoints)."""
    manager.wait_until_finished()


def save_params(path: str | os.PathLike, params: Any, *, model_config: Any = None) -> str:
    """Write final params as `path/params/` (orbax, a plain nested dict) and `path/model_config.json`.

    The folder is what `load_params` (and the experiments' `--reward-init` / `--model.init`)
    read back; `rlhf_jax.models.save_pretrained` is the Hugging Face alternative. Sharded `jax.Array` params are
    written shard by shard without a gather to one host, so on several hosts every process calls this with the
    same `path` (a shared file system) and its own shards; process 0 writes the config.
    """
    import dataclasses
    import json

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
    if model_config is not None and jax.process_index() == 0:
        with open(os.path.join(path, "model_config.json"), "w") as f:
            json.dump(dataclasses.asdict(model_config), f, indent=2)
    return path


def load_params(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None) -> tuple[Any, Any]:
    """`(model_config, params)` from a `save_params` folder or a Hugging Face folder (config.json + safetensors).

    model_config is None for a `save_params` folder written without one. A `save_params` folder loads on any
    device topology, whatever the one that wrote it (e.g. FSDP-sharded over several hosts): every array is
    restored onto `sharding` (default: the first local device); reshard afterwards with `rlhf_jax.sharding`.
    """
    import json

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "params")):
        from rlhf_jax.models.hf import CheckpointError, _read_json

        config = None
        cfg_path = os.path.join(path, "model_config.json")
        if os.path.exists(cfg_path):
            from rlhf_jax.models.config import ModelConfig

            try:
                config = ModelConfig(**_read_json(cfg_path))
            except TypeError as e:
                raise CheckpointError(f"{cfg_path}: not a ModelConfig ({e})") from None
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            with ocp.StandardCheckpointer() as ckptr:
                meta = ckptr.metadata(os.path.join(path, "params"))
                tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
                                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
                params = ckptr.restore(os.path.join(path, "params"), target)
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types for a damaged folder)
            first = (str(e).strip().splitlines() or [""])[0].split(" See full")[0][:200]
            raise CheckpointError(f"{path}/params: cannot be restored ({type(e).__name__}: {first}); the folder "
                                  "is incomplete or damaged: copy it again or re-run the stage that wrote it") from None
        return config, params
    if os.path.exists(os.path.join(path, "config.json")):
        from rlhf_jax.models import load_pretrained

        return load_pretrained(path)
    raise FileNotFoundError(f"{path}: neither a save_params folder (params/ + model_config.json) nor a Hugging "
                            "Face folder (config.json + *.safetensors)")


class GracefulExit:
    """Context manager turning SIGTERM/SIGINT into a flag that training loops poll.

    Inside the context the first signal sets `requested` (and `signum`); the loop finishes its current step, saves,
    and returns. A second SIGINT raises KeyboardInterrupt (an impatient Ctrl-C still works). Previous handlers are
    restored on exit. Outside the main thread signals cannot be caught, so the context only provides the flag.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.warning("received %s: stopping after the current step and saving a checkpoint",
                    signal.Signals(signum).name)

    def request(self) -> None:
        """Ask for a stop without a signal (tests, notebooks)."""
        self.requested = True

    def __enter__(self) -> "GracefulExit":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class CheckpointHook(StageHooks):
    """Hook saving every `save_every` steps, on a stop request, and at the end.

    Implements the stage hooks protocol (`on_step(step, metrics)`, `should_stop()`) plus `on_state(step, state)`,
    which the stage loop calls after each step with the new state (the only moment the state is visible), and
    `finalize(step, state)` for the final save. `data` is the batch iterator (anything with `.state() -> dict`);
    its position is stored with the state so that resume continues the data stream where it stopped.
    """

    def __init__(self, manager: ocp.CheckpointManager, *, save_every: int = 0, data: Any = None,
                 exit: GracefulExit | None = None, metadata: dict | None = None,
                 stop_at: Callable[[int], bool] | None = None):
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at stop/end), got {save_every}")
        self.manager, self.save_every, self.data = manager, save_every, data
        self.exit = exit if exit is not None else GracefulExit(signals=())
        self.metadata = dict(metadata or {})
        self.stop_at = stop_at
        self.last_saved: int | None = None
        self._last_metrics: dict = {}

    def on_step(self, step: int, metrics: dict) -> None:
        self._last_metrics = dict(metrics)
        if self.stop_at is not None and self.stop_at(int(step)):
            self.exit.request()

    def should_stop(self) -> bool:
        return self.exit.requested

    def extra(self, step: int) -> dict:
        data_state = self.data.state() if self.data is not None and hasattr(self.data, "state") else None
        return {"data": data_state, "metadata": self.metadata, "metrics": _jsonable(self._last_metrics)}

    def on_state(self, step: int, state: Any) -> None:
        step = int(step)
        due = self.save_every > 0 and step % self.save_every == 0
        if due or self.exit.requested:
            if save(self.manager, step, state, self.extra(step)):
                self.last_saved = step

    def finalize(self, step: int, state: Any) -> None:
        """Save the final state (if not already saved) and wait for all writes."""
        if self.last_saved != int(step) and save(self.manager, step, state, self.extra(step)):
            self.last_saved = int(step)
        wait(self.manager)

    def close(self) -> None:
        wait(self.manager)


def _jsonable(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        out[k] = v if np.isfinite(v) else None
    return out
