"""The contrastive train step: optimizer, TrainState, and `train_step(state, batch) -> (state, metrics)` in
two variants, plain and GradCache, both exact w.r.t. a single-device computation on the global batch.

Cross-device negatives: the step is one jitted program over global arrays (GSPMD). Embeddings come out
of the encoder row-sharded over data × fsdp; `global_loss` then constrains the passages to be
replicated, which is an explicit all-gather (every device holds all B·G passages, each device scores its
own query rows against all of them), and the loss sees the global batch, as `losses.e5_loss` requires.
Its gradient is the transpose of that all-gather (a reduce-scatter XLA inserts), so the gradient scale
and column order are those of the single-device loss by construction; `tests/test_train_step.py`
checks this against `jax.grad` on one device. Params are stored split per `sharding.PARAM_RULES` and
gathered over `fsdp` right before each encoder call (`sharding.compute_shardings`).

Packed batches (`pack_sequences`, data_pipelines.preprocess.Batcher): several texts share a row; the
encoder returns one embedding per (row, slot) and `unpack_slots` picks each query's and passage's out of
the replicated slot list, after which the loss is the same.

Dropout: every token's mask is a hash of (step key, call site, the token's text index in the global
batch, its position in the text) (encoder.Dropout), not of where the row sits in an array, so GradCache's
chunks, the plain step, padded or packed rows, any mesh and any host count draw the same masks (Flax's
own masks depend on the array shape, so they would not give this).

GradCache (Gao et al. 2021): `gradcache.chunk_size` = C queries per batch shard per chunk; a chunk holds C
rows from each of the data × fsdp shards (C·data·fsdp queries and their G passages each), so it stays
sharded over the mesh and per-device activation memory depends on C only. Pass 1 embeds the chunks
without keeping activations; the loss and its gradient w.r.t. the global embeddings are taken on the
gathered batch; pass 2 re-encodes chunk by chunk under `jax.vjp` with those embedding gradients and sums
the param gradients (a `lax.scan`, so one chunk's activations are live at a time), each batch shard
into its own partial sum, reduced once after the loop (`gradcache.reduce_per_chunk` reduces every chunk). Packed batches chunk
their packed rows the same way (C rows per shard; the data pipeline rounds R to a multiple of C·shards).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines import batch as batch_contract
from me5_jax import config as config_lib
from me5_jax import encoder as enc
from me5_jax import losses
from me5_jax import sharding
from me5_jax.variants import EncoderConfig

Batch = dict[str, jax.Array]


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
  lc = config.loss
  return losses.LossConfig(
      temperature=config.temperature, terms=tuple(lc.terms), false_negative_masking=lc.false_negative_masking,
      kd_alpha=lc.kd_alpha, teacher_temperature=lc.teacher_temperature,
      matryoshka_dims=tuple(lc.matryoshka_dims), matryoshka_weights=tuple(lc.matryoshka_weights))


def encoder_config(base: EncoderConfig, config: ml_collections.ConfigDict, platform: str | None = None
                   ) -> EncoderConfig:
  """The variant (or checkpoint) config with the step's precision, remat and attention choices; params stay
  fp32. attention_impl "auto" picks cuDNN's fused kernel on a GPU where it is eligible (half precision,
  head size a multiple of 8 up to 128), the splash kernel on TPU, and XLA elsewhere; attention_dropout -1
  keeps the checkpoint's (while it is > 0, training steps use the explicit softmax with dropout)."""
  impl = config.attention_impl
  if impl == "auto":
    head_size = base.hidden_size // base.num_heads
    eligible = config.dtype == "bfloat16" and head_size % 8 == 0 and head_size <= 128
    platform = platform or jax.default_backend()
    impl = "splash" if platform == "tpu" else "cudnn" if eligible and platform == "gpu" else "xla"
  dropout = base.attention_dropout if config.attention_dropout < 0 else config.attention_dropout
  return base.replace(dtype=config.dtype, remat=config.remat, param_dtype="float32", attention_impl=impl,
                      attention_dropout=dropout)


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """One-line errors naming the key, raised before anything compiles."""
  sharding.check_batch_size(config.batch_size, mesh)
  chunk, per_shard = config.gradcache.chunk_size, config.batch_size // sharding.num_batch_shards(mesh)
  if chunk < 0 or (chunk and per_shard % chunk):
    raise ValueError(f"gradcache.chunk_size={chunk} must be 0 (off) or divide the per-shard batch {per_shard} "
                     f"(batch_size / (mesh.data*mesh.fsdp))")
  if not 0 <= config.warmup_steps <= config.total_steps:
    raise ValueError(f"warmup_steps={config.warmup_steps} must be in [0, total_steps={config.total_steps}]")
  loss_config(config)  # LossConfig validates the loss.* keys


# ---------------------------------------------------------------------------------------------- optimizer

def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then linear decay to 0 at total_steps."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  decay = optax.linear_schedule(config.learning_rate, 0.0, config.total_steps - config.warmup_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def decay_mask(params: Any) -> Any:
  """True where AdamW applies weight decay: not LayerNorm params and not biases (as HF/E5 do)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (sharding.path_str(path).endswith("bias") or "LayerNorm" in sharding.path_str(path)),
      params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                  weight_decay=config.weight_decay, mask=decay_mask))


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def _rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(param init key, dropout stream key): dropout of step s is fold_in(stream, s)."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
  return init_rng, dropout_rng


def _state_fn(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict) -> Callable[[Any], TrainState]:
  tx = make_optimizer(config)
  return lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings of the state, with nothing allocated (AOT compile, checkpoint restore)."""
  shapes = jax.eval_shape(lambda: _state_fn(enc_cfg, config)(enc.init_params(enc_cfg, _rngs(config.seed)[0])))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, sharding.tree_shardings(shapes, mesh))


def init_train_state(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict, mesh: Mesh,
                     params: Any = None) -> TrainState:
  """The state created already sharded: fresh params from `config.seed`, or given (e.g. host) params."""
  shardings = jax.tree.map(lambda s: s.sharding, abstract_train_state(enc_cfg, config, mesh))
  make_state = _state_fn(enc_cfg, config)
  if params is None:
    init = lambda: make_state(enc.init_params(enc_cfg, _rngs(config.seed)[0]))
    return jax.jit(init, out_shardings=shardings)()
  params = jax.device_put(params, shardings.params)
  return jax.jit(make_state, out_shardings=shardings)(params)


# ------------------------------------------------------------------------------------- embeddings, loss

def _text_ids(batch: Batch) -> dict[str, jax.Array]:
  """Each token's text, numbered over the global batch (queries 0..B-1, then passages row-major), which
  keys its dropout mask (encoder.Dropout): the same text gets the same mask in any layout or chunk."""
  b, g = (batch["passage_slots"] if batch_contract.is_packed(batch) else batch["passage_ids"]).shape[:2]
  query_B, passage_BxG = jnp.arange(b), b + jnp.arange(b * g).reshape(b, g)
  if batch_contract.is_packed(batch):
    r, length = batch["packed_ids"].shape
    num_slots = batch_contract.slots_per_row(length)
    text_of_slot = (jnp.zeros(r * num_slots, jnp.int32).at[batch["query_slots"]].set(query_B)
                    .at[batch["passage_slots"]].set(passage_BxG))
    slot_RxL = jnp.arange(r)[:, None] * num_slots + jnp.maximum(batch["packed_segments"] - 1, 0)
    return {"packed_text_ids": text_of_slot[slot_RxL]}
  return {"query_text_ids": jnp.broadcast_to(query_B[:, None], batch["query_ids"].shape),
          "passage_text_ids": jnp.broadcast_to(passage_BxG[..., None], batch["passage_ids"].shape)}


def _gather_weights(params: Any, mesh: Mesh) -> Any:
  # Explicit FSDP: gather the fsdp-split weights before use (the transpose reduce-scatters their grads).
  # Left to itself, GSPMD resharded activations instead, with collective-permutes that inside GradCache's
  # loops were slow and hung XLA:CPU's in-process collectives.
  return jax.lax.with_sharding_constraint(params, sharding.compute_shardings(params, mesh))


def _embed_rows(params: Any, rows: Batch, dropout_rng: jax.Array | None, cfg: EncoderConfig, mesh: Mesh
                ) -> tuple[jax.Array, jax.Array]:
  """(q_BxD, p_BxGxD) of some padded rows (the batch's token and text-id arrays)."""
  b, g, lp = rows["passage_ids"].shape
  params = _gather_weights(params, mesh)
  q_BxD = enc.embed(params, rows["query_ids"], rows["query_mask"], cfg, dropout_rng, rows["query_text_ids"],
                    right_padded=True)
  flat = lambda x: x.reshape(b * g, lp)  # noqa: E731
  p_NxD = enc.embed(params, flat(rows["passage_ids"]), flat(rows["passage_mask"]), cfg, dropout_rng,
                    flat(rows["passage_text_ids"]), right_padded=True)
  return q_BxD, p_NxD.reshape(b, g, -1)


def _embed_packed_rows(params: Any, rows: Batch, dropout_rng: jax.Array | None, cfg: EncoderConfig, mesh: Mesh
                       ) -> jax.Array:
  """emb_RxSxD of some packed rows."""
  ids_RxL = rows["packed_ids"]
  return enc.embed_packed(_gather_weights(params, mesh), ids_RxL, rows["packed_segments"],
                          batch_contract.slots_per_row(ids_RxL.shape[1]), cfg, dropout_rng, rows["packed_text_ids"])


def global_loss(q_BxD, p_BxGxD, batch: Batch, loss_cfg: losses.LossConfig, mesh: Mesh):
  """The loss on the global batch. The cross-device gather of negatives is the replicate constraint."""
  q_BxD = jax.lax.with_sharding_constraint(q_BxD, sharding.batch_sharding(mesh))
  p_BxGxD = jax.lax.with_sharding_constraint(p_BxGxD, sharding.replicated(mesh))  # all-gather passages
  return losses.e5_loss(q_BxD, p_BxGxD, batch.get("passage_hash"), batch.get("teacher_scores"), cfg=loss_cfg)


def unpack_slots(emb_RxSxD: jax.Array, batch: Batch, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """(q_BxD, p_BxGxD) picked from the packed rows' slots by the batch's `query_slots`/`passage_slots`.
  The slot embeddings are replicated first (R·S·D floats, like the passages' all-gather)."""
  flat_NxD = jax.lax.with_sharding_constraint(emb_RxSxD.reshape(-1, emb_RxSxD.shape[-1]), sharding.replicated(mesh))
  return flat_NxD[batch["query_slots"]], flat_NxD[batch["passage_slots"]]




def compute_grads(params: Any, batch: Batch, dropout_rng: jax.Array | None, *, enc_cfg: EncoderConfig,
                  loss_cfg: losses.LossConfig, mesh: Mesh, chunk_size: int = 0, reduce_per_chunk: bool = False
                  ) -> tuple[dict[str, jax.Array], Any]:
  """(loss metrics, grads) of the global batch; GradCache when chunk_size > 0. Traceable, not jitted.

  Both layouts go through (rows → embeddings → loss): padded rows embed to (q_BxD, p_BxGxD), packed rows
  to slot embeddings [R, S, D] that `unpack_slots` turns into the same pair."""
  # A Pallas kernel (splash attention) runs per device under shard_map, which takes the mesh from context.
  with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if enc_cfg.attention_impl == "splash"
        else contextlib.nullcontext()):
    return _compute_grads(params, batch, dropout_rng, enc_cfg, loss_cfg, mesh, chunk_size, reduce_per_chunk)


def _compute_grads(params, batch, dropout_rng, enc_cfg, loss_cfg, mesh, chunk_size, reduce_per_chunk):
  packed = batch_contract.is_packed(batch)
  rows = {k: batch[k] for k in (batch_contract.PACKED_TOKEN_KEYS if packed else batch_contract.PADDED_TOKEN_KEYS)} | _text_ids(batch)
  embed_fn = functools.partial(_embed_packed_rows if packed else _embed_rows, dropout_rng=dropout_rng,
                               cfg=enc_cfg, mesh=mesh)
  if packed:
    loss_of = lambda emb: global_loss(*unpack_slots(emb, batch, mesh), batch, loss_cfg, mesh)  # noqa: E731
  else:
    loss_of = lambda emb: global_loss(*emb, batch, loss_cfg, mesh)  # noqa: E731
  if not chunk_size:
    (_, metrics), grads = jax.value_and_grad(lambda p: loss_of(embed_fn(p, rows)), has_aux=True)(params)
    return metrics, grads
  return _gradcache(params, rows, embed_fn, loss_of, mesh, chunk_size, reduce_per_chunk)


def _gradcache(params, rows, embed_fn, loss_of, mesh, chunk_size, reduce_per_chunk):
  """rows: arrays with a leading row axis (queries, or packed rows) and more rows per query (passages);
  chunk c takes rows c·C..(c+1)·C of every shard."""
  n = sharding.num_batch_shards(mesh)
  num_chunks = next(iter(rows.values())).shape[0] // (n * chunk_size)
  chunk_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def to_chunks(x_Bx):
    """[B, ...] → [num_chunks, n·C, ...]: chunk c takes rows c·C..(c+1)·C of every shard (no data moves)."""
    x = x_Bx.reshape((n, num_chunks, chunk_size) + x_Bx.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x.reshape((num_chunks, n * chunk_size) + x_Bx.shape[1:]),
                                            chunk_sharding)

  def from_chunks(x_Cx):
    x = x_Cx.reshape((num_chunks, n, chunk_size) + x_Cx.shape[2:]).swapaxes(0, 1)
    return x.reshape((n * num_chunks * chunk_size,) + x_Cx.shape[2:])

  chunks = jax.tree.map(to_chunks, rows)
  # Pass 1: embeddings only; nothing here is differentiated, so no activations outlive a chunk.
  emb_chunks = jax.lax.map(functools.partial(embed_fn, params), chunks)
  (_, metrics), d_emb = jax.value_and_grad(loss_of, has_aux=True)(jax.tree.map(from_chunks, emb_chunks))

  # Pass 2: re-encode each chunk (same rows, same dropout keys → same embeddings) and pull the
  # embedding gradients back to the params; the sum over chunks is the gradient of the global loss.
  # By default every batch shard sums its own chunks' gradients on its devices (a vmap over the shards
  # keeps the partial sums apart: a full fp32 gradient per device) and the shards' sums are reduced once,
  # after the loop. Summing into the params' sharding instead (`reduce_per_chunk`, ZeRO-3's memory: 1/fsdp
  # of a gradient per device) reduces every chunk's gradients, the whole embedding gradient included,
  # which XLA:TPU does as an all-reduce per chunk (BENCHMARKS.md "tpu_aot").
  if reduce_per_chunk:
    slices, slice_axes, specs = 1, None, sharding.tree_shardings(params, mesh)
  else:
    slices, slice_axes, specs = n, sharding.BATCH_AXES, sharding.compute_shardings(params, mesh)
  sums_shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(slice_axes, *s.spec)), specs)
  by_slice = lambda x: x.reshape((slices, -1) + x.shape[1:])  # noqa: E731  [n·C, ...] → [slices, n·C/slices, ...]

  def slice_grads(chunk, d_emb_chunk):
    with sharding.rows_split_by_outer_vmap() if slice_axes else contextlib.nullcontext():
      _, vjp = jax.vjp(lambda p: embed_fn(p, chunk), params)
      return vjp(d_emb_chunk)[0]

  def accumulate(sums, chunk_and_cotangents):
    g = jax.vmap(slice_grads, spmd_axis_name=slice_axes)(*jax.tree.map(by_slice, chunk_and_cotangents))
    return jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, sums, g), sums_shardings), None

  zeros = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda p: jnp.zeros((slices,) + p.shape, p.dtype), params), sums_shardings)
  sums, _ = jax.lax.scan(accumulate, zeros, (chunks, jax.tree.map(to_chunks, d_emb)))
  grads = jax.lax.with_sharding_constraint(jax.tree.map(lambda s: s.sum(0), sums),
                                           sharding.tree_shardings(params, mesh))
  return metrics, grads


# ------------------------------------------------------------------------------------------- the step

def make_train_step(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`, jitted with the state's and batch's shardings, the
  state donated. One compilation per batch shape (and per presence of `teacher_scores`)."""
  check_config(config, mesh)
  tx, schedule = make_optimizer(config), learning_rate_schedule(config)
  loss_cfg, dropout_stream = loss_config(config), _rngs(config.seed)[1]
  grads_fn = functools.partial(compute_grads, enc_cfg=enc_cfg, loss_cfg=loss_cfg, mesh=mesh,
                               chunk_size=config.gradcache.chunk_size,
                               reduce_per_chunk=config.gradcache.reduce_per_chunk)

  def train_step(state: TrainState, batch: Batch):
    metrics, grads = grads_fn(state.params, batch, jax.random.fold_in(dropout_stream, state.step))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = metrics | {"grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    return new_state, metrics

  state_shardings = jax.tree.map(lambda s: s.sharding, abstract_train_state(enc_cfg, config, mesh))
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0,
                 compiler_options=config_lib.compiler_options(config, mesh.devices.flat[0].platform))
