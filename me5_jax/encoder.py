"""The Flax (Linen) encoder for BERT and XLM-RoBERTa, and the pure embedding function at the jit boundary.

Submodule names mirror the Hugging Face module tree (`embeddings/word_embeddings`,
`encoder/layer_3/attention/self/query`, ...), so checkpoint conversion in `me5_jax.hf_io` is a
mechanical renaming and the sharding rules in `me5_jax.sharding` read like the HF parameter names.

Shape suffixes: B batch, L sequence length, D hidden size, H heads, K head size, F FFN size.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from me5_jax.variants import EncoderConfig

Params = Any


def _init(std: float = 0.02):
  return nn.initializers.normal(stddev=std)


class Embeddings(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.arch == "xlmr":
      # HF create_position_ids_from_input_ids: count non-pad tokens, pads stay at padding_idx.
      not_pad_BxL = (ids_BxL != cfg.pad_token_id).astype(jnp.int32)
      pos_BxL = jnp.cumsum(not_pad_BxL, axis=1) * not_pad_BxL + cfg.pad_token_id
    else:
      pos_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                     embedding_init=_init(), name=name)
    x_BxLxD = embed(cfg.vocab_size, "word_embeddings")(ids_BxL)
    x_BxLxD = x_BxLxD + embed(cfg.max_position_embeddings, "position_embeddings")(pos_BxL)
    # E5 never uses segment ids: every token is type 0.
    x_BxLxD = x_BxLxD + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids_BxL))
    x_BxLxD = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="LayerNorm")(x_BxLxD)
    return nn.Dropout(cfg.hidden_dropout)(x_BxLxD, deterministic=deterministic)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h, k = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    proj = lambda name: nn.DenseGeneral((h, k), dtype=dt, param_dtype=pdt, kernel_init=_init(), name=name)
    q_BxLxHxK = proj("query")(x_BxLxD)
    k_BxLxHxK = proj("key")(x_BxLxD)
    v_BxLxHxK = proj("value")(x_BxLxD)
    logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                                preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(k))
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL + bias_Bx1x1xL, axis=-1)
    probs_BxHxLxL = nn.Dropout(cfg.attention_dropout)(probs_BxHxLxL, deterministic=deterministic)
    ctx_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL.astype(dt), v_BxLxHxK)
    return ctx_BxLxHxK.reshape(x_BxLxD.shape[:2] + (cfg.hidden_size,))


class DenseResidualNorm(nn.Module):
  """HF's `*Output` block: dense → dropout → LayerNorm(x + residual)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, residual_BxLxD, deterministic: bool):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    y_BxLxD = nn.Dense(cfg.hidden_size, dtype=dt, param_dtype=pdt, kernel_init=_init(), name="dense")(x)
    y_BxLxD = nn.Dropout(cfg.hidden_dropout)(y_BxLxD, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                        name="LayerNorm")(y_BxLxD + residual_BxLxD)


class Attention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool):
    ctx_BxLxD = SelfAttention(self.cfg, name="self")(x_BxLxD, bias_Bx1x1xL, deterministic)
    return DenseResidualNorm(self.cfg, name="output")(ctx_BxLxD, x_BxLxD, deterministic)


class Intermediate(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    h_BxLxF = nn.Dense(cfg.intermediate_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                       kernel_init=_init(), name="dense")(x_BxLxD)
    return nn.gelu(h_BxLxF, approximate=False)


class Layer(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool):
    a_BxLxD = Attention(self.cfg, name="attention")(x_BxLxD, bias_Bx1x1xL, deterministic)
    h_BxLxF = Intermediate(self.cfg, name="intermediate")(a_BxLxD)
    return DenseResidualNorm(self.cfg, name="output")(h_BxLxF, a_BxLxD, deterministic)


_REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool):
    layer_cls = Layer
    if self.cfg.remat != "none":
      layer_cls = nn.remat(Layer, policy=_REMAT_POLICY[self.cfg.remat], static_argnums=(3,))
    for i in range(self.cfg.num_layers):
      x_BxLxD = layer_cls(self.cfg, name=f"layer_{i}")(x_BxLxD, bias_Bx1x1xL, deterministic)
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
  def __call__(self, ids_BxL, mask_BxL, deterministic: bool = True):
    x_BxLxD = Embeddings(self.cfg, name="embeddings")(ids_BxL, deterministic)
    # Additive mask: padded keys get the most negative finite value, as transformers does.
    bias_Bx1x1xL = jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    x_BxLxD = Stack(self.cfg, name="encoder")(x_BxLxD, bias_Bx1x1xL, deterministic)
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


def hidden_states(params: Params, ids_BxL, mask_BxL, cfg: EncoderConfig, dropout_rng=None):
  """Last hidden states. Dropout is on exactly when a dropout rng is given."""
  rngs = None if dropout_rng is None else {"dropout": dropout_rng}
  return Encoder(cfg).apply({"params": params}, ids_BxL, mask_BxL, deterministic=dropout_rng is None, rngs=rngs)


def embed(params: Params, ids_BxL, mask_BxL, cfg: EncoderConfig, dropout_rng=None):
  """The E5 embedding: masked mean of the last hidden states, L2-normalised, fp32 [B, D].

  A pure function of (params, ids, mask[, rng]): this is what the train step differentiates and what
  inference jits, with `cfg` static.
  """
  h_BxLxD = hidden_states(params, ids_BxL, mask_BxL, cfg, dropout_rng)
  return l2_normalize(mean_pool(h_BxLxD, mask_BxL))
