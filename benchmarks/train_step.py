"""Train-step throughput of me5_jax against a PyTorch reference in the same run, as a ratio.

Both sides do the same work per step: encode B queries and B passages (dropout on, train mode), masked
mean pooling, L2 normalisation, InfoNCE of every query against all B passages at τ = 0.01, backward,
global-norm clipping at 1.0, AdamW (no decay on LayerNorm and biases) with a linear schedule. The PyTorch
side is transformers' BertModel (SDPA attention) with the same sizes and random init; nothing is
downloaded. JAX and PyTorch alternate in rounds and each reports its median round, so load from other
processes hits both alike. On CPU the process is pinned to --threads cores, which sizes both XLA's and
torch's thread pools (on a machine busy with other work, torch's OpenMP threads suffer most from
oversubscription: pin to fewer cores than are busy).

  python benchmarks/train_step.py              # CPU, fp32, a 4-layer d=256 encoder, B=16 pairs × 64 tokens
  python benchmarks/train_step.py --threads=1  # both frameworks pinned to one core
  python benchmarks/train_step.py --tiny       # seconds: smoke test of both code paths
  python benchmarks/train_step.py --gpu        # small/base/large, bf16, seq len 128, tokens/s, MFU, a base profile

--gpu: per-device batches realistic for the card
(--gpu_batch, 1024 / 512 / 256 pairs), bf16 activations with fp32 master params, dropout on. Rows per shape:
`me5_jax` (the checkpoint's attention dropout 0.1: the explicit XLA softmax with dropout), `me5_jax fused`
(attention_dropout=0: cuDNN's fused attention through jax.nn.dot_product_attention; hidden dropout stays),
and the PyTorch peer at its best: transformers' BertModel in bf16 autocast with SDPA attention and fused
AdamW, eager and `torch.compile`d (the faster is the ratio's reference). Each framework and shape runs in
its own process (--frameworks picks a subset). Then a jax.profiler trace of --profile_shape's step, in a
process of its own, and its top operations by device time. On an H200 (2026-12-04) the torch rows of all
three shapes took ~4.5 minutes and me5_jax's far longer: on a short lease, start with `--shapes small`.

MFU = model FLOPs per step / (step time × peak dense bf16 FLOP/s, --peak_tflops, 989 for an H100/H200 SXM).
Model FLOPs per token: 6 × (matmul params per layer × layers) + 12 × layers × seq len × hidden (the
attention score and value products), i.e. forward + backward without rematerialisation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np

from me5_jax import config as config_lib, dispatch, profiling, sharding
from me5_jax import train_step as ts
from me5_jax.variants import VARIANTS, EncoderConfig

TEMPERATURE = 0.01
LR, WARMUP, TOTAL = 1e-4, 10, 1000


def model_flops_per_step(cfg: EncoderConfig, batch: int, seq_len: int) -> float:
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  tokens = 2 * batch * seq_len  # queries and passages
  per_token = 6 * n * (4 * d * d + 2 * d * f) + 12 * n * seq_len * d
  return tokens * per_token + 6 * batch * batch * d  # + the B × B similarity matmul


def random_batch(cfg: EncoderConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = lambda shape: rng.integers(cfg.pad_token_id + 5, cfg.vocab_size, shape).astype(np.int32)
  return dict(query_ids=ids((batch, seq_len)), query_mask=np.ones((batch, seq_len), np.int32),
              passage_ids=ids((batch, 1, seq_len)), passage_mask=np.ones((batch, 1, seq_len), np.int32))


def jax_step(cfg: EncoderConfig, batch: dict[str, np.ndarray], attention_dropout: float = -1.0
             ) -> tuple[Callable[[], None], Callable[[], None]]:
  """(run one step, wait for the device) for me5_jax's jitted, donated train step on one device, with the
  attention kernel the trainer would pick (`train_step.encoder_config`, attention_impl "auto")."""
  config = config_lib.base_config()
  config.dtype, config.attention_dropout = cfg.dtype, attention_dropout
  cfg = ts.encoder_config(cfg, config)
  config.batch_size = batch["query_ids"].shape[0]
  config.mesh.data = 1
  config.temperature, config.learning_rate, config.warmup_steps, config.total_steps = TEMPERATURE, LR, WARMUP, TOTAL
  config.loss.false_negative_masking = False  # the PyTorch side has no hashes to compare
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  state = {"s": ts.init_train_state(cfg, config, mesh)}
  step = ts.make_train_step(cfg, config, mesh)
  device_batch = sharding.shard_batch(batch, mesh)
  in_flight = dispatch.InFlight(dispatch.max_in_flight(mesh.devices.flat))

  def run():
    in_flight.admit()
    state["s"], metrics = step(state["s"], device_batch)
    in_flight.add(metrics)

  return run, in_flight.drain


def trainer_step(config, batches: list[dict[str, np.ndarray]]) -> tuple[Callable[[], None], Callable[[], None]]:
  """(run one step, wait) of the trainer's own step for `config` (its init_checkpoint's weights), cycling
  through real host batches already sharded onto the mesh."""
  from me5_jax import inputs
  _, enc_cfg, load_params = inputs.model_source(config)
  enc_cfg = ts.encoder_config(enc_cfg, config)
  mesh = sharding.make_mesh(config)
  box = {"state": ts.init_train_state(enc_cfg, config, mesh, load_params()), "i": 0}
  step = ts.make_train_step(enc_cfg, config, mesh)
  device_batches = [sharding.shard_batch(b, mesh) for b in batches]
  in_flight = dispatch.InFlight(config.steps_in_flight or dispatch.max_in_flight(mesh.devices.flat))

  def run():
    in_flight.admit()  # the trainer's bound on steps in flight (me5_jax.dispatch)
    box["state"], metrics = step(box["state"], device_batches[box["i"] % len(device_batches)])
    in_flight.add(metrics)
    box["i"] += 1
  return run, in_flight.drain


def torch_step(cfg: EncoderConfig, batch: dict[str, np.ndarray], device: str, compile_model: bool = False
               ) -> tuple[Callable[[], None], Callable[[], None]]:
  """The same step in PyTorch: transformers BertModel (SDPA attention), autocast to the same activation
  dtype, fused AdamW on CUDA; `compile_model` wraps the encoder in torch.compile."""
  import torch
  import torch.nn.functional as F
  import transformers

  hf_cfg = transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id)
  hf_cfg._attn_implementation = "sdpa"  # transformers' default on torch >= 2.1; stated so the peer is pinned
  model = transformers.BertModel(hf_cfg, add_pooling_layer=False).to(device).train()
  no_decay = lambda name: name.endswith("bias") or "LayerNorm" in name
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=device == "cuda")
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: s / WARMUP if s < WARMUP else max(0.0, (TOTAL - s) / (TOTAL - WARMUP)))
  t = {k: torch.from_numpy(v.reshape(v.shape[0], -1)).long().to(device) for k, v in batch.items()}
  bf16 = cfg.dtype == "bfloat16"
  forward = torch.compile(model) if compile_model else model

  def embed(ids, mask):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      h = forward(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((h.float() * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

  def run():
    q = embed(t["query_ids"], t["query_mask"])
    p = embed(t["passage_ids"], t["passage_mask"])
    loss = F.cross_entropy(q @ p.T / TEMPERATURE, torch.arange(q.shape[0], device=device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)

  return run, (torch.cuda.synchronize if device == "cuda" else lambda: None)


def time_rounds(runners: dict[str, tuple[Callable, Callable]], warmup: int, steps: int, rounds: int
                ) -> dict[str, float]:
  """Median seconds per step of each runner; runners alternate round by round."""
  for run, sync in runners.values():
    for _ in range(warmup):  # compiles / autotunes
      run()
    sync()
  per_step = {name: [] for name in runners}
  for _ in range(rounds):
    for name, (run, sync) in runners.items():
      start = time.perf_counter()
      for _ in range(steps):
        run()
      sync()
      per_step[name].append((time.perf_counter() - start) / steps)
  return {name: statistics.median(v) for name, v in per_step.items()}


def _shapes(args) -> tuple[list[tuple[str, EncoderConfig, int]], int, int]:
  """[(name, encoder config, pairs per step)], seq len, timed steps per round."""
  drop = dict(hidden_dropout=args.dropout, attention_dropout=args.dropout)
  if args.gpu:
    batches = dict(kv.split("=") for kv in args.gpu_batch.split(","))
    shapes = [(name, VARIANTS[name].replace(dtype="bfloat16", **drop), int(batches[name]))
              for name in args.shapes.split(",")]
    return shapes, args.seq_len or 128, args.steps or 8
  if args.tiny:
    return [("tiny-bert", VARIANTS["tiny-bert"].replace(**drop), 8)], args.seq_len or 16, args.steps or 3
  cpu = EncoderConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                      max_position_embeddings=512, **drop)
  return [("cpu-4x256", cpu, args.batch)], args.seq_len or 64, args.steps or 5


def _measure(args, cfg: EncoderConfig, batch_size: int, seq_len: int, steps: int, frameworks: list[str]
             ) -> tuple[dict[str, float], dict[str, str]]:
  """Seconds per step of each framework in this process, and where each ran."""
  import torch
  device = "cuda" if args.gpu else "cpu"
  if args.gpu and not torch.cuda.is_available():
    raise SystemExit("--gpu: torch sees no CUDA device")
  if not args.gpu:
    torch.set_num_threads(args.threads)
  batch = random_batch(cfg, batch_size, seq_len)
  make = {"me5_jax": lambda: jax_step(cfg, batch), "me5_jax fused": lambda: jax_step(cfg, batch, 0.0),
          "torch": lambda: torch_step(cfg, batch, device),
          "torch.compile": lambda: torch_step(cfg, batch, device, compile_model=True)}
  runners = {fw: make[fw]() for fw in frameworks}
  sec = time_rounds(runners, warmup=2 if args.tiny else 3, steps=steps, rounds=args.rounds)
  jax_where = lambda: f"jax {jax.__version__} on {jax.devices()[0].device_kind}"  # noqa: E731
  torch_where = lambda: (f"torch {torch.__version__} on {torch.cuda.get_device_name() if args.gpu else 'cpu'}"  # noqa: E731
                         f"{'' if args.gpu else f', {torch.get_num_threads()} threads'}")
  if args.profile_dir and "me5_jax" in runners:
    run, sync = runners["me5_jax"]
    with profiling.trace(args.profile_dir):
      for _ in range(3):
        run()
      sync()
  return sec, {fw: jax_where() if fw.startswith("me5_jax") else torch_where() for fw in frameworks}


def _measure_isolated(name: str, framework: str, timeout_s: float, profile_dir: str = "") -> tuple[float, str]:
  """One framework on one shape in a fresh process: JAX's and torch's GPU memory pools never meet. The
  process's wall time (imports, compiles, rounds) goes to stderr as it ends, and into `where`: a lease on a
  lent GPU is short, and the next run is sized from these."""
  cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--one={name}:{framework}"]
  if profile_dir:
    cmd.append(f"--profile_dir={profile_dir}")
  start = time.perf_counter()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s).stdout
  wall_s = time.perf_counter() - start
  print(f"[{name} {framework}: process {wall_s:.0f} s]", file=sys.stderr, flush=True)
  result = json.loads(out.strip().splitlines()[-1])
  return result["sec"], f"{result['where']} ({wall_s:.0f} s)"


def _exception_line(stderr: str) -> str:
  """The raised exception's line of a traceback (JAX appends a note about its filtered frames after it)."""
  lines = [line for line in stderr.strip().splitlines() if line and not line.startswith(" ")]
  return next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1] if lines else "")


def _print_profile(args) -> None:
  """--profile_shape's me5_jax step traced in a process of its own, after the table: a slow or failing
  trace (CUPTI) costs no row."""
  profile_dir = os.path.abspath(f"profile-{args.profile_shape}")
  try:
    _measure_isolated(args.profile_shape, "me5_jax", args.worker_timeout, profile_dir)
    top = profiling.format_top_ops(profiling.top_ops(profile_dir), 25)
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
    print(f"\nprofile of {args.profile_shape} failed: "
          f"{_exception_line(e.stderr or '') if isinstance(e, subprocess.CalledProcessError) else e}")
    return
  print(f"\nme5_jax {args.profile_shape}: top operations by device time over 3 steps (trace in {profile_dir})")
  print(top)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="small/base/large in bf16 on the first GPU")
  parser.add_argument("--tiny", action="store_true", help="tiny model, few steps: a smoke test")
  parser.add_argument("--isolate", action="store_true",
                      help="each framework and shape in its own process (always on with --gpu)")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # shape:framework, for --isolate
  parser.add_argument("--shapes", default="small,base,large", help="--gpu: which variants")
  parser.add_argument("--frameworks", default="",
                      help="comma-separated subset of me5_jax, 'me5_jax fused', torch, torch.compile (default: all "
                           "four with --gpu, me5_jax and torch on CPU)")
  parser.add_argument("--gpu_batch", default="small=1024,base=512,large=256", help="--gpu: pairs per step")
  parser.add_argument("--profile_shape", default="base",
                      help="--gpu: the shape whose me5_jax step is profiled after the table ('' = none)")
  parser.add_argument("--worker_timeout", type=float, default=900,
                      help="seconds for one framework on one shape (imports, compiles, rounds): a hang never ends")
  parser.add_argument("--profile_dir", default="", help=argparse.SUPPRESS)  # set for the profiled subprocess
  parser.add_argument("--batch", type=int, default=16, help="CPU: query-passage pairs per step")
  parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (CPU 64, GPU 128)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU: pin the process to this many cores; XLA and torch both use exactly these")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the card")
  args = parser.parse_args()
  if not args.gpu:  # before XLA's and torch's thread pools exist: both size them from the affinity mask
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  shapes, seq_len, steps = _shapes(args)

  if args.one:
    name, framework = args.one.split(":")
    cfg, batch_size = next((c, b) for n, c, b in shapes if n == name)
    sec, where = _measure(args, cfg, batch_size, seq_len, steps, [framework])
    print(json.dumps({"sec": sec[framework], "where": where[framework]}))
    return
  frameworks = (args.frameworks.split(",") if args.frameworks else
                ["me5_jax", "me5_jax fused", "torch", "torch.compile"] if args.gpu else ["me5_jax", "torch"])

  isolate = args.isolate or args.gpu
  print(f"seq len {seq_len}, dropout {args.dropout}, "
        f"{'one process per framework and shape' if isolate else 'frameworks alternating in one process'}")
  print(f"{'shape':10} {'dtype':9} {'pairs':>5} {'framework':13} {'ms/step':>9} {'steps/s':>8} {'seq/s':>9} "
        f"{'tokens/s':>10} {'MFU':>6} {'jax/torch':>9}  where")
  for name, cfg, batch_size in shapes:
    if isolate:
      runs = {}
      for fw in frameworks:
        try:
          runs[fw] = _measure_isolated(name, fw, args.worker_timeout)
        except subprocess.CalledProcessError as e:  # e.g. torch.compile failing: report, keep the others
          print(f"{name} {fw}: failed ({e.returncode}): {_exception_line(e.stderr or '')}", flush=True)
        except subprocess.TimeoutExpired:
          print(f"{name} {fw}: no result within --worker_timeout={args.worker_timeout:.0f} s", flush=True)
      sec, where = {fw: r[0] for fw, r in runs.items()}, {fw: r[1] for fw, r in runs.items()}
    else:
      sec, where = _measure(args, cfg, batch_size, seq_len, steps, frameworks)
    flops = model_flops_per_step(cfg, batch_size, seq_len)
    peer = min((sec[fw] for fw in ("torch", "torch.compile") if fw in sec), default=None)
    for fw, s in sec.items():
      mfu = f"{100 * flops / (s * args.peak_tflops * 1e12):5.1f}%" if args.gpu else "    -"
      ratio = f"{peer / s:8.2f}x" if fw.startswith("me5_jax") and peer else ""
      print(f"{name:10} {cfg.dtype:9} {batch_size:5d} {fw:13} {1e3 * s:9.1f} {1 / s:8.2f} {2 * batch_size / s:9.1f} "
            f"{2 * batch_size * seq_len / s:10.0f} {mfu:>6} {ratio:>9}  {where[fw]}", flush=True)
  if args.gpu and args.profile_shape in {name for name, _, _ in shapes}:
    _print_profile(args)


if __name__ == "__main__":
  main()
