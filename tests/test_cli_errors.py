"""Every command line fails the one way `me5_jax.cli` says: exit status 2 for bad input or usage, 1 for a
failure while running, and one stderr line `<program>: error: ...` naming what to fix. One bad input per
program here (in process: no model is loaded); the trainer's are in test_train_loop, the TPU compiler's in
test_tpu_aot, fetch's in test_fetch, and the data errors of each program in its own test file."""
import importlib

import pytest

from me5_jax import cli


def run_main(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
  try:
    status = importlib.import_module(module).main(argv)
  except SystemExit as e:  # argparse's usage errors
    status = e.code
  return status, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def bad_inputs(tmp_path, minilm_dir):
  """(module, argv, what the error line must name), one per program."""
  texts = tmp_path / "texts.txt"
  texts.write_text("hello\n", encoding="utf-8")
  sts = tmp_path / "sts.tsv"
  sts.write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\n", encoding="utf-8")
  beir = tmp_path / "beir"
  beir.mkdir()
  (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a passage"}\n', encoding="utf-8")
  (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n', encoding="utf-8")
  (beir / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
  mine_files = ["--queries", str(beir / "queries.jsonl"), "--corpus", str(beir / "corpus.jsonl"),
                "--qrels", str(beir / "qrels.tsv"), "--out", str(tmp_path / "o.jsonl")]
  too_long = "the 512 positions of the model"  # MiniLM: 512 positions
  return [
      ("me5_jax.embed", ["--model", minilm_dir, "--input", str(tmp_path / "none.txt"), "--output", "e.npy"], "none.txt"),
      ("me5_jax.embed", ["--model", minilm_dir, "--input", str(texts), "--output", str(tmp_path / "e.npy"),
                         "--max-length", "1000"], too_long),
      ("me5_jax.evaluate", ["--model", minilm_dir, "--task", "sts", "--data", str(sts), "--max-length", "1000"],
       too_long),
      ("me5_jax.mine", ["--model", minilm_dir, *mine_files, "--max-length", "1000"], too_long),
      ("me5_jax.mine", ["--model", minilm_dir, *mine_files, "--top-k", "0"], "--top-k"),
      ("me5_jax.export", ["--workdir", str(tmp_path), "--out", str(tmp_path / "x")], str(tmp_path)),
      ("me5_jax.report", ["--workdir", str(tmp_path)], "metrics.jsonl"),
      ("data_pipelines.build", ["--source", "custom", "--files", str(tmp_path / "none.jsonl"), "--data-dir",
                                str(tmp_path / "tfds")], "none.jsonl"),
      ("data_pipelines.bible", ["--mining-set", str(tmp_path / "m"), "--corpus", "xx:9"], "xx:9"),
      ("me5_jax.fetch", ["no-such-asset"], "no-such-asset"),
  ]


def test_each_program_bad_input_is_status_2_and_one_line_naming_it(bad_inputs, capsys):
  for module, argv, needle in bad_inputs:
    status, lines = run_main(module, argv, capsys)
    assert status == cli.BAD_INPUT, (module, argv, lines)
    assert lines and lines[-1].startswith(f"{module}: error: ") and needle in lines[-1], (module, lines)
    assert not any(line.startswith("Traceback") for line in lines), (module, lines)
