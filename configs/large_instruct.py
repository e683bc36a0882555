"""mE5-large-instruct: stage 2 of mE5-large on the instruct mixture (recipe §4).

Queries are `Instruct: {task}\nQuery: {q}` with the record's task (or the source's default instruction),
documents get no prefix. Starts from a stage-1 mE5-large workdir or checkpoint (set init_checkpoint).
"""
from me5_jax.config import recipe_config


def get_config(stage: str = "finetune"):
  c = recipe_config("large", stage)
  c.instruct = True
  c.query_prefix = ""
  c.passage_prefix = ""
  return c
