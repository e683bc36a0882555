"""mE5-large: `--config configs/large.py` (stage-1 pre-training) or `configs/large.py:finetune` (stage 2)."""
from me5_jax.config import recipe_config


def get_config(stage: str = "pretrain"):
  return recipe_config("large", stage)
