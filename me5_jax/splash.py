"""Attention on TPU through the Pallas splash-attention kernel (`attention_impl="splash"`), the fused
kernel MaxText uses: padding and packed rows both become segment ids, so no [B, L, L] mask or its
gradient is ever built, and fully masked key blocks are skipped.

Constraints of the kernel, handled here: sequence lengths are padded up to a multiple of its 128-token
blocks (padding gets segment id -1, so it attends only to itself); it does not scale the logits (q is
scaled by 1/sqrt(K) first); it has no attention-probability dropout (encoder.attention_with_dropout stays
the path while dropout is on); and XLA cannot partition a Pallas call, so under a mesh the kernel runs
per device inside `jax.shard_map` (sharding.attention_specs). Off TPU the same kernel runs in Pallas
interpret mode, which is how tests check it against the XLA path on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from me5_jax import sharding

BLOCK = 128  # the kernel's default q and kv block sizes; lengths must be multiples of them


def _kernel(length: int, num_heads: int, interpret: bool):
  """Built per trace: it holds mask-info arrays, which a cache would leak across traces as tracers."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # Pallas: on first use
  # Full mask: all structure comes from the segment ids (padding, packed texts).
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  return sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((length, length))] * num_heads), head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _local(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, segments_BxL, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  kernel = _kernel(q_BxHxLxK.shape[2], q_BxHxLxK.shape[1], interpret)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
  return jax.vmap(one)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, segments_BxL)


def attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL, *, interpret: bool | None = None):
  """Softmax attention where a query sees the keys of its own segment (id > 0 = a text, 0 = padding).
  interpret None: the compiled kernel when lowering for TPU, Pallas interpret mode on other backends."""
  b, length, h, k = q_BxLxHxK.shape
  padded = -(-length // BLOCK) * BLOCK
  heads_major = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - length), (0, 0)))  # noqa: E731
  q = heads_major(q_BxLxHxK * jnp.asarray(k ** -0.5, q_BxLxHxK.dtype))
  kk, v = heads_major(k_BxLxHxK), heads_major(v_BxLxHxK)
  seg = jnp.pad(segments_BxL.astype(jnp.int32), ((0, 0), (0, padded - length)), constant_values=-1)

  def run(*args, interpret: bool):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return _local(*args, interpret=interpret)
    qkv_spec, seg_spec = sharding.attention_specs(mesh, h)
    return jax.shard_map(functools.partial(_local, interpret=interpret), mesh=mesh,
                         in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec, check_vma=False)(*args)

  if interpret is None:
    out = jax.lax.platform_dependent(q, kk, v, seg, tpu=functools.partial(run, interpret=False),
                                     default=functools.partial(run, interpret=True))
  else:
    out = run(q, kk, v, seg, interpret=interpret)
  return out[:, :, :length].transpose(0, 2, 1, 3)
