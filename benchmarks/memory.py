"""Compiled per-device peak memory of the plain train step and of GradCache as the global batch grows.

Ahead-of-time only (nothing runs, nothing is allocated): for each global batch the step is compiled for a
mesh of simulated CPU devices and XLA's buffer assignment is read (arguments + outputs - donated + temps).
GradCache at a fixed chunk size should stay nearly flat while the plain step grows with the batch. What
still grows under GradCache is the loss itself: its [B/devices, B·G] similarity matrices ("loss alone": the
loss and its gradient compiled by themselves), negligible at mE5 scale (32k over 64 devices: 512 × 32k per
device) but larger than a tiny encoder's chunk at B = 8192 on 8 devices.

  python benchmarks/memory.py                       # tiny-bert, 8 devices, Lq 32, Lp 128, chunk 8
  python benchmarks/memory.py --variant=small --devices=64 --batches=256,8192 --chunk_size=4  # mE5-like ratio
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from me5_jax import aot, config as config_lib, sharding
from me5_jax import train_step as ts
from me5_jax.variants import get_variant

MIB = 2**20


def loss_only_peak(config, mesh, dim: int, g: int) -> int:
  """Temp bytes of the loss and its gradient w.r.t. the embeddings, compiled alone."""
  b = config.batch_size
  rows = sharding.batch_sharding(mesh)
  shape = lambda s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt, sharding=rows)
  loss = lambda q, p, h: ts.global_loss(q, p, {"passage_hash": h}, ts.loss_config(config), mesh)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  compiled = grad.lower(shape((b, dim)), shape((b, g, dim)), shape((b, g, 2), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="tiny-bert", help="encoder size")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (mesh data axis)")
  parser.add_argument("--query_len", type=int, default=32)
  parser.add_argument("--passage_len", type=int, default=128)
  parser.add_argument("--group_size", type=int, default=1)
  parser.add_argument("--chunk_size", type=int, default=8, help="GradCache queries per device per chunk")
  parser.add_argument("--batches", default="256,1024,4096,8192", help="global batch sizes")
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices)
  enc_cfg = get_variant(args.variant)
  print(f"{args.variant}, {args.devices} devices (mesh.data), Lq {args.query_len}, Lp {args.passage_len}, "
        f"G {args.group_size}, GradCache chunk {args.chunk_size} queries/device; per-device MiB")
  print(f"{'batch':>6} {'plain':>10} {'gradcache':>10} {'plain/gc':>9} {'loss alone':>11}")
  first = None
  start = time.time()
  for batch_size in map(int, args.batches.split(",")):
    peaks = []
    for chunk in (0, args.chunk_size):
      config = config_lib.base_config()
      config.batch_size, config.gradcache.chunk_size = batch_size, chunk
      shape = aot.Shape(batch_size, args.query_len, args.passage_len, args.group_size, teacher=False)
      compiled = aot.compile_train_step(enc_cfg, config, shape)
      peaks.append(aot.MemoryReport.of(compiled).peak)
    loss = loss_only_peak(config, sharding.make_mesh(config), enc_cfg.hidden_size, args.group_size)
    first = first or peaks
    print(f"{batch_size:6d} {peaks[0] / MIB:10.1f} {peaks[1] / MIB:10.1f} {peaks[0] / peaks[1]:8.1f}x "
          f"{loss / MIB:11.1f}", flush=True)
  print(f"growth over the range: plain {peaks[0] / first[0]:.2f}x, GradCache {peaks[1] / first[1]:.2f}x "
        f"(compiled in {time.time() - start:.0f} s)")


if __name__ == "__main__":
  main()
