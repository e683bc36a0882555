"""The real mE5-small fine-tune step on CPU: me5_jax against sentence-transformers' MNRL, in one process.

Same work per step on every side: the real multilingual-e5-small (me5-small-q4 from `me5_jax.fetch`,
250k vocabulary), B = 64 real query → passage pairs (a Bible verse in one of 11 non-English versions,
"query: ", ~20–60 tokens → the 10-verse passage around it in another version, "passage: ", cut at 128),
fp32, dropout on (the checkpoint's 0.1 at every site, attention probabilities included), InfoNCE over the
batch at τ = 0.05 (MNRL scale 20), backward, clipping at 1.0, AdamW at lr 2e-5. The peer is
sentence-transformers' `MultipleNegativesRankingLoss` on a `SentenceTransformer` (transformers'
BertModel, SDPA attention), each side padded to its own longest text, as its collator pads. me5_jax runs
the trainer's jitted step (`train_step.make_train_step`) on `configs/small.py` settings, with the layouts
given by --layouts: `padded` (power-of-two buckets) and `packed` (`pack_sequences`; 128-token rows).
Steps cycle through --batches real batches (each shape compiles once, in the warm-up pass, reported as
"first steps"). Each path runs in its own worker process (as a training run would: no other framework's
thread pools in it) and the workers take turns, round by round, so load from elsewhere hits all alike;
each reports its median round.

  python benchmarks/finetune_step.py                  # one CPU device (as a plain `me5_jax.train` runs)
  python benchmarks/finetune_step.py --devices 8      # 8 simulated CPU devices (mesh.data=8)
  python benchmarks/finetune_step.py --profile DIR    # also a jax.profiler trace of one me5_jax step per layout
  python benchmarks/finetune_step.py --no_peer --layouts packed,packed:attention_dropout=0.0,packed:xla_cpu_options=
      # trade-offs: attention-probability dropout off (jax.nn.dot_product_attention), XLA:CPU's YNNPACK fusions on
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time

# torch's OpenMP workers otherwise spin after each op, taking the cores from the JAX step that follows.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEVICES = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--devices=")),
                int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 1)
import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", _DEVICES)

import numpy as np  # noqa: E402

from me5_jax import config as config_lib, profiling  # noqa: E402
from me5_jax.tokenize import Tokenizer  # noqa: E402
from data_pipelines.preprocess import Batcher, PreprocessConfig  # noqa: E402
from train_step import trainer_step  # noqa: E402  (benchmarks/train_step.py)

BATCH, TAU, LR = 64, 0.05, 2e-5
PEER = "sentence-transformers"
QUERY_TOKENS = (20, 60)
# --allocators: the malloc behind a me5_jax worker, as its environment. XLA:CPU mallocs each execution's
# temporaries and frees them after it; glibc serves large blocks with mmap and returns them to the kernel,
# so every step faults its temporaries in again. "nommap" keeps them on the heap (never mmap, never trim);
# "thp" backs the heap with transparent huge pages; jemalloc and tcmalloc (NAME=path/to/lib.so, e.g. from
# Debian's libjemalloc2 / libtcmalloc-minimal4) are LD_PRELOADed with their default settings.
_KEEP = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={1 << 40}"
ALLOCATORS = {"glibc": {}, "nommap": {"GLIBC_TUNABLES": _KEEP}, "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
              "nommap+thp": {"GLIBC_TUNABLES": _KEEP + ":glibc.malloc.hugetlb=1"}, "jemalloc": None, "tcmalloc": None}


def profile_subdir(root: str, name: str) -> str:
  """--profile's folder for path `name` ("me5_jax packed:attention_dropout=0.0 [thp]"), "" for the peer."""
  if not root or name == PEER:
    return ""
  return os.path.join(root, name.replace(" [", "_").rstrip("]").split()[-1].replace(":", "_"))


def allocator_envs(spec: str) -> dict[str, dict[str, str]]:
  """"glibc,nommap,jemalloc=/usr/lib/.../libjemalloc.so.2" → {name: environment}."""
  envs = {}
  for item in filter(None, spec.split(",")):
    name, _, lib = item.partition("=")
    if name not in ALLOCATORS:
      sys.exit(f"finetune_step: --allocators: unknown {name!r}; known: {', '.join(ALLOCATORS)}")
    if ALLOCATORS[name] is None and not os.path.isfile(lib):
      sys.exit(f"finetune_step: --allocators: {name} needs its library, {name}=PATH (got {lib or 'none'})")
    envs[name] = ALLOCATORS[name] if ALLOCATORS[name] is not None else {"LD_PRELOAD": lib}
  return envs


def realdata() -> str:
  """The cache folder holding me5-small-q4 and bible_pd.tsv (`me5_jax.fetch` gets them if missing)."""
  from me5_jax import fetch
  for name in ("me5-small-q4", "bible_pd.tsv"):
    fetch.fetch(name)
  return fetch.cache_dir()


def real_pairs(root: str, tokenizer: Tokenizer, n: int, seed: int = 0) -> list[tuple[str, str]]:
  """n (query, passage) texts without prefixes: a verse of ~20–60 tokens (with "query: ") in a non-English
  version → the 10 verses around it in any version (cut at 128 tokens by the batcher, as
  passage_max_length does)."""
  with open(os.path.join(root, "bible_pd.tsv"), encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  header, rows = rows[0], rows[1:]
  cols = [c for c in range(1, len(header)) if not header[c].startswith("en")]
  rng = np.random.default_rng(seed)
  pairs = []
  while len(pairs) < n:
    i, qc, pc = int(rng.integers(5, len(rows) - 5)), int(rng.choice(cols)), int(rng.integers(1, len(header)))
    query = rows[i][qc]
    if not QUERY_TOKENS[0] <= len(tokenizer.token_ids(["query: " + query])[0]) <= QUERY_TOKENS[1]:
      continue
    pairs.append((query, " ".join(r[pc] for r in rows[i - 5:i + 5])))
  return pairs


def step_config(devices: int) -> config_lib.ml_collections.ConfigDict:
  """configs/small.py's fine-tune settings as the issue's run used them: fp32, pairs, lr 2e-5, τ 0.05."""
  c = config_lib.recipe_config("small", "pretrain")
  c.dtype, c.remat, c.batch_size, c.learning_rate, c.temperature = "float32", "none", BATCH, LR, TAU
  c.warmup_steps, c.total_steps, c.gradcache.chunk_size = 3, 30, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = devices, 1, 1
  c.query_max_length = c.passage_max_length = 128
  return c


def torch_runner(model_dir: str, pairs_per_batch):
  import torch
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

  model = SentenceTransformer(model_dir, device="cpu")
  model.train()
  loss_fn = MultipleNegativesRankingLoss(model, scale=1.0 / TAU)
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
  max_len = 128
  model.max_seq_length = max_len
  features = [[model.preprocess([q for q, _ in pairs]), model.preprocess([p for _, p in pairs])]
              for pairs in pairs_per_batch]
  box = {"i": 0}

  def run():
    feats = features[box["i"] % len(features)]
    box["i"] += 1
    loss = loss_fn(feats, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run, lambda: None, [sum(int(f["attention_mask"].shape[1]) * BATCH for f in fs) for fs in features]


def build_runner(name: str, args, root: str, model_dir: str, tokenizer: Tokenizer, pairs_per_batch):
  """(run one step, wait, tokens encoded per step) of `name`: "me5_jax padded|packed" or the peer."""
  if name == PEER:
    run, sync, peer_tokens = torch_runner(model_dir, pairs_per_batch)
    return run, sync, float(np.mean(peer_tokens))
  layout, _, overrides = name.split()[-1].partition(":")
  pre = PreprocessConfig(max_query_length=128, max_passage_length=128, prefixes={"": ("", "")},
                         pack_rows=layout == "packed", row_multiple=args.devices)
  batcher = Batcher(tokenizer, pre)
  batches = [batcher([q for q, _ in pb], [p for _, p in pb]) for pb in pairs_per_batch]
  config = step_config(args.devices)
  config.init_checkpoint = model_dir
  for override in filter(None, overrides.split(",")):  # e.g. packed:attention_dropout=0.0
    key, _, value = override.partition("=")
    config[key] = type(config[key])(value)  # float or str keys
  run, sync = trainer_step(config, batches)
  tokens = np.mean([b["packed_ids"].size if layout == "packed" else b["query_ids"].size + b["passage_ids"].size
                    for b in batches])
  return run, sync, float(tokens)


def serve(args) -> None:
  """--worker NAME: build one runner, warm it up (compiles), then run the steps the parent asks for on
  stdin ("N" per line), answering one JSON line each on stdout."""
  root = realdata()
  model_dir = os.path.join(root, "me5-small-q4")
  tokenizer = Tokenizer.from_dir(model_dir)
  pairs_per_batch = batches_of_pairs(root, tokenizer, args.batches)
  run, sync, tokens = build_runner(args.worker, args, root, model_dir, tokenizer, pairs_per_batch)
  start = time.perf_counter()
  for _ in pairs_per_batch:  # one compile per distinct shape; the peer's first steps warm its allocator
    run()
  sync()
  first_s = time.perf_counter() - start
  if args.profile and args.worker != PEER:
    with profiling.trace(args.profile):
      run()
      sync()
  where = (f"jax {jax.__version__} on {jax.device_count()} CPU device(s)" if args.worker != PEER else
           f"torch {__import__('torch').__version__}, {__import__('torch').get_num_threads()} threads")
  print(json.dumps({"first_s": first_s, "tokens": tokens, "where": where}), flush=True)
  for line in sys.stdin:
    n = int(line)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(n):
      run()
    sync()
    sec = (time.perf_counter() - start) / n
    print(json.dumps({"sec": sec, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n}),
          flush=True)


def batches_of_pairs(root: str, tokenizer: Tokenizer, n: int):
  pairs = [("query: " + q, "passage: " + p) for q, p in real_pairs(root, tokenizer, BATCH * n)]
  return [pairs[i * BATCH:(i + 1) * BATCH] for i in range(n)]


class Worker:
  """A `--worker` subprocess: one framework and layout per process, so no thread pool or allocator of one
  slows the other (co-resident, torch's runtime slowed the JAX step by ~30 % here: BENCHMARKS.md)."""

  def __init__(self, name: str, argv: list[str], profile_dir: str, env: dict[str, str] | None = None):
    """`name`: the path ("me5_jax packed"), with " [allocator]" where --allocators asks for several."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name.split(" [")[0]]
    if profile_dir:
      cmd += ["--profile", profile_dir]
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})})
    self.answers: queue.Queue = queue.Queue()  # its JSON lines, then None at its exit (read by a thread,
    threading.Thread(target=self._read, daemon=True).start()  # so that a silent worker can time out)

  def _read(self) -> None:
    for line in self.proc.stdout:
      if line.startswith("{"):
        self.answers.put(line)
    self.answers.put(None)

  def answer(self, timeout_s: float = 900.0) -> dict:
    """The worker's next JSON line; a worker silent for `timeout_s` (a hang) is killed and named."""
    try:
      line = self.answers.get(timeout=timeout_s)
    except queue.Empty:
      self.proc.kill()
      sys.exit(f"finetune_step: the {self.name} worker gave no answer in {timeout_s:.0f} s; killed it")
    if line is None:
      sys.exit(f"finetune_step: the {self.name} worker exited ({self.proc.wait()}) without an answer")
    return json.loads(line)

  def run(self, steps: int) -> dict:
    """{"sec": seconds per step, "faults": minor page faults per step}."""
    try:
      self.proc.stdin.write(f"{steps}\n")
      self.proc.stdin.flush()
    except BrokenPipeError:  # e.g. killed for memory: every worker holds its model, optimizer and temporaries
      sys.exit(f"finetune_step: the {self.name} worker exited ({self.proc.wait()}); fewer --allocators or "
               "--layouts per run need less memory")
    return self.answer()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices (mesh.data)")
  parser.add_argument("--batches", type=int, default=2, help="real batches cycled per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--layouts", default="padded,packed",
                      help="me5_jax layouts to time, each optionally with config overrides: "
                           "'packed:attention_dropout=0.0', 'packed:xla_cpu_options='")
  parser.add_argument("--no_peer", action="store_true", help="me5_jax only")
  parser.add_argument("--allocators", default="glibc",
                      help=f"malloc variants for the me5_jax workers: {', '.join(ALLOCATORS)} "
                           "(jemalloc=PATH, tcmalloc=PATH); the peer keeps glibc's")
  parser.add_argument("--profile", default="", help="a jax.profiler trace of one step per layout under this folder")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    serve(args)
    return
  root = realdata()
  tokenizer = Tokenizer.from_dir(os.path.join(root, "me5-small-q4"))
  real_tokens = np.mean([sum(len(r) for r in tokenizer.token_ids([t for pair in pb for t in pair], 128))
                         for pb in batches_of_pairs(root, tokenizer, args.batches)])
  envs = allocator_envs(args.allocators)
  paths = [(f"me5_jax {layout}" + (f" [{alloc}]" if len(envs) > 1 else ""), env)
           for layout in args.layouts.split(",") for alloc, env in envs.items()]
  paths += [] if args.no_peer else [(PEER, {})]
  names = [name for name, _ in paths]
  argv = ["--devices", str(args.devices), "--batches", str(args.batches)]
  workers, ready = [], {}
  for name, env in paths:  # started one at a time: their warm-up compiles do not compete
    workers.append(Worker(name, argv, profile_subdir(args.profile, name), env))
    ready[name] = workers[-1].answer()
  start = time.time()
  answers = {w.name: [] for w in workers}
  for _ in range(args.rounds):
    for w in workers:
      answers[w.name].append(w.run(args.batches))
  for w in workers:
    w.close()
  med = {name: statistics.median(a["sec"] for a in v) for name, v in answers.items()}
  faults = {name: statistics.median(a["faults"] for a in v) for name, v in answers.items()}
  print(f"fine-tune step, me5-small-q4 (12×384, vocab 250k), {BATCH} real pairs per step (queries "
        f"{QUERY_TOKENS[0]}–{QUERY_TOKENS[1]} tokens, passages ≤ 128), fp32, dropout 0.1, {args.batches} batches × "
        f"{args.rounds} rounds, one process per path, alternating ({time.time() - start:.0f} s); real tokens per "
        f"step {real_tokens:.0f}; {os.cpu_count()} cores")
  for name in names:
    print(f"  {name}: {ready[name]['where']}")
  ref = med.get(PEER)
  print(f"| {'path':40} | {'s/step':>7} | {'minor faults/step':>17} | {'tokens encoded/step':>19} | "
        f"{'first steps (compile)':>21} | {'peer time / time':>16} |")
  print(f"|{'-' * 42}|{'-' * 9}|{'-' * 19}|{'-' * 21}|{'-' * 23}|{'-' * 18}|")
  for name, s in med.items():
    ratio = f"{ref / s:15.2f}x" if ref else f"{'-':>16}"
    print(f"| {name:40} | {s:7.2f} | {faults[name]:17.0f} | {ready[name]['tokens']:19.0f} | "
          f"{ready[name]['first_s']:20.1f}s | {ratio} |")
  for name in names:
    if args.profile and name != PEER:
      print(f"\ntop operations, {name} (one step):")
      print(profiling.format_top_ops(profiling.top_ops(profile_subdir(args.profile, name)), 15))


if __name__ == "__main__":
  main()
