"""The real train step compiled by XLA:TPU for TPU slices, on this CPU host (libtpu from the tpu-aot extra,
installed by tests/run.sh), and what the design promises checked in the compiled program: the passages are
all-gathered and the queries are not, GradCache's gradients are all-reduced once per step and not per chunk,
the per-chip memory is within a bound derived from the state and the activations, one backend compilation
per step shape. Tiny configs (one layer of tiny-bert at the shipped configs' shapes), so each compiles in
seconds.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from me5_jax import aot, config as config_lib, hlo_collectives, sharding, tpu_topology, train_step
from me5_jax.variants import get_variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L = 16, 32


def test_slice_names_parse_as_sold_and_bad_ones_name_the_accepted_forms():
  v5p = tpu_topology.parse("v5p-256")
  assert (v5p.chips, v5p.grid, v5p.libtpu_name) == (128, "4x4x8", "v5p:4x4x8")  # 2 TensorCores per chip
  assert tpu_topology.parse("v5e-8").libtpu_name == "v5e:2x4"
  assert tpu_topology.parse("v6e-64").chips == 64
  assert tpu_topology.parse("v5e:4x4").chips == 16
  for bad, why in [("v5p-7", "v5p-8, v5p-16"), ("v7x-8", "GEN-N"), ("v5e:4x4x4", "2 dimensions"),
                   ("v5e-3", "v5e-1, v5e-4")]:
    with pytest.raises(ValueError, match=why):
      tpu_topology.parse(bad)


def _tiny(size: str, stage: str):
  """The shipped recipe config of `size`/`stage` at tiny sizes (as tests/test_configs.py does)."""
  c = config_lib.recipe_config(size, stage)
  c.batch_size, c.query_max_length, c.passage_max_length = B, L, L
  c.num_hard_negatives = min(c.num_hard_negatives, 1)
  if c.gradcache.chunk_size:
    c.gradcache.chunk_size = 1  # 2 queries per batch shard on 8 chips: two chunks
  return c, train_step.encoder_config(get_variant("tiny-bert", num_layers=1), c, platform="tpu")


@pytest.fixture(scope="module")
def v5e_8():
  return tpu_topology.devices(tpu_topology.parse("v5e-8"))


def _compile(config, enc_cfg, devices):
  """(compiled step, mesh, how many backend compilations of the train step it took)."""
  compiles = []

  def listener(event, secs, fun_name="", **kw):
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(train_step)":
      compiles.append(secs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mesh = sharding.make_mesh(config, devices)
    compiled = aot.compile_train_step(enc_cfg, config, aot.step_shape(config, mesh), devices=devices)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return compiled, mesh, len(compiles)


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_stage2_step_on_v5e_8_gathers_the_passages_not_the_queries_and_fits_a_derived_bound(v5e_8):
  config, enc_cfg = _tiny("small", "finetune")  # G = 2, teacher scores, padded rows on TPU
  compiled, mesh, num_compiles = _compile(config, enc_cfg, v5e_8)
  assert v5e_8[0].device_kind == "TPU v5 lite" and num_compiles == 1
  d, g = enc_cfg.hidden_size, 1 + config.num_hard_negatives
  gathered = [s.split("{")[0] for s in hlo_collectives.output_shapes(compiled.as_text(), "all-gather")]
  assert f"f32[{B},{g},{d}]" in gathered            # every chip gets all B·G passage embeddings
  assert not any(s.endswith(f"[{B},{d}]") for s in gathered)  # queries stay split: [B/8, N] logits

  # The bound: arguments are the state's shards (params + Adam moments, fp32; replicated over `data`)
  # and the batch, up to TPU tile padding; temporaries at most one fp32 gradient copy plus one layer's
  # activations per token (≤ 16·D + 4·F + 4·H·L floats) for every token this chip encodes.
  state = train_step.abstract_train_state(enc_cfg, config, mesh)
  state_bytes = sum(np.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(state))
  tokens = B // 8 * (L + g * L)
  per_token = 4 * (16 * d + 4 * enc_cfg.intermediate_size + 4 * enc_cfg.num_heads * L) * enc_cfg.num_layers
  memory = aot.MemoryReport.of(compiled)
  assert state_bytes <= memory.argument <= 1.5 * state_bytes + 64 * 2**10
  assert memory.alias >= state_bytes  # the donated state is updated in place
  assert memory.temp <= state_bytes / 3 + tokens * per_token


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_gradcache_gradients_are_all_reduced_once_per_step_not_per_chunk(v5e_8):
  config, enc_cfg = _tiny("small", "pretrain")  # GradCache, 2 chunks
  compiled, _, num_compiles = _compile(config, enc_cfg, v5e_8)
  stats = hlo_collectives.collectives(compiled.as_text())
  assert num_compiles == 1
  assert stats["all-reduce"].executed > 0 and stats["all-reduce"].in_loops == 0
  loops = hlo_collectives.multiplicities(compiled.as_text())
  assert max(loops.values()) == 2  # the chunk loops' bodies run once per chunk


def _aot_cli(*flags):
  """Runs `python -m me5_jax.aot` in a fresh process; (stdout, {collective: (in HLO, per step, in loops)})."""
  out = subprocess.run([sys.executable, "-m", "me5_jax.aot", *flags], capture_output=True, text=True, timeout=240,
                       cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  table = out.stdout.split("collectives", 1)[1].splitlines()[2:]
  rows = {line.split()[0]: tuple(map(int, line.split()[1:4])) for line in table if line.startswith("  ")}
  return out.stdout, rows


@pytest.mark.parametrize("reduce_per_chunk", [False, True])
def test_fsdp_config_on_v5p_reduces_gradients_once_per_step_unless_told_per_chunk(reduce_per_chunk):
  """mE5-large's recipe (fsdp over every chip, GradCache, remat) through the CLI, tiny-xlmr at its shapes."""
  stdout, rows = _aot_cli(
      "--config", "configs/large.py", "--variant", "tiny-xlmr", "--topology", "v5p-8", "--config.batch_size=16",
      "--config.query_max_length=32", "--config.passage_max_length=32", "--config.gradcache.chunk_size=1",
      f"--config.gradcache.reduce_per_chunk={reduce_per_chunk}")
  assert "4 × TPU v5 (v5p:2x2x1) mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in stdout
  assert "fits in 95 GiB per device" in stdout and "projected at MFU 40% of 459 TFLOP/s" in stdout
  reductions_in_loops = sum(rows.get(kind, (0, 0, 0))[2] for kind in ("all-reduce", "reduce-scatter"))
  assert rows["all-gather"][2] > 0  # the fsdp-split weights are gathered for every chunk (ZeRO-3)
  assert (reductions_in_loops > 0) == reduce_per_chunk


def test_cli_without_a_slice_name_it_knows_is_one_line_naming_the_forms():
  out = subprocess.run([sys.executable, "-m", "me5_jax.aot", "--topology", "v5p-7"], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("me5_jax.aot: error: --topology")


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])  # plain step; GradCache (the kernel in its vmap)
def test_splash_attention_lowers_to_a_mosaic_kernel_for_v5e_8(stage, v5e_8):
  """attention_impl auto on TPU with attention dropout off: the Pallas splash kernel, compiled by XLA:TPU
  (its Mosaic custom call in the program), head size 64 as mE5-base/large have."""
  config, _ = _tiny("small", stage)
  config.attention_dropout = 0.0
  variant = get_variant("tiny-bert", num_layers=1, hidden_size=128, num_heads=2, intermediate_size=256)
  enc_cfg = train_step.encoder_config(variant, config, platform="tpu")
  assert enc_cfg.attention_impl == "splash"
  compiled, _, num_compiles = _compile(config, enc_cfg, v5e_8)
  assert num_compiles == 1 and "tpu_custom_call" in compiled.as_text()
