"""Ahead-of-time check: compile the train step for a mesh, global batch and sequence lengths without
allocating anything, and print XLA's per-device memory analysis, so an out-of-memory shows up before a pod
is booked.

  python -m me5_jax.aot --variant=large --query_len=32 --passage_len=128 \
      --config.batch_size=32768 --config.mesh.data=32 --config.mesh.fsdp=8 --config.gradcache.chunk_size=16 \
      --config.dtype=bfloat16 --config.remat=full --fake_devices=256 --device_memory_gb=80

The state and batch are `jax.ShapeDtypeStruct`s carrying their shardings; `.lower().compile()` runs the
real SPMD partitioner and XLA's buffer assignment for the devices at hand. With `--fake_devices=N` those
are N simulated CPU devices (any N, also on a laptop): the partitioning, the sharded argument sizes and the
collectives are the pod's, but the temp size is the CPU compiler's estimate (GPU/TPU fusion and layouts
differ), so leave headroom. The command above compiles in ~4 min on 2 CPU cores and reports 15.1 GiB per
device. On the real accelerator (or a TPU topology from `jax.experimental.topologies`, which needs libtpu
and is not tried here) the numbers are that backend's own.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from me5_jax import config as config_lib, sharding
from me5_jax import train_step as ts
from me5_jax.variants import EncoderConfig, get_variant


def abstract_batch(batch_size: int, query_len: int, passage_len: int, group_size: int, teacher: bool,
                   mesh: jax.sharding.Mesh, packed_rows: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch contract (DESIGN.md) as sharded shapes; packed_rows > 0 gives the packed layout, that many
  rows of max(Lq, Lp) tokens (how many a real batch needs depends on its text lengths)."""
  rows = sharding.batch_sharding(mesh)
  spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  b, g = batch_size, group_size
  if packed_rows:
    length = max(query_len, passage_len)
    batch = dict(packed_ids=spec((packed_rows, length)), packed_segments=spec((packed_rows, length)),
                 query_slots=spec((b,)), passage_slots=spec((b, g)), passage_hash=spec((b, g, 2)))
  else:
    batch = dict(query_ids=spec((b, query_len)), query_mask=spec((b, query_len)),
                 passage_ids=spec((b, g, passage_len)), passage_mask=spec((b, g, passage_len)),
                 passage_hash=spec((b, g, 2)))
  if teacher:
    batch["teacher_scores"] = spec((b, g), jnp.float32)
  return batch


def compile_train_step(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict, *, query_len: int,
                       passage_len: int, group_size: int = 1, teacher: bool = False,
                       devices: list | None = None, packed_rows: int = 0) -> jax.stages.Compiled:
  """The compiled `train_step` for this shape on `devices` (default: all), nothing allocated."""
  mesh = sharding.make_mesh(config, devices)
  step = ts.make_train_step(enc_cfg, config, mesh)
  state = ts.abstract_train_state(enc_cfg, config, mesh)
  batch = abstract_batch(config.batch_size, query_len, passage_len, group_size, teacher, mesh, packed_rows)
  return step.lower(state, batch).compile()


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes from XLA's buffer assignment. Donated state is counted once (alias)."""
  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> "MemoryReport":
    m = compiled.memory_analysis()
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
               m.generated_code_size_in_bytes)

  def table(self) -> str:
    gib = lambda n: f"{n / 2**20:12.1f} MiB"
    rows = [("arguments (state + batch)", self.argument), ("outputs", self.output),
            ("aliased (donated state)", -self.alias), ("temporaries", self.temp),
            ("generated code", self.code), ("peak per device", self.peak)]
    return "\n".join(f"  {name:28s}{gib(n)}" for name, n in rows)


def _define_flags() -> None:
  """CLI flags, defined only when run as a program so importing this module registers nothing."""
  flags.DEFINE_string("variant", "small", "encoder size from me5_jax.variants.VARIANTS")
  flags.DEFINE_integer("query_len", 32, "query sequence length Lq")
  flags.DEFINE_integer("passage_len", 128, "passage sequence length Lp")
  flags.DEFINE_integer("group_size", 1, "G = 1 + hard negatives per query")
  flags.DEFINE_bool("teacher", False, "batch carries teacher scores (stage-2 distillation)")
  flags.DEFINE_integer("packed_rows", 0, "pack_sequences: rows of max(Lq, Lp) per global batch (0 = padded)")
  flags.DEFINE_integer("fake_devices", 0, "compile for this many simulated CPU devices instead of the local ones")
  flags.DEFINE_float("device_memory_gb", 0.0, "if set, say whether the peak fits in this much memory per device")
  config_flags.DEFINE_config_dict("config", config_lib.base_config(), "step config (--config.batch_size=...)")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  if args.fake_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.fake_devices)
  config = args.config
  enc_cfg = ts.encoder_config(get_variant(args.variant), config)
  try:
    compiled = compile_train_step(enc_cfg, config, query_len=args.query_len, passage_len=args.passage_len,
                                  group_size=args.group_size, teacher=args.teacher, packed_rows=args.packed_rows)
  except ValueError as e:  # config errors (mesh sizes, batch_size, gradcache.chunk_size): one line
    sys.exit(f"error: {e}")
  mesh = sharding.make_mesh(config)
  report = MemoryReport.of(compiled)
  print(f"{args.variant} ({enc_cfg.num_params() / 1e6:.1f}M params, {enc_cfg.dtype}, remat={enc_cfg.remat}) "
        f"on {jax.devices()[0].platform} mesh {dict(mesh.shape)}: batch {config.batch_size} × (Lq {args.query_len}"
        f" + {args.group_size} × Lp {args.passage_len})"
        f"{f' packed in {args.packed_rows} rows' if args.packed_rows else ''}, "
        f"gradcache.chunk_size={config.gradcache.chunk_size}")
  print(report.table())
  if args.device_memory_gb:
    budget = args.device_memory_gb * 1e9
    verdict = "fits" if report.peak <= budget else "DOES NOT FIT"
    print(f"  {verdict} in {args.device_memory_gb:g} GB per device ({100 * report.peak / budget:.0f}%)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
