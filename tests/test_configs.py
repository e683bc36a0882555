"""Every shipped config builds, validates, and its train step compiles on 8 CPU devices at a tiny size.

The tiny override keeps what shapes the program (stage, mesh, dtype, remat, GradCache on/off, hard
negatives, teacher scores) and shrinks only the sizes: the config's architecture as the tiny variant with
one layer (layers are unrolled, so each one adds compile time), batch 16, lengths 32, at most one hard
negative, GradCache chunks that divide the per-shard batch. The step is compiled ahead of time from
abstract inputs (no data, no parameters allocated).
"""
import importlib.util
import os

import jax
import pytest

from me5_jax import config as config_lib
from me5_jax import aot, sharding, train_step
from me5_jax.variants import get_variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (config file, get_config argument, tiny variant with the config's architecture)
SHIPPED = [
    ("small.py", "pretrain", "tiny-bert"), ("small.py", "finetune", "tiny-bert"),
    ("base.py", "pretrain", "tiny-xlmr"), ("base.py", "finetune", "tiny-xlmr"),
    ("large.py", "pretrain", "tiny-xlmr"), ("large.py", "finetune", "tiny-xlmr"),
    ("large_instruct.py", "finetune", "tiny-xlmr"),
    ("demo.py", "", "tiny-bert"), ("demo.py", "finetune", "tiny-bert"),
]
B, L = 16, 32


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def tiny(config, variant: str, tokenizer_dir: str):
  c = config.copy_and_resolve_references()
  c.init_checkpoint, c.model_variant, c.tokenizer = "", variant, tokenizer_dir
  c.batch_size, c.query_max_length, c.passage_max_length = B, L, L
  c.num_hard_negatives = min(c.num_hard_negatives, 1)
  if c.gradcache.chunk_size:
    c.gradcache.chunk_size = 1  # 2 queries per batch shard on the 8-device meshes here: two chunks
  return c


@pytest.mark.parametrize("name, arg, variant", SHIPPED, ids=[f"{n[:-3]}:{a or 'default'}" for n, a, _ in SHIPPED])
def test_shipped_config_validates_and_its_step_compiles_at_tiny_size(name, arg, variant, minilm_dir):
  shipped = load_config(name, arg)
  config_lib.validate(shipped)
  assert shipped.stage == (arg or "pretrain")

  config = tiny(shipped, variant, minilm_dir)
  config_lib.validate(config)
  mesh = sharding.make_mesh(config)
  train_step.check_config(config, mesh)
  enc_cfg = train_step.encoder_config(get_variant(variant, num_layers=1), config)
  state = train_step.abstract_train_state(enc_cfg, config, mesh)
  g = 1 + config.num_hard_negatives
  batch = aot.abstract_batch(B, L, L, g, config.stage == "finetune" and config.use_teacher, mesh,
                             packed_rows=B * (1 + g) // 2 if config_lib.pack_sequences(config, "cpu") else 0)
  compiled = train_step.make_train_step(enc_cfg, config, mesh).lower(state, batch).compile()
  out_state, metrics = compiled.output_shardings
  assert jax.tree.structure(out_state) == jax.tree.structure(state)
  assert {"loss", "grad_norm", "learning_rate"} <= set(metrics)


def test_unknown_stage_is_an_error_naming_the_choices():
  with pytest.raises(ValueError, match="pretrain"):
    load_config("large.py", "pretrian")


def test_pack_sequences_unset_packs_on_cpu_only_and_true_false_force_it():
  c = config_lib.base_config()
  assert c.pack_sequences is None
  assert config_lib.pack_sequences(c, "cpu") and not config_lib.pack_sequences(c, "gpu")
  assert not config_lib.pack_sequences(c, "tpu")
  c.pack_sequences = False
  assert not config_lib.pack_sequences(c, "cpu")
  c.pack_sequences = True
  assert config_lib.pack_sequences(c, "gpu")


@pytest.mark.parametrize("key, value", [("attention_impl", "flash"), ("attention_dropout", 1.5),
                                        ("prefetch_batches", 3), ("profile_steps", "10"), ("steps_in_flight", 3),
                                        ("xla_cpu_options", "ynn=off")])
def test_new_loop_and_attention_keys_are_checked_naming_the_key(key, value):
  from me5_jax import profiling
  c = config_lib.base_config()
  c.init_checkpoint = "somewhere"
  c[key] = value
  with pytest.raises(ValueError, match=key):
    config_lib.validate(c)
    profiling.parse_steps(c.profile_steps)


def test_xla_cpu_options_reach_the_cpu_compiler_only():
  c = config_lib.base_config()
  assert config_lib.compiler_options(c, "cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert config_lib.compiler_options(c, "gpu") is None
  c.xla_cpu_options = ""
  assert config_lib.compiler_options(c, "cpu") is None
