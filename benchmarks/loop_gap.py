"""The host's idle gap between train steps: the trainer's loop against the step run back to back.

A step whose device time is small (here a tiny random BERT, 2 layers × 32, on configs/demo.py's real
Bible batches over 8 simulated CPU devices, ~tens of ms a step) shows what a GPU or TPU step would see:
any host work the loop does between steps (building and copying the next batch, reading metrics) is
device idle time. Three loops over the same batches, in one process:

  back to back   the step dispatched N times on batches already on the devices, at most 2 (the device
                 floor) or 1 steps in flight (`me5_jax.dispatch`; never unbounded: XLA:CPU deadlocks
                 past 32 queued 8-device steps)
  synchronous    the loop before round 3: dispatch, build the next host batch, read the step's
                 metrics (waits for it), then copy the next batch and dispatch
  trainer        `me5_jax.train.train_and_evaluate` with `steps_in_flight` 2 (metrics read one step
                 late) and 1 (the default on CPU with several devices), batches prefetched onto the
                 devices by `inputs.DeviceFeed`, timed from its metrics.jsonl

gap = loop ms/step − back-to-back (≤ 2 in flight) ms/step.

  python benchmarks/loop_gap.py              # 60 steps each, ~2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("ME5_CPU_DEVICES", "8")
import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", int(os.environ["ME5_CPU_DEVICES"]))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs.demo import get_config  # noqa: E402
from me5_jax import dispatch, fetch, inputs, sharding, train  # noqa: E402
from me5_jax import train_step as ts  # noqa: E402
from me5_jax.tokenize import Tokenizer  # noqa: E402


def tiny_model(root: str, minilm_dir: str) -> str:
  """A random 2-layer BERT (d 32) with MiniLM's tokenizer, as tests/test_train_loop.py uses."""
  import torch
  from transformers import BertConfig, BertModel
  path = os.path.join(root, "tiny-bert")
  torch.manual_seed(0)
  BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(path)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(os.path.join(minilm_dir, name), path)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="loop_gap_")
  config = get_config()
  config.init_checkpoint = tiny_model(root, fetch.fetch("all-MiniLM-L6-v2"))
  config.update(dict(total_steps=args.steps, warmup_steps=2, log_every_steps=10, checkpoint_every_steps=args.steps,
                     eval_bitext="", export_at_end=False))
  mesh = sharding.make_mesh(config)
  _, enc_cfg, load_params = inputs.model_source(config)
  enc_cfg = ts.encoder_config(enc_cfg, config)
  tokenizer = Tokenizer.from_dir(config.init_checkpoint)
  step_fn = ts.make_train_step(enc_cfg, config, mesh)

  def fresh():
    return ts.init_train_state(enc_cfg, config, mesh, load_params()), inputs.input_pipeline(config, tokenizer, mesh)

  # Back to back: the batches are on the devices before the clock starts; at most `limit` steps in flight
  # (dispatch.InFlight: unbounded, XLA:CPU deadlocks past 32 queued 8-device steps).
  state, pipeline = fresh()
  device_batches = [sharding.shard_batch(next(pipeline), mesh) for _ in range(args.steps)]
  seen = set()
  for b in device_batches:  # every shape (one program per packed row count) compiled before timing
    if b["packed_ids"].shape not in seen:
      seen.add(b["packed_ids"].shape)
      state, metrics = step_fn(state, b)
      jax.block_until_ready(metrics)

  def back_to_back(limit: int) -> float:
    nonlocal state
    in_flight = dispatch.InFlight(limit)
    start = time.perf_counter()
    for b in device_batches:
      in_flight.admit()
      state, metrics = step_fn(state, b)
      in_flight.add(metrics)
    in_flight.drain()
    return (time.perf_counter() - start) / args.steps

  floor = {limit: back_to_back(limit) for limit in (2, 1)}

  # Synchronous: the loop as it was (host batch built during the step, metrics read before the next dispatch).
  state, pipeline = fresh()
  batch = next(pipeline)
  start = time.perf_counter()
  for step in range(args.steps):
    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    if step < args.steps - 1:
      batch = next(pipeline)
    metrics = jax.device_get(metrics)
  synchronous = (time.perf_counter() - start) / args.steps

  def trainer(limit: int) -> float:
    """The trainer in-process with `steps_in_flight=limit`; its per-interval step times after the first
    interval (compile, evals)."""
    workdir = os.path.join(root, f"run{limit}")
    run_config = config.copy_and_resolve_references()
    run_config.steps_in_flight = limit
    train.train_and_evaluate(run_config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      times = [json.loads(line)["step_time_s"] for line in f if '"step_time_s"' in line]
    return statistics.median(times[1:])

  rows = [("back to back, ≤ 2 in flight (device floor)", floor[2]), ("back to back, ≤ 1 in flight", floor[1]),
          ("synchronous (the loop before round 3)", synchronous)]
  rows += [(f"trainer, steps_in_flight={limit}{' (default here)' if limit == dispatch.max_in_flight() else ''}",
            trainer(limit)) for limit in (2, 1)]
  print(f"tiny BERT (2×32), configs/demo.py batches (64 Bible pairs, packed), {jax.device_count()} simulated CPU "
        f"devices, {args.steps} steps per loop; jax {jax.__version__}, {os.cpu_count()} cores")
  print(f"| {'loop':45} | {'ms/step':>8} | {'host gap ms/step':>16} |")
  print(f"|{'-' * 47}|{'-' * 10}|{'-' * 18}|")
  for name, sec in rows:
    print(f"| {name:45} | {1e3 * sec:8.1f} | {1e3 * (sec - floor[2]):16.1f} |")
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
