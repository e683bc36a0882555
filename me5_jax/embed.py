"""Embed a text file, one text per line: `python -m me5_jax.embed --model DIR --input texts.txt --output emb.npy`.

Writes float32 [N, D] L2-normalised rows in input order; line i of the input is row i, empty lines
included. Only the line ending (LF or CRLF) is stripped, so leading/trailing spaces are part of a text.
Bad input (undecodable bytes, a missing model folder, config, weights or tokenizer) is reported as one
line naming what to fix, with exit status 2, before the model is loaded. Texts are encoded on every device
of the run, each distinct text once; launched as several processes (`me5_jax.distributed`: ME5_COORDINATOR,
ME5_NUM_PROCESSES, ME5_PROCESS_ID; ME5_CPU_DEVICES for simulated CPU devices), process 0 writes the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from me5_jax import cli, compile_cache, distributed

PROGRAM = "me5_jax.embed"  # its `<program>: error:` lines (me5_jax.cli)

PROGRESS_MIN_TEXTS = 1000  # below this an embedding run takes seconds: no progress lines


class InputError(Exception):
  """Bad command-line input; its message is the whole one-line report."""


def read_lines(path: str) -> list[str]:
  """The file's lines as UTF-8 text, without their LF / CRLF; a final line ending adds no empty line."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read the input ({e.strerror})") from None
  lines = data.split(b"\n")
  if lines[-1] == b"":
    lines.pop()
  texts = []
  for lineno, raw in enumerate(lines, 1):
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    try:
      texts.append(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
          from None
  return texts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--model", required=True, help="HF model folder (config.json, weights, tokenizer)")
  ap.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
  ap.add_argument("--output", required=True, help="where to write the float32 [N, D] .npy")
  ap.add_argument("--prefix", default="", help="prepended to every text, e.g. 'query: ' or 'passage: '")
  ap.add_argument("--batch-size", type=_positive, default=64)
  ap.add_argument("--max-length", type=_positive, default=None,
                  help="tokens per text incl. special tokens (default: the model's)")
  return ap.parse_args(argv)


def _positive(value: str) -> int:
  n = int(value)
  if n < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
  return n


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  distributed.initialize()
  compile_cache.enable()
  from me5_jax import hf_io  # imported here so `--help` and argument errors come back at once
  try:
    texts = read_lines(args.input)
    hf_io.check_model_dir(args.model)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
      raise InputError(f"{args.output}: the output folder {out_dir} does not exist")
  except (InputError, FileNotFoundError) as e:
    return cli.error(PROGRAM, e)

  from me5_jax.embedder import Embedder
  try:
    embedder = Embedder.from_pretrained(args.model, max_length=args.max_length)
  except (FileNotFoundError, ValueError) as e:  # the loaders name the file and the key
    return cli.error(PROGRAM, e)
  long_input = len(texts) >= PROGRESS_MIN_TEXTS
  start = time.time()
  emb_NxD = embedder.encode(texts, prefix=args.prefix, batch_size=args.batch_size,
                            max_length=args.max_length, progress=long_input)
  if embedder.is_writer:
    with open(args.output, "wb") as f:  # an open file: np.save would append .npy to other names
      np.save(f, emb_NxD.astype(np.float32, copy=False))
  if long_input:
    print(f"embedded {len(texts)} texts in {time.time() - start:.1f}s → {args.output} {emb_NxD.shape}",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
