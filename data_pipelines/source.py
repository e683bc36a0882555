"""Read side: a built dataset as a random-access source of plain Python records, without TensorFlow.

The training path runs where TensorFlow is absent (the GPU machine), so this module finds the array_record
files through `tfds.builder_from_directory(...)`, reads them with array_record's reader and parses each
record's tf.Example bytes with tensorflow_datasets' own proto module: no TensorFlow anywhere. Records come
back as the builders' schemas (see records.py) with Python types: str for text (TFDS returns bytes), float
for scores, lists for sequences; stored token ids as int32 arrays. Order is TFDS's (shuffled at write time).
"""
from __future__ import annotations

import glob
import os
import threading
from typing import Any, Collection, Sequence

import numpy as np

# source name → (TFDS builder name, builder config or None); "bible" is the default Bible pair set.
DATASETS = {name: ("me5_pairs", name) for name in (
    "wikipedia", "mc4", "cc_news", "nllb", "reddit", "s2orc", "stackexchange", "xp3", "sbert", "custom")}
DATASETS.update({"stage2": ("me5_stage2", None), "bible": ("me5_bible", "pd"), "bible/demo": ("me5_bible", "demo")})
VERSION = "1.0.0"
INT32_BYTES = "int32_bytes"  # a field kind of Source: an int32 tensor serialized as one bytes value


def dataset_path(data_dir: str, name: str) -> str:
  """Where the dataset of source `name` lives (or will) under `data_dir`: DIR/builder[/config]/version."""
  if name not in DATASETS:
    raise KeyError(f"unknown source {name!r}; known: {', '.join(DATASETS)}")
  builder, config = DATASETS[name]
  return os.path.join(data_dir, builder, *([config] if config else []), VERSION)


# Random access, no reader threads: array_record's batched `read(list)` costs ~0.3-0.7 ms per call in its
# thread pool (a batch reads each source once) and TFDS's data source adds a Python thread pool per call;
# seek + read of one record costs 7-10 µs of CPU, most of it riegeli's per-record chunk decoding.
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
READER_BUFFER_BYTES = 4 << 10


class Source:
  """len + getitem → dict of str / float / list; `build_report` holds the valid/skipped counts of the build.

  Records are read as raw bytes from the split's array_record shards (one reader per shard, opened on first
  use) and parsed straight from the tf.Example proto with the dataset's own feature specs, which yields
  Python types directly and reads 2.5x as many records per second as TFDS's generic numpy decoding (the
  reference in the tests). Picklable (readers are reopened), for read workers. Prefer `__getitems__` for many
  records. Reads are serialised by a lock: a reader is a file position.
  """

  def __init__(self, name: str, split: str, shards: Sequence[tuple[str, int, int]],
               fields: dict[str, tuple[str, bool]], build_report: dict[str, Any]):
    """shards: (array_record path, first record, record count) of each file of the split, in order."""
    self.name, self.split = name, split
    self._shards = list(shards)
    self._paths = [path for path, _, _ in shards]
    takes = np.array([take for _, _, take in shards], np.int64)
    self._ends = np.cumsum(takes)  # record index → shard: searchsorted on the ends
    self._offsets = np.array([skip for _, skip, _ in shards], np.int64) - (self._ends - takes)  # + index → position
    self._fields = fields  # feature → (proto list kind, is scalar)
    # Decoded by kind, so the common cases (one string, one ids array) skip the generic conversion.
    self._texts = [k for k, (kind, scalar) in fields.items() if kind == "bytes_list" and scalar]
    self._ids = [k for k, (kind, _) in fields.items() if kind == INT32_BYTES]
    self._others = [(k, kind, scalar) for k, (kind, scalar) in fields.items()
                    if k not in self._texts and k not in self._ids]
    self.build_report = build_report
    self.__setstate__(self.__dict__)

  def without(self, fields: Collection[str]) -> "Source":
    """The same records without `fields`, which are then never decoded (the input pipeline skips the
    metadata fields it does not read: a sixth of a stage-1 record's decoding)."""
    kept = {key: spec for key, spec in self._fields.items() if key not in fields}
    return Source(self.name, self.split, self._shards, kept, self.build_report)

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._readers: list = [None] * len(self._paths)
    self._lock = threading.Lock()

  def _reader(self, shard: int):
    if self._readers[shard] is None:
      from array_record.python import array_record_module
      self._readers[shard] = array_record_module.ArrayRecordReader(
          self._paths[shard], options=READER_OPTIONS, file_reader_buffer_size=READER_BUFFER_BYTES)
    return self._readers[shard]

  def _raw(self, indices: Sequence[int]) -> list[bytes]:
    index_N = np.asarray(indices, np.int64).reshape(-1)
    if index_N.size and (index_N.min() < 0 or index_N.max() >= len(self)):
      bad = index_N[(index_N < 0) | (index_N >= len(self))][0]
      raise IndexError(f"{self!r}: record {bad} is out of range")
    shard_N = np.searchsorted(self._ends, index_N, side="right")
    position_N = index_N + self._offsets[shard_N]
    out = []
    with self._lock:
      for shard, position in zip(shard_N.tolist(), position_N.tolist()):
        reader = self._reader(shard)
        reader.seek(position)
        out.append(reader.read())
    return out

  def _decode(self, raw: bytes, parse) -> dict[str, Any]:
    feature = parse(raw).features.feature
    record: dict[str, Any] = {key: feature[key].bytes_list.value[0].decode("utf-8") for key in self._texts}
    for key in self._ids:
      record[key] = np.frombuffer(feature[key].bytes_list.value[0], "<i4")
    for key, kind, scalar in self._others:
      values = getattr(feature[key], kind).value
      if kind == "bytes_list":
        values = [v.decode("utf-8") for v in values]
      record[key] = values[0] if scalar else list(values)
    return record

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decode(self._raw([index])[0], _parser())

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read (grain uses it when present)."""
    parse = _parser()
    return [self._decode(raw, parse) for raw in self._raw(indices)]

  def __repr__(self) -> str:
    return f"Source({self.name!r}, split={self.split!r}, {len(self)} records)"


def _parser():
  """tf.Example's parser (deferred: importing tensorflow_datasets is slow)."""
  from tensorflow_datasets.proto import tf_example_pb2
  return tf_example_pb2.Example.FromString


def _proto_fields(builder) -> dict[str, tuple[str, bool]]:
  """feature → (tf.Example list kind, scalar?) from the dataset's features.json (flat schemas only); an
  int32 tensor stored as bytes (builders.IDS) is INT32_BYTES, read back as an int32 array."""
  fields = {}
  serialized = builder.info.features.get_serialized_info()
  for key, info in builder.info.features.get_tensor_info().items():
    dtype = np.dtype(info.np_dtype)
    if dtype == np.int32 and np.dtype(serialized[key].np_dtype) == object:
      fields[key] = (INT32_BYTES, False)
      continue
    kind = ("bytes_list" if dtype == object else "float_list" if np.issubdtype(dtype, np.floating)
            else "int64_list")
    if len(info.shape) > 1:
      raise ValueError(f"{builder.data_dir}: feature {key!r} has shape {info.shape}; only scalars and lists")
    fields[key] = (kind, info.shape == ())
  return fields


def open_source(data_dir: str, name: str, split: str = "train") -> Source:
  """The built dataset of source `name` (a key of DATASETS) under `data_dir`, split "train" (or "eval"
  for the Bible's held-out verses), as a random-access Source."""
  path = dataset_path(data_dir, name)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    found = sorted(glob.glob(os.path.join(data_dir, "me5_*", "**", "dataset_info.json"), recursive=True))
    raise FileNotFoundError(f"{path}: no built dataset for source {name!r} (build it with "
                            f"`python -m data_pipelines.build --source {name} ...`); found: "
                            f"{[os.path.dirname(f) for f in found] or 'none'}")
  import tensorflow_datasets as tfds  # deferred: it is slow to import and only this function needs it
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise KeyError(f"{path}: no split {split!r}; it has {', '.join(builder.info.splits)}")
  report = dict(builder.info.metadata or {}).get("build_report", {})
  shards = [(f.filename, f.skip, f.take) for f in builder.info.splits[split].file_instructions]
  return Source(name, split, shards, _proto_fields(builder), report)
