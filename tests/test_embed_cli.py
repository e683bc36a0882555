"""`python -m me5_jax.embed` on the real all-MiniLM-L6-v2, checked row by row against sentence-transformers."""
import os
import subprocess
import sys

import numpy as np
import pytest
from multilingual_texts import LONG_TEXT

from me5_jax import embed

MAX_LENGTH = 32
# Lengths vary so the embedder's length sort reorders them; empty lines at the start, middle and end.
LINES = ["", "short", "a somewhat longer line about the weather in Lisbon today", "", "Guten Morgen!",
         "  leading and trailing spaces  ", LONG_TEXT, "x", "Москва — столица России.", "我今天早上喝了一杯绿茶。", ""]


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "me5_jax.embed", *args], capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope="module")
def st_model(minilm_dir):
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(minilm_dir, device="cpu")
  st.max_seq_length = MAX_LENGTH
  return st


@pytest.mark.parametrize("prefix", ["", "query: "])
def test_rows_follow_input_lines(minilm_dir, st_model, tmp_path, prefix):
  src, out = tmp_path / "texts.txt", tmp_path / "emb.out"  # not .npy: the name must be kept as given
  # A CRLF line ending must not change a text; the final empty text is the "\n\n" at the end.
  src.write_bytes(("\n".join(LINES[:4]) + "\r\n" + "\n".join(LINES[4:]) + "\n").encode("utf-8"))
  proc = run_cli("--model", minilm_dir, "--input", str(src), "--output", str(out), "--prefix", prefix,
                 "--batch-size", "4", "--max-length", str(MAX_LENGTH))
  assert proc.returncode == 0, proc.stderr
  got_NxD = np.load(out)
  assert got_NxD.dtype == np.float32 and got_NxD.shape == (len(LINES), 384)
  np.testing.assert_allclose(np.linalg.norm(got_NxD, axis=1), 1.0, rtol=1e-6)
  want_NxD = st_model.encode(LINES, prompt=prefix or None, batch_size=4)
  np.testing.assert_allclose(got_NxD, want_NxD, rtol=0, atol=1e-5)
  assert np.abs(got_NxD[0] - got_NxD[1]).max() > 0.1  # rows are distinct: an order mix-up would show


@pytest.mark.parametrize("data,lines", [
    (b"a\nb", ["a", "b"]), (b"a\nb\n", ["a", "b"]), (b"a\n\n", ["a", ""]), (b"", []), (b"\n", [""]),
    (b"x \r\n\r\n\ty\r", ["x ", "", "\ty"]), (b"a\rb\n", ["a\rb"]),
])
def test_read_lines_strips_only_line_endings(tmp_path, data, lines):
  (tmp_path / "t.txt").write_bytes(data)
  assert embed.read_lines(str(tmp_path / "t.txt")) == lines


def test_bad_utf8_names_the_line_before_loading_anything(tmp_path):
  src = tmp_path / "texts.txt"
  src.write_bytes("fine\nnaïve\n".encode("utf-8") + b"caf\xe9 latin-1\nmore\n")
  # A missing model folder too: the input is checked first, so its error is the one reported.
  proc = run_cli("--model", str(tmp_path / "no_model"), "--input", str(src), "--output", str(tmp_path / "e.npy"))
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"me5_jax.embed: error: {src}:3: not valid UTF-8 (byte 0xe9 at column 4)"
  assert not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("missing,message", [
    ("folder", "does not exist"),
    ("config.json", "config.json is missing"),
    ("model.safetensors", "the weights are missing"),
    ("tokenizer.json", "the tokenizer is missing"),
])
def test_incomplete_model_folder_is_one_line_error(minilm_dir, tmp_path, capsys, missing, message):
  model = tmp_path / "model"
  if missing != "folder":
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
      if name != missing:
        os.symlink(os.path.join(minilm_dir, name), model / name)
  src = tmp_path / "texts.txt"
  src.write_text("hello\n", encoding="utf-8")
  assert embed.main(["--model", str(model), "--input", str(src), "--output", str(tmp_path / "e.npy")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("me5_jax.embed: error: ") and str(model) in err and message in err


def test_output_folder_must_exist(minilm_dir, tmp_path, capsys):
  src = tmp_path / "texts.txt"
  src.write_text("hello\n", encoding="utf-8")
  out = tmp_path / "nowhere" / "e.npy"
  assert embed.main(["--model", minilm_dir, "--input", str(src), "--output", str(out)]) == 2
  assert "output folder" in capsys.readouterr().err
