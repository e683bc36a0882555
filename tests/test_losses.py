"""me5_jax.losses against a hand-written float64 numpy reference that loops over queries and candidates."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.batch import hash_ids
from me5_jax.losses import EXTRA_TERMS, LossConfig, e5_loss

B, G, D = 6, 3, 16
loss_jit = jax.jit(e5_loss, static_argnames="cfg")


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(seed=0):
  """Queries, and passages near their own query (so accuracy is neither 0 nor 1), distinct hashes."""
  rng = np.random.default_rng(seed)
  q = unit(rng.normal(size=(B, D)))
  p = unit(0.6 * q[:, None, :] + rng.normal(size=(B, G, D)) * np.array([0.3, 0.8, 0.8])[:, None])
  hsh = rng.choice(2**31 - 1, size=(B, G, 2), replace=False).astype(np.int32)
  return q.astype(np.float32), p.astype(np.float32), hsh


def with_duplicates(q, p, hsh):
  """Query 0's positive reappears as query 2's positive and as query 4's first hard negative."""
  p, hsh = p.copy(), hsh.copy()
  for b, g in [(2, 0), (4, 1)]:
    p[b, g], hsh[b, g] = p[0, 0], hsh[0, 0]
  return q, p, hsh


def ref_one_dim(q, p, hsh, teacher, cfg):
  """Loss and metrics for one embedding size: explicit candidate lists, float64 log-sum-exp."""
  q, p = q.astype(np.float64), p.astype(np.float64)
  tau, mask = cfg.temperature, hsh is not None and cfg.false_negative_masking
  same = lambda bg, jh: mask and bool(np.all(hsh[bg] == hsh[jh]))
  nce, correct, negs, pos_cos, neg_cos = 0.0, 0, 0, [], []
  mass = {t: 0.0 for t in EXTRA_TERMS if t in cfg.terms}
  for i in range(B):
    target = q[i] @ p[i, 0] / tau
    cols = []  # (logit, block)
    for b in range(B):
      for g in range(G):
        if (b, g) != (i, 0) and not same((b, g), (i, 0)):
          cols.append((q[i] @ p[b, g] / tau, "qp"))
          neg_cos.append(q[i] @ p[b, g])
    for j in range(B):
      if j == i or same((j, 0), (i, 0)):
        continue
      pair = {"pq": (p[i, 0], q[j]), "qq": (q[i], q[j]), "pp": (p[i, 0], p[j, 0])}
      cols += [(pair[t][0] @ pair[t][1] / tau, t) for t in mass]
    logits = np.array([target] + [c[0] for c in cols])
    lse = logits.max() + np.log(np.sum(np.exp(logits - logits.max())))
    nce += (lse - target) / B
    for t in mass:
      mass[t] += sum(np.exp(z - lse) for z, blk in cols if blk == t) / B
    correct += target > max(z for z, blk in cols if blk == "qp")
    negs += len(cols)
    pos_cos.append(q[i] @ p[i, 0])
  out = {"loss_contrastive": nce, "accuracy": correct / B, "num_negatives": negs / B,
         "pos_minus_neg": np.mean(pos_cos) - np.mean(neg_cos), **{f"mass_{t}": m for t, m in mass.items()}}
  out["loss"] = nce
  if teacher is not None:
    kd = 0.0
    for i in range(B):
      group = [g for g in range(G) if g == 0 or not same((i, g), (i, 0))]  # own-positive copies leave
      s = np.array([q[i] @ p[i, g] / tau for g in group])
      t = teacher[i, group].astype(np.float64) / cfg.teacher_temperature
      log_s, log_t = s - np.log(np.sum(np.exp(s))), t - np.log(np.sum(np.exp(t)))
      kd += np.sum(np.exp(log_t) * (log_t - log_s)) / B
    out["loss_kd"] = kd
    out["loss"] = kd + cfg.kd_alpha * nce
  return out


def ref_loss(q, p, hsh=None, teacher=None, cfg=LossConfig()):
  if not cfg.matryoshka_dims:
    return ref_one_dim(q, p, hsh, teacher, cfg)
  weights = cfg.matryoshka_weights or [1.0] * len(cfg.matryoshka_dims)
  out = ref_one_dim(q, p, hsh, teacher, cfg)
  out["loss"] = 0.0
  for d, w in zip(cfg.matryoshka_dims, weights):
    out[f"loss_dim{d}"] = ref_one_dim(unit(q[:, :d]), unit(p[..., :d]), hsh, teacher, cfg)["loss"]
    out["loss"] += w * out[f"loss_dim{d}"]
  return out


def assert_metrics_match(got, want):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == np.float32 and got[k].shape == (), k
    np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-5, atol=2e-5, err_msg=k)


ALL_TERMS = ("qp", *EXTRA_TERMS)


@pytest.mark.parametrize("terms", [("qp",), ("qp", "pq"), ("qp", "qq"), ("qp", "pp"), ALL_TERMS])
def test_infonce_with_hard_negatives_and_extra_terms(terms):
  q, p, hsh = make_batch()
  cfg = LossConfig(temperature=0.05, terms=terms)
  loss, metrics = loss_jit(q, p, hsh, cfg=cfg)
  want = ref_loss(q, p, hsh, cfg=cfg)
  assert_metrics_match(metrics, want)
  assert float(loss) == float(metrics["loss"])
  assert 0 < want["accuracy"] < 1  # the batch tests the argmax both ways


def test_bf16_inputs_are_computed_in_fp32():
  q, p, _ = make_batch()
  cfg = LossConfig(temperature=0.05)
  q16, p16 = q.astype(jax.numpy.bfloat16), p.astype(jax.numpy.bfloat16)
  _, metrics = loss_jit(q16, p16, cfg=cfg)
  want = ref_loss(np.asarray(q16, np.float32), np.asarray(p16, np.float32), cfg=cfg)
  assert_metrics_match(metrics, want)


def test_gradient_matches_analytic_softmax_gradient_with_masking():
  """dL/dz = (softmax - onehot) / B on kept columns, 0 on masked ones; chain rule through z = q·p / τ."""
  q, p, hsh = with_duplicates(*make_batch())
  cfg = LossConfig(temperature=0.05)
  grad_q, grad_p = jax.grad(lambda q, p: e5_loss(q, p, hsh, cfg=cfg)[0], argnums=(0, 1))(q, p)
  q64, p64 = q.astype(np.float64), p.reshape(B * G, D).astype(np.float64)
  dz = np.zeros((B, B * G))
  for i in range(B):
    kept = [j for j in range(B * G) if j == i * G or not np.all(hsh.reshape(-1, 2)[j] == hsh[i, 0])]
    z = q64[i] @ p64[kept].T / cfg.temperature
    dz[i, kept] = np.exp(z - z.max()) / np.sum(np.exp(z - z.max())) / B
    dz[i, i * G] -= 1 / B
  np.testing.assert_allclose(grad_q, dz @ p64 / cfg.temperature, atol=1e-5)
  np.testing.assert_allclose(grad_p.reshape(B * G, D), dz.T @ q64 / cfg.temperature, atol=1e-5)


@pytest.mark.parametrize("terms", [("qp",), ALL_TERMS])
def test_false_negative_masking(terms):
  q, p, hsh = with_duplicates(*make_batch())
  cfg = LossConfig(temperature=0.05, terms=terms)
  _, masked = loss_jit(q, p, hsh, cfg=cfg)
  assert_metrics_match(masked, ref_loss(q, p, hsh, cfg=cfg))
  # Queries 0 and 2 each lose 2 duplicate passages; with the extra terms also each other, in 3 blocks.
  extra = 3 * (B - 1) if len(terms) > 1 else 0
  lost = 2 * (2 + (3 if len(terms) > 1 else 0))
  assert float(masked["num_negatives"]) == pytest.approx((B * (B * G - 1 + extra) - lost) / B)

  _, unmasked = loss_jit(q, p, None, cfg=cfg)
  assert_metrics_match(unmasked, ref_loss(q, p, None, cfg=cfg))
  assert float(masked["loss"]) < float(unmasked["loss"]) - 0.1
  off = LossConfig(temperature=0.05, terms=terms, false_negative_masking=False)
  _, switched_off = loss_jit(q, p, hsh, cfg=off)
  np.testing.assert_allclose(float(switched_off["loss"]), float(unmasked["loss"]), rtol=1e-6)

  grads = jax.grad(lambda q, p: e5_loss(q, p, hsh, cfg=cfg)[0], argnums=(0, 1))(q, p)
  assert all(np.isfinite(g).all() for g in grads)


def test_distillation_kl_plus_alpha_infonce():
  q, p, hsh = with_duplicates(*make_batch())
  teacher = np.random.default_rng(1).normal(size=(B, G)).astype(np.float32) * 3
  cfg = LossConfig(teacher_temperature=0.5)
  loss, metrics = loss_jit(q, p, hsh, teacher, cfg=cfg)
  want = ref_loss(q, p, hsh, teacher, cfg)
  assert_metrics_match(metrics, want)
  np.testing.assert_allclose(float(loss), want["loss_kd"] + 0.2 * want["loss_contrastive"], rtol=2e-5)


def test_hard_negative_equal_to_its_positive_leaves_the_distillation_term():
  """Query 3's second hard negative is its own positive (another id, the same text): the loss equals the
  loss of query 3's group without that slot, teacher and student alike."""
  q, p, hsh = make_batch(4)
  p[3, 2], hsh[3, 2] = p[3, 0], hsh[3, 0]
  teacher = np.random.default_rng(5).normal(size=(B, G)).astype(np.float32) * 3
  teacher[3, 2] = teacher[3, 0]  # the teacher rates a copy of the positive like the positive
  cfg = LossConfig(teacher_temperature=0.5)
  _, metrics = loss_jit(q, p, hsh, teacher, cfg=cfg)
  kd = 0.0
  for i in range(B):
    group = [0, 1] if i == 3 else list(range(G))
    s = q[i].astype(np.float64) @ p[i, group].astype(np.float64).T / cfg.temperature
    t = teacher[i, group].astype(np.float64) / cfg.teacher_temperature
    log_s, log_t = s - np.log(np.sum(np.exp(s - s.max()))) - s.max(), t - np.log(np.sum(np.exp(t)))
    kd += np.sum(np.exp(log_t) * (log_t - log_s)) / B
  np.testing.assert_allclose(float(metrics["loss_kd"]), kd, rtol=2e-5)
  assert_metrics_match(metrics, ref_loss(q, p, hsh, teacher, cfg))
  _, unmasked = loss_jit(q, p, hsh, teacher, cfg=LossConfig(teacher_temperature=0.5, false_negative_masking=False))
  assert abs(float(unmasked["loss_kd"]) - kd) > 1e-3  # the copy did change the term before masking
  grads = jax.grad(lambda q, p: e5_loss(q, p, hsh, teacher, cfg=cfg)[0], argnums=(0, 1))(q, p)
  assert all(np.isfinite(g).all() for g in grads)


def test_distillation_kl_is_torch_kldiv_batchmean():
  torch = pytest.importorskip("torch")
  q, p, _ = make_batch()
  teacher = np.random.default_rng(2).normal(size=(B, G)).astype(np.float32)
  cfg = LossConfig(temperature=0.05, teacher_temperature=2.0)
  _, metrics = loss_jit(q, p, None, teacher, cfg=cfg)
  f64 = lambda x: torch.tensor(x, dtype=torch.float64)
  student = torch.einsum("bd,bgd->bg", f64(q), f64(p))
  kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
      torch.log_softmax(student / 0.05, -1), torch.log_softmax(f64(teacher) / 2.0, -1))
  np.testing.assert_allclose(float(metrics["loss_kd"]), kl.item(), rtol=2e-5)


def test_matryoshka_weighted_sum_of_truncated_renormalised_losses():
  q, p, hsh = with_duplicates(*make_batch())
  teacher = np.random.default_rng(3).normal(size=(B, G)).astype(np.float32)
  cfg = LossConfig(temperature=0.05, terms=("qp", "qq"), matryoshka_dims=(4, 8, 16),
                   matryoshka_weights=(0.5, 1.0, 2.0))
  loss, metrics = loss_jit(q, p, hsh, teacher, cfg=cfg)
  assert_metrics_match(metrics, ref_loss(q, p, hsh, teacher, cfg))
  assert float(loss) == float(metrics["loss"])


def test_matryoshka_without_the_full_dim_reports_full_dim_metrics():
  q, p, hsh = make_batch()
  cfg = LossConfig(temperature=0.05, matryoshka_dims=(4, 8))
  _, metrics = loss_jit(q, p, hsh, cfg=cfg)
  assert_metrics_match(metrics, ref_loss(q, p, hsh, cfg=cfg))
  _, plain = loss_jit(q, p, hsh, cfg=LossConfig(temperature=0.05))
  for k in ("loss_contrastive", "accuracy", "pos_minus_neg", "num_negatives"):
    assert float(metrics[k]) == float(plain[k]), k


def test_bad_config_and_shapes_name_the_culprit():
  with pytest.raises(ValueError, match="LossConfig.terms"):
    LossConfig(terms=("qq",))
  with pytest.raises(ValueError, match="LossConfig.matryoshka_weights"):
    LossConfig(matryoshka_dims=(4, 8), matryoshka_weights=(1.0,))
  assert hash(LossConfig(terms=["qp", "pp"])) == hash(LossConfig(terms=("qp", "pp")))
  q, p, hsh = make_batch()
  with pytest.raises(ValueError, match="passage_hash"):
    e5_loss(q, p, hsh[:, :1], cfg=LossConfig())
  with pytest.raises(ValueError, match="matryoshka_dims"):
    e5_loss(q, p, cfg=LossConfig(matryoshka_dims=(32,)))


def test_hash_ids_ignores_padding_and_separates_texts():
  ids = np.array([[5, 6, 7, 1, 1, 1], [5, 6, 7, 9, 9, 9], [5, 6, 8, 1, 1, 1], [6, 5, 7, 1, 1, 1],
                  [5, 6, 1, 1, 1, 1]])
  mask = np.array([[1, 1, 1, 0, 0, 0]] * 4 + [[1, 1, 0, 0, 0, 0]])
  h = hash_ids(ids, mask)
  assert h.dtype == np.int32 and h.shape == (5, 2)
  assert (h[0] == h[1]).all()  # padding value and length are ignored
  assert (h[0] == hash_ids(ids[:1, :3], mask[:1, :3])).all()
  assert (h[0] == hash_ids(ids[:1].astype(np.int64), mask[:1])).all()
  assert len({tuple(r) for r in h[[0, 2, 3, 4]]}) == 4  # changed, reordered, truncated
  grouped = hash_ids(ids[:4].reshape(2, 2, 6), mask[:4].reshape(2, 2, 6))
  assert grouped.shape == (2, 2, 2) and (grouped.reshape(4, 2) == h[:4]).all()


def test_hash_ids_is_the_same_in_another_process():
  ids, mask = np.array([[3, 1, 4, 1, 5, 0]]), np.array([[1, 1, 1, 1, 1, 0]])
  code = ("import numpy as np; from data_pipelines.batch import hash_ids; "
          "print(*hash_ids(np.array([[3, 1, 4, 1, 5, 0]]), np.array([[1, 1, 1, 1, 1, 0]]))[0])")
  env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       timeout=120)
  assert [int(x) for x in out.stdout.split()] == hash_ids(ids, mask)[0].tolist()
