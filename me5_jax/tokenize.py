"""Tokenization from a Hugging Face model folder, the E5 prefixes and the instruct template.

The Rust `tokenizers` library does the work (it is what transformers' tokenizers run, so ids are
identical to HF). Padding and truncation settings stored inside a `tokenizer.json` are ignored: some
snapshots (all-MiniLM-L6-v2) pad every input to 128, which would silently change results. We truncate
to the max length asked for and pad to a multiple of 8 so the encoder compiles few shapes.

Sentencepiece (XLM-R) `tokenizer.json` files written by older converters keep a trailing space or newline
as a lone "▁" token; sentencepiece itself, and transformers 5 (hence sentence-transformers), split on
whitespace first and drop it. We do the same, so ids match transformers.AutoTokenizer.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Sequence

import numpy as np
from tokenizers import pre_tokenizers as pre

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
INSTRUCT_TEMPLATE = "Instruct: {task}\nQuery: {query}"
PAD_MULTIPLE = 8
# Any one of these makes a folder's tokenizer; tokenizer.json is preferred.
TOKENIZER_SOURCES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model")


def with_prefix(texts: Sequence[str], prefix: str | None) -> list[str]:
  return [prefix + t for t in texts] if prefix else list(texts)


def instruct_query(task: str, query: str) -> str:
  """mE5-large-instruct / E5-mistral query format; documents get no prefix at all."""
  return INSTRUCT_TEMPLATE.format(task=task, query=query)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Tokenizer:
  """Truncating, padding tokenizer over a `tokenizers.Tokenizer`.

  `max_length` counts special tokens, as in transformers.
  """

  def __init__(self, backend, pad_id: int, max_length: int = 512):
    self.backend = backend
    self.backend.no_padding()
    self.backend.no_truncation()
    if isinstance(backend.pre_tokenizer, pre.Metaspace):
      backend.pre_tokenizer = pre.Sequence([pre.WhitespaceSplit(), backend.pre_tokenizer])
    self.pad_id = pad_id
    self.max_length = max_length
    self.path: str | None = None  # the folder it was loaded from (from_dir), which names it
    self.num_special = backend.num_special_tokens_to_add(is_pair=False)

  @classmethod
  def from_dir(cls, path: str, max_length: int | None = None) -> "Tokenizer":
    """Loads `tokenizer.json`, or builds one from `vocab.txt` / `sentencepiece.bpe.model` via transformers."""
    import tokenizers
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok_json):
      backend = tokenizers.Tokenizer.from_file(tok_json)
    elif any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_SOURCES[1:]):
      from transformers import AutoTokenizer  # only for folders without tokenizer.json
      backend = AutoTokenizer.from_pretrained(path).backend_tokenizer
    else:
      raise FileNotFoundError(f"{path}: the tokenizer is missing (no {', '.join(TOKENIZER_SOURCES)})")
    tokenizer = cls(backend, _pad_id(path, backend), max_length or _model_max_length(path))
    tokenizer.path = path
    return tokenizer

  def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Ids with special tokens, truncated to max_length (the trailing special token is kept)."""
    limit = max_length or self.max_length
    self.backend.enable_truncation(limit)
    try:
      return [e.ids for e in self.backend.encode_batch(list(texts))]
    finally:
      self.backend.no_truncation()

  def __call__(self, texts: Sequence[str], max_length: int | None = None, pad_to: int | None = None):
    """Returns (ids_BxL int32, mask_BxL int32), L = pad_to or the longest row rounded up to 8."""
    rows = self.token_ids(texts, max_length)
    return self.pad(rows, pad_to)

  def pad(self, rows: Sequence[Sequence[int]], pad_to: int | None = None):
    return pad_rows(rows, self.pad_id, pad_to)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None):
  """Token rows → (ids_BxL int32, mask_BxL int32), L = pad_to or the longest row rounded up to 8."""
  return pad_ragged(*ragged(rows), pad_id, pad_to)


def ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Token rows → (tokens_K int32: every row's tokens, row after row; lengths_B int64): the form the input
  pipeline builds, pads and packs batches in."""
  lengths_B = np.fromiter(map(len, rows), np.int64, len(rows))
  if rows and isinstance(rows[0], np.ndarray):
    return np.concatenate(rows).astype(np.int32, copy=False), lengths_B
  return np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lengths_B.sum())), lengths_B


def ragged_positions(starts_B: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
  """Where each token of ragged rows (row after row, `lengths_B` long) goes in a flat array in which row b
  starts at starts_B[b]: the index array that places (or, read from, gathers) them all in one step."""
  return np.repeat(starts_B - (np.cumsum(lengths_B) - lengths_B), lengths_B) + np.arange(int(np.sum(lengths_B)))


def pad_ragged(tokens_K: np.ndarray, lengths_B: np.ndarray, pad_id: int, pad_to: int | None = None):
  """Rows given as one flat array, row after row, and their lengths → (ids_BxL int32, mask_BxL int32) as
  `pad_rows` gives them, filled in one vectorised assignment (a row's tokens are the first mask-1 places of
  its row, in order)."""
  lengths_B = np.asarray(lengths_B, np.int64)
  longest = int(lengths_B.max(initial=1))
  length = pad_to or round_up(max(longest, 1), PAD_MULTIPLE)
  if longest > length:
    raise ValueError(f"a row of {longest} tokens does not fit pad_to={length}")
  keep_BxL = np.arange(length) < lengths_B[:, None]
  ids_BxL = np.full((len(lengths_B), length), pad_id, np.int32)
  ids_BxL[keep_BxL] = tokens_K
  return ids_BxL, keep_BxL.astype(np.int32)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _pad_id(path: str, backend) -> int:
  """The tokenizer's own pad token, as HF tokenizers pad with it. config.json can disagree: mE5-small is
  a BERT body (config pad_token_id 0) over the XLM-R vocabulary (<pad> = 1); the mask hides pads either way."""
  for token in ("<pad>", "[PAD]"):
    tid = backend.token_to_id(token)
    if tid is not None:
      return tid
  cfg = _read_json(os.path.join(path, "config.json"))
  if cfg.get("pad_token_id") is not None:
    return int(cfg["pad_token_id"])
  raise ValueError(f"{path}: cannot tell the padding id (no <pad>/[PAD] token, no pad_token_id in config.json)")


def _model_max_length(path: str) -> int:
  """sentence-transformers' max_seq_length when the folder has one, else the position table's size."""
  st = _read_json(os.path.join(path, "sentence_bert_config.json"))
  if "max_seq_length" in st:
    return int(st["max_seq_length"])
  cfg = _read_json(os.path.join(path, "config.json"))
  offset = 2 if cfg.get("model_type") in ("xlm-roberta", "roberta") else 0
  return int(cfg.get("max_position_embeddings", 512 + offset)) - offset
