"""Hugging Face checkpoint I/O: HF folder → (EncoderConfig, Flax params) and back, plus the
sentence-transformers files that make an export load as Transformer → mean Pooling → Normalize.

Parameter names convert mechanically because the Flax module tree mirrors HF's
(see `me5_jax.encoder`): `encoder.layer.3.attention.self.query.weight` ↔
`encoder/layer_3/attention/self/query/kernel` (transposed, then reshaped to the Flax shape).
Safetensors load without torch; a `pytorch_model.bin` needs torch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from me5_jax import encoder as enc
from me5_jax.tokenize import TOKENIZER_SOURCES
from me5_jax.variants import EncoderConfig, from_hf_config, to_hf_config

_HF_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.")
_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.|^lm_head\.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentencepiece.bpe.model")
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


def check_model_dir(path: str) -> None:
  """Fails fast, naming the first missing piece (folder, config.json, weights, tokenizer), before any
  expensive loading; `FileNotFoundError` so CLIs can print it as a one-line error."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model folder {path} does not exist")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path}: config.json is missing (not a Hugging Face model folder)")
  if not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES):
    raise FileNotFoundError(f"{path}: the weights are missing (no {' or '.join(WEIGHT_FILES)})")
  if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_SOURCES):
    raise FileNotFoundError(f"{path}: the tokenizer is missing (no {', '.join(TOKENIZER_SOURCES)})")


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  st = os.path.join(path, WEIGHT_FILES[0])
  if os.path.exists(st):
    from safetensors.numpy import load_file
    return load_file(st)
  pt = os.path.join(path, WEIGHT_FILES[1])
  if os.path.exists(pt):
    import torch  # only the legacy pickle format needs torch
    return {k: v.float().numpy() for k, v in torch.load(pt, map_location="cpu", weights_only=True).items()}
  raise FileNotFoundError(f"{path}: the weights are missing (no {' or '.join(WEIGHT_FILES)})")


def _flax_path(hf_key: str) -> tuple[str, ...]:
  parts = re.sub(r"\blayer\.(\d+)", r"layer_\1", hf_key).split(".")
  parent, leaf = parts[-2], parts[-1]
  leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
  if leaf == "weight":
    leaf = "embedding" if parent.endswith("_embeddings") else "scale" if parent == "LayerNorm" else "kernel"
  return tuple(parts[:-1]) + (leaf,)


def _hf_key(path: tuple[str, ...]) -> str:
  *mods, leaf = path
  leaf = "bias" if leaf == "bias" else "weight"
  return re.sub(r"\blayer_(\d+)", r"layer.\1", ".".join(mods + [leaf]))


def abstract_params(cfg: EncoderConfig):
  return jax.eval_shape(lambda: enc.init_params(cfg, jax.random.key(0)))


def load_config(path: str) -> EncoderConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model folder {path} does not exist")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: config.json is missing (not a Hugging Face model folder)")
  with open(cfg_path, encoding="utf-8") as f:
    return from_hf_config(json.load(f), source=cfg_path)


def _encoder_key(hf_key: str) -> str:
  """The key without the model-class prefix ("bert.", "roberta.", ...)."""
  for p in _HF_PREFIXES:
    if hf_key.startswith(p):
      return hf_key[len(p):]
  return hf_key


def _has_pooler(encoder_keys) -> bool:
  return any(k.startswith("pooler.") for k in encoder_keys)


def pretrained_config(path: str) -> EncoderConfig:
  """The EncoderConfig of an HF folder without reading any tensor (a resumed run needs only this):
  config.json, plus whether the weights hold a pooler, from the safetensors header."""
  cfg = load_config(path)
  st = os.path.join(path, WEIGHT_FILES[0])
  if os.path.exists(st):
    from safetensors import safe_open
    with safe_open(st, "np") as f:
      names = list(f.keys())
  else:
    names = list(_read_state_dict(path))
  return cfg.replace(add_pooler=_has_pooler(_encoder_key(k) for k in names))


def load_pretrained(path: str, **overrides: Any) -> tuple[EncoderConfig, Any]:
  """Reads an HF BERT / XLM-R folder into (config, fp32 numpy params). Errors name missing tensors."""
  cfg = load_config(path)
  state = {}
  for k, v in _read_state_dict(path).items():
    k = _encoder_key(k)
    if not _IGNORED.search(k):
      state[k] = v
  cfg = cfg.replace(add_pooler=_has_pooler(state), **overrides)
  want = traverse_util.flatten_dict(abstract_params(cfg))
  got = {_flax_path(k): v for k, v in state.items()}
  missing = sorted(_hf_key(p) for p in want if p not in got)
  if missing:
    raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  params = {}
  for p, spec in want.items():
    w = got[p]
    if p[-1] == "kernel":
      w = w.T
    if w.size != int(np.prod(spec.shape)):
      raise ValueError(f"{path}: tensor {_hf_key(p)} has shape {got[p].shape}, config wants {spec.shape}")
    params[p] = np.ascontiguousarray(w.reshape(spec.shape), dtype=np.float32)
  return cfg, traverse_util.unflatten_dict(params)


def to_state_dict(params: Any, cfg: EncoderConfig) -> dict[str, np.ndarray]:
  """Flax params → HF tensor names and layouts (fp32). Adds a zero pooler when the encoder has none,
  because transformers cannot record add_pooling_layer=False and would report the pooler missing."""
  out = {}
  for p, w in traverse_util.flatten_dict(jax.device_get(params)).items():
    w = np.asarray(w, np.float32)
    if p[-1] == "kernel":
      w = w.reshape(w.shape[0], -1).T
    elif p[-1] == "bias":
      w = w.reshape(-1)
    out[_hf_key(p)] = np.ascontiguousarray(w)
  if not cfg.add_pooler:
    d = cfg.hidden_size
    out["pooler.dense.weight"] = np.zeros((d, d), np.float32)
    out["pooler.dense.bias"] = np.zeros((d,), np.float32)
  return out


def save_pretrained(params: Any, cfg: EncoderConfig, out_dir: str, tokenizer_dir: str | None = None,
                    max_seq_length: int | None = None, prompts: dict[str, str] | None = None) -> str:
  """Writes an HF folder (config.json + model.safetensors + tokenizer files) that is also a
  sentence-transformers model: Transformer → mean Pooling → Normalize, with the E5 prompts by name.
  `max_seq_length` defaults to what the position table allows, at most 512 (the mE5 training length)."""
  from safetensors.numpy import save_file
  max_seq_length = max_seq_length or min(512, cfg.max_tokens)
  if max_seq_length > cfg.max_tokens:
    raise ValueError(f"max_seq_length {max_seq_length} exceeds the {cfg.max_tokens} positions of the encoder")
  os.makedirs(out_dir, exist_ok=True)
  save_file(to_state_dict(params, cfg), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  _write_json(os.path.join(out_dir, "config.json"), to_hf_config(cfg))
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
        shutil.copyfile(src, os.path.join(out_dir, name))
  _write_sentence_transformers_files(out_dir, cfg.hidden_size, max_seq_length,
                                     E5_PROMPTS if prompts is None else prompts)
  return out_dir


def _write_sentence_transformers_files(out_dir: str, dim: int, max_seq_length: int, prompts: dict[str, str]):
  # The classic module names load in sentence-transformers 2.x through 6.x.
  _write_json(os.path.join(out_dir, "modules.json"), [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
  ])
  _write_json(os.path.join(out_dir, "sentence_bert_config.json"),
              {"max_seq_length": max_seq_length, "do_lower_case": False})
  _write_json(os.path.join(out_dir, "config_sentence_transformers.json"),
              {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
  _write_json(os.path.join(out_dir, "1_Pooling", "config.json"), {
      "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
      "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True})
  os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)


def _write_json(path: str, obj: Any):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")
