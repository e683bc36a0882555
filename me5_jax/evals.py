"""In-loop evaluation: the `evaluate` tasks run on the current parameters, on process 0.

Dev sets are loaded once. Parameters are gathered to the host by every process (a collective), then
process 0 embeds with a float32 copy of the encoder config; the others return nothing.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from me5_jax import evaluate
from me5_jax.embedder import Embedder
from me5_jax.tokenize import Tokenizer
from me5_jax.variants import EncoderConfig


def _bitext_data(config, workdir: str) -> evaluate.BitextData | None:
  if not config.eval_bitext:
    return None
  path = config.eval_bitext
  if path == "bible":  # the held-out verses, never trained on (data_pipelines.bible.split_eval)
    from data_pipelines import bible
    path = os.path.join(workdir, "eval", "bible_heldout.tsv")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      bible.write_bitext_tsv(path + ".tmp")
      os.replace(path + ".tmp", path)
  data = evaluate.load_bitext(path, config.eval_bitext_pivot or None)
  if config.eval_bitext_columns:
    unknown = [c for c in config.eval_bitext_columns if c not in data.columns]
    if unknown:
      raise ValueError(f"config key eval_bitext_columns: {unknown} not in {path} (columns {data.columns})")
    keep = [data.pivot] + [c for c in config.eval_bitext_columns if c != data.pivot]
    data = dataclasses.replace(data, columns=keep, texts={c: data.texts[c] for c in keep})
  return data


class Evaluator:
  def __init__(self, config, tokenizer: Tokenizer, enc_cfg: EncoderConfig, workdir: str):
    self.config, self.tokenizer = config, tokenizer
    self.enc_cfg = enc_cfg.replace(dtype="float32", remat="none")
    self.active = jax.process_index() == 0 and bool(config.eval_bitext or config.eval_retrieval)
    self.bitext = _bitext_data(config, workdir) if self.active else None
    self.retrieval = evaluate.load_retrieval(config.eval_retrieval) if self.active and config.eval_retrieval else None

  def __call__(self, params: Any, step: int) -> dict:
    if not (self.config.eval_bitext or self.config.eval_retrieval):
      return {}
    host_params = multihost_utils.process_allgather(params, tiled=True)  # every process takes part
    if not self.active:
      return {}
    embedder = Embedder(self.enc_cfg, host_params, self.tokenizer, devices=jax.local_devices())  # process 0 alone
    c, out = self.config, {}
    opts = dict(batch_size=c.eval_batch_size, max_length=c.eval_max_length)
    if self.bitext is not None:
      out["bitext"] = evaluate.evaluate_bitext(embedder, self.bitext, prefix=c.query_prefix or None, **opts)
    if self.retrieval is not None:
      out["retrieval"] = evaluate.evaluate_retrieval(embedder, self.retrieval, c.query_prefix, c.passage_prefix,
                                                     **opts)
    return out

  @staticmethod
  def summary(results: dict) -> str:
    parts = []
    if "bitext" in results:
      b = results["bitext"]
      cols = " ".join(f"{k}={v['to_pivot']:.3f}" for k, v in b["p@1"].items())
      parts.append(f"bitext P@1→{b['pivot']} mean {b['mean_p@1_to_pivot']:.4f} ({cols})")
    if "retrieval" in results:
      r = results["retrieval"]
      parts.append(" ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)))
    return "; ".join(parts)
