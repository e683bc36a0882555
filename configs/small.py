"""mE5-small: `--config configs/small.py` (stage-1 pre-training) or `configs/small.py:finetune` (stage 2)."""
from me5_jax.config import recipe_config


def get_config(stage: str = "pretrain"):
  return recipe_config("small", stage)
