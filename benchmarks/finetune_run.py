"""A whole 30-step fine-tune of the real mE5-small: `python -m me5_jax.train` against sentence-transformers'
`SentenceTransformerTrainer.train()`, on the same machine in the same run, compile included.

The data: 1,920 real (query → passage) pairs from the Bible (benchmarks/finetune_step.py's `real_pairs`:
a verse of ~20–60 tokens in a non-English version → the 10 verses around it, cut at 128 tokens), written as
JSONL. me5_jax builds it (`data_pipelines.build --source custom`, timed on its own) and trains
`configs/small.py` as the issue's run did: fp32, one CPU device, batch 64, lr 2e-5 (3 warmup steps),
τ 0.05, 30 steps, dropout on, queries and passages cut at 128, a cold compile cache (a fresh
JAX_COMPILATION_CACHE_DIR) unless --warm_cache. The peer: MultipleNegativesRankingLoss (scale 20) under
SentenceTransformerTrainer, batch 64, lr 2e-5, 3 warmup steps, 30 steps, fp32, no saving; its
`trainer.train()` is timed, and its whole script. Each side runs in its own process, one after the other.

  python benchmarks/finetune_run.py            # ~25 minutes on 2 cores
  python benchmarks/finetune_run.py --steps 5  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BATCH, LR, TAU, WARMUP, PAIRS = 64, 2e-5, 0.05, 3, 1920

PEER = r"""
import json, sys, time
t0 = time.time()
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
model_dir, pairs_path, steps, out = sys.argv[1:5]
rows = [json.loads(line) for line in open(pairs_path, encoding="utf-8")]
data = Dataset.from_dict({"anchor": ["query: " + r["query"] for r in rows],
                          "positive": ["passage: " + r["passage"] for r in rows]})
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = 128
args = SentenceTransformerTrainingArguments(
    output_dir=out, per_device_train_batch_size=%(batch)d, learning_rate=%(lr)g, warmup_steps=%(warmup)d,
    max_steps=int(steps), lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0, save_strategy="no",
    logging_steps=10, report_to=[], dataloader_drop_last=True, seed=0, use_cpu=True)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                     loss=MultipleNegativesRankingLoss(model, scale=%(scale)g))
t1 = time.time()
trainer.train()
print(json.dumps({"train_s": time.time() - t1, "script_s": time.time() - t0}))
""" % dict(batch=BATCH, lr=LR, warmup=WARMUP, scale=1 / TAU)


def write_pairs(path: str) -> None:
  from finetune_step import real_pairs, realdata
  from me5_jax.tokenize import Tokenizer
  root = realdata()
  pairs = real_pairs(root, Tokenizer.from_dir(os.path.join(root, "me5-small-q4")), PAIRS, seed=1)
  with open(path, "w", encoding="utf-8") as f:
    for q, p in pairs:
      f.write(json.dumps({"query": q, "passage": p}, ensure_ascii=False) + "\n")


RUN_TIMEOUT_S = 3600  # one whole 30-step run takes minutes here; a hung run raises TimeoutExpired


def timed(cmd: list[str], env: dict, log_path: str) -> float:
  start = time.time()
  with open(log_path, "w") as log:
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S).returncode
  if rc:
    sys.exit(f"finetune_run: {' '.join(cmd[:4])} ... exited {rc}; see {log_path}")
  return time.time() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warm_cache", action="store_true", help="keep .cache/jax (a rerun) instead of a fresh one")
  parser.add_argument("--work", default="", help="folder for data, runs and logs (default: a temp folder)")
  parser.add_argument("--only", choices=("me5_jax", "peer"), default=None, help="run one side only")
  parser.add_argument("--glibc_tunables", default="glibc.malloc.hugetlb=1",
                      help="GLIBC_TUNABLES of the me5_jax side, as launch/setup_env.sh sets it ('' = glibc's "
                           "defaults); the peer runs with glibc's defaults, as sentence-transformers users do")
  args = parser.parse_args()
  work = args.work or tempfile.mkdtemp(prefix="finetune_run_")
  os.makedirs(work, exist_ok=True)
  from finetune_step import realdata  # benchmarks/finetune_step.py, beside this script
  pairs = os.path.join(work, "pairs.jsonl")
  write_pairs(pairs)
  model_dir = os.path.join(realdata(), "me5-small-q4")
  env = {k: v for k, v in os.environ.items() if k not in ("ME5_CPU_DEVICES", "XLA_FLAGS", "GLIBC_TUNABLES")}
  env["OMP_WAIT_POLICY"] = "PASSIVE"
  if not args.warm_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(work, "jax_cache")
  rows = []
  if args.only != "peer":
    rows += run_me5_jax(args, work, pairs, model_dir,
                        {**env, "GLIBC_TUNABLES": args.glibc_tunables} if args.glibc_tunables else env)
  if args.only != "me5_jax":
    rows += run_peer(args, work, pairs, model_dir, env)
  print(f"{args.steps}-step fine-tune of me5-small-q4, batch {BATCH} real pairs, fp32, 1 CPU device, "
        f"{'warm' if args.warm_cache else 'cold'} compile cache; me5_jax with GLIBC_TUNABLES="
        f"{args.glibc_tunables or '(unset)'}; {os.cpu_count()} cores; logs in {work}")
  print(f"| {'what':52} | {'seconds':>8} | notes")
  print(f"|{'-' * 54}|{'-' * 10}|------")
  for what, sec, note in rows:
    print(f"| {what:52} | {sec:8.1f} | {note}")


def run_me5_jax(args, work: str, pairs: str, model_dir: str, env: dict) -> list[tuple[str, float, str]]:
  data_dir = os.path.join(work, "tfds")
  build_s = timed([sys.executable, "-m", "data_pipelines.build", "--source", "custom", "--files", pairs,
                   "--data-dir", data_dir, "--overwrite"], env, os.path.join(work, "build.log"))
  overrides = dict(init_checkpoint=model_dir, train_data="custom", data_dir=data_dir, batch_size=BATCH,
                   total_steps=args.steps, warmup_steps=WARMUP, learning_rate=LR, temperature=TAU,
                   dtype="float32", remat="none", **{"mesh.data": 1, "gradcache.chunk_size": 0},
                   query_max_length=128, passage_max_length=128, log_every_steps=10,
                   checkpoint_every_steps=args.steps, export_at_end=False)
  workdir = os.path.join(work, "me5_jax_run")
  train_log = os.path.join(work, "train.log")
  train_s = timed([sys.executable, "-m", "me5_jax.train", "--config", "configs/small.py", "--workdir", workdir]
                  + [f"--config.{k}={v}" for k, v in overrides.items()], env, train_log)
  with open(train_log, encoding="utf-8") as f:
    log = f.read()
  first = re.search(r"(\d\d:\d\d:\d\d) INFO training steps", log)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if '"loss"' in line]
  steps_s = sum(r["step_time_s"] * (r["step"] - prev) for r, prev in
                zip(records, [0] + [r["step"] for r in records[:-1]]))
  rows = [("me5_jax: data_pipelines.build", build_s, "")]
  rows.append((f"me5_jax: me5_jax.train ({args.steps} steps)", train_s,
               f"steps {steps_s:.0f} s incl. compile; loss {records[-1]['loss']:.3f}; started {first[1] if first else '?'}"))
  return rows


def run_peer(args, work: str, pairs: str, model_dir: str, env: dict) -> list[tuple[str, float, str]]:
  """SentenceTransformerTrainer.train() on the same pairs, in its own process."""
  script = os.path.join(work, "peer.py")
  with open(script, "w") as f:
    f.write(PEER)
  peer_log = os.path.join(work, "peer.log")
  peer_s = timed([sys.executable, script, model_dir, pairs, str(args.steps), os.path.join(work, "peer_out")],
                 env, peer_log)
  with open(peer_log, encoding="utf-8") as f:
    peer = json.loads([line for line in f if line.startswith('{"train_s"')][-1])
  return [(f"sentence-transformers: trainer.train() ({args.steps} steps)", peer["train_s"],
           f"whole script {peer_s:.0f} s")]


if __name__ == "__main__":
  main()
