"""The CPU demo's train step on its real batches: me5_jax (packed and padded rows) against the PyTorch peer.

Same work per step on every side: all-MiniLM-L6-v2 (fetched from PyPI), 64 Bible verse pairs from the
`bible/demo` source in `configs/demo.py`'s order, dropout on, InfoNCE at τ = 0.05 over the batch, backward,
AdamW. The peer is what sentence-transformers' MultipleNegativesRankingLoss fit runs: transformers'
BertModel, each side padded to its own longest text (dynamic padding), one process on all cores.
me5_jax runs as the demo does, over 8 simulated devices: `packed` packs queries and passages into
128-token rows (`pack_sequences`, the demo's setting), `padded` pads each side to a power-of-two bucket.
Steps cycle through --batches real batches (each shape compiles once, in the warm-up pass); the
frameworks alternate round by round and each reports its median round, so load from other processes hits
all alike.

  python benchmarks/demo_step.py                 # 4 batches × 2 rounds, ~8 min on 2 cores
  python benchmarks/demo_step.py --batches 2 --rounds 1   # quick look
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("ME5_CPU_DEVICES", "8")
# torch's OpenMP workers otherwise spin after each op, taking the cores from the JAX step that follows.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", int(os.environ["ME5_CPU_DEVICES"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs.demo import get_config  # noqa: E402
from me5_jax import inputs, sharding  # noqa: E402
from me5_jax.tokenize import Tokenizer  # noqa: E402
from train_step import time_rounds, trainer_step  # noqa: E402  (benchmarks/train_step.py)


def torch_runner(config, batches):
  import torch
  import torch.nn.functional as F
  from transformers import AutoModel

  from me5_jax import fetch
  model = AutoModel.from_pretrained(fetch.resolve_model(config.init_checkpoint)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

  def trimmed(ids, mask):
    """Dynamic padding: the side's longest text, as sentence-transformers' collate pads."""
    length = int(mask.sum(1).max())
    return torch.from_numpy(ids[:, :length]).long(), torch.from_numpy(mask[:, :length]).long()

  sides = [(trimmed(b["query_ids"], b["query_mask"]), trimmed(b["passage_ids"][:, 0], b["passage_mask"][:, 0]))
           for b in batches]

  def embed(ids, mask):
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

  def one(q, p):
    def run():
      scores = embed(*q) @ embed(*p).T / config.temperature
      F.cross_entropy(scores, torch.arange(scores.shape[0])).backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
    return run
  box = {"i": 0}

  def run():
    one(*sides[box["i"] % len(sides)])()
    box["i"] += 1
  return run, lambda: None


def real_batches(config, n: int, packed: bool):
  config = config.copy_and_resolve_references()
  config.pack_sequences = packed
  model_dir, _, _ = inputs.model_source(config)
  pipeline = inputs.input_pipeline(config, Tokenizer.from_dir(model_dir), sharding.make_mesh(config))
  return [next(pipeline) for _ in range(n)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", type=int, default=4, help="real demo batches per round")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  import torch
  config = get_config()
  padded, packed = real_batches(config, args.batches, False), real_batches(config, args.batches, True)
  real = np.mean([b["query_mask"].sum() + b["passage_mask"].sum() for b in padded])
  tokens = {"me5_jax packed": np.mean([b["packed_ids"].size for b in packed]),
            "me5_jax padded": np.mean([b["query_ids"].size + b["passage_ids"].size for b in padded]),
            "torch (peer)": np.mean([b["query_ids"].shape[0] * (b["query_mask"].sum(1).max()
                                                                + b["passage_mask"].sum(-1).max()) for b in padded])}
  runners = {"me5_jax packed": trainer_step(config, packed), "me5_jax padded": trainer_step(config, padded),
             "torch (peer)": torch_runner(config, padded)}
  start = time.time()
  sec = time_rounds(runners, warmup=args.batches, steps=args.batches, rounds=args.rounds)
  print(f"demo step, all-MiniLM-L6-v2, {config.batch_size} real Bible pairs per step, {args.batches} batches × "
        f"{args.rounds} rounds ({time.time() - start:.0f} s); real tokens per step {real:.0f}")
  print(f"jax {jax.__version__} on {jax.device_count()} simulated CPU devices; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} cores")
  print(f"| {'path':15} | {'s/step':>7} | {'tokens encoded/step':>19} | {'peer time / time':>16} |")
  print(f"|{'-' * 17}|{'-' * 9}|{'-' * 21}|{'-' * 18}|")
  for name, s in sec.items():
    print(f"| {name:15} | {s:7.2f} | {tokens[name]:19.0f} | {sec['torch (peer)'] / s:15.2f}x |")


if __name__ == "__main__":
  main()
