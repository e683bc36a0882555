"""Token ids stored at build time, and the read-time prefix that turns them into a text's row.

A build stores each text's ids without special tokens and without the E5 prefix (which is chosen at read
time: `query: `, `passage: `, the instruct template with the record's task), cut to a stored maximum. The
read path then only concatenates:

  row(prefix, ids, max_length) = head + (prefix ids + ids)[:max_length - |head| - |tail|] + tail

(head/tail: the tokenizer's special tokens, [CLS] … [SEP] or <s> … </s>), which is exactly what tokenizing
`prefix + text` gives, truncated to max_length, for a tokenizer that works word by word: one whose
pre-tokenizer splits on whitespace before the subword model runs (BERT's BertPreTokenizer; XLM-R's
Metaspace behind the WhitespaceSplit that `me5_jax.tokenize` puts in front of it) and whose normalizer maps
characters one at a time (lower-casing, accent stripping, NFKC, CJK spacing), and for a prefix that is empty
or ends in whitespace, so that no word straddles the prefix and the text. `check_prefix` refuses other
prefixes; `tests/test_pretokenized.py` checks the equality for the real BERT WordPiece and XLM-R
sentencepiece tokenizers on multilingual text.

`fingerprint` names the tokenizer a dataset was built with (a hash of its files), so training with another
one can be refused before anything compiles.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from me5_jax.tokenize import TOKENIZER_SOURCES, Tokenizer, ragged_positions

PROBES = ("hello world", "  Grüße, Köln! ", "北京是中国的首都。", "القاهرة عاصمة مصر", "x")
FINGERPRINT_FILES = TOKENIZER_SOURCES + ("tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_TOKENS = 512  # the longest text any recipe config reads (query/passage max lengths ≤ 512)
TOKENIZE_CHUNK = 512  # examples tokenized per call at build time


def fingerprint(tokenizer_dir: str) -> str:
  """sha256 over the tokenizer files present in `tokenizer_dir` (names and bytes), first 16 hex digits."""
  digest = hashlib.sha256()
  for name in FINGERPRINT_FILES:
    path = os.path.join(tokenizer_dir, name)
    if os.path.exists(path):
      digest.update(name.encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()[:16]


def check_prefix(prefix: str) -> None:
  """A stored text can follow `prefix` only across a word boundary."""
  if prefix and not prefix[-1].isspace():
    raise ValueError(f"prefix {prefix!r} does not end in whitespace: its last word would run into the text's "
                     "first, so pre-tokenized ids cannot be used with it")


class Pretokenizer:
  """Build side: `text_ids`; read side: `row`. Both from one `me5_jax.tokenize.Tokenizer`."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    empty = tokenizer.backend.encode("").ids  # the special tokens around nothing: head + tail
    head_length = _head_length(tokenizer)
    self.head, self.tail = np.asarray(empty[:head_length], np.int32), np.asarray(empty[head_length:], np.int32)
    self.specials = len(empty)  # tokens every row has besides its prefix and text
    self._prefix_ids: dict[str, np.ndarray] = {}  # a handful of prefixes (and instruct tasks) per run

  def check_word_by_word(self) -> None:
    """Raises ValueError unless stored ids + a prefix give this tokenizer's own ids on a few probe texts (a
    byte-level BPE, for one, marks a word's leading space inside its first token, so they would not)."""
    for prefix in ("query: ", "passage: "):
      for text in PROBES:
        if self.row(prefix, self.text_ids([text], 512)[0], 512).tolist() != self.tokenizer.token_ids([prefix + text], 512)[0]:
          raise ValueError(f"this tokenizer does not tokenize word by word ({prefix + text!r} differs from its "
                           "prefix and text tokenized apart): its ids cannot be stored at build time")

  def text_ids(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's ids, no special tokens, the first `max_tokens` of them (what a build stores)."""
    encodings = self.tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids[:max_tokens] for e in encodings]

  def add_ids(self, examples: Iterable[tuple[str, dict]], max_tokens: int) -> Iterator[tuple[str, dict]]:
    """(key, example) pairs with each text's ids added, as a build stores them: `<text>_ids` beside each
    text, a stage-2 example's negatives as one flat `negatives_ids` split by `negatives_lengths`. Tokenized
    TOKENIZE_CHUNK examples per call (the Rust tokenizer batches across threads)."""
    examples = iter(examples)
    while chunk := list(itertools.islice(examples, TOKENIZE_CHUNK)):
      for key in ("query", "passage", "positive"):
        if key in chunk[0][1]:
          for (_, example), ids in zip(chunk, self.text_ids([e[key] for _, e in chunk], max_tokens)):
            example[f"{key}_ids"] = np.asarray(ids, np.int32)
      if "negatives" in chunk[0][1]:
        flat = self.text_ids([n for _, e in chunk for n in e["negatives"]], max_tokens)
        start = 0
        for _, example in chunk:
          rows = flat[start:start + len(example["negatives"])]
          start += len(rows)
          example["negatives_ids"] = np.asarray([i for r in rows for i in r], np.int32)
          example["negatives_lengths"] = np.asarray([len(r) for r in rows], np.int32)
      yield from chunk

  def prefix_ids(self, prefix: str) -> np.ndarray:
    if prefix not in self._prefix_ids:
      check_prefix(prefix)
      self._prefix_ids[prefix] = np.asarray(self.tokenizer.backend.encode(prefix, add_special_tokens=False).ids,
                                            np.int32)
    return self._prefix_ids[prefix]

  def check_max_length(self, max_length: int, max_tokens: int, what: str = "max length") -> None:
    """Rows of `max_length` need at most max_length - specials ids of a text: more than a build that cut
    texts to `max_tokens` stored, and a long text would silently end early."""
    if max_length - self.specials > max_tokens:
      raise ValueError(f"{what} {max_length} needs up to {max_length - self.specials} ids per "
                       f"text, but the dataset stores at most {max_tokens} (rebuild with a larger --max-tokens)")

  def row(self, prefix: str, ids: Sequence[int], max_length: int) -> np.ndarray:
    """The ids of `prefix + text` with special tokens (int32), truncated to `max_length` as the tokenizer
    does (exact when `ids` were stored with max_tokens ≥ max_length - specials: `check_max_length`)."""
    return self.ragged([(prefix, ids)], max_length)[0]

  def ragged(self, items: Sequence[tuple[str, Sequence[int]]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`row` of every (prefix, ids) item as one flat int32 array, row after row, and the rows' lengths
    (int64): built with a few array operations for the whole batch, not per row, and never padded (the
    packed layout places these rows straight into its own; `tokenize.pad_ragged` pads them)."""
    n, head, tail = len(items), len(self.head), len(self.tail)
    room = max(max_length - self.specials, 0)
    prefix_N, texts = zip(*items) if n else ((), ())
    distinct = list(dict.fromkeys(prefix_N))  # the batch's few prefixes
    prefixes = [self.prefix_ids(prefix)[:room] for prefix in distinct]
    code_N = np.zeros(n, np.int64)
    if len(distinct) > 1:
      prefix_N = np.array(prefix_N, object)
      for code, prefix in enumerate(distinct[1:], 1):
        code_N[prefix_N == prefix] = code
    prefix_length_N = np.array([len(p) for p in prefixes], np.int64)[code_N] if n else code_N
    text_length_N = np.minimum(np.fromiter(map(len, texts), np.int64, n), room - prefix_length_N)
    lengths_N = self.specials + prefix_length_N + text_length_N
    starts_N = np.cumsum(lengths_N) - lengths_N
    tokens_K = np.empty(int(lengths_N.sum()), np.int32)
    for k, token in enumerate(self.head.tolist()):
      tokens_K[starts_N + k] = token
    for code, prefix_ids in enumerate(prefixes):
      at = starts_N[code_N == code] + head
      tokens_K[at[:, None] + np.arange(len(prefix_ids))] = prefix_ids
    # Each text's tokens go between its row's prefix and its tail.
    text_tokens = np.concatenate([ids[:k] for ids, k in zip(texts, text_length_N.tolist())]) if n else tokens_K[:0]
    tokens_K[ragged_positions(starts_N + head + prefix_length_N, text_length_N)] = text_tokens
    for k, token in enumerate(self.tail.tolist()):
      tokens_K[starts_N + lengths_N - tail + k] = token
    return tokens_K, lengths_N


def _head_length(tokenizer: Tokenizer) -> int:
  """How many of the special tokens come before the text: found by encoding one known word."""
  backend = tokenizer.backend
  word = backend.encode("a", add_special_tokens=False).ids
  full = backend.encode("a").ids
  for start in range(len(full) - len(word) + 1):
    if full[start:start + len(word)] == word:
      return start
  raise ValueError("cannot place the tokenizer's special tokens around a text")
