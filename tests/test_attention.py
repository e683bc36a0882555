"""Attention through jax.nn.dot_product_attention (padding as key lengths, packed rows as an exact
block-diagonal mask) and the explicit dropout path, against the encoder's previous attention: a dense
additive mask (finfo.min on masked keys), softmax, hash dropout on the [B, H, L, L] probabilities, all
in the [B, L, H, K] layout. Whole encoders (tiny BERT and XLM-R), padded and packed, dropout on and off,
to 1e-5 in fp32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.preprocess import pack_token_rows
from me5_jax import encoder as enc
from me5_jax.tokenize import pad_rows
from me5_jax.variants import get_variant


def previous_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, keep_Bx1xLxL, dropout=None, token_BxL=None):
  """The encoder's attention before it used jax.nn.dot_product_attention (commit c1351fd)."""
  bias = jnp.where(keep_Bx1xLxL, 0.0, jnp.finfo(jnp.float32).min)
  logits = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / jnp.sqrt(jnp.float32(q_BxLxHxK.shape[-1]))
  probs = jax.nn.softmax(logits + bias, axis=-1)
  if dropout is not None:
    probs = dropout(probs, token_BxL, False)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v_BxLxHxK)


@pytest.fixture
def previous_encoder(monkeypatch):
  """Routes both attention paths of the encoder through `previous_attention` while active."""
  def fused(q, k, v, mask=None, key_value_seq_lengths=None, implementation=None):
    keep = enc.AttentionMask(key_value_seq_lengths, mask).keep(q.shape[1])
    return previous_attention(q, k, v, keep)

  def with_dropout(q, k, v, mask, dropout, token_BxL):
    return previous_attention(q, k, v, mask.keep(q.shape[1]), dropout, token_BxL)

  def activate():
    monkeypatch.setattr(enc.jax.nn, "dot_product_attention", fused)
    monkeypatch.setattr(enc, "attention_with_dropout", with_dropout)
  return activate


def token_rows(n: int, max_len: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  return [rng.integers(5, 200, k).tolist() for k in rng.integers(2, max_len + 1, n)]


def padded(rows, length: int, pad: int):
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


@pytest.mark.parametrize("variant", ["tiny-bert", "tiny-xlmr"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("layout", ["padded", "right-padded", "packed"])
def test_encoder_equals_the_previous_attention(variant, dropout, layout, previous_encoder):
  cfg = get_variant(variant)  # hidden and attention dropout 0.1
  params = enc.init_params(cfg, jax.random.key(0))
  rows = token_rows(12, 16)
  rng = jax.random.key(7) if dropout else None
  if layout != "packed":  # "padded": any mask (a key mask); "right-padded": key lengths
    ids, mask = padded(rows, 16, cfg.pad_token_id)
    right = layout == "right-padded"
    run = lambda: np.asarray(enc.hidden_states(params, ids, mask, cfg, rng, right_padded=right))  # noqa: E731
  else:
    ids, segments, _ = pack_token_rows(*pad_rows(rows, cfg.pad_token_id), 32, cfg.pad_token_id)
    run = lambda: np.asarray(enc.hidden_states(params, ids, segments > 0, cfg, rng, segments))  # noqa: E731
  now = run()
  previous_encoder()
  before = run()
  valid = (segments if layout == "packed" else mask) > 0  # padding tokens' states are never pooled
  np.testing.assert_allclose(now[valid], before[valid], rtol=0, atol=1e-5)
  if dropout:  # the dropout path really dropped something: the states differ from deterministic ones
    assert np.abs(now - np.asarray(enc.hidden_states(params, ids, ids * 0 + 1, cfg))).max() > 1e-2


def test_right_padded_attention_takes_key_lengths_not_a_mask(monkeypatch):
  """Right-padded rows (the train step's, the Embedder's) reach jax.nn.dot_product_attention as
  key_value_seq_lengths and no mask array."""
  seen = {}
  real = jax.nn.dot_product_attention

  def spy(q, k, v, mask=None, key_value_seq_lengths=None, implementation=None):
    seen.update(mask=mask, lengths=key_value_seq_lengths, implementation=implementation)
    return real(q, k, v, mask=mask, key_value_seq_lengths=key_value_seq_lengths, implementation=implementation)

  monkeypatch.setattr(enc.jax.nn, "dot_product_attention", spy)
  cfg = get_variant("tiny-bert")
  params = enc.init_params(cfg, jax.random.key(0))
  ids, mask = padded(token_rows(4, 16), 16, cfg.pad_token_id)
  enc.embed(params, ids, mask, cfg, right_padded=True)
  assert seen["mask"] is None and seen["implementation"] == "xla"
  np.testing.assert_array_equal(np.asarray(seen["lengths"]), mask.sum(1))


def test_attention_impl_auto_picks_cudnn_only_on_gpu_in_half_precision():
  from me5_jax import config as config_lib
  from me5_jax import train_step as ts
  c = config_lib.base_config()
  base = get_variant("small")  # head size 32
  assert ts.encoder_config(base, c, platform="gpu").attention_impl == "xla"  # fp32: not eligible
  c.dtype = "bfloat16"
  assert ts.encoder_config(base, c, platform="gpu").attention_impl == "cudnn"
  assert ts.encoder_config(base, c, platform="cpu").attention_impl == "xla"
  assert ts.encoder_config(base, c).attention_dropout == base.attention_dropout  # -1: the checkpoint's
  c.attention_dropout = 0.0
  assert ts.encoder_config(base, c).attention_dropout == 0.0


def test_the_saved_model_info_does_not_pin_the_runs_attention_kernel(tmp_path, minilm_dir):
  """A GPU run's cuDNN choice must not stop export or evaluation of its workdir on another machine."""
  from me5_jax import checkpoint
  checkpoint.save_model_info(str(tmp_path), get_variant("tiny-bert").replace(attention_impl="cudnn"), minilm_dir)
  assert checkpoint.load_model_info(str(tmp_path))[0].attention_impl == "xla"


@pytest.mark.parametrize("variant", ["tiny-bert", "tiny-xlmr"])
@pytest.mark.parametrize("layout", ["padded", "right-padded", "packed"])
def test_splash_kernel_in_interpret_mode_equals_the_xla_path(variant, layout):
  """attention_impl="splash" (me5_jax.splash: Pallas splash attention, run in interpret mode off TPU), with
  padding and packed texts as segment ids, against the XLA path: hidden states of every real token and the
  pooled embeddings to 1e-5 in fp32. Row lengths 40 and 32 are padded to the kernel's 128-token blocks."""
  cfg = get_variant(variant)
  params = enc.init_params(cfg, jax.random.key(0))
  rows = token_rows(6, 40)
  if layout != "packed":
    ids, mask = padded(rows, 40, cfg.pad_token_id)
    kw = dict(right_padded=layout == "right-padded")
    segments = None
  else:
    ids, segments, _ = pack_token_rows(*pad_rows(rows, cfg.pad_token_id), 48, cfg.pad_token_id)
    mask, kw = segments > 0, dict(segments_BxL=segments)
  states = lambda c: np.asarray(enc.hidden_states(params, ids, mask, c, None, **kw))  # noqa: E731
  xla, spl = states(cfg), states(cfg.replace(attention_impl="splash"))
  valid = np.asarray(mask) > 0
  np.testing.assert_allclose(spl[valid], xla[valid], rtol=0, atol=1e-5)
  if segments is None:
    np.testing.assert_allclose(np.asarray(enc.embed(params, ids, mask, cfg.replace(attention_impl="splash"), **kw)),
                               np.asarray(enc.embed(params, ids, mask, cfg, **kw)), rtol=0, atol=1e-5)


def test_attention_impl_auto_picks_splash_on_tpu():
  from me5_jax import config as config_lib
  from me5_jax import train_step as ts
  c = config_lib.base_config()
  assert ts.encoder_config(get_variant("small"), c, platform="tpu").attention_impl == "splash"
  c.attention_impl = "xla"
  assert ts.encoder_config(get_variant("small"), c, platform="tpu").attention_impl == "xla"
