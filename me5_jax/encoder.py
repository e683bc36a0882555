"""The Flax (Linen) encoder for BERT and XLM-RoBERTa, and the pure embedding function at the jit boundary.

Submodule names mirror the Hugging Face module tree (`embeddings/word_embeddings`,
`encoder/layer_3/attention/self/query`, ...), so checkpoint conversion in `me5_jax.hf_io` is a
mechanical renaming and the sharding rules in `me5_jax.sharding` read like the HF parameter names.

Shape suffixes: B batch, L sequence length, D hidden size, H heads, K head size, F FFN size, R packed
rows, S slots (texts) per packed row. Padding: see AttentionMask.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from me5_jax import splash
from me5_jax.variants import EncoderConfig

Params = Any


def _init(std: float = 0.02):
  return nn.initializers.normal(stddev=std)


def _mix32(x):
  """Wellons' lowbias32 integer hash: a bijection on uint32 whose output bits all depend on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


class Dropout(nn.Module):
  """Inverted dropout whose mask is a hash of (call site, token, feature) rather than of array positions.

  Why: a token's mask must not depend on where its text sits in the batch. `token_BxL` (from
  `token_keys`: the text's global index in the batch and the token's position in the text) keys the
  rows, so padded and packed rows, GradCache chunks, any mesh and any number of hosts draw the same masks
  for the same text, from one key per step. The hash (two words drawn per call from the rng, then
  Wellons' 32-bit mixer) also costs a few integer ops per element, where threefry bits cost ~30 % of a
  CPU train step (BENCHMARKS.md "demo_step"); dropout needs independent-looking masks, not cryptographic ones.
  x is [B, L, D] (hidden: token × feature) or [B, H, L, L] (attention: query token × head × key token).
  """
  rate: float

  @nn.compact
  def __call__(self, x, token_BxL, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    row_BxL = _mix32(token_BxL ^ seed[0])
    if x.ndim == 3:
      col_D = _mix32(jnp.arange(x.shape[-1], dtype=jnp.uint32) ^ seed[1])
      bits = _mix32(row_BxL[:, :, None] ^ col_D)
    else:
      head_H = _mix32(jnp.arange(x.shape[1], dtype=jnp.uint32) ^ seed[1])
      col_BxHxL = _mix32(token_BxL[:, None, :] ^ head_H[None, :, None])
      bits = _mix32(row_BxL[:, None, :, None] ^ col_BxHxL[:, :, None, :])
    keep = bits >= jnp.uint32(min(int(self.rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), 0.0).astype(x.dtype)


def token_keys(text_ids_BxL, pos_BxL):
  """uint32 key of each token: its text's global index in the batch and its position in that text."""
  return _mix32(_mix32(text_ids_BxL.astype(jnp.uint32)) ^ pos_BxL.astype(jnp.uint32))


def segment_positions(segments_BxL):
  """Index of each token within its segment (packed rows hold several texts, each starting at 0)."""
  iota_BxL = jax.lax.broadcasted_iota(jnp.int32, segments_BxL.shape, 1)
  new_BxL = jnp.concatenate([jnp.ones_like(segments_BxL[:, :1], bool),
                             segments_BxL[:, 1:] != segments_BxL[:, :-1]], axis=1)
  return iota_BxL - jax.lax.cummax(jnp.where(new_BxL, iota_BxL, 0), axis=1)


class Embeddings(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, pos_BxL, token_BxL, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                     embedding_init=_init(), name=name)
    x_BxLxD = embed(cfg.vocab_size, "word_embeddings")(ids_BxL)
    x_BxLxD = x_BxLxD + embed(cfg.max_position_embeddings, "position_embeddings")(pos_BxL)
    # E5 never uses segment ids: every token is type 0.
    x_BxLxD = x_BxLxD + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids_BxL))
    x_BxLxD = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="LayerNorm")(x_BxLxD)
    return Dropout(cfg.hidden_dropout)(x_BxLxD, token_BxL, deterministic)


def positions(ids_BxL, cfg: EncoderConfig, segments_BxL=None):
  """Position ids as HF computes them; in packed rows they restart at every segment."""
  if segments_BxL is not None:
    pos_BxL = segment_positions(segments_BxL)
    if cfg.arch == "xlmr":
      pos_BxL = jnp.where(segments_BxL > 0, pos_BxL + cfg.pad_token_id + 1, cfg.pad_token_id)
    return pos_BxL
  if cfg.arch == "xlmr":
    # HF create_position_ids_from_input_ids: count non-pad tokens, pads stay at padding_idx.
    not_pad_BxL = (ids_BxL != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad_BxL, axis=1) * not_pad_BxL + cfg.pad_token_id
  return jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)


class AttentionMask(struct.PyTreeNode):
  """Which keys each query may attend to, in the form jax.nn.dot_product_attention takes best.

  Right-padded rows (the batch contract: tokens 0..length-1 are the text) as key lengths: no mask array at
  all (the XLA path builds it from an iota, cuDNN skips the padding and computes no mask gradient). Rows
  padded anywhere else (an HF-style mask on the inference path) as a key mask [B, 1, 1, L]. Packed rows as
  the exact block-diagonal mask [B, 1, L, L]: a query sees only its own text's tokens.
  """
  lengths_B: jax.Array | None = None
  keep_Bx1xQxL: jax.Array | None = None   # Q = 1 (a key mask) or L (packed rows)
  segments_BxL: jax.Array | None = None   # packed rows: 1..S per text, 0 = padding

  @classmethod
  def of(cls, mask_BxL, segments_BxL=None, right_padded: bool = False) -> "AttentionMask":
    if segments_BxL is not None:
      return cls(keep_Bx1xQxL=(segments_BxL[:, None, :, None] == segments_BxL[:, None, None, :])
                 & (segments_BxL[:, None, None, :] > 0), segments_BxL=segments_BxL)
    if right_padded:
      return cls(lengths_B=jnp.sum(mask_BxL > 0, axis=1, dtype=jnp.int32))
    return cls(keep_Bx1xQxL=(mask_BxL > 0)[:, None, None, :])

  def keep(self, length: int):
    """The mask as a boolean array broadcastable to [B, H, L, L]."""
    if self.keep_Bx1xQxL is not None:
      return self.keep_Bx1xQxL
    return (jnp.arange(length) < self.lengths_B[:, None])[:, None, None, :]

  def query_by_key(self, length: int):
    """The mask array for jax.nn.dot_product_attention, [B, 1, L, L], or None (key lengths). A key mask is
    broadcast over the queries: cuDNN's kernel (JAX 0.11, "auto" on a GPU) rejects a [B, 1, 1, L] mask
    ("Bias must have same seq length as QKV") instead of falling back; XLA fuses the broadcast away."""
    if self.keep_Bx1xQxL is None:
      return None
    return jnp.broadcast_to(self.keep_Bx1xQxL, self.keep_Bx1xQxL.shape[:2] + (length, length))

  def segment_ids(self, length: int):
    """[B, L] int32 segment ids (me5_jax.splash): packed rows' own, else 1 = a token, 0 = padding. Padding
    then attends to padding, where the XLA path lets it attend to the text: only padded positions' hidden
    states differ, which no embedding reads (mean pooling skips them)."""
    if self.segments_BxL is not None:
      return self.segments_BxL
    if self.lengths_B is not None:
      return (jnp.arange(length) < self.lengths_B[:, None]).astype(jnp.int32)
    return self.keep_Bx1xQxL[:, 0, 0, :].astype(jnp.int32)


def attention_with_dropout(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask: AttentionMask, dropout: nn.Module, token_BxL):
  """Softmax attention with dropout on the attention probabilities, which no fused kernel (and not
  jax.nn.dot_product_attention) offers. The same arithmetic as its XLA path (fp32 logits, masked logits
  set to a large negative value), computed heads-major: XLA:CPU's batched dots run ~10 % faster on
  [B, H, L, K] operands than on the [B, L, H, K] layout."""
  scale = 1.0 / jnp.sqrt(jnp.float32(q_BxLxHxK.shape[-1]))
  q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (x.transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  logits_BxHxLxL = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxLxK, k_BxHxLxK, preferred_element_type=jnp.float32) * scale
  logits_BxHxLxL = jnp.where(mask.keep(q_BxLxHxK.shape[1]), logits_BxHxLxL, -0.7 * jnp.finfo(jnp.float32).max)
  probs_BxHxLxL = dropout(jax.nn.softmax(logits_BxHxLxL, axis=-1), token_BxL, False)
  ctx_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", probs_BxHxLxL.astype(v_BxLxHxK.dtype), v_BxHxLxK)
  return ctx_BxHxLxK.transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
  """Multi-head self-attention. Without attention-probability dropout (inference, or attention_dropout
  0) it is jax.nn.dot_product_attention with cfg.attention_impl (XLA, or cuDNN's fused kernel on GPU) or
  the splash kernel on TPU (me5_jax.splash); with it, `attention_with_dropout`."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask: AttentionMask, token_BxL, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h, k = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    proj = lambda name: nn.DenseGeneral((h, k), dtype=dt, param_dtype=pdt, kernel_init=_init(), name=name)
    q_BxLxHxK = proj("query")(x_BxLxD)
    k_BxLxHxK = proj("key")(x_BxLxD)
    v_BxLxHxK = proj("value")(x_BxLxD)
    if not deterministic and cfg.attention_dropout > 0:
      ctx_BxLxHxK = attention_with_dropout(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask, Dropout(cfg.attention_dropout),
                                           token_BxL)
    elif cfg.attention_impl == "splash":
      ctx_BxLxHxK = splash.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask.segment_ids(x_BxLxD.shape[1]))
    else:
      ctx_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask.query_by_key(x_BxLxD.shape[1]),
          key_value_seq_lengths=mask.lengths_B, implementation=cfg.attention_impl)
    return ctx_BxLxHxK.reshape(x_BxLxD.shape[:2] + (cfg.hidden_size,))


class DenseResidualNorm(nn.Module):
  """HF's `*Output` block: dense → dropout → LayerNorm(x + residual)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, residual_BxLxD, token_BxL, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    y_BxLxD = nn.Dense(cfg.hidden_size, dtype=dt, param_dtype=pdt, kernel_init=_init(), name="dense")(x)
    y_BxLxD = Dropout(cfg.hidden_dropout)(y_BxLxD, token_BxL, deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                        name="LayerNorm")(y_BxLxD + residual_BxLxD)


class Attention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask: AttentionMask, token_BxL, deterministic: bool):
    ctx_BxLxD = SelfAttention(self.cfg, name="self")(x_BxLxD, mask, token_BxL, deterministic)
    return DenseResidualNorm(self.cfg, name="output")(ctx_BxLxD, x_BxLxD, token_BxL, deterministic)


def gelu(x):
  """Exact GELU, x·Φ(x), written with erf rather than jax.nn.gelu's erfc: XLA:CPU's erf is the cheaper
  polynomial (a one-off A/B of the real mE5-small step, both alternating in one process on this project's
  2-core VM, gave 19.4 vs 21.8 s/step); the two differ by ~1e-6."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.sqrt(0.5).astype(x.dtype)))


class Intermediate(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    h_BxLxF = nn.Dense(cfg.intermediate_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                       kernel_init=_init(), name="dense")(x_BxLxD)
    return gelu(h_BxLxF)


class Layer(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, token_BxL, deterministic: bool):
    a_BxLxD = Attention(self.cfg, name="attention")(x_BxLxD, mask, token_BxL, deterministic)
    h_BxLxF = Intermediate(self.cfg, name="intermediate")(a_BxLxD)
    return DenseResidualNorm(self.cfg, name="output")(h_BxLxF, a_BxLxD, token_BxL, deterministic)


_REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, token_BxL, deterministic: bool):
    layer_cls = Layer
    if self.cfg.remat != "none":
      layer_cls = nn.remat(Layer, policy=_REMAT_POLICY[self.cfg.remat], static_argnums=(4,))
    for i in range(self.cfg.num_layers):
      x_BxLxD = layer_cls(self.cfg, name=f"layer_{i}")(x_BxLxD, mask, token_BxL, deterministic)
    return x_BxLxD


class Pooler(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cls_BxD = nn.Dense(self.cfg.hidden_size, dtype=jnp.dtype(self.cfg.dtype),
                       param_dtype=jnp.dtype(self.cfg.param_dtype), kernel_init=_init(), name="dense")(x_BxLxD[:, 0])
    return jnp.tanh(cls_BxD)


class Encoder(nn.Module):
  """Returns the last hidden states [B, L, D] (and the pooler output when the config has one)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, deterministic: bool = True, segments_BxL=None, text_ids_BxL=None,
               right_padded: bool = False):
    """segments_BxL (packed rows): 1..S numbers the texts sharing a row, 0 is padding; a token attends
    only within its own text. Without it every row is one text and mask_BxL marks its tokens;
    right_padded promises they are a prefix of the row (attention then takes lengths, see AttentionMask).
    text_ids_BxL: each token's text, numbered across the global batch, for dropout (default: the row)."""
    pos_BxL = positions(ids_BxL, self.cfg, segments_BxL)
    if text_ids_BxL is None:
      text_ids_BxL = jax.lax.broadcasted_iota(jnp.int32, ids_BxL.shape, 0)
    token_BxL = token_keys(text_ids_BxL, pos_BxL)
    x_BxLxD = Embeddings(self.cfg, name="embeddings")(ids_BxL, pos_BxL, token_BxL, deterministic)
    mask = AttentionMask.of(mask_BxL, segments_BxL, right_padded)
    x_BxLxD = Stack(self.cfg, name="encoder")(x_BxLxD, mask, token_BxL, deterministic)
    if self.cfg.add_pooler:
      Pooler(self.cfg, name="pooler")(x_BxLxD)
    return x_BxLxD


def mean_pool(hidden_BxLxD, mask_BxL):
  """Masked mean over tokens in fp32: padding contributes nothing, as in sentence-transformers."""
  m_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
  summed_BxD = jnp.sum(hidden_BxLxD.astype(jnp.float32) * m_BxLx1, axis=1)
  return summed_BxD / jnp.maximum(jnp.sum(m_BxLx1, axis=1), 1e-9)


def l2_normalize(x_BxD, eps: float = 1e-12):
  """torch.nn.functional.normalize semantics: divide by max(norm, eps)."""
  return x_BxD / jnp.maximum(jnp.linalg.norm(x_BxD, axis=-1, keepdims=True), eps)


def init_params(cfg: EncoderConfig, rng: jax.Array, seq_len: int = 8) -> Params:
  """Fresh BERT-style initialisation (normal(0.02) weights, zero biases, unit LayerNorm)."""
  ids_1xL = jnp.full((1, seq_len), cfg.pad_token_id + 5, jnp.int32)
  return Encoder(cfg).init(rng, ids_1xL, jnp.ones_like(ids_1xL))["params"]


def hidden_states(params: Params, ids_BxL, mask_BxL, cfg: EncoderConfig, dropout_rng=None, segments_BxL=None,
                  text_ids_BxL=None, right_padded: bool = False):
  """Last hidden states. Dropout is on exactly when a dropout rng is given."""
  rngs = None if dropout_rng is None else {"dropout": dropout_rng}
  return Encoder(cfg).apply({"params": params}, ids_BxL, mask_BxL, deterministic=dropout_rng is None, rngs=rngs,
                            segments_BxL=segments_BxL, text_ids_BxL=text_ids_BxL, right_padded=right_padded)


def embed(params: Params, ids_BxL, mask_BxL, cfg: EncoderConfig, dropout_rng=None, text_ids_BxL=None,
          right_padded: bool = False):
  """The E5 embedding: masked mean of the last hidden states, L2-normalised, fp32 [B, D].

  A pure function of (params, ids, mask[, rng]): this is what the train step differentiates and what
  inference jits, with `cfg` static. `right_padded` (the batch contract's rows, and the tokenizer's)
  lets attention take key lengths instead of a mask; any mask is exact without it.
  """
  h_BxLxD = hidden_states(params, ids_BxL, mask_BxL, cfg, dropout_rng, text_ids_BxL=text_ids_BxL,
                          right_padded=right_padded)
  return l2_normalize(mean_pool(h_BxLxD, mask_BxL))


def embed_packed(params: Params, ids_RxL, segments_RxL, num_slots: int, cfg: EncoderConfig, dropout_rng=None,
                 text_ids_RxL=None):
  """E5 embeddings of packed rows: slot s of row r is the text numbered s + 1 in `segments_RxL`.

  Packing puts several short texts in one row (data_pipelines.preprocess.pack_texts), so the encoder
  runs on about as many tokens as the texts hold instead of rows padded to the batch's longest text.
  Returns fp32 [R, S, D], L2-normalised; empty slots are zero vectors.
  """
  h_RxLxD = hidden_states(params, ids_RxL, segments_RxL > 0, cfg, dropout_rng, segments_RxL, text_ids_RxL)
  onehot_RxLxS = (segments_RxL[..., None] == jnp.arange(1, num_slots + 1)).astype(jnp.float32)
  summed_RxSxD = jnp.einsum("rls,rld->rsd", onehot_RxLxS, h_RxLxD.astype(jnp.float32))
  used_RxSx1 = jnp.sum(onehot_RxLxS, axis=1)[..., None]
  # Empty slots get a constant before the norm (whose gradient at 0 is NaN), then zero.
  mean_RxSxD = jnp.where(used_RxSx1 > 0, summed_RxSxD / jnp.maximum(used_RxSx1, 1.0), 1.0)
  return jnp.where(used_RxSx1 > 0, l2_normalize(mean_RxSxD), 0.0)
