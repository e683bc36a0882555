"""`Embedder.encode` on every local device: equal to one device, in input order, each distinct text once."""
import jax
import numpy as np
import pytest

from me5_jax import hf_io
from me5_jax.embedder import Embedder
from me5_jax.tokenize import Tokenizer
from multilingual_texts import TEXTS


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  cfg, params = hf_io.load_pretrained(minilm_dir)
  return cfg, params, Tokenizer.from_dir(minilm_dir)


def counting(embedder: Embedder, monkeypatch) -> list[int]:
  """Records how many texts each tokenizer call gets: every encoded row is tokenized exactly once."""
  calls = []
  token_ids = embedder.tokenizer.token_ids

  def spy(texts, max_length=None):
    calls.append(len(texts))
    return token_ids(texts, max_length)
  monkeypatch.setattr(embedder.tokenizer, "token_ids", spy)
  return calls


def test_eight_devices_equal_one_in_order_with_repeats_encoded_once(minilm, monkeypatch):
  cfg, params, tokenizer = minilm
  distinct = list(dict.fromkeys(TEXTS))  # 36 sentences, an empty string, a text beyond the max length
  rng = np.random.default_rng(0)
  texts = [distinct[i] for i in rng.integers(0, len(distinct), 5 * len(distinct))]
  texts += distinct  # every distinct text at least once
  one = Embedder(cfg, params, tokenizer, devices=jax.devices()[:1])
  eight = Embedder(cfg, params, tokenizer, devices=jax.devices()[:8])
  calls = counting(eight, monkeypatch)
  emb8 = eight.encode(texts, prefix="query: ", batch_size=12)  # rounded up to 16 rows, 2 per device
  assert calls == [len(distinct)]
  emb1 = one.encode(texts, prefix="query: ", batch_size=16)
  np.testing.assert_allclose(emb8, emb1, atol=1e-6)
  ref = one.encode(distinct, prefix="query: ", batch_size=16)  # order: row i is texts[i]
  index = {t: i for i, t in enumerate(distinct)}
  np.testing.assert_allclose(emb8, ref[[index[t] for t in texts]], atol=1e-6)
  assert len(jax.tree.leaves(eight.params)[0].devices()) == 8


def test_max_length_beyond_positions_is_refused(minilm):
  cfg, params, tokenizer = minilm
  embedder = Embedder(cfg, params, tokenizer, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=f"max_length 1000 exceeds the model's {cfg.max_tokens} positions"):
    embedder.encode(["text"], max_length=1000)
