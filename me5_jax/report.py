"""`python -m me5_jax.report --workdir DIR [--reload]`: the before → after table of a run's evaluations.

Reads the `eval/...` entries of DIR/metrics.jsonl (the first and the last evaluated step). With --reload it
also loads DIR/export through sentence-transformers and re-scores the bitext dev set from that reload,
so the table's "after" column is what a user of the exported model gets.
"""
from __future__ import annotations

import json
import os
import sys

from me5_jax import cli

PROGRAM = "me5_jax.report"  # its `<program>: error:` lines (me5_jax.cli)


def eval_history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if any(k.startswith("eval/") for k in r)]


def bitext_columns(row: dict) -> dict[str, float]:
  """{column: P@1 column → pivot} of one eval row."""
  prefix, suffix = "eval/bitext/p@1/", "/to_pivot"
  return {k[len(prefix):-len(suffix)]: v for k, v in row.items() if k.startswith(prefix) and k.endswith(suffix)}


def reload_bitext(workdir: str) -> dict[str, float]:
  """Bitext P@1 of the exported folder loaded through sentence-transformers, on the run's dev set."""
  import numpy as np
  from sentence_transformers import SentenceTransformer

  from me5_jax import config as config_lib, evaluate
  from me5_jax.metrics import p_at_1
  config = config_lib.load(os.path.join(workdir, "config.json"))
  data = evaluate.load_bitext(os.path.join(workdir, "eval", "bible_heldout.tsv") if config.eval_bitext == "bible"
                              else config.eval_bitext, config.eval_bitext_pivot or None)
  model = SentenceTransformer(os.path.join(workdir, "export"), device="cpu")
  model.max_seq_length = config.eval_max_length
  enc = lambda texts: model.encode([(config.query_prefix or "") + t for t in texts], batch_size=64,  # noqa: E731
                                   convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
  pivot = enc(data.texts[data.pivot])
  columns = config.eval_bitext_columns or [c for c in data.columns if c != data.pivot]
  return {c: p_at_1(enc(data.texts[c]), pivot) for c in columns}


def main(argv=None) -> int:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--reload", action="store_true", help="re-score the export through sentence-transformers")
  args = ap.parse_args(argv)
  try:
    history = eval_history(args.workdir)
  except FileNotFoundError as e:
    return cli.error(PROGRAM, e)
  if len(history) < 2:
    return cli.error(PROGRAM, f"{args.workdir}/metrics.jsonl has {len(history)} evaluation(s); need one "
                     "before and one after training")
  first, last = history[0], history[-1]
  before, after = bitext_columns(first), bitext_columns(last)
  reloaded = reload_bitext(args.workdir) if args.reload else {}
  head = f"| bitext P@1 → pivot | step {first['step']} | step {last['step']} | change |"
  head += " sentence-transformers reload |" if reloaded else ""
  print(head)
  print("|---" * (head.count("|") - 1) + "|")
  for col in before:
    line = f"| {col} | {before[col]:.3f} | {after[col]:.3f} | {after[col] - before[col]:+.3f} |"
    print(line + (f" {reloaded[col]:.3f} |" if reloaded else ""))
  mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
  line = f"| **mean** | {mean(before):.3f} | {mean(after):.3f} | {mean(after) - mean(before):+.3f} |"
  print(line + (f" {mean(reloaded):.3f} |" if reloaded else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
