"""Every shipped recipe config's real train step compiled by XLA:TPU for the slice a user would pick for it,
on this CPU host (libtpu: `pip install -e '.[tpu-aot]'`), as one table: per-chip memory against HBM,
the collectives per step, the model FLOPs and the projected step and stage time at --mfu.

  python benchmarks/tpu_aot.py                        # all rows (about 20 min on 2 cores)
  python benchmarks/tpu_aot.py --only large:pretrain  # one row; the full report: python -m me5_jax.aot ...
  python benchmarks/tpu_aot.py --only small:pretrain --set gradcache.reduce_per_chunk=True   # a variant

Compile only: nothing runs on a TPU, so machine load changes the compile time column only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from me5_jax import aot, hlo_collectives, sharding, tpu_topology  # noqa: E402
from me5_jax import train_step as ts  # noqa: E402
from me5_jax.variants import get_variant  # noqa: E402

# (configs/<file>:<stage>, size, slice): stage 1 at 32k pairs on pod slices, stage 2 at 512 on small ones.
ROWS = [
    ("small:pretrain", "small", "v5e-64"), ("small:finetune", "small", "v5e-8"),
    ("base:pretrain", "base", "v5p-128"), ("base:finetune", "base", "v5e-16"),
    ("large:pretrain", "large", "v5p-256"), ("large:finetune", "large", "v5p-32"),
    ("large_instruct:finetune", "large", "v5p-32"),
]


def load(name: str):
  """configs/<file>.py:<stage> → its config (the same files `me5_jax.train --config` reads)."""
  import importlib.util
  file, stage = name.split(":")
  spec = importlib.util.spec_from_file_location(file, os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                   f"{file}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(stage)


def set_key(config, key: str, value: str) -> None:
  """--set gradcache.reduce_per_chunk=True: a dotted config key, the value parsed as the key's type."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)


def compile_row(name: str, size: str, slice_name: str, config, mfu: float) -> str:
  """One table row; a config XLA:TPU cannot fit gets its row, then the row of the variant whose
  gradcache.chunk_size aot.fitting_chunk_size picks."""
  tpu_slice = tpu_topology.parse(slice_name)
  devices = tpu_topology.devices(tpu_slice)
  enc_cfg = ts.encoder_config(get_variant(size), config, platform="tpu")
  mesh = sharding.make_mesh(config, devices)
  shape = aot.step_shape(config, mesh)
  mesh_text = "x".join(str(mesh.shape[a]) for a in sharding.AXES)
  start = time.time()
  try:
    compiled = aot.compile_train_step(enc_cfg, config, shape, devices=devices)
  except aot.DoesNotFit as e:
    chunk = aot.fitting_chunk_size(config, mesh, e)
    row = (f"{name:32s} {slice_name:8s} {mesh_text:>10s} {time.time() - start:9.0f}   DOES NOT FIT: temporaries "
           f"{e.required_gib:g} GiB > {e.available_gib:g} GiB HBM")
    print(row, flush=True)
    fitting = config.copy_and_resolve_references()
    fitting.gradcache.chunk_size = chunk
    return compile_row(f"{name} chunk_size={chunk}", size, slice_name, fitting, mfu)
  seconds = time.time() - start
  memory = aot.MemoryReport.of(compiled)
  stats = hlo_collectives.collectives(compiled.as_text())
  reduce_bytes = stats["all-reduce"].bytes_per_step + stats["reduce-scatter"].bytes_per_step
  in_loops = stats["all-reduce"].in_loops + stats["reduce-scatter"].in_loops
  flops = shape.model_flops(enc_cfg)
  step_s = flops / (len(devices) * tpu_slice.generation.peak_flops * mfu)
  hbm = tpu_slice.generation.hbm_gib * 2**30
  row = (f"{name:32s} {slice_name:8s} {mesh_text:>10s} {seconds:9.0f} {memory.peak / 2**30:7.2f} "
         f"({100 * memory.peak / hbm:3.0f}%) {reduce_bytes / 2**30:15.2f} {in_loops:8d} "
         f"{stats['all-gather'].bytes_per_step / 2**30:15.2f} {flops / 1e15:10.2f} {step_s:7.3f} "
         f"{step_s * config.total_steps / 3600:8.1f}")
  print(row, flush=True)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="comma-separated config names from the table")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (repeatable)")
  parser.add_argument("--mfu", type=float, default=0.4)
  args = parser.parse_args()
  print(f"{'config':32s} {'slice':8s} {'mesh':>10s} {'compile s':>9s} {'peak GiB/chip':>14s} "
        f"{'reduce GiB/step':>15s} {'in loops':>8s} {'gather GiB/step':>15s} {'PFLOP/step':>10s} "
        f"{'s/step':>7s} {'stage h':>8s}", flush=True)
  for name, size, slice_name in ROWS:
    if args.only and name not in args.only.split(","):
      continue
    config = load(name)
    for kv in args.set:
      set_key(config, *kv.split("=", 1))
    compile_row(name + "".join(f" {kv}" for kv in args.set), size, slice_name, config, args.mfu)
  print(f"mesh = data x fsdp x tensor; peak = arguments + outputs - donated + temporaries + code; reduce = "
        f"all-reduce + reduce-scatter output bytes per chip per step (XLA:TPU also writes some all-gathers as "
        f"all-reduces); in loops = reductions executed inside the GradCache loops; s/step and stage h at MFU "
        f"{args.mfu:.0%} of the chip's bf16 peak (v5e 197, v5p 459, v6e 918 TFLOP/s)")


if __name__ == "__main__":
  main()
