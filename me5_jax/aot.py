"""Ahead-of-time check: compile the real train step for a mesh, global batch and sequence lengths without
allocating anything, and print the compiler's per-device memory, cost analysis and collectives, so an
out-of-memory or a misplaced collective shows up before a pod is booked.

  python -m me5_jax.aot --config configs/large.py --topology v5p-256        # XLA:TPU, on this CPU host
  python -m me5_jax.aot --config configs/small.py:finetune --topology v5e-8 --mfu 0.4
  python -m me5_jax.aot --variant=large --query_len=32 --passage_len=128 \
      --config.batch_size=32768 --config.mesh.data=32 --config.mesh.fsdp=8 --config.gradcache.chunk_size=16 \
      --config.dtype=bfloat16 --config.remat=full --fake_devices=256 --device_memory_gb=80

The state and batch are `jax.ShapeDtypeStruct`s carrying their shardings; `.lower().compile()` runs the
real SPMD partitioner and the backend's buffer assignment for the devices given:
- `--topology SLICE` (me5_jax.tpu_topology): the slice's TPU devices from libtpu (`pip install -e
  '.[tpu-aot]'`), compiled by XLA:TPU itself on a CPU host: memory, fusions, layouts and collectives are
  the pod's. It also prints a projected step and stage time at `--mfu` of the chip's bf16 peak.
- `--fake_devices=N`: N simulated CPU devices; the partitioning and sharded argument sizes are the pod's,
  the temporaries are XLA:CPU's estimate (leave headroom).
- neither: the local devices.
Defaults come from the config: the encoder size (`model_variant`, or the recipe size of `init_checkpoint`),
lengths, group size (1 + num_hard_negatives), teacher scores (stage 2), and the layout (`pack_sequences`
for the backend); flags override them.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import batch as batch_contract
from me5_jax import cli, config as config_lib, hlo_collectives, sharding, tpu_topology
from me5_jax import train_step as ts
from me5_jax.metric_writer import flops_per_sequence
from me5_jax.variants import VARIANTS, EncoderConfig, get_variant

PROGRAM = "me5_jax.aot"  # its `<program>: error:` lines (me5_jax.cli)


def abstract_batch(batch_size: int, query_len: int, passage_len: int, group_size: int, teacher: bool,
                   mesh: jax.sharding.Mesh, packed_rows: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch contract (DESIGN.md) as sharded shapes; packed_rows > 0 gives the packed layout, that many
  rows of max(Lq, Lp) tokens (how many a real batch needs depends on its text lengths)."""
  rows = sharding.batch_sharding(mesh)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for key, (shape, dtype) in
          batch_contract.shapes(batch_size, query_len, passage_len, group_size, teacher, packed_rows).items()}


FIT_KNOBS = ("a smaller gradcache.chunk_size (one chunk's activations), remat=full (one layer's), or a larger "
             "mesh.fsdp (the state split over more chips)")
_TPU_OOM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?\(([\d.]+)G\).*?\(([\d.]+)G\)")


class DoesNotFit(Exception):
  """XLA:TPU refused the program: its temporaries alone exceed the chip's HBM (it says so at compile time)."""

  def __init__(self, message: str, required_gib: float, available_gib: float):
    super().__init__(message)
    self.required_gib, self.available_gib = required_gib, available_gib


def compile_train_step(enc_cfg: EncoderConfig, config: ml_collections.ConfigDict, shape: "Shape",
                       devices: list | None = None) -> jax.stages.Compiled:
  """The compiled `train_step` for this shape on `devices` (default: all local ones), nothing allocated;
  DoesNotFit where the TPU compiler finds it cannot fit in HBM."""
  mesh = sharding.make_mesh(config, devices)
  step = ts.make_train_step(enc_cfg, config, mesh)
  state = ts.abstract_train_state(enc_cfg, config, mesh)
  batch = abstract_batch(shape.batch_size, shape.query_len, shape.passage_len, shape.group_size, shape.teacher,
                         mesh, shape.packed_rows)
  try:
    return step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    oom = _TPU_OOM.search(str(e))
    if not oom:
      raise
    raise DoesNotFit(str(e).splitlines()[0], float(oom[1]), float(oom[2])) from None


def fitting_chunk_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, e: DoesNotFit) -> int:
  """A gradcache.chunk_size whose activations should fit, for the message and the fitting variant:
  temporaries scale with the rows encoded at once, so halve them until the compiler's figure is below 60 %
  of HBM (the state and the loss's buffers take the rest)."""
  per_shard = config.batch_size // sharding.num_batch_shards(mesh)
  current = config.gradcache.chunk_size or per_shard
  chunk = current
  while chunk > 1 and per_shard % (chunk // 2) == 0 and e.required_gib * chunk / current > 0.6 * e.available_gib:
    chunk //= 2
  return chunk


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


@dataclasses.dataclass(frozen=True)
class Shape:
  """What one compiled step encodes: global batch, lengths, group size, teacher scores, packed rows."""
  batch_size: int
  query_len: int
  passage_len: int
  group_size: int
  teacher: bool
  packed_rows: int = 0

  def model_flops(self, enc_cfg: EncoderConfig) -> float:
    """Training FLOPs of the step's sequences at the compiled lengths (the MFU numerator, no recompute)."""
    if self.packed_rows:
      return self.packed_rows * flops_per_sequence(enc_cfg, max(self.query_len, self.passage_len))
    return self.batch_size * (flops_per_sequence(enc_cfg, self.query_len)
                              + self.group_size * flops_per_sequence(enc_cfg, self.passage_len))

  def describe(self) -> str:
    packed = f" packed in {self.packed_rows} rows" if self.packed_rows else ""
    return (f"batch {self.batch_size} × (Lq {self.query_len} + {self.group_size} × Lp {self.passage_len})"
            f"{' + teacher scores' if self.teacher else ''}{packed}")


def step_shape(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, query_len: int = 0, passage_len: int = 0,
               group_size: int = 0, teacher: bool | None = None, packed_rows: int = 0) -> Shape:
  """The config's step shape on the mesh's backend, with any part overridden (0 / None = the config's).
  A packed layout without a row count gets half the padded layout's rows, about what packing saves on
  real text (a real batch's count depends on its text lengths), rounded to whole chunks of all shards."""
  g = group_size or 1 + config.num_hard_negatives
  lq, lp = query_len or config.query_max_length, passage_len or config.passage_max_length
  if not packed_rows and config_lib.pack_sequences(config, mesh.devices.flat[0].platform):
    unit = sharding.num_batch_shards(mesh) * max(1, config.gradcache.chunk_size)
    packed_rows = -(-config.batch_size * (1 + g) // 2 // unit) * unit
  teacher = config.stage == "finetune" and config.use_teacher if teacher is None else teacher
  return Shape(config.batch_size, lq, lp, g, teacher, packed_rows)


def report(compiled: jax.stages.Compiled, enc_cfg: EncoderConfig, shape: Shape, num_devices: int,
           total_steps: int, hbm_bytes: float = 0.0, peak_flops: float = 0.0, mfu: float = 0.0) -> str:
  """The printed report: memory (vs `hbm_bytes` per device if given), the compiler's cost analysis, the
  collectives per step, and, given the chip's peak, the projected step and stage time at `mfu`."""
  memory = MemoryReport.of(compiled)
  lines = ["memory per device (XLA buffer assignment):", memory.table()]
  if hbm_bytes:
    verdict = "fits" if memory.peak <= hbm_bytes else "DOES NOT FIT"
    lines.append(f"  {verdict} in {hbm_bytes / 2**30:g} GiB per device ({100 * memory.peak / hbm_bytes:.0f}%)")
    if memory.peak > hbm_bytes:
      lines.append(f"  to fit: {FIT_KNOBS}")
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  lines += ["compiler cost analysis per device (while-loop bodies counted once, as XLA reports them):",
            f"  flops {cost.get('flops', 0):.4g}   bytes accessed {cost.get('bytes accessed', 0):.4g}   "
            f"transcendentals {cost.get('transcendentals', 0):.4g}"]
  lines += ["collectives (per device; loops unrolled by their trip counts):",
            hlo_collectives.table(hlo_collectives.collectives(compiled.as_text()))]
  flops = shape.model_flops(enc_cfg)
  lines.append(f"model FLOPs per step {flops:.4g} ({flops / num_devices:.4g} per device)")
  if peak_flops and mfu:
    step_s = flops / (num_devices * peak_flops * mfu)
    lines.append(f"projected at MFU {mfu:.0%} of {peak_flops / 1e12:g} TFLOP/s: {step_s:.3f} s/step, "
                 f"{total_steps} steps = {step_s * total_steps / 3600:.2f} h "
                 f"({num_devices * step_s * total_steps / 3600:.0f} chip-hours)")
  return "\n".join(lines)


def _define_flags() -> None:
  """CLI flags, defined only when run as a program so importing this module registers nothing."""
  flags.DEFINE_string("variant", "", "encoder size from me5_jax.variants.VARIANTS (default: the config's)")
  flags.DEFINE_integer("query_len", 0, "query sequence length Lq (0 = config query_max_length)")
  flags.DEFINE_integer("passage_len", 0, "passage sequence length Lp (0 = config passage_max_length)")
  flags.DEFINE_integer("group_size", 0, "G = 1 + hard negatives per query (0 = 1 + config num_hard_negatives)")
  flags.DEFINE_bool("teacher", None, "batch carries teacher scores (default: stage 2 with use_teacher)")
  flags.DEFINE_integer("packed_rows", 0, "pack_sequences: rows of max(Lq, Lp) per global batch (0 = the config's "
                       "layout; packed layouts then get half the padded rows)")
  flags.DEFINE_integer("fake_devices", 0, "compile for this many simulated CPU devices instead of the local ones")
  flags.DEFINE_string("topology", "", "compile with XLA:TPU for this TPU slice, e.g. v5e-16, v5p-256, v6e-64 "
                      "(me5_jax.tpu_topology; needs the tpu-aot extra)")
  flags.DEFINE_float("device_memory_gb", 0.0, "say whether the peak fits in this much memory per device "
                     "(default with --topology: the chip's HBM)")
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the projected step time (with --topology)")
  config_flags.DEFINE_config_file("config", config_lib.__file__, "configs/<name>.py[:stage] (default: the "
                                  "base config); keys overridable as --config.key=value")


def resolve_variant(name: str, config: ml_collections.ConfigDict) -> str:
  """--variant, else the config's model_variant, else the recipe size whose init_checkpoint it names."""
  found = name or config.model_variant or config_lib.recipe_size(config.init_checkpoint)
  if not found:
    raise ValueError(f"--variant: the config's init_checkpoint {config.init_checkpoint!r} is not a recipe "
                     f"checkpoint; name the encoder size (one of {sorted(VARIANTS)})")
  return found


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  config = args.config
  try:
    if args.topology and args.fake_devices:
      raise ValueError("--topology and --fake_devices: give one of them")
    tpu_slice = tpu_topology.parse(args.topology) if args.topology else None
    if args.fake_devices:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", args.fake_devices)
    devices = tpu_topology.devices(tpu_slice) if tpu_slice else jax.devices()
    platform = devices[0].platform
    variant = resolve_variant(args.variant, config)
    enc_cfg = ts.encoder_config(get_variant(variant), config, platform=platform)
    mesh = sharding.make_mesh(config, devices)
    shape = step_shape(config, mesh, args.query_len, args.passage_len, args.group_size, args.teacher,
                       args.packed_rows)
    print(f"{variant} ({enc_cfg.num_params() / 1e6:.1f}M params, {enc_cfg.dtype}, remat={enc_cfg.remat}, "
          f"attention {enc_cfg.attention_impl}) on {len(devices)} × {devices[0].device_kind} "
          f"{f'({tpu_slice.libtpu_name}) ' if tpu_slice else ''}mesh {dict(mesh.shape)}: {shape.describe()}, "
          f"gradcache.chunk_size={config.gradcache.chunk_size}", flush=True)
    start = time.time()
    compiled = compile_train_step(enc_cfg, config, shape, devices=devices)
  except DoesNotFit as e:
    print(f"DOES NOT FIT: XLA:TPU needs {e.required_gib:g} GiB of temporaries per chip, the chip has "
          f"{e.available_gib:g} GiB ({e})\n  to fit: {FIT_KNOBS}; e.g. "
          f"--config.gradcache.chunk_size={fitting_chunk_size(config, mesh, e)}")
    sys.exit(1)
  except (ValueError, KeyError) as e:  # config and flag errors: one line
    sys.exit(cli.error(PROGRAM, e.args[0] if e.args else e))
  except RuntimeError as e:  # the compiler or its install (libtpu)
    sys.exit(cli.error(PROGRAM, e.args[0] if e.args else e, cli.FAILED))
  print(f"compiled in {time.time() - start:.0f} s")
  hbm = args.device_memory_gb * 1e9 or (tpu_slice.generation.hbm_gib * 2**30 if tpu_slice else 0.0)
  print(report(compiled, enc_cfg, shape, len(devices), config.total_steps, hbm_bytes=hbm,
               peak_flops=tpu_slice.generation.peak_flops if tpu_slice else 0.0, mfu=args.mfu))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.absl_flags_parser(PROGRAM))
