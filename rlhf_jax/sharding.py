"""Scale-out: a (data, fsdp, tensor) device mesh, logical-axis partition rules, sharded jitted steps, multi-host.

Parameters carry logical axis names where the model defines them (`models.param_logical_axes`); `DEFAULT_RULES`
below is the only place that maps those names onto mesh axes. The recipe is the one of GSPMD (Xu et al. 2021)
and of Flax's lm1b / Gemma examples:

- data parallelism: the batch axis B is split over ("data", "fsdp"); params are replicated over "data".
- FSDP / ZeRO-3 (Rajbhandari et al. 2020): the model-width dimension D ("embed") of every weight is split over
  "fsdp", so each device stores 1/fsdp of the params and optimizer state; XLA all-gathers a layer's weights
  before use and reduce-scatters its gradients.
- tensor parallelism (Megatron-LM, Shoeybi et al. 2019): heads N, kv heads K, the MLP hidden width F and the
  vocabulary V are split over "tensor"; use it within a host (fast interconnect).

A dimension is only split if its size divides by the mesh axes' total size; otherwise it is replicated (e.g.
K=2 kv heads on tensor=4, or the prime byte-level vocab 259), so every model runs on every mesh. Every stage
step is compiled once by `jit_sharded` with explicit in/out shardings and donated state (no pmap anywhere).
Multi-host: call `initialize_distributed()` first in every process, build the mesh over all global devices and
feed each process's own rows to `shard_batch` (`jax.make_array_from_process_local_data`).

Shapes: B batch, T time, D model width, F MLP width, N heads, K kv heads, H head dim, V vocab, L layers.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)
"""Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). Names not listed replicate."""


# ------------------------------------------------------------------------------------------------ the mesh
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` for multi-host runs; a no-op for a single process.

    Call it in every process before any other JAX call. With no arguments it initializes only where JAX can find
    its peers on its own (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes) and does nothing on a single
    machine. On CPU, cross-process collectives use gloo.
    """
    if jax.distributed.is_initialized() or num_processes == 1:
        return
    if coordinator_address is None and num_processes is None and not _cluster_detected():
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - option absent in some jax builds
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def _cluster_detected() -> bool:
    """True when `jax.distributed.initialize()` can auto-detect a multi-process cluster."""
    try:
        from jax._src.clusters import ClusterEnv  # private, but the same detection jax.distributed uses
        return any(env.is_env_present() for env in ClusterEnv._cluster_types
                   if env.__name__ not in ("Mpi4pyCluster",))     # mpi4py merely being installed is no cluster
    except Exception:  # pragma: no cover - layout changed: fall back to well-known variables
        import os
        return any(m in os.environ for m in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"))


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all global devices).

    shape: (data, fsdp, tensor); None puts every device on "data"; one entry may be -1 (inferred).
    The product must equal the number of devices. Devices are laid out so that "tensor" (the last axis)
    varies fastest, i.e. stays within a host / NVLink domain.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = (n, 1, 1) if shape is None else tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"make_mesh: shape must be (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known <= 0 or n % known:
            raise ValueError(f"make_mesh: {n} devices do not divide by {known} (shape {shape})")
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n or min(shape) < 1:
        raise ValueError(f"make_mesh: shape {shape} (data, fsdp, tensor) needs {math.prod(shape)} devices but "
                         f"{n} are given; pick a shape whose product is {n}, or use -1 for one axis")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ------------------------------------------------------------------------------------------ partition rules
def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _spec(logical: tuple, shape: tuple | None, mesh: Mesh, rules) -> P:
    """One leaf: logical names -> PartitionSpec, replicating dims that do not divide or reuse a mesh axis."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if mesh.shape[a] > 1)               # size-1 axes add nothing
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or used & set(axes) or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used |= set(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_to_mesh(logical_axes_tree, mesh: Mesh, rules=DEFAULT_RULES, shapes=None):
    """Tree of logical-axis tuples -> tree of `NamedSharding`.

    shapes: an optional matching tree of arrays / `jax.ShapeDtypeStruct`s; when given, a dimension whose size
    does not divide by its mesh axes' size is replicated instead (always pass it for real params).
    """
    leaves, treedef = jax.tree.flatten(logical_axes_tree, is_leaf=_is_axes)
    dims = [None] * len(leaves) if shapes is None else [tuple(np.shape(x)) for x in treedef.flatten_up_to(shapes)]
    return treedef.unflatten([NamedSharding(mesh, _spec(tuple(l), d, mesh, rules)) for l, d in zip(leaves, dims)])


def params_sharding(config, mesh: Mesh, *, scalar_head: bool = False, rules=DEFAULT_RULES):
    """Shardings for `models.init_params(config, rng, scalar_head=...)`, by the rule table."""
    from rlhf_jax.models import init_params, param_logical_axes
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scalar_head=scalar_head))
    return logical_to_mesh(param_logical_axes(config, scalar_head=scalar_head), mesh, rules, shapes)


def shard_params(params, config, mesh: Mesh, *, rules=DEFAULT_RULES):
    """Place a model's params (policy, reference, reward or value model) on the mesh by the rule table."""
    return shard(params, params_sharding(config, mesh, scalar_head="score_head" in params, rules=rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fits(sharding: NamedSharding, leaf) -> bool:
    shape = getattr(leaf, "shape", None)
    if shape is None or len(sharding.spec) > len(shape):
        return False
    for dim, axes in zip(shape, sharding.spec):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        if dim % math.prod(sharding.mesh.shape[a] for a in axes):
            return False
    return True


def state_sharding(state, params_sharding_tree, mesh: Mesh):
    """Shardings for a whole state pytree (e.g. a `TrainState` or its `jax.eval_shape`).

    Every subtree with the structure of `params_sharding_tree` (the params, optax's mu / nu / momentum /
    accumulated gradients, a reference model ...) gets the params' shardings, leaf by leaf where the leaf's shape
    fits (factored statistics such as Adafactor's row/column moments fall back to replicated); every other leaf
    (step, rng, scalars, counts, KL coefficient) is replicated. `params_sharding_tree` may also be a list of
    trees, e.g. [policy_shardings, value_shardings], for states holding several models. The result keeps the
    state's static fields (its optax transformation), so build it from the very state you will pass to the step.
    """
    trees = list(params_sharding_tree) if isinstance(params_sharding_tree, (list, tuple)) else [
        params_sharding_tree]
    defs = [jax.tree.structure(t) for t in trees]
    rep = replicated(mesh)

    def mirrors(x) -> int | None:
        s = jax.tree.structure(x)
        return next((i for i, d in enumerate(defs) if s == d and s.num_leaves > 0), None)

    def assign(x):
        i = mirrors(x)
        if i is None:
            return rep
        return jax.tree.map(lambda sh, leaf: sh if _fits(sh, leaf) else rep, trees[i], x)

    return jax.tree.map(assign, state, is_leaf=lambda x: mirrors(x) is not None)


# ------------------------------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, ...] arrays: B split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch, mesh: Mesh):
    """Host numpy batch -> global `jax.Array`s with B split over ("data", "fsdp").

    Single process: `batch` is the whole global batch. Multi-host: each process passes only its own rows (its
    share of the global batch, in process order) and gets the global array. Leaves that are not arrays (e.g. a
    host-side "meta" list) must be removed first; 0-d arrays are replicated.
    """
    sharding = batch_sharding(mesh)
    n_batch = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        rows = x.shape[0] * jax.process_count()
        if rows % n_batch:
            raise ValueError(f"shard_batch: global batch size {rows} must be divisible by data*fsdp = {n_batch} "
                             f"(mesh {dict(mesh.shape)}); change the batch size or the mesh shape")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def shard(tree, shardings):
    """Place a pytree (params, a state, a reference model) on the mesh: `jax.device_put` with a sharding tree."""
    return jax.device_put(tree, shardings)


# -------------------------------------------------------------------------------------------- jitted steps
def jit_sharded(fn: Callable, mesh: Mesh, state_sharding, batch_sharding, *, donate: bool = True,
                extra_in_shardings: tuple = (), compiler_options: dict | None = None, **options) -> Callable:
    """`jax.jit` a step `fn(state, batch, *extra, **options) -> (state, metrics)` with explicit shardings.

    Returns `step(state, batch, *extra) -> (state, metrics)`. The state keeps `state_sharding` in and out and is
    donated (its buffers are reused: do not read the input state after the call); the batch gets
    `batch_sharding` (one `NamedSharding` applies to every leaf, e.g. `batch_sharding(mesh)`); extra positional
    arrays (e.g. frozen reference params) get `extra_in_shardings` (call with exactly that many extra
    positional arguments; None for an absent one, e.g. reward params under a reward_fn); metrics come back
    replicated. `options` (model_config, loss options) are bound here as compile-time constants: jit with
    in_shardings takes no keyword arguments at call time. `compiler_options` go to XLA unchanged (the tests pass
    {"xla_backend_optimization_level": 0} to compile faster on CPU).
    """
    bound = functools.partial(fn, **options) if options else fn
    return jax.jit(bound, in_shardings=(state_sharding, batch_sharding, *extra_in_shardings),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options)
