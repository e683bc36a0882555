"""`Embedder.encode` on every local device: equal to one device, in input order, each distinct text once."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from me5_jax import hf_io
from me5_jax.embedder import Embedder
from me5_jax.tokenize import Tokenizer
from multilingual_texts import TEXTS
from test_train_loop import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_two_processes_embed_what_one_device_does(minilm, minilm_dir, tmp_path):
  """`python -m me5_jax.embed` as 2 processes × 2 CPU devices on loopback (gloo): one global batch over all 4
  devices; process 0 writes the rows, equal to one device's, in order."""
  cfg, params, tokenizer = minilm
  texts = [t for t in dict.fromkeys(TEXTS) if "\n" not in t]
  texts = texts + texts[::3]  # repeats
  src = tmp_path / "texts.txt"
  src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
  port = free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ME5_CPU_DEVICES": "2", "ME5_COORDINATOR": f"127.0.0.1:{port}",
           "ME5_NUM_PROCESSES": "2", "ME5_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, "-m", "me5_jax.embed", "--model", minilm_dir, "--input", str(src),
                                   "--output", str(tmp_path / f"out{i}.npy"), "--batch-size", "8"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
  assert not (tmp_path / "out1.npy").exists()
  want = Embedder(cfg, params, tokenizer, devices=jax.devices()[:1]).encode(texts, batch_size=8)
  np.testing.assert_allclose(np.load(tmp_path / "out0.npy"), want, atol=1e-6)
