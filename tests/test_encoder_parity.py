"""The Flax encoder against the PyTorch references (transformers, sentence-transformers) on real and
random checkpoints: tokens, hidden states, embeddings, export round trip, bf16, remat and dropout.

Each real model is loaded once per module; the jitted shapes are few so the file stays fast on 2 cores.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from multilingual_texts import LONG_TEXT, TEXTS
from sentence_transformers import SentenceTransformer

from me5_jax import encoder as enc
from me5_jax import hf_io
from me5_jax.embedder import Embedder
from me5_jax.tokenize import QUERY_PREFIX, Tokenizer
from me5_jax.variants import get_variant

torch.set_grad_enabled(False)
ATOL = 1e-5


def torch_mean_pool(hidden_BxLxD: torch.Tensor, mask_BxL: torch.Tensor) -> np.ndarray:
  """The reference pooling, written out in torch: masked mean, then L2."""
  m_BxLx1 = mask_BxL[..., None].float()
  pooled_BxD = (hidden_BxLxD * m_BxLx1).sum(1) / m_BxLx1.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled_BxD, dim=-1).numpy()


def hf_embed(model, tokenizer, texts, max_length: int) -> np.ndarray:
  """The E5 embedding computed with transformers: tokenizer → AutoModel → masked mean → L2."""
  batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
  out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
  return torch_mean_pool(out.last_hidden_state, batch["attention_mask"])


# ---------------------------------------------------------------- all-MiniLM-L6-v2 (real BERT)

@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return Embedder.from_pretrained(minilm_dir), SentenceTransformer(minilm_dir, device="cpu")


def test_minilm_matches_sentence_transformers(minilm):
  ours, st = minilm
  assert ours.tokenizer.max_length == st.max_seq_length == 256
  assert len(ours.tokenizer.token_ids([LONG_TEXT], 10_000)[0]) > 256, "the long text must be truncated"
  got_NxD = ours.encode(TEXTS, batch_size=16)
  want_NxD = st.encode(TEXTS, batch_size=16, convert_to_numpy=True)
  assert got_NxD.dtype == np.float32 and got_NxD.shape == want_NxD.shape == (len(TEXTS), 384)
  np.testing.assert_allclose(got_NxD, want_NxD, rtol=0, atol=ATOL)
  # The model card's number, as a check that the reference itself is the real model.
  happy = got_NxD[TEXTS.index("That is a happy person")] @ got_NxD[TEXTS.index("That is a very happy person")]
  assert abs(happy - 0.9429) < 1e-3


def test_bf16_compute_close_to_fp32(minilm):
  ours, _ = minilm
  tok = ours.tokenizer
  ids_BxL, mask_BxL = tok(TEXTS[:16], max_length=64, pad_to=64)
  fp32_BxD = np.asarray(enc.embed(ours.params, ids_BxL, mask_BxL, ours.cfg))
  bf16_cfg = ours.cfg.replace(dtype="bfloat16")
  bf16_BxD = np.asarray(enc.embed(ours.params, ids_BxL, mask_BxL, bf16_cfg))
  assert bf16_BxD.dtype == np.float32
  assert jax.tree.leaves(ours.params)[0].dtype == np.float32  # params stay fp32
  # Relative error of the embedding matrix (Frobenius); single rows may reach ~1.1e-2 on 6 layers.
  rel = np.linalg.norm(bf16_BxD - fp32_BxD) / np.linalg.norm(fp32_BxD)
  assert 0 < rel <= 1e-2, "bf16 must change the computation, by at most 1e-2"
  rel_B = np.linalg.norm(bf16_BxD - fp32_BxD, axis=-1) / np.linalg.norm(fp32_BxD, axis=-1)
  assert rel_B.max() <= 2e-2


# ---------------------------------------------------------------- multilingual-e5-small (4-bit copy)

@pytest.fixture(scope="module")
def me5(me5_small_dir):
  ours = Embedder.from_pretrained(me5_small_dir)
  hf_tok = transformers.AutoTokenizer.from_pretrained(me5_small_dir)
  return ours, hf_tok


@pytest.mark.parametrize("max_length", [512, 24])
def test_me5_token_ids_match_transformers(me5, me5_small_dir, max_length):
  ours, hf_tok = me5
  texts = [QUERY_PREFIX + t for t in TEXTS]
  want = hf_tok(texts, truncation=True, max_length=max_length)["input_ids"]
  assert ours.tokenizer.token_ids(texts, max_length) == want
  assert max(len(r) for r in want) == max_length  # the long text was truncated
  assert hf_tok("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]
  # The raw `tokenizers` pipeline of this tokenizer.json agrees except on trailing whitespace, which it
  # keeps as a "▁" token (sentencepiece and transformers drop it; so do we, see me5_jax.tokenize).
  raw = tokenizers.Tokenizer.from_file(os.path.join(me5_small_dir, "tokenizer.json"))
  raw.enable_truncation(max_length)
  differ = [t for t, ids in zip(texts, want) if raw.encode(t).ids != ids]
  assert differ == [t for t in texts if t != t.rstrip()]
  # Padding uses the tokenizer's own pad token, as HF does.
  ids_BxL, mask_BxL = ours.tokenizer(texts[:4], max_length)
  ref = hf_tok(texts[:4], truncation=True, max_length=max_length, padding=True)
  L = len(ref["input_ids"][0])
  np.testing.assert_array_equal(ids_BxL[:, :L], ref["input_ids"])
  np.testing.assert_array_equal(mask_BxL[:, :L], ref["attention_mask"])
  assert (ids_BxL[:, L:] == hf_tok.pad_token_id).all() and (mask_BxL[:, L:] == 0).all()


def test_me5_embeddings_match_transformers(me5, me5_small_dir):
  ours, hf_tok = me5
  texts = [QUERY_PREFIX + t for t in TEXTS]
  model = transformers.AutoModel.from_pretrained(me5_small_dir).eval()
  want_NxD = hf_embed(model, hf_tok, texts, max_length=128)
  got_NxD = ours.encode(TEXTS, prefix=QUERY_PREFIX, batch_size=16, max_length=128)
  np.testing.assert_allclose(got_NxD, want_NxD, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- XLM-R (random, built with transformers)

def random_xlmr(tmp_path, add_pooling_layer: bool, vocab_size: int = 1000, seed: int = 0) -> str:
  """A random 2-layer XLM-R saved with save_pretrained; LayerNorms and the padding row are perturbed
  too, so a mis-mapped scale/bias or a wrong position table row cannot hide behind their init."""
  torch.manual_seed(seed)
  hf_cfg = transformers.XLMRobertaConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=130, pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5)
  model = transformers.XLMRobertaModel(hf_cfg, add_pooling_layer=add_pooling_layer).eval()
  for name, p in model.named_parameters():
    if "LayerNorm" in name or name.endswith("bias"):
      p.add_(0.1 * torch.randn_like(p))
    elif name.endswith("embeddings.weight") and "token_type" not in name:
      p[hf_cfg.pad_token_id].normal_(std=0.1)  # HF zeroes the padding rows at init
  path = str(tmp_path / f"xlmr_pool{int(add_pooling_layer)}")
  model.save_pretrained(path)
  return path


def padded_batch(lengths, pad_to: int, pad_id: int, vocab_size: int, seed: int = 0):
  """Rows of random ids (avoiding specials 0..3) with trailing padding, like the tokenizer makes."""
  rng = np.random.default_rng(seed)
  ids_BxL = np.full((len(lengths), pad_to), pad_id, np.int32)
  mask_BxL = np.zeros_like(ids_BxL)
  for i, n in enumerate(lengths):
    ids_BxL[i, :n] = rng.integers(4, vocab_size, n)
    ids_BxL[i, 0], ids_BxL[i, n - 1] = 0, 2
    mask_BxL[i, :n] = 1
  return ids_BxL, mask_BxL


def test_xlmr_matches_transformers_on_padded_batches(tmp_path):
  path = random_xlmr(tmp_path, add_pooling_layer=True)
  model = transformers.AutoModel.from_pretrained(path).eval()
  cfg, params = hf_io.load_pretrained(path)
  assert cfg.arch == "xlmr" and cfg.position_offset == 2 and cfg.add_pooler and cfg.max_tokens == 128
  lengths = [5, 17, 40, 9, 2]
  for pad_to in (40, 64):  # more padding must change nothing
    ids_BxL, mask_BxL = padded_batch(lengths, pad_to, cfg.pad_token_id, cfg.vocab_size)
    out = model(input_ids=torch.from_numpy(ids_BxL).long(), attention_mask=torch.from_numpy(mask_BxL).long())
    got_BxLxD = np.asarray(enc.hidden_states(params, ids_BxL, mask_BxL, cfg))
    np.testing.assert_allclose(got_BxLxD, out.last_hidden_state.numpy(), rtol=0, atol=ATOL)
    got_BxD = np.asarray(enc.embed(params, ids_BxL, mask_BxL, cfg))
    np.testing.assert_allclose(got_BxD, torch_mean_pool(out.last_hidden_state, torch.from_numpy(mask_BxL)),
                               rtol=0, atol=ATOL)
    # The same rows unpadded, one by one: padding must be invisible.
    for i, n in enumerate(lengths):
      alone_1xD = enc.embed(params, ids_BxL[i:i + 1, :n], mask_BxL[i:i + 1, :n], cfg)
      np.testing.assert_allclose(np.asarray(alone_1xD)[0], got_BxD[i], rtol=0, atol=ATOL)


def test_xlmr_position_ids_start_after_padding_idx(tmp_path):
  """A left-padded row: HF numbers positions by counting non-pad tokens, so pads are skipped."""
  path = random_xlmr(tmp_path, add_pooling_layer=False)
  model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
  cfg, params = hf_io.load_pretrained(path)
  assert not cfg.add_pooler
  ids_BxL, mask_BxL = padded_batch([10, 16], 16, cfg.pad_token_id, cfg.vocab_size, seed=1)
  ids_BxL[0] = np.roll(ids_BxL[0], 6)
  mask_BxL[0] = np.roll(mask_BxL[0], 6)
  out = model(input_ids=torch.from_numpy(ids_BxL).long(), attention_mask=torch.from_numpy(mask_BxL).long())
  got_BxLxD = np.asarray(enc.hidden_states(params, ids_BxL, mask_BxL, cfg))
  np.testing.assert_allclose(got_BxLxD, out.last_hidden_state.numpy(), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- export round trip

def assert_reloads_everywhere(export_dir: str, ours: Embedder, texts, max_length: int):
  """The export loads in transformers with every key matched and in sentence-transformers as
  Transformer → mean Pooling → Normalize with the E5 prompts, and both give our embeddings."""
  model, info = transformers.AutoModel.from_pretrained(export_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  got_NxD = ours.encode(texts, batch_size=16, max_length=max_length)
  np.testing.assert_allclose(hf_embed(model.eval(), hf_tok, texts, max_length), got_NxD, rtol=0, atol=ATOL)

  st = SentenceTransformer(export_dir, device="cpu")
  assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
  assert st.max_seq_length == max_length
  np.testing.assert_allclose(st.encode(texts, batch_size=16), got_NxD, rtol=0, atol=ATOL)
  want_NxD = st.encode(texts, prompt_name="query", batch_size=16)
  np.testing.assert_allclose(ours.encode(texts, prefix=QUERY_PREFIX, batch_size=16, max_length=max_length),
                             want_NxD, rtol=0, atol=ATOL)
  assert st.prompts["passage"] == "passage: "


def test_export_then_import_is_exact(minilm, tmp_path):
  ours, _ = minilm
  out = hf_io.save_pretrained(ours.params, ours.cfg, str(tmp_path / "export"), tokenizer_dir=None,
                              max_seq_length=256)
  cfg, params = hf_io.load_pretrained(out)
  assert cfg == ours.cfg
  jax.tree.map(np.testing.assert_array_equal, params, ours.params)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    Tokenizer.from_dir(out)  # exported without tokenizer files: the error says so


def test_round_trip_through_transformers_and_sentence_transformers(minilm, minilm_dir, tmp_path):
  ours, _ = minilm
  out = hf_io.save_pretrained(ours.params, ours.cfg, str(tmp_path / "export"), tokenizer_dir=minilm_dir,
                              max_seq_length=256)
  assert_reloads_everywhere(out, Embedder.from_pretrained(out), TEXTS[:-1:3], max_length=256)


def test_round_trip_xlmr_without_pooler(tmp_path):
  """Imported XLM-R with no pooler → export: transformers still finds every key (a zero pooler is
  written, as it cannot record add_pooling_layer=False) and computes our hidden states."""
  cfg, params = hf_io.load_pretrained(random_xlmr(tmp_path, add_pooling_layer=False))
  out = hf_io.save_pretrained(params, cfg, str(tmp_path / "export"))
  model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids_BxL, mask_BxL = padded_batch([7, 16, 3], 16, cfg.pad_token_id, cfg.vocab_size, seed=3)
  want_BxLxD = model.eval()(input_ids=torch.from_numpy(ids_BxL).long(),
                            attention_mask=torch.from_numpy(mask_BxL).long()).last_hidden_state.numpy()
  got_BxLxD = np.asarray(enc.hidden_states(params, ids_BxL, mask_BxL, cfg))
  np.testing.assert_allclose(got_BxLxD, want_BxLxD, rtol=0, atol=ATOL)
  with open(os.path.join(out, "sentence_bert_config.json")) as f:
    assert json.load(f)["max_seq_length"] == cfg.max_tokens == 128  # fits the position table


# ---------------------------------------------------------------- remat and dropout (tiny-bert)

@pytest.fixture(scope="module")
def tiny():
  cfg = get_variant("tiny-bert")
  params = enc.init_params(cfg, jax.random.key(0))
  ids_BxL, mask_BxL = padded_batch([16, 7, 12, 3], 16, cfg.pad_token_id, cfg.vocab_size, seed=2)
  return cfg, params, ids_BxL, mask_BxL


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(cfg, params, ids_BxL, mask_BxL, rng=None):
  """A contrastive-style loss over the batch, its embeddings and its gradients."""
  def loss(p):
    e_BxD = enc.embed(p, ids_BxL, mask_BxL, cfg, dropout_rng=rng)
    sim_BxB = e_BxD @ e_BxD.T / 0.05
    return -jnp.mean(jax.nn.log_softmax(sim_BxB, axis=-1) * jnp.eye(len(e_BxD)) + 0.1 * sim_BxB), e_BxD
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_embeddings_and_gradients(tiny, remat):
  cfg, params, ids_BxL, mask_BxL = tiny
  base = _loss_and_grads(cfg, params, ids_BxL, mask_BxL)
  rematted = _loss_and_grads(cfg.replace(remat=remat), params, ids_BxL, mask_BxL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), base, rematted)


def test_dropout_on_iff_rng_given(tiny):
  cfg, params, ids_BxL, mask_BxL = tiny
  cfg = cfg.replace(remat="full")  # dropout masks must be reproduced when the layer is recomputed
  (_, plain_BxD), _ = _loss_and_grads(cfg, params, ids_BxL, mask_BxL)
  drop_a = _loss_and_grads(cfg, params, ids_BxL, mask_BxL, jax.random.key(1))
  drop_a2 = _loss_and_grads(cfg, params, ids_BxL, mask_BxL, jax.random.key(1))
  (_, drop_b_BxD), _ = _loss_and_grads(cfg, params, ids_BxL, mask_BxL, jax.random.key(2))
  drop_a_BxD = drop_a[0][1]
  assert np.abs(np.asarray(drop_a_BxD - plain_BxD)).max() > 1e-3
  assert np.abs(np.asarray(drop_a_BxD - drop_b_BxD)).max() > 1e-3
  jax.tree.map(np.testing.assert_array_equal, drop_a, drop_a2)
  # Without remat the same rng gives the same masks, so remat changes nothing under dropout either.
  no_remat = _loss_and_grads(cfg.replace(remat="none"), params, ids_BxL, mask_BxL, jax.random.key(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), drop_a, no_remat)
