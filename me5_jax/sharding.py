"""The device mesh, the sharding of every parameter, and the sharding of the batch: the only module that
names mesh axes.

Axes (any of them may be size 1):
  data    pure data parallelism: batch rows split, params replicated;
  fsdp    batch rows split too, and params (and Adam moments) split along their hidden dimension (ZeRO-3);
  tensor  Megatron-style model parallelism: attention heads and FFN columns split, batch rows replicated.

Every parameter's sharding comes from `PARAM_RULES`, one short table of (regex on the '/'-joined param
path, PartitionSpec). The same table shards the optimizer state (Adam's moments have the params' paths
under `opt_state/.../mu/`), so params and moments always agree. A dimension that the named mesh axes do
not divide (mE5's 250037-row vocabulary over tensor=2) is replicated along that axis instead of failing.
`compute_shardings` is the same table with `fsdp` removed: what the step constrains the params to right
before the encoder uses them, i.e. the FSDP all-gather, written out.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over these; `tensor` holds a replica of each row

# (regex searched in the param path, spec). Kernels are [in, out] (Dense) or [D, H, K] (DenseGeneral).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"word_embeddings/embedding$", P("tensor", "fsdp")),          # [V, D]: vocab-parallel rows
    (r"(position|token_type)_embeddings/embedding$", P(None, "fsdp")),
    (r"self/(query|key|value)/kernel$", P("fsdp", "tensor", None)),  # [D, H, K]: heads over tensor
    (r"self/(query|key|value)/bias$", P("tensor", None)),            # [H, K]
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),            # [D, F]: column-parallel
    (r"intermediate/dense/bias$", P("tensor")),                      # [F]
    (r"output/dense/kernel$", P("tensor", "fsdp")),                  # [H·K or F, D]: row-parallel
    (r"pooler/dense/kernel$", P("fsdp", "tensor")),
    (r"(LayerNorm/(scale|bias)|dense/bias)$", P()),                  # small vectors: replicated
)


def make_mesh(config: Any, devices: list | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh from `config.mesh`; one size may be -1 (fills the devices).

  Auto axis types, so that jit places the collectives (an embedding lookup on a batch-sharded array fails
  under the Explicit default of `jax.make_mesh`).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {a: int(config.mesh[a]) for a in AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(fill) > 1:
    raise ValueError(f"mesh.{(bad or fill)[0]}={sizes[(bad or fill)[0]]}: mesh sizes must be positive, "
                     "and at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  for a, s in sizes.items():
    if s > 0 and n % s:
      raise ValueError(f"mesh.{a}={s} does not divide the {n} devices")
  known = math.prod(s for s in sizes.values() if s > 0)
  if fill:
    if n % known:
      raise ValueError(f"mesh.{fill[0]}=-1 cannot fill {n} devices with the other axes' product {known}")
    sizes[fill[0]] = n // known
  elif known != n:
    raise ValueError(f"mesh.data*mesh.fsdp*mesh.tensor={known} but there are {n} devices; "
                     "set one of them to -1 to fill")
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch rows are split (data × fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = num_batch_shards(mesh)
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of mesh.data*mesh.fsdp={n}")


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (replicating along them instead)."""
  out = []
  for dim, axes in zip(shape, spec):  # dims past the spec's length stay unsharded
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    out.append(names if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return P(*[a[0] if a and len(a) == 1 else a for a in out])


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of one param (or optimizer-state leaf with a param's path)."""
  if not shape:
    return P()  # scalars: step counters
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, path):
      if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} has rank {len(spec)} but {path} has shape {shape}")
      return _fit(spec, shape, mesh)
  raise ValueError(f"no sharding rule in me5_jax.sharding.PARAM_RULES matches param {path} {shape}")


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of params, optimizer state or a whole TrainState (arrays or shapes)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), np.shape(x), mesh)), tree)


def compute_shardings(tree: Any, mesh: Mesh) -> Any:
  """The params as the encoder consumes them: `fsdp` gathered away, `tensor` kept (explicit FSDP)."""
  def without_fsdp(axes):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != "fsdp")
    return names[0] if len(names) == 1 else (names or None)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, P(*map(without_fsdp, spec_for(path_str(path), np.shape(x), mesh)))),
      tree)


_ROWS_SPLIT_OUTSIDE = contextvars.ContextVar("rows_split_outside", default=False)


@contextlib.contextmanager
def rows_split_by_outer_vmap():
  """While tracing under it, row axes hold one batch shard's rows: an outer `jax.vmap(...,
  spmd_axis_name=BATCH_AXES)` (GradCache's per-shard gradients) already splits the batch over the mesh."""
  token = _ROWS_SPLIT_OUTSIDE.set(True)
  try:
    yield
  finally:
    _ROWS_SPLIT_OUTSIDE.reset(token)


def attention_specs(mesh, num_heads: int) -> tuple[P, P]:
  """shard_map specs of a per-device attention kernel (me5_jax.splash): [B, H, L, K] operands with rows
  over data × fsdp (unless an outer vmap holds that split) and heads over tensor (where it divides them,
  as PARAM_RULES split the q/k/v kernels), and the [B, L] segment ids alike."""
  rows = None if _ROWS_SPLIT_OUTSIDE.get() else BATCH_AXES
  heads = "tensor" if mesh.shape["tensor"] > 1 and num_heads % mesh.shape["tensor"] == 0 else None
  return P(rows, heads, None, None), P(rows, None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (row) axis split over data × fsdp; a pytree prefix for every array of a batch."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local rows (global batch / process_count of them) → global arrays sharded over data × fsdp."""
  sharding, n = batch_sharding(mesh), num_batch_shards(mesh)
  for key, value in batch.items():  # packed batches: packed rows and queries are different counts
    if value.shape[0] * jax.process_count() % n:
      raise ValueError(f"batch array {key} {value.shape}: {value.shape[0]} rows per process do not split "
                       f"over mesh.data*mesh.fsdp={n} shards")
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
