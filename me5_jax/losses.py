"""E5 losses on the *global* (already gathered) batch: InfoNCE over every passage of the batch with hard
negatives, SimLM's full contrastive terms, false-negative masking, cross-encoder distillation, Matryoshka.

The loss is a pure function of global arrays, so the sharded train step and its single-device reference
call the same code: getting every device's passages in front of every query is the gather's job
(`me5_jax.train_step`), never this module's.

Shape suffixes: B queries, G = 1 + k passages per query (slot 0 the positive), N = B·G candidate passages
flattened row-major (candidate j = b·G + g, so query i's target is column i·G), D embedding size,
M all softmax columns of one query.

The contrastive loss (one softmax per query, as SimLM's `full_contrastive_scores_and_labels` in
microsoft/unilm simlm/src/utils.py, which concatenates [qk, kq, qq, kk]): with s(a, b) = cos(a, b) / τ and
p⁺_i = p[i, 0], query i's row holds the blocks named in `LossConfig.terms`

  qp: s(q_i, p_j)    for all N passages j         (always on; it holds the target column i·G)
  pq: s(p⁺_i, q_j)   for queries j ≠ i            (other queries as negatives of i's positive)
  qq: s(q_i, q_j)    for queries j ≠ i
  pp: s(p⁺_i, p⁺_j)  for positives j ≠ i

  L_nce = -(1/B) Σ_i log( exp s(q_i, p⁺_i) / Σ_{m in row i, not masked} exp row_i[m] ).

False-negative masking (with `passage_hash`, h_j the hash of candidate j, h⁺_i that of p⁺_i): in qp, a
column j ≠ i·G with h_j = h⁺_i is dropped from row i (the same text as the positive, elsewhere in the
global batch); in pq/qq/pp, column j is dropped when h⁺_j = h⁺_i (q_j is then a relevant query for p⁺_i,
a paraphrase of q_i, and p⁺_j is p⁺_i itself). In the distillation term (query i's own G passages), a hard
negative with h_j = h⁺_i leaves both the teacher's and the student's softmax, so the loss is the loss of
the group without it. Dropped columns get a large finite negative logit, never
-inf, whose exp underflows to 0 and whose gradient is 0 rather than NaN.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

EXTRA_TERMS = ("pq", "qq", "pp")
_MASKED_LOGIT = -1e9
# Similarities at τ = 0.01 turn a 1e-3 cosine error into 0.1 in the logit: keep the fp32 dots exact
# on TPU (bf16 passes) and GPU (TF32) too. The matmuls are B×N×D, negligible next to the encoder.
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss settings. Hashable (lists are turned into tuples), so it can be a static jit argument."""
  temperature: float = 0.01
  terms: tuple[str, ...] = ("qp",)         # "qp" plus any of EXTRA_TERMS, see the module docstring
  false_negative_masking: bool = True
  kd_alpha: float = 0.2                    # weight of InfoNCE when teacher scores are given (stage 2)
  teacher_temperature: float = 1.0
  matryoshka_dims: tuple[int, ...] = ()    # () = the full dimension only; e.g. (32, 64, 128, 384)
  matryoshka_weights: tuple[float, ...] = ()  # () = all 1.0

  def __post_init__(self):
    for name in ("terms", "matryoshka_dims", "matryoshka_weights"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.temperature <= 0 or self.teacher_temperature <= 0:
      raise ValueError(f"LossConfig.temperature and .teacher_temperature must be > 0, "
                       f"got {self.temperature} and {self.teacher_temperature}")
    if ("qp" not in self.terms or len(set(self.terms)) != len(self.terms)
        or not set(self.terms) <= {"qp", *EXTRA_TERMS}):
      raise ValueError(f"LossConfig.terms must hold 'qp' and any of {EXTRA_TERMS}, each once; "
                       f"got {self.terms}")
    dims = self.matryoshka_dims
    if any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
      raise ValueError(f"LossConfig.matryoshka_dims must be distinct positive sizes, got {dims}")
    if self.matryoshka_weights and len(self.matryoshka_weights) != len(dims):
      raise ValueError(f"LossConfig.matryoshka_weights needs one weight per dim of {dims}, "
                       f"got {self.matryoshka_weights}")


def e5_loss(q_BxD: jax.Array, p_BxGxD: jax.Array, passage_hash_BxGx2: jax.Array | None = None,
            teacher_BxG: jax.Array | None = None, *, cfg: LossConfig
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one global batch and its fp32 scalar metrics.

  Embeddings are L2-normalised; every array holds the whole global batch in global order. Without
  `teacher_BxG` the loss is L_nce; with it (stage 2) it is KL(teacher ‖ student) over each query's own G
  passages + kd_alpha · L_nce. With Matryoshka dims it is Σ_d w_d · loss(first d dims, re-normalised),
  and the metrics other than `loss` and `loss_dim{d}` are those of the full dimension.

  Metrics: loss, loss_contrastive, loss_kd (with a teacher), mass_<term> per extra term (mean softmax
  probability a query puts on that block), accuracy (q→p top-1 over the N passages after masking; ties
  count as misses), pos_minus_neg (mean positive cosine minus the mean cosine of all unmasked q→p
  negative pairs), num_negatives (unmasked non-target columns per query, all blocks), loss_dim{d}.
  """
  _check_shapes(q_BxD, p_BxGxD, passage_hash_BxGx2, teacher_BxG, cfg)
  q_BxD = q_BxD.astype(jnp.float32)
  p_BxGxD = p_BxGxD.astype(jnp.float32)
  if teacher_BxG is not None:
    teacher_BxG = teacher_BxG.astype(jnp.float32)
  same_BxN = same_BxB = None
  if passage_hash_BxGx2 is not None and cfg.false_negative_masking:
    same_BxN, same_BxB = _same_as_positive(passage_hash_BxGx2)
  one_dim = lambda q, p: _loss_at_dim(q, p, same_BxN, same_BxB, teacher_BxG, cfg)
  if not cfg.matryoshka_dims:
    return one_dim(q_BxD, p_BxGxD)

  full_dim = q_BxD.shape[-1]
  weights = cfg.matryoshka_weights or (1.0,) * len(cfg.matryoshka_dims)
  loss, metrics, per_dim = 0.0, None, {}
  for d, w in zip(cfg.matryoshka_dims, weights):
    loss_d, metrics_d = one_dim(_prefix(q_BxD, d), _prefix(p_BxGxD, d))
    loss = loss + w * loss_d
    per_dim[f"loss_dim{d}"] = loss_d
    if d == full_dim:
      metrics = metrics_d
  if metrics is None:
    metrics = one_dim(q_BxD, p_BxGxD)[1]
  return loss, {**metrics, **per_dim, "loss": loss}


def _check_shapes(q_BxD, p_BxGxD, hash_BxGx2, teacher_BxG, cfg: LossConfig) -> None:
  """Shape errors at trace time, naming the argument, before a confusing broadcast deep inside."""
  if q_BxD.ndim != 2 or p_BxGxD.ndim != 3 or p_BxGxD.shape[::2] != q_BxD.shape:
    raise ValueError(f"e5_loss: q must be [B, D] and p [B, G, D], got {q_BxD.shape} and {p_BxGxD.shape}")
  if hash_BxGx2 is not None and hash_BxGx2.shape != (*p_BxGxD.shape[:2], 2):
    raise ValueError(f"e5_loss: passage_hash must be [B, G, 2] = {(*p_BxGxD.shape[:2], 2)}, "
                     f"got {hash_BxGx2.shape}")
  if teacher_BxG is not None and teacher_BxG.shape != p_BxGxD.shape[:2]:
    raise ValueError(f"e5_loss: teacher scores must be [B, G] = {p_BxGxD.shape[:2]}, got {teacher_BxG.shape}")
  if any(d > q_BxD.shape[1] for d in cfg.matryoshka_dims):
    raise ValueError(f"LossConfig.matryoshka_dims {cfg.matryoshka_dims} exceed the embedding size "
                     f"{q_BxD.shape[1]}")


def _same_as_positive(hash_BxGx2):
  """same_BxN[i, j]: candidate j has the text of query i's positive; same_BxB[i, j]: i, j share a positive."""
  b, g, _ = hash_BxGx2.shape
  hash_Nx2 = hash_BxGx2.reshape(b * g, 2)
  pos_Bx2 = hash_BxGx2[:, 0]
  same_BxN = jnp.all(pos_Bx2[:, None, :] == hash_Nx2[None, :, :], axis=-1)
  same_BxB = jnp.all(pos_Bx2[:, None, :] == pos_Bx2[None, :, :], axis=-1)
  return same_BxN, same_BxB


def _prefix(x_xD, d: int):
  """The first d dims re-normalised (as torch F.normalize: divide by max(‖x‖, 1e-12))."""
  x_xd = x_xD[..., :d]
  return x_xd / jnp.maximum(jnp.linalg.norm(x_xd, axis=-1, keepdims=True), 1e-12)


def _loss_at_dim(q_BxD, p_BxGxD, same_BxN, same_BxB, teacher_BxG, cfg: LossConfig):
  b, g, d = p_BxGxD.shape
  n = b * g
  pos_BxD = p_BxGxD[:, 0]
  target_B = jnp.arange(b) * g
  is_target_BxN = jnp.arange(n)[None, :] == target_B[:, None]
  keep_qp_BxN = jnp.ones((b, n), bool) if same_BxN is None else is_target_BxN | ~same_BxN
  keep_extra_BxB = ~jnp.eye(b, dtype=bool)
  if same_BxB is not None:
    keep_extra_BxB &= ~same_BxB

  dot = lambda x, y: jnp.matmul(x, y.T, precision=_EXACT)
  cos_qp_BxN = dot(q_BxD, p_BxGxD.reshape(n, d))
  extra = [t for t in EXTRA_TERMS if t in cfg.terms]
  cos_extra = {"pq": lambda: dot(pos_BxD, q_BxD), "qq": lambda: dot(q_BxD, q_BxD),
               "pp": lambda: dot(pos_BxD, pos_BxD)}
  cos_BxM = jnp.concatenate([cos_qp_BxN] + [cos_extra[t]() for t in extra], axis=1)
  keep_BxM = jnp.concatenate([keep_qp_BxN] + [keep_extra_BxB] * len(extra), axis=1)
  logits_BxM = jnp.where(keep_BxM, cos_BxM / cfg.temperature, _MASKED_LOGIT)
  logp_BxM = jax.nn.log_softmax(logits_BxM, axis=-1)
  nce = -jnp.mean(jnp.take_along_axis(logp_BxM, target_B[:, None], axis=1))

  metrics = {"loss_contrastive": nce}
  prob_BxM = jnp.exp(logp_BxM)
  for k, t in enumerate(extra):
    metrics[f"mass_{t}"] = jnp.mean(jnp.sum(prob_BxM[:, n + k * b: n + (k + 1) * b], axis=1))
  pos_cos_B = jnp.take_along_axis(cos_qp_BxN, target_B[:, None], axis=1)[:, 0]
  neg_BxN = keep_qp_BxN & ~is_target_BxN
  mean_neg = jnp.sum(jnp.where(neg_BxN, cos_qp_BxN, 0.0)) / jnp.maximum(jnp.sum(neg_BxN), 1)
  metrics["pos_minus_neg"] = jnp.mean(pos_cos_B) - mean_neg
  # Top-1 as "strictly above every unmasked negative": exact ties (an unmasked duplicate) count as misses
  # instead of depending on argmax's column order.
  best_neg_B = jnp.max(jnp.where(neg_BxN, cos_qp_BxN, -jnp.inf), axis=1)
  metrics["accuracy"] = jnp.mean((pos_cos_B > best_neg_B).astype(jnp.float32))
  metrics["num_negatives"] = jnp.mean(jnp.sum(keep_BxM, axis=1) - 1).astype(jnp.float32)

  loss = nce
  if teacher_BxG is not None:
    student_BxG = jnp.einsum("bd,bgd->bg", q_BxD, p_BxGxD, precision=_EXACT) / cfg.temperature
    teacher_BxG = teacher_BxG / cfg.teacher_temperature
    if same_BxN is not None:  # a hard negative with its own positive's text leaves both softmaxes
      own_BxG = same_BxN.reshape(b, b, g)[jnp.arange(b), jnp.arange(b)]
      keep_BxG = ~own_BxG.at[:, 0].set(False)  # slot 0 is the positive itself
      student_BxG = jnp.where(keep_BxG, student_BxG, _MASKED_LOGIT)
      teacher_BxG = jnp.where(keep_BxG, teacher_BxG, _MASKED_LOGIT)
    log_student_BxG = jax.nn.log_softmax(student_BxG, axis=-1)
    log_teacher_BxG = jax.nn.log_softmax(teacher_BxG, axis=-1)
    # torch KLDivLoss(reduction="batchmean", log_target=True): Σ p_t (log p_t - log p_s) / B.
    kd = jnp.sum(jnp.exp(log_teacher_BxG) * (log_teacher_BxG - log_student_BxG)) / b
    metrics["loss_kd"] = kd
    loss = kd + cfg.kd_alpha * nce
  metrics["loss"] = loss
  return loss, metrics
