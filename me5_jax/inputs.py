"""What the trainer starts from: the model (HF folder or scratch variant) and the input pipeline over the
datasets named by `train_data`, both resolved from the config before anything compiles."""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from me5_jax import config as config_lib
from me5_jax import fetch, hf_io
from me5_jax.instructions import SOURCE_INSTRUCTIONS
from me5_jax.sharding import num_batch_shards, shard_batch
from me5_jax.tokenize import Tokenizer
from me5_jax.variants import EncoderConfig, get_variant

log = logging.getLogger(__name__)
AUTO_BUILT = ("bible", "bible/demo")  # built from the fetched Bible database on first use


def model_source(config) -> tuple[str, EncoderConfig, Callable[[], Any]]:
  """(model folder or "", encoder config, load_params). load_params() reads the host params (None for a
  fresh init of `model_variant`); the trainer calls it only when there is no checkpoint to resume."""
  if not config.init_checkpoint:
    return "", get_variant(config.model_variant), lambda: None
  try:
    model_dir = fetch.resolve_model(config.init_checkpoint)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config key init_checkpoint: {e}") from None
  return model_dir, hf_io.pretrained_config(model_dir), lambda: hf_io.load_pretrained(model_dir)[1]


def _open_sources(config, tokenizer: Tokenizer) -> dict[str, Any]:
  """The `train_data` sources under `data_dir`. The ones the trainer builds itself (AUTO_BUILT, the Bible)
  are built once per tokenizer with its token ids stored, under DATA_DIR/tokenized/<fingerprint>, so that
  runs of different models can share a data_dir and every run reads ids instead of tokenizing."""
  from data_pipelines import pretokenized
  from data_pipelines.source import dataset_path, open_source
  data_dir = os.path.expanduser(config.data_dir or os.path.join(fetch.cache_dir(), "tfds"))
  own_dir = data_dir
  if tokenizer.path:
    own_dir = os.path.join(data_dir, "tokenized", pretokenized.fingerprint(tokenizer.path))
  build = dict(tokenizer_dir=tokenizer.path) if tokenizer.path else {}
  names = list(config_lib.parse_train_data(config.train_data))
  for name in names:
    if name in AUTO_BUILT and not os.path.exists(os.path.join(dataset_path(own_dir, name), "dataset_info.json")):
      # Process 0 builds; the others wait, then build only if their data_dir is not shared with it.
      from data_pipelines import builders  # imports TFDS's writer side: only when a build is due
      builders.tfds.disable_progress_bar()  # TFDS's per-example bars would bury the trainer's log
      if jax.process_index() == 0:
        log.info("building the %s dataset into %s (once per tokenizer)", name, own_dir)
        builders.build(name, own_dir, **build)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"built {name}")
        if not os.path.exists(dataset_path(own_dir, name)):
          builders.build(name, own_dir, **build)
  return {name: open_source(own_dir if name in AUTO_BUILT else data_dir, name) for name in names}


def input_pipeline(config, tokenizer: Tokenizer, mesh):
  """The InputPipeline for this process: its share of every global batch, in the batch contract layout.
  Packed rows come in multiples of the batch shards this process feeds (times the GradCache chunk)."""
  from data_pipelines import pretokenized
  from data_pipelines.input_pipeline import InputPipeline
  from data_pipelines.mixture import MixtureConfig
  from data_pipelines.preprocess import PreprocessConfig
  sources = _open_sources(config, tokenizer)
  for name, src in sources.items():
    report = getattr(src, "build_report", {}) or {}
    skipped = report.get("skipped") or {}
    ids = " (token ids stored at build)" if report.get("tokenizer") else ""
    log.info("source %s: %d records%s%s", name, len(src), ids, f"; skipped at build: {skipped}" if skipped else "")
  weights = config_lib.parse_train_data(config.train_data)
  mixture = MixtureConfig(
      global_batch_size=config.batch_size, seed=config.seed, alpha=config.mixture_alpha,
      same_source_batches=config.same_source_batches,
      weights=None if all(w is None for w in weights.values()) else
      {n: (1.0 if w is None else w) for n, w in weights.items()})
  preprocess = PreprocessConfig(
      stage=1 if config.stage == "pretrain" else 2, max_query_length=config.query_max_length,
      max_passage_length=config.passage_max_length, num_hard_negatives=config.num_hard_negatives,
      use_teacher=config.use_teacher, instruct=config.instruct,
      instructions=SOURCE_INSTRUCTIONS if config.instruct else {},
      prefixes={n: (config.query_prefix, config.passage_prefix) for n in sources},
      pack_rows=config_lib.pack_sequences(config, jax.default_backend()),
      row_multiple=max(1, num_batch_shards(mesh) // jax.process_count()) * max(1, config.gradcache.chunk_size))
  agree = None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    agree = lambda kind, n: int(multihost_utils.process_allgather(np.array(n)).max())  # noqa: E731
  return InputPipeline(sources, tokenizer, mixture, preprocess, process_index=jax.process_index(),
                       process_count=jax.process_count(), strict=config.strict_data, agree_length=agree,
                       tokenizer_fingerprint=pretokenized.fingerprint(tokenizer.path) if tokenizer.path else None)


@dataclasses.dataclass
class FeedItem:
  batch: dict[str, jax.Array]          # the global batch, sharded onto the devices
  data_state: dict                     # the pipeline's position after this batch (saved with its step)
  bad_records: dict                    # records skipped so far, as of this batch
  flops: float                         # training FLOPs of the rows it encodes (metric_writer.batch_flops)


class DeviceFeed:
  """The next `depth` global batches, already copied to the devices, so a step never waits for the host.

  `pop()` hands out the oldest; `fill()` (called right after the step is dispatched) builds the next host
  batch and starts its copy while the step runs. With `read_workers` the host batches are built by that
  many processes (`ReadWorkers`), `depth` each ahead. Otherwise, in one process, they come from a
  background thread (`Prefetch`: tokenizing releases the GIL), so building overlaps even a blocking metrics
  read; with several processes they are built in the loop's thread. Either way hosts agree on shapes in
  the loop's thread (a device collective, `agree_length`, which must not interleave with the step's
  collectives from another thread): ReadWorkers does it in `next`, and Prefetch is not used then.
  """

  def __init__(self, pipeline, mesh, flops_fn: Callable[[dict], float], depth: int = 2, read_workers: int = 0):
    from data_pipelines.input_pipeline import Prefetch
    from data_pipelines.read_workers import ReadWorkers
    self.mesh, self.flops_fn, self.depth = mesh, flops_fn, depth
    if read_workers:
      self.source = ReadWorkers(pipeline, read_workers, depth)
    else:
      self.source = Prefetch(pipeline, size=depth) if jax.process_count() == 1 else pipeline
    self.queue: collections.deque[FeedItem] = collections.deque()
    for _ in range(depth):
      self.fill()

  def fill(self) -> None:
    if len(self.queue) >= self.depth:
      return
    host_batch = next(self.source)
    self.queue.append(FeedItem(shard_batch(host_batch, self.mesh), self.source.get_state(),
                               self.source.bad_records, self.flops_fn(host_batch)))

  def pop(self) -> FeedItem:
    if not self.queue:
      self.fill()
    return self.queue.popleft()

  def close(self) -> None:
    if hasattr(self.source, "close"):
      self.source.close()
