"""mE5-base: `--config configs/base.py` (stage-1 pre-training) or `configs/base.py:finetune` (stage 2)."""
from me5_jax.config import recipe_config


def get_config(stage: str = "pretrain"):
  return recipe_config("base", stage)
