"""The bound on executions in flight (me5_jax.dispatch) and the loops that obey it. No real data: a tiny
random BERT with a made-up vocabulary, trained on made-up pairs, so these run in any clone."""
import json
import os
import subprocess
import sys

import jax
import pytest

from me5_jax import dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(200)]


def test_in_flight_finishes_the_oldest_before_one_more_would_exceed_the_limit():
  finished = []
  window = dispatch.InFlight(2, finish=finished.append)
  for i in range(5):
    window.admit()
    window.add(i)
    assert len(window.items) <= 2
  assert finished == [0, 1, 2]
  window.drain()
  assert finished == [0, 1, 2, 3, 4] and not window.items
  with pytest.raises(ValueError, match="1..32"):
    dispatch.InFlight(33)


def test_bound_is_one_for_simulated_cpu_devices_and_two_for_one_device():
  assert dispatch.max_in_flight() == 1          # the suite's 8 simulated CPU devices
  assert dispatch.max_in_flight(jax.devices()[:1]) == 2


def test_the_program_that_deadlocks_unbounded_finishes_at_the_bound():
  """tests/dispatch_probe.py queued without a bound aborts in XLA:CPU's rendezvous (~45 s, not run here)."""
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "dispatch_probe.py"), "300",
                        str(dispatch.max_in_flight())], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "300 steps, at most 1 in flight" in out.stdout, out.stderr[-2000:]


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
  """(model folder, data dir): a random 1-layer BERT (d 32) whose vocab.txt holds WORDS, and 512
  made-up (query, passage) pairs built as the `custom` source."""
  import torch
  from transformers import BertConfig, BertModel

  from data_pipelines import builders
  root = tmp_path_factory.mktemp("dispatch")
  model_dir = str(root / "tiny-bert")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", ":", "passage"] + WORDS
  torch.manual_seed(0)
  BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
  with open(os.path.join(model_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}, f)
  pairs = str(root / "pairs.jsonl")
  with open(pairs, "w") as f:
    for i in range(512):
      words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(1 + i % 6)]
      f.write(json.dumps({"query": " ".join(words[:3]), "passage": " ".join(words)}) + "\n")
  data_dir = str(root / "tfds")
  builders.build("custom", data_dir, [pairs])
  return model_dir, data_dir


@pytest.mark.timeout(450)
def test_trainer_runs_500_steps_on_8_devices_at_the_default_bound(made_up, tmp_path):
  """The real loop (python -m me5_jax.train, in a subprocess with a time limit, so a hang fails this test
  instead of the suite) with `steps_in_flight` at its default, on 8 simulated CPU devices."""
  model_dir, data_dir = made_up
  steps = 500
  settings = dict(init_checkpoint=model_dir, train_data="custom", data_dir=data_dir, batch_size=16,
                  query_max_length=16, passage_max_length=16, total_steps=steps, warmup_steps=10,
                  checkpoint_every_steps=steps, log_every_steps=100, eval_bitext="", export_at_end=False)
  cmd = ([sys.executable, "-m", "me5_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
          "--workdir", str(tmp_path / "run")] + [f"--config.{k}={v}" for k, v in settings.items()])
  out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "ME5_CPU_DEVICES": "8"}, capture_output=True, text=True,
                       timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "at most 1 step(s) in flight" in out.stderr
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert max(r["step"] for r in logged) == steps
