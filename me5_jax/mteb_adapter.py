"""me5_jax models inside the `mteb` benchmark (`pip install mteb`; written against mteb 2.26).

`MtebEncoder` wraps an `Embedder` in mteb's encoder protocol, so mteb's own tasks, splits and scoring run
on our JAX encoder:

  import mteb
  from me5_jax.mteb_adapter import MtebEncoder
  model = MtebEncoder.from_pretrained("out/large_instruct/export", instruct=True)
  mteb.evaluate(model, mteb.get_tasks(tasks=["STS12", "SciFact"]), encode_kwargs={"batch_size": 64})

mteb 2 calls `encode(inputs: DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)`
and scores with `similarity` / `similarity_pairwise`, inherited from mteb's AbsEncoder (cosine, per
`mteb_model_meta`). The mteb 1 call, `encode(sentences, task_name=..., prompt_type=...)`, works too.

Prefixes are those of unilm's E5 evaluation code (`me5_jax.instructions.prefixes`): on Retrieval tasks
"query: " / "passage: " by prompt type, elsewhere "query: " on every text; with instruct=True the task's
instruction, `Instruct: {task}\\nQuery: `, takes the place of "query: " and documents get no prefix.
One difference from unilm remains: it skips L2 normalisation for Classification (slightly better scores,
its comment says); `Embedder` always normalises.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from me5_jax import instructions
from me5_jax.embedder import Embedder

DOCUMENT_PROMPT_TYPES = ("document", "passage")  # mteb 2 says "document", mteb 1 said "passage"


class MtebEncoder(AbsEncoder):
  """An `Embedder` as an mteb encoder. `instructions` maps task names to instructions that take precedence
  over the built-in table (for tasks it lacks, or task types it has no default for)."""

  def __init__(self, embedder: Embedder, name: str, instruct: bool = False,
               instructions: Mapping[str, str] | None = None, max_length: int | None = None):
    self.embedder, self.instruct, self.max_length = embedder, instruct, max_length
    self.instructions = dict(instructions or {})
    self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
        name=name, revision="local", framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE,
        embed_dim=embedder.cfg.hidden_size, max_tokens=embedder.tokenizer.max_length,
        use_instructions=instruct))

  @classmethod
  def from_pretrained(cls, path: str, instruct: bool = False, instructions: Mapping[str, str] | None = None,
                      dtype: str = "float32", max_length: int | None = None) -> "MtebEncoder":
    """Loads an HF model folder; mteb files results under the name "me5_jax/<folder name>"."""
    name = "me5_jax/" + os.path.basename(os.path.normpath(path))
    return cls(Embedder.from_pretrained(path, dtype=dtype), name, instruct, instructions, max_length)

  def prefixes(self, task_name: str, task_type: str) -> tuple[str, str]:
    """(query-side, document-side) prefix for a task."""
    instruction = None
    if self.instruct:
      instruction = self.instructions.get(task_name) or instructions.instruction_for(task_name, task_type)
    return instructions.prefixes(task_type, task_name, instruction)

  def encode(self, inputs: Iterable[Any], *, task_metadata: Any = None, hf_split: str | None = None,
             hf_subset: str | None = None, prompt_type: str | None = None, task_name: str | None = None,
             **kwargs: Any) -> np.ndarray:
    """float32 [N, D] unit rows. `inputs` is mteb 2's DataLoader of {"text": [...]} batches (a retrieval
    document arrives as "title text") or a list of strings; the task comes from `task_metadata`, or from
    `task_name` looked up in mteb's registry (the mteb 1 call)."""
    if task_metadata is None:
      if task_name is None:
        raise ValueError("MtebEncoder.encode needs task_metadata (mteb 2) or task_name (mteb 1)")
      import mteb
      task_metadata = mteb.get_task(task_name).metadata
    texts = list(inputs) if isinstance(inputs, (list, tuple)) else [t for batch in inputs for t in batch["text"]]
    query_prefix, document_prefix = self.prefixes(task_metadata.name, task_metadata.type)
    prefix = document_prefix if prompt_type in DOCUMENT_PROMPT_TYPES else query_prefix
    return self.embedder.encode(texts, prefix=prefix, batch_size=kwargs.get("batch_size") or 32,
                                max_length=self.max_length, progress=bool(kwargs.get("show_progress_bar")))
