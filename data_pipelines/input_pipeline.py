"""The trainer's input: a weighted mixture of random-access sources → host-local token batches.

    pipe = InputPipeline(sources, tokenizer, MixtureConfig(global_batch_size=...), PreprocessConfig(...),
                         process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(pipe)          # dict of numpy arrays, DESIGN.md "Batch contract", B = global // hosts
    state = pipe.get_state()    # small JSON dict, identical on every host: save it with the checkpoint
    pipe.set_state(state)       # in a fresh pipeline: the following batches are the same, bit for bit
    pipe.bad_records            # {source: {reason: count}} of records skipped at read time, for the log
    with Prefetch(pipe) as it:  # optional: batches built in a thread while the step runs; same API
      ...

A source is anything with `__len__` and `__getitem__(i) -> dict` (grain's RandomAccessDataSource
protocol): a list of dicts, or a TFDS array_record data source. No TensorFlow is imported here.

Sources built with token ids (`build --tokenizer`) are read as ids when `tokenizer_fingerprint` (of the
tokenizer this pipeline holds) matches the one they were built with: the batches are identical, without
tokenizing. A different tokenizer, or a max length beyond the ids stored, is refused at construction.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Callable, Mapping, Protocol

import numpy as np

from data_pipelines.mixture import MixtureConfig, MixtureSampler, Plan, uniform
from data_pipelines.preprocess import (Batcher, PreprocessConfig, agree_shapes, check_record,
                                       choose_negatives, pad_score)
from data_pipelines.pretokenized import Pretokenizer, check_prefix
from me5_jax.tokenize import Tokenizer

log = logging.getLogger(__name__)

# A bad record is replaced by a random record of the same source; this many bad draws in a row for one
# slot means the source itself is broken, which is an error rather than something to count.
MAX_DRAWS = 64
SALT_REPLACE, SALT_FILL = 21, 22
METADATA_FIELDS = ("lang", "source")  # a stage-1 record's fields for reports and evaluation, not for batches
TEXTS = ("query", "passage")  # a stage-1 record's texts


class RandomAccessSource(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> Mapping: ...


class InputPipeline:
  """Iterator of host-local batches; see the module docstring for the API."""

  def __init__(self, sources: Mapping[str, RandomAccessSource], tokenizer: Tokenizer,
               mixture: MixtureConfig, preprocess: PreprocessConfig, *, process_index: int = 0,
               process_count: int = 1, strict: bool = False,
               agree_length: Callable[[str, int], int] | None = None, tokenizer_fingerprint: str | None = None):
    """agree_length(kind, local_length) -> length shared by all hosts ("query"/"passage", or "rows" for
    packed batches), e.g. a max over `multihost_utils.process_allgather`; hosts must feed one global shape.
    Without it, several hosts pad every batch to the max lengths (packed: a row per text), and a single
    host pads to the smallest bucket that fits."""
    if not sources:
      raise ValueError("InputPipeline needs at least one source")
    self.with_ids = {name: _uses_ids(name, source, preprocess, tokenizer, tokenizer_fingerprint)
                     for name, source in sources.items()}
    # Sources that can (data_pipelines.source.Source) skip decoding the fields no batch uses: the metadata,
    # and a stage-1 source's texts when it is read as ids. Its texts then go unchecked here: a build that
    # stores ids refused the same missing, non-string and empty texts (records.validated).
    self.sources, self._checked_texts = {}, {}
    for name, source in sources.items():
      self._checked_texts[name] = None  # the stage's texts (check_record)
      if hasattr(source, "without"):
        skip_texts = self.with_ids[name] and preprocess.stage == 1
        source = source.without(METADATA_FIELDS + (TEXTS if skip_texts else ()))
        self._checked_texts[name] = () if skip_texts else None
      self.sources[name] = source
    self.sampler = MixtureSampler({n: len(s) for n, s in self.sources.items()}, mixture, process_index,
                                  process_count)
    self.cfg, self.strict, self.seed = preprocess, strict, mixture.seed
    if agree_length is None and process_count > 1:
      local_texts = mixture.global_batch_size // process_count * (1 + preprocess.group_size)
      limits = {"query": preprocess.max_query_length, "passage": preprocess.max_passage_length,
                "rows": -(-local_texts // preprocess.row_multiple) * preprocess.row_multiple}  # a row per text
      agree_length = _Limits(limits)
    self.agree_length, self.process_index = agree_length, process_index
    self.batcher = Batcher(tokenizer, preprocess, process_index=process_index)  # agreeing is `finish`'s
    self._bad = collections.Counter()

  def __iter__(self) -> "InputPipeline":
    return self

  def __next__(self) -> dict:
    return self.finish(*self.build(self.sampler.next_plan()))

  def build(self, plan: Plan) -> tuple[dict, collections.Counter]:
    """The batch of `plan` in this host's own shapes, and the records it skipped ({(source, reason): n}):
    a pure function of the plan, so read workers (data_pipelines.read_workers) can build any step's."""
    self._bad, outer = collections.Counter(), self._bad
    try:
      return self._batch(plan), self._bad
    finally:
      self._bad = outer

  def finish(self, batch: dict, bad: collections.Counter) -> dict:
    """Counts `bad` and pads `batch` to the shapes the hosts agree on, in step order."""
    self._bad.update(bad)
    if self.agree_length is None:
      return batch
    return agree_shapes(batch, self.agree_length, self.process_index, self.batcher.tokenizer.pad_id)

  def __getstate__(self) -> dict:
    """What a read worker gets: everything but `agree_length` (a collective, maybe), which stays here."""
    return {**self.__dict__, "agree_length": None}

  def _batch(self, plan: Plan) -> dict:
    queries, passages, teacher = [], [], []
    names, cfg = self.sampler.names, self.cfg
    passage_prefixes = {name: cfg.passage_prefix(name) for name in names}
    query_prefixes = {name: None if cfg.instruct else cfg.prefix_pair(name)[0] for name in names}  # None: per record
    for row, s, record in zip(plan.rows.tolist(), plan.sources.tolist(), self._records(plan)):
      name = names[s]
      query_prefix, passage_prefix = query_prefixes[name], passage_prefixes[name]
      if query_prefix is None:
        query_prefix = cfg.query_prefix(record, name)
      ids = self.with_ids[name]
      queries.append((query_prefix, record["query_ids"]) if ids else query_prefix + record["query"])
      if cfg.stage == 1:
        passages.append((passage_prefix, record["passage_ids"]) if ids else passage_prefix + record["passage"])
        continue
      group, scores = self._group(name, record, plan.step, row)
      passages.extend((passage_prefix, p_ids) if ids else passage_prefix + text for text, p_ids in group)
      teacher.append(scores)
    return self.batcher.local(queries, passages, teacher if cfg.stage == 2 and cfg.use_teacher else None)

  def _records(self, plan: Plan) -> list[Mapping]:
    """The plan's valid records in row order, read with one batched call per source."""
    records: list[Mapping] = [{}] * len(plan.rows)
    for s in np.unique(plan.sources).tolist():
      name, rows = self.sampler.names[s], np.flatnonzero(plan.sources == s)
      for r, record in zip(rows.tolist(), self._fetch(name, plan.indices[rows])):
        if check_record(record, name, self.cfg, self._checked_texts[name]) is None:
          records[r] = record
        else:  # counted and replaced
          key = (SALT_REPLACE, plan.step, int(plan.rows[r]))
          records[r] = self._read(name, int(plan.indices[r]), *key, record=record)
    return records

  def _group(self, name: str, record: Mapping, step: int, row: int
             ) -> tuple[list[tuple[str, list[int] | None]], list[float]]:
    """Positive + k hard negatives as (text, stored ids or None), with teacher scores; missing negatives
    are other records' positives."""
    k, ids = self.cfg.num_hard_negatives, self.with_ids[name]
    chosen = choose_negatives(len(record["negatives"]), k, self.seed, step, row).tolist()
    negative_ids = _split(record["negatives_ids"], record["negatives_lengths"]) if ids else None
    group = [(record["positive"], record.get("positive_ids"))]
    group += [(record["negatives"][j], negative_ids[j] if ids else None) for j in chosen]
    scores = [float(record["positive_score"])] + [float(record["negative_scores"][j]) for j in chosen]
    for slot in range(len(chosen), k):
      taken = {text for text, _ in group}
      for attempt in range(MAX_DRAWS):
        key = (SALT_FILL, step, row, slot, attempt)
        other = self._read(name, self._draw(name, *key), *key)
        if other["positive"] not in taken:
          break
      else:
        raise ValueError(f"source {name!r}: no passage outside the group of row {row} (step {step}) to "
                         f"fill its {k} hard-negative slots; lower num_hard_negatives or grow the source")
      group.append((other["positive"], other.get("positive_ids")))
      scores.append(pad_score(record))
    return group, scores

  def _draw(self, name: str, *key: int) -> int:
    return int(uniform(self.seed, *key) * len(self.sources[name]))

  def _fetch(self, name: str, indices: np.ndarray) -> list[Mapping]:
    source = self.sources[name]
    if hasattr(source, "__getitems__"):  # e.g. array_record: one call for many records
      return source.__getitems__(indices.tolist())
    return [source[i] for i in indices.tolist()]

  def _read(self, name: str, index: int, *key: int, record: Mapping | None = None) -> Mapping:
    """Record `index` of `name` (already read: `record`); a bad one is counted and replaced by a random
    record drawn with `key`, so the replacement is the same on resume and on any host count."""
    for attempt in range(MAX_DRAWS):
      record = self.sources[name][index] if record is None else record
      reason = check_record(record, name, self.cfg, self._checked_texts[name])
      if reason is None:
        return record
      if self.strict:
        raise ValueError(f"source {name!r} record {index}: {reason} (strict mode)")
      self._bad[name, reason] += 1
      index, record = self._draw(name, *key, attempt), None
    raise ValueError(f"source {name!r}: {MAX_DRAWS} bad records in a row (last: {reason}); "
                     f"rebuild it, bad records so far: {self.bad_records[name]}")

  @property
  def bad_records(self) -> dict[str, dict[str, int]]:
    """Records skipped at read time on this host since construction, by source and reason."""
    out: dict[str, dict[str, int]] = {}
    for (name, reason), n in sorted(self._bad.items()):
      out.setdefault(name, {})[reason] = n
    return out

  def epochs(self) -> dict[str, float]:
    return self.sampler.epochs()

  def get_state(self) -> dict:
    return self.sampler.get_state()

  def set_state(self, state: Mapping) -> None:
    self.sampler.set_state(state)


class _Limits:
  """agree_length of hosts that were given none: every host pads to the max lengths (picklable)."""

  def __init__(self, limits: dict[str, int]):
    self.limits = limits

  def __call__(self, kind: str, length: int) -> int:
    return self.limits[kind]


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
  """A stage-2 record's negatives' ids, stored as one flat list and their lengths."""
  ends = np.cumsum(lengths).tolist()
  return [flat[end - n:end] for end, n in zip(ends, lengths)]


def _uses_ids(name: str, source, cfg: PreprocessConfig, tokenizer: Tokenizer, fingerprint: str | None) -> bool:
  """Whether `source` is read as its stored token ids; raises ValueError (naming the source, both tokenizers
  or the lengths) where they exist but cannot be used."""
  built = (getattr(source, "build_report", None) or {}).get("tokenizer")
  if not built or fingerprint is None:
    return False
  if built["fingerprint"] != fingerprint:
    raise ValueError(f"source {name!r} stores token ids of tokenizer {built['fingerprint']} ({built.get('dir')}), "
                     f"but training tokenizes with {fingerprint}: rebuild it with --tokenizer set to the "
                     "training tokenizer's folder, or train with that tokenizer")
  pre = Pretokenizer(tokenizer)
  for key, length in (("query_max_length", cfg.max_query_length), ("passage_max_length", cfg.max_passage_length)):
    pre.check_max_length(length, built["max_tokens"], f"{key} (source {name!r})")
  prefixes = {cfg.passage_prefix(name), *([] if cfg.instruct else [cfg.prefix_pair(name)[0]])}
  try:
    for prefix in prefixes:
      check_prefix(prefix)
  except ValueError as e:
    log.warning("source %s: tokenizing its texts on the fly, not reading its stored ids: %s", name, e)
    return False
  return True


class BatchesAhead:
  """What builds batches ahead of the step (Prefetch, read_workers.ReadWorkers) shares: the iterator and
  context-manager protocol, and get_state / bad_records / epochs of the batches handed out so far (not
  the ones built ahead), so that a checkpoint taken between steps resumes exactly. `_report` holds them."""
  pipeline: InputPipeline
  _report: tuple[dict, dict, dict]

  def __iter__(self):
    return self

  def _snapshot(self) -> tuple[dict, dict, dict]:
    """The pipeline's state, skipped records and epochs now, for `_report`."""
    return self.pipeline.get_state(), self.pipeline.bad_records, self.pipeline.epochs()

  def get_state(self) -> dict:
    return self._report[0]

  @property
  def bad_records(self) -> dict[str, dict[str, int]]:
    return self._report[1]

  def epochs(self) -> dict[str, float]:
    return self._report[2]

  def close(self) -> None:
    raise NotImplementedError

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Prefetch(BatchesAhead):
  """Builds the next `size` batches in a background thread while the step runs (the tokenizer releases the
  GIL). get_state / bad_records / epochs describe the batches handed out so far, not the buffered ones, so a
  checkpoint taken between steps resumes exactly. Restore state into the InputPipeline before wrapping it.
  Multi-host: agree_length then runs in this thread, so it must not issue device collectives that could
  interleave with the train step's; keep the default (pad to the max lengths) there.
  """

  def __init__(self, pipeline: InputPipeline, size: int = 2):
    self.pipeline = pipeline
    self._report = self._snapshot()
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._error: Exception | None = None
    self._thread = threading.Thread(target=self._produce, name="input_pipeline", daemon=True)
    self._thread.start()

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self.pipeline)
        self._put((batch, self._snapshot()))
    except Exception as e:  # noqa: BLE001 -- re-raised in the consumer by __next__
      self._put((e, None))

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __next__(self) -> dict:
    if self._error is None:
      item, report = self._get()
      if report is not None:
        self._report = report
        return item
      self._error = item
    raise self._error

  def _get(self) -> tuple:
    """The next (batch, report) or (exception, None); never waits on a producer that has died (any
    exception it raises reaches the queue; this catches what cannot, e.g. the thread being killed)."""
    while True:
      try:
        return self._queue.get(timeout=1.0)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          return RuntimeError("the input pipeline thread stopped without handing over a batch"), None

  def close(self, timeout_s: float = 60.0) -> None:
    """Stops the thread; it finishes the batch it is building first (a daemon: never blocks exit)."""
    self._stop.set()
    self._thread.join(timeout_s)
    if self._thread.is_alive():
      log.warning("input pipeline thread still building a batch after %.0f s; not waiting for it", timeout_s)
