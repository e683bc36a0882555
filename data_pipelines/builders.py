"""TFDS builders that turn users' files (and the Bible database) into array_record datasets.

array_record gives random access (`tfds.data_source`), which the mixture needs for deterministic,
resumable sampling without TensorFlow. Builders take their inputs as constructor arguments (no download
manager: files are the user's), validate every record (records.py) and store the build report, with
the skipped-record counts, in the dataset's metadata.json so that the training log can repeat it.
TFDS shuffles examples when writing, so index order is not file order.

With a tokenizer (`build(..., tokenizer_dir=DIR)`, `--tokenizer DIR`) every text is also stored as token
ids (`data_pipelines.pretokenized`: no prefix, no special tokens, at most `max_tokens`): `<text>_ids` beside
each text, and a stage-2 record's negatives as one flat `negatives_ids` list split by `negatives_lengths`.
The build report then names the tokenizer (`tokenizer`: fingerprint, max_tokens), which the read path
checks against the tokenizer it trains with.

Use `build(...)` (or the CLI, `python -m data_pipelines.build`) rather than the classes directly: it
checks the inputs and the destination before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import bible, pretokenized, readers, records
from data_pipelines.source import DATASETS, VERSION, dataset_path

FILE_FORMAT = "array_record"
# array_record options of a dataset that stores token ids. TFDS writes every record zstd-compressed
# (group_size:1,zstd:3), and reading a record back then mostly decompresses it: a training host that reads
# ids instead of tokenizing spends much of its time there (BENCHMARKS.md "input_pipeline": uncompressed, long
# passages are read 1.25-1.6x as fast), for more disk. Text-only datasets, whose reads are dwarfed by
# tokenizing, keep TFDS's compression.
IDS_ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
TEXT = tfds.features.Text()
PAIR_FEATURES = {"query": TEXT, "passage": TEXT, "lang": TEXT, "source": TEXT}
STAGE2_FEATURES = {"query": TEXT, "positive": TEXT, "negatives": tfds.features.Sequence(TEXT),
                   "positive_score": np.float32, "negative_scores": tfds.features.Sequence(np.float32),
                   "task": TEXT}
# Token ids as one bytes value (int32, little-endian) rather than an int64_list: the read side turns it into
# an array with one np.frombuffer instead of converting every id (data_pipelines.source).
IDS = tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)


class _UncompressedWriter(tfds.core.writer.ExampleWriter):
  """Writes an array_record shard with IDS_ARRAY_RECORD_OPTIONS (TFDS's own writer fixes zstd)."""

  def write(self, path: epath.PathLike, examples) -> None:
    from array_record.python import array_record_module
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), IDS_ARRAY_RECORD_OPTIONS)
    try:
      for _, serialized in examples:
        writer.write(serialized)
    finally:
      writer.close()


class _ReportingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: the features, array_record output and the build report saved as metadata."""
  VERSION = tfds.core.Version(VERSION)
  FEATURES: dict[str, Any] = {}
  # TFDS looks for a checksums file next to a packaged builder's code, and doing so imports the
  # `importlib_resources` backport (absent on Python >= 3.9): we download nothing, so there is no code path.
  code_path = None

  def __init__(self, *, strict: bool = False, pretokenizer: pretokenized.Pretokenizer | None = None,
               max_tokens: int = pretokenized.DEFAULT_MAX_TOKENS, **kwargs):
    """pretokenizer: store every text's ids under its tokenizer (loaded from a folder: `Tokenizer.path`)."""
    self.report = records.BuildReport(strict)
    self.pretokenizer, self.tokenizer_info = pretokenizer, None
    if pretokenizer is not None:
      tokenizer_dir = pretokenizer.tokenizer.path
      self.tokenizer_info = {"fingerprint": pretokenized.fingerprint(tokenizer_dir), "max_tokens": max_tokens,
                             "dir": os.path.abspath(tokenizer_dir)}
    super().__init__(file_format=FILE_FORMAT, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built inline (not from a package folder with README/CITATIONS), so the DatasetInfo is explicit.
    features = dict(self.FEATURES)
    if self.pretokenizer is not None:
      features.update({f"{key}_ids": IDS for key in ("query", "passage", "positive", "negatives")
                       if key in features})
      if "negatives" in features:
        features["negatives_lengths"] = IDS
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features),
                                 metadata=tfds.core.MetadataDict())

  def _example_writer(self) -> tfds.core.writer.ExampleWriter:
    """TFDS's hook for a custom writer: datasets with ids write uncompressed records (in Beam workers too:
    the writer travels pickled with the pipeline)."""
    if self.pretokenizer is None:
      return super()._example_writer()
    return _UncompressedWriter(file_format=self.info.file_format)

  def _with_ids(self, examples):
    """`examples` ((key, example) pairs) with each text's token ids added (Pretokenizer.add_ids)."""
    if self.pretokenizer is None:
      return examples
    return self.pretokenizer.add_ids(examples, self.tokenizer_info["max_tokens"])

  def _log_download_bytes(self) -> None:
    """Silenced: TFDS would announce a download of "Unknown size"; nothing is downloaded here."""

  def _log_download_done(self) -> None:
    """Silenced: build() returns, and the CLI prints, a summary with the counts instead."""

  def _finish(self, report: dict[str, Any] | None = None, **extra: Any) -> None:
    """Called once all splits are written, before TFDS saves the info (and so metadata.json), with the
    report of this process (default) or the one merged from a Beam build's workers."""
    tokenizer = {"tokenizer": self.tokenizer_info} if self.tokenizer_info else {}
    self.info.metadata["build_report"] = {**(report or self.report.to_json()), **extra, **tokenizer}


class _FilesBuilder(_ReportingBuilder, skip_registration=True):
  """A builder over user files (JSONL / TSV / Parquet), one "train" split; in this process, or with
  `beam=True` as an Apache Beam pipeline (data_pipelines.beam_build) that writes the same records."""

  def __init__(self, *, files: Sequence[str] = (), beam: bool = False, span_bytes: int | None = None, **kwargs):
    self.files = [os.fspath(f) for f in files]
    self.beam, self.span_bytes = beam, span_bytes
    super().__init__(**kwargs)

  def _parser(self):
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the files are the user's
    if not self.beam:
      return {"train": self._with_ids(self._generate_examples())}
    from data_pipelines import beam_build
    tokenizer = self.tokenizer_info or {}
    return {"train": beam_build.ReadFiles(
        self.files, self._parser(), strict=self.report.strict, report_path=self._report_path(),
        pretokenizer=self.pretokenizer,
        max_tokens=tokenizer.get("max_tokens", pretokenized.DEFAULT_MAX_TOKENS),
        span_bytes=self.span_bytes or beam_build.SPAN_BYTES)}

  def _report_path(self) -> str:
    from data_pipelines import beam_build
    return os.path.join(os.fspath(self.data_dir), beam_build.REPORT_FILE)  # the folder being built

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    if self.beam:  # the pipeline has run: store its workers' merged report
      report_file = epath.Path(self._report_path())
      self._finish(json.loads(report_file.read_text()), files=self.files)
      report_file.unlink()

  def _generate_examples(self):
    yield from records.validated(self.files, self._parser(), self.report)
    self._finish(files=self.files)


@dataclasses.dataclass(eq=False)
class PairsConfig(tfds.core.BuilderConfig):
  default_lang: str = ""  # lang for records that carry none (e.g. a per-language Wikipedia dump)


class Me5Pairs(_FilesBuilder):
  """Stage-1 (query, passage) pairs of one mE5 source, with language and source name."""
  FEATURES = PAIR_FEATURES
  BUILDER_CONFIGS = [PairsConfig(name=name, description=f"query ← {'|'.join(f.query)}, "
                                 f"passage ← {'|'.join(f.passage)}")
                     for name, f in records.PAIR_FIELDS.items()]

  def __init__(self, *, lang: str = "", **kwargs):
    self.lang = lang
    super().__init__(**kwargs)

  def _parser(self):
    return records.pair_parser(self.builder_config.name, self.lang)


class Me5Stage2(_FilesBuilder):
  """Stage-2 fine-tuning examples: query, positive, hard negatives, teacher scores (NaN = none), task."""
  FEATURES = STAGE2_FEATURES

  def _parser(self):
    return records.parse_stage2


@dataclasses.dataclass(eq=False)
class BibleConfig(tfds.core.BuilderConfig):
  pairs: tuple[tuple[str, str], ...] = ()


class Me5Bible(_ReportingBuilder):
  """Aligned Bible verses as translation pairs (query: a non-English verse, passage: the English one);
  "train" excludes the held-out verses, "eval" holds exactly them (see bible.py)."""
  FEATURES = PAIR_FEATURES
  BUILDER_CONFIGS = [BibleConfig(name=name, pairs=pairs, description=f"{len(pairs)} version pairs")
                     for name, pairs in bible.PAIR_SETS.items()]

  def __init__(self, *, db_path: str, max_verses: int | None = None, **kwargs):
    self.db_path, self.max_verses = db_path, max_verses
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    verses = bible.aligned_verses(self.db_path)[:self.max_verses]
    train, held_out = bible.split_eval(verses)
    self._verses = {"train": len(train), "eval": len(held_out)}
    return {"train": self._with_ids(self._generate_examples(train, "train")),
            "eval": self._with_ids(self._generate_examples(held_out, "eval"))}

  def _generate_examples(self, verses, split):
    for key, example in bible.translation_pairs(verses, self.builder_config.pairs):
      self.report.ok(f"{self.db_path}[{split}]")
      yield key, example
    self._finish(db_path=self.db_path, verses=self._verses, pairs=[list(p) for p in self.builder_config.pairs])


def build(name: str, data_dir: str, files: Sequence[str] = (), *, strict: bool = False,
          overwrite: bool = False, lang: str = "", db_path: str | None = None,
          max_verses: int | None = None, tokenizer_dir: str | None = None,
          max_tokens: int = pretokenized.DEFAULT_MAX_TOKENS, beam_runner: str | None = None,
          beam_options: str | None = None, span_bytes: int | None = None) -> dict[str, Any]:
  """Builds the dataset of source `name` (a key of source.DATASETS) into `data_dir`; returns the build
  report (valid / skipped counts by reason and file, plus "path" and "splits"). With `tokenizer_dir`, the
  texts' token ids are stored too (module docstring). With `beam_runner` or `beam_options` (a string of
  Beam pipeline flags) the files are read by an Apache Beam pipeline (data_pipelines.beam_build), in
  spans of `span_bytes`; the records and the report are those of the one-process build.

  Raises readers.InputError for unusable inputs or an existing dataset (unless overwrite), before any
  work; records.BadRecordError in strict mode at the first bad record (nothing is left behind then).
  """
  if name not in DATASETS:
    raise readers.InputError(f"unknown source {name!r}; known: {', '.join(DATASETS)}")
  builder_name, config = DATASETS[name]
  use_beam = bool(beam_runner or beam_options)
  if builder_name == "me5_bible":
    if files:
      raise readers.InputError("the Bible source reads bible.db (db_path), not files")
    if use_beam:
      raise readers.InputError("--beam-runner/--beam-options: the Bible source builds in one process (one "
                               "SQLite file); Beam builds are for --files")
    db_path = db_path or bible.default_db()
    if not os.path.isfile(db_path):
      raise readers.InputError(f"{db_path}: no such Bible database")
    kwargs = {"db_path": db_path, "max_verses": max_verses}
  elif builder_name == "me5_stage2":
    for path in files:
      if readers.file_format(path) == "tsv":
        raise readers.InputError(f"{path}: stage-2 records hold lists (negatives); use JSONL or Parquet")
    readers.check_files(files, records.STAGE2_REQUIRED)
    kwargs = {"files": files, "strict": strict, "beam": use_beam, "span_bytes": span_bytes}
  else:
    fields = records.PAIR_FIELDS[config]
    readers.check_files(files, [("query", *fields.query), ("passage", *fields.passage)])
    kwargs = {"files": files, "strict": strict, "lang": lang, "beam": use_beam, "span_bytes": span_bytes}
  if tokenizer_dir is not None:
    if not os.path.isdir(tokenizer_dir):
      raise readers.InputError(f"--tokenizer {tokenizer_dir}: no such folder")
    if max_tokens < 1:
      raise readers.InputError(f"--max-tokens must be >= 1, got {max_tokens}")
    from me5_jax.tokenize import Tokenizer
    try:
      pretokenizer = pretokenized.Pretokenizer(Tokenizer.from_dir(tokenizer_dir))
      pretokenizer.check_word_by_word()
    except (ValueError, FileNotFoundError) as e:
      raise readers.InputError(f"--tokenizer {tokenizer_dir}: {e}") from None
    kwargs.update(pretokenizer=pretokenizer, max_tokens=max_tokens)
  if use_beam:
    try:
      from data_pipelines import beam_build
    except ImportError as e:
      raise readers.InputError(f"--beam-runner/--beam-options need apache-beam ({e}); pip install "
                               "'me5_jax[data]'") from None
    try:
      pipeline_options = beam_build.pipeline_options(beam_options or "")
    except ValueError as e:
      raise readers.InputError(f"--beam-options {beam_options!r}: {e}") from None
  path = epath.Path(dataset_path(data_dir, name))  # a local folder, or gs://... for a cluster's build
  if path.exists():
    if not overwrite:
      raise readers.InputError(f"{path} exists; pass overwrite=True (--overwrite) to rebuild it")
    path.rmtree()
  builder_cls = {"me5_pairs": Me5Pairs, "me5_stage2": Me5Stage2, "me5_bible": Me5Bible}[builder_name]
  builder = builder_cls(data_dir=data_dir, config=config, **kwargs)
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  if use_beam:
    download_config = tfds.download.DownloadConfig(try_download_gcs=False, beam_runner=beam_runner,
                                                   beam_options=pipeline_options)
  try:
    builder.download_and_prepare(download_config=download_config)
  except Exception as e:
    bad_record = use_beam and beam_build.strict_error(e)
    if bad_record:  # a worker's strict-mode stop, as the one-process build raises it
      raise bad_record from None
    raise
  return {**builder.info.metadata["build_report"], "path": os.fspath(builder.data_dir),
          "splits": {s: info.num_examples for s, info in builder.info.splits.items()}}
