"""The sharded train step against a single-device reference: loss and every gradient, on three meshes;
GradCache against the plain step with dropout on; one compilation per shape; optimizer and config errors.

All fp32 on 8 simulated CPU devices with the tiny BERT, a global batch of 16 queries, each with a positive
and a hard negative, cross-encoder teacher scores (so the distillation term is on) and a positive that is
duplicated on another device (so false-negative masking acts across devices).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from data_pipelines.batch import hash_ids
from me5_jax import encoder as enc
from me5_jax import aot, config as config_lib, losses, sharding
from me5_jax import train_step as ts
from me5_jax.variants import get_variant

B, G, L = 16, 2, 16
TOL = 1e-5


def step_config(mesh_shape=(8, 1, 1), chunk_size=0, **overrides):
  config = config_lib.base_config()
  config.batch_size = B
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  config.gradcache.chunk_size = chunk_size
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


@pytest.fixture(scope="module")
def enc_cfg():
  return get_variant("tiny-bert")


@pytest.fixture(scope="module")
def params(enc_cfg):
  return jax.device_get(enc.init_params(enc_cfg, jax.random.key(1)))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)

  def tokens(shape):
    lens = rng.integers(4, L + 1, shape[:-1])
    mask = (np.arange(L) < lens[..., None]).astype(np.int32)
    return rng.integers(5, 1000, shape).astype(np.int32) * mask, mask

  q_ids, q_mask = tokens((B, L))
  p_ids, p_mask = tokens((B, G, L))
  # Query 9's positive is query 1's positive: rows 1 and 9 sit on different devices of every mesh here.
  p_ids[9, 0], p_mask[9, 0] = p_ids[1, 0], p_mask[1, 0]
  return dict(query_ids=q_ids, query_mask=q_mask, passage_ids=p_ids, passage_mask=p_mask,
              passage_hash=hash_ids(p_ids, p_mask),
              teacher_scores=rng.normal(size=(B, G)).astype(np.float32))


def reference_loss(params, batch, enc_cfg, loss_cfg):
  """The unsharded loss, written out independently of me5_jax.train_step."""
  q_BxD = enc.embed(params, batch["query_ids"], batch["query_mask"], enc_cfg)
  p_NxD = enc.embed(params, batch["passage_ids"].reshape(B * G, L), batch["passage_mask"].reshape(B * G, L),
                    enc_cfg)
  return losses.e5_loss(q_BxD, p_NxD.reshape(B, G, -1), batch["passage_hash"], batch["teacher_scores"],
                        cfg=loss_cfg)


@pytest.fixture(scope="module")
def reference(params, batch, enc_cfg):
  """jax.grad of the unsharded loss on one device."""
  one = jax.devices()[0]
  fn = jax.jit(jax.value_and_grad(reference_loss, has_aux=True), static_argnums=(2, 3))
  (loss, _), grads = fn(jax.device_put(params, one), jax.device_put(batch, one), enc_cfg,
                        ts.loss_config(step_config()))
  return float(loss), jax.device_get(grads)


def assert_grads_close(actual, expected):
  """Per-leaf relative error ≤ TOL. The denominator is floored at 1e-4 of the whole gradient's norm:
  key biases have an exactly-zero gradient (softmax is shift-invariant), so they hold only rounding noise."""
  floor = 1e-4 * float(optax.global_norm(expected))
  paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
  for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), floor)
    assert err <= TOL, f"gradient of {path}: relative error {err:.2e}"


def sharded_grads(params, batch, enc_cfg, config, dropout_rng=None):
  """`compute_grads` jitted over a mesh with the train step's param and batch shardings."""
  mesh = sharding.make_mesh(config)
  ts.check_config(config, mesh)
  fn = jax.jit(lambda p, b, r: ts.compute_grads(p, b, r, enc_cfg=enc_cfg, loss_cfg=ts.loss_config(config),
                                                 mesh=mesh, chunk_size=config.gradcache.chunk_size,
                                                 reduce_per_chunk=config.gradcache.reduce_per_chunk))
  metrics, grads = fn(jax.device_put(params, sharding.tree_shardings(params, mesh)),
                      sharding.shard_batch(batch, mesh), dropout_rng)
  return jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_sharded_grads_equal_single_device(mesh_shape, params, batch, enc_cfg, reference):
  metrics, grads = sharded_grads(params, batch, enc_cfg, step_config(mesh_shape))
  ref_loss, ref_grads = reference
  assert abs(float(metrics["loss"]) - ref_loss) <= TOL * abs(ref_loss)
  assert float(metrics["loss_kd"]) > 0 and float(metrics["num_negatives"]) < B * G - 1  # KD on, a duplicate masked
  assert_grads_close(grads, ref_grads)


def test_per_device_negatives_fail_the_check(params, batch, enc_cfg, reference):
  """The bug the check exists for: each device's queries scored only against its own passages."""
  mesh = sharding.make_mesh(step_config((8, 1, 1)))
  loss_cfg = ts.loss_config(step_config())
  rows = P(sharding.BATCH_AXES)

  def per_device_loss(params, batch):
    q_BxD = enc.embed(params, batch["query_ids"], batch["query_mask"], enc_cfg)
    p_NxD = enc.embed(params, batch["passage_ids"].reshape(B * G, L), batch["passage_mask"].reshape(B * G, L),
                      enc_cfg)
    local = lambda q, p, h, t: jax.lax.pmean(losses.e5_loss(q, p, h, t, cfg=loss_cfg)[0], sharding.BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=rows, out_specs=P())(
        q_BxD, p_NxD.reshape(B, G, -1), batch["passage_hash"], batch["teacher_scores"])

  loss, grads = jax.jit(jax.value_and_grad(per_device_loss))(
      jax.device_put(params, sharding.replicated(mesh)), sharding.shard_batch(batch, mesh))
  ref_loss, ref_grads = reference
  assert abs(float(loss) - ref_loss) > 100 * TOL * abs(ref_loss)
  with pytest.raises(AssertionError, match="relative error"):
    assert_grads_close(jax.device_get(grads), ref_grads)


@pytest.fixture(scope="module")
def plain_with_dropout(params, batch, enc_cfg):
  return sharded_grads(params, batch, enc_cfg, step_config((2, 2, 2)), jax.random.key(7))


# per-shard batch is 16 / (2·2) = 4: 4 is the whole batch; reduce_per_chunk: gradients reduced every chunk
@pytest.mark.parametrize("chunk_size, reduce_per_chunk", [(1, False), (2, False), (4, False), (2, True)])
def test_gradcache_equals_plain_step_with_dropout(chunk_size, reduce_per_chunk, params, batch, enc_cfg,
                                                  plain_with_dropout):
  config = step_config((2, 2, 2), chunk_size)
  config.gradcache.reduce_per_chunk = reduce_per_chunk
  metrics, grads = sharded_grads(params, batch, enc_cfg, config, jax.random.key(7))
  plain_metrics, plain_grads = plain_with_dropout
  for k in ("loss", "loss_kd", "loss_contrastive", "accuracy", "num_negatives"):
    assert abs(float(metrics[k]) - float(plain_metrics[k])) <= TOL * abs(float(plain_metrics[k])), k
  assert_grads_close(grads, plain_grads)


def test_dropout_is_on_and_per_step(params, batch, enc_cfg, reference, plain_with_dropout):
  """The GradCache check above would be vacuous if the rng did nothing."""
  assert abs(float(plain_with_dropout[0]["loss"]) - reference[0]) > 1e-3


def test_train_step_compiles_once_and_learns(params, batch, enc_cfg):
  config = step_config((4, 2, 1), chunk_size=1, learning_rate=1e-3, warmup_steps=1, total_steps=10)
  mesh = sharding.make_mesh(config)
  state = ts.init_train_state(enc_cfg, config, mesh, params=params)
  qkernel = lambda tree: tree["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  qkernel_sharding = qkernel(state.params).sharding
  assert qkernel_sharding.spec == P("fsdp", None, None)  # the rule's [D, H, K] spec, tensor=1 dropped
  assert qkernel(state.opt_state[1][0].mu).sharding == qkernel_sharding  # Adam moments sharded alike
  step = ts.make_train_step(enc_cfg, config, mesh)
  device_batch = sharding.shard_batch(batch, mesh)
  schedule = ts.learning_rate_schedule(config)
  losses_seen = []
  for i in range(4):
    state, metrics = step(state, device_batch)
    metrics = jax.device_get(metrics)
    losses_seen.append(float(metrics["loss"]))
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)))
    assert float(metrics["grad_norm"]) > 0
  assert step._cache_size() == 1  # one trace and compile for four same-shaped batches
  assert int(state.step) == 4
  assert qkernel(state.params).sharding == qkernel_sharding
  assert {"accuracy", "pos_minus_neg", "num_negatives", "loss_kd", "loss_contrastive"} <= set(metrics)
  assert losses_seen[-1] < losses_seen[1]  # step 0 has learning rate 0 (warmup starts at 0)


def test_weight_decay_skips_layernorm_and_biases(params):
  """With zero gradients Adam's update is 0, so only decoupled weight decay moves the params."""
  config = step_config(learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1)
  tx = ts.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)

  def check(path, update, param):
    name = sharding.path_str(path)
    factor = 0.0 if ("LayerNorm" in name or name.endswith("bias")) else -0.5 * 0.1  # -lr · weight_decay
    np.testing.assert_allclose(np.asarray(update), factor * np.asarray(param), rtol=1e-6, atol=1e-12,
                               err_msg=name)
  jax.tree_util.tree_map_with_path(check, updates, params)


@pytest.mark.parametrize("change, key", [
    (dict(mesh=(3, 1, 1)), "mesh.data"),
    (dict(mesh=(-1, -1, 1)), "mesh."),
    (dict(mesh=(2, 2, 1)), "mesh.data*mesh.fsdp*mesh.tensor"),
    (dict(batch_size=12), "batch_size=12"),
    (dict(chunk_size=3), "gradcache.chunk_size=3"),
])
def test_config_errors_name_the_key(change, key):
  config = step_config(change.get("mesh", (8, 1, 1)), change.get("chunk_size", 0))
  config.batch_size = change.get("batch_size", B)
  with pytest.raises(ValueError, match=key.replace("*", r"\*").replace(".", r"\.")):
    ts.check_config(config, sharding.make_mesh(config))


@pytest.mark.parametrize("variant", ["tiny-xlmr", "small", "large"])
def test_every_param_has_a_sharding_rule(variant):
  config = step_config((2, 2, 2))
  mesh = sharding.make_mesh(config)
  shapes = jax.eval_shape(lambda: enc.init_params(get_variant(variant, add_pooler=True), jax.random.key(0)))
  specs = {sharding.path_str(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(sharding.tree_shardings(shapes, mesh))[0]}
  assert specs["encoder/layer_0/intermediate/dense/kernel"] == P("fsdp", "tensor")
  assert specs["encoder/layer_0/output/LayerNorm/scale"] == P()
  # mE5-small's 250037-row vocabulary is not divisible by tensor=2: only its hidden dim is split.
  vocab_spec = specs["embeddings/word_embeddings/embedding"]
  assert vocab_spec == (P(None, "fsdp") if variant == "small" else P("tensor", "fsdp"))


def test_aot_compile_counts_the_sharded_state(enc_cfg):
  """The AOT memory analysis, without allocating: its argument bytes are the per-device shards of the
  state and batch (the same step and shapes as the train-step test above, so the compile cache hits)."""
  config = step_config((4, 2, 1), chunk_size=1, learning_rate=1e-3, warmup_steps=1, total_steps=10)
  compiled = aot.compile_train_step(enc_cfg, config, aot.Shape(B, L, L, G, teacher=True))
  report = aot.MemoryReport.of(compiled)
  mesh = sharding.make_mesh(config)
  shards = jax.tree.leaves(ts.abstract_train_state(enc_cfg, config, mesh)) + jax.tree.leaves(
      aot.abstract_batch(B, L, L, G, True, mesh))
  expected = sum(np.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in shards)
  assert report.argument == expected
  assert report.alias > 0 and report.temp > 0 and report.peak > report.argument


def packed(batch, row_multiple):
  """The same texts in the packed layout (data_pipelines.preprocess.pack_token_rows)."""
  from data_pipelines.preprocess import pack_token_rows
  from me5_jax.tokenize import pad_rows
  rows = [list(r[m > 0]) for r, m in zip(batch["query_ids"], batch["query_mask"])]
  rows += [list(r[m > 0]) for r, m in zip(batch["passage_ids"].reshape(B * G, L),
                                          batch["passage_mask"].reshape(B * G, L))]
  ids, segments, slots = pack_token_rows(*pad_rows(rows, 0), L, pad_id=0, row_multiple=row_multiple)
  return dict(packed_ids=ids, packed_segments=segments, query_slots=slots[:B],
              passage_slots=slots[B:].reshape(B, G), passage_hash=batch["passage_hash"],
              teacher_scores=batch["teacher_scores"])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_packed_batch_gives_the_padded_loss_and_grads(mesh_shape, params, batch, enc_cfg, reference):
  packed_batch = packed(batch, 8)
  assert packed_batch["packed_ids"].shape[0] < B * (1 + G)  # texts really share rows
  metrics, grads = sharded_grads(params, packed_batch, enc_cfg, step_config(mesh_shape))
  ref_loss, ref_grads = reference
  assert abs(float(metrics["loss"]) - ref_loss) <= TOL * abs(ref_loss)
  assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("chunk_size", [1, 2])  # (2, 2, 2): 4 shards, rows a multiple of 4·2
def test_packed_gradcache_equals_packed_plain_step_with_dropout(chunk_size, params, batch, enc_cfg):
  packed_batch = packed(batch, 8)
  plain_metrics, plain_grads = sharded_grads(params, packed_batch, enc_cfg, step_config((2, 2, 2)),
                                             jax.random.key(7))
  metrics, grads = sharded_grads(params, packed_batch, enc_cfg, step_config((2, 2, 2), chunk_size),
                                 jax.random.key(7))
  assert abs(float(metrics["loss"]) - float(plain_metrics["loss"])) <= TOL * abs(float(plain_metrics["loss"]))
  assert_grads_close(grads, plain_grads)


def test_packed_batch_draws_the_padded_dropout_masks(params, batch, enc_cfg, plain_with_dropout):
  """Dropout is keyed by (text, position), so packing the same texts changes nothing but rounding."""
  metrics, grads = sharded_grads(params, packed(batch, 8), enc_cfg, step_config((2, 2, 2)), jax.random.key(7))
  plain_metrics, plain_grads = plain_with_dropout
  assert abs(float(metrics["loss"]) - float(plain_metrics["loss"])) <= TOL * abs(float(plain_metrics["loss"]))
  assert_grads_close(grads, plain_grads)


@pytest.mark.parametrize("chunk_size", [0, 1])
def test_splash_attention_gives_the_xla_paths_gradients_on_a_sharded_mesh(chunk_size, params, batch, enc_cfg):
  """attention_impl="splash" inside the sharded step: the Pallas kernel (interpret mode on CPU) runs per
  device under shard_map (rows over data × fsdp, heads over tensor), also inside GradCache's per-shard vmap;
  loss and gradients equal the XLA path's (attention dropout off: the kernel has none)."""
  no_dropout = enc_cfg.replace(attention_dropout=0.0)
  config = step_config((2, 2, 2), chunk_size)
  xla_metrics, xla_grads = sharded_grads(params, batch, no_dropout, config)
  metrics, grads = sharded_grads(params, batch, no_dropout.replace(attention_impl="splash"), config)
  assert abs(float(metrics["loss"]) - float(xla_metrics["loss"])) <= TOL * abs(float(xla_metrics["loss"]))
  assert_grads_close(grads, xla_grads)
