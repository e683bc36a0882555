"""The trainer end to end: `python -m me5_jax.train` run as subprocesses on 8 simulated CPU devices.

A random-init tiny BERT (transformers' own BertModel, the MiniLM tokenizer) trains on 300 real
(German verse → English verse) pairs built into a custom TFDS dataset, with configs/demo.py's settings
(packed rows, dropout on). One uninterrupted run is the
reference; every interrupted run (SIGKILL, SIGTERM, a damaged checkpoint, two processes) must end with the
reference's parameters: bitwise in one process, to float32 rounding across two processes. The runs share
one compiled program through the persistent compile cache (.cache/jax).
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 24, 4  # steps, checkpoint interval
NUM_PAIRS = 300       # 18.75 batches of 16: the runs cross an epoch boundary
TIMEOUT = 240        # s, each trainer subprocess (a hang fails the test naming the run)
pytestmark = pytest.mark.timeout(900)  # tests that start several runs


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, minilm_dir, bible_tsv):
  """(model folder, data dir, eval TSV): a tiny HF BertModel with the MiniLM tokenizer and the dataset."""
  import torch
  from transformers import BertConfig, BertModel

  from data_pipelines import builders
  root = tmp_path_factory.mktemp("train_loop")
  model_dir = str(root / "tiny-bert")
  torch.manual_seed(0)
  BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(model_dir)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(os.path.join(minilm_dir, name), model_dir)

  with open(bible_tsv, encoding="utf-8") as f:
    header, *rows = [line.rstrip("\n").split("\t") for line in f]
  eval_cols = ["en:4", "de:e", "fr:l", "es:v", "it:d", "pt:a"]  # configs/demo.py's eval columns
  idx = [header.index(c) for c in eval_cols]
  rows = [r for r in rows if len(r) == len(header) and all(r[i].strip() for i in idx)]
  pairs = str(root / "pairs.jsonl")
  with open(pairs, "w", encoding="utf-8") as f:
    for r in rows[:NUM_PAIRS]:
      f.write(json.dumps({"query": r[idx[1]], "passage": r[idx[0]]}, ensure_ascii=False) + "\n")
  eval_tsv = str(root / "heldout.tsv")
  with open(eval_tsv, "w", encoding="utf-8") as f:
    for r in [eval_cols] + [[r[i] for i in idx] for r in rows[NUM_PAIRS:NUM_PAIRS + 48]]:
      f.write("\t".join(r) + "\n")
  data_dir = str(root / "tfds")
  builders.build("custom", data_dir, [pairs])
  return model_dir, data_dir, eval_tsv


def run_settings(tiny) -> dict:
  """configs/demo.py's overrides for every run of this module."""
  model_dir, data_dir, _ = tiny
  return dict(init_checkpoint=model_dir, train_data="custom", data_dir=data_dir, batch_size=16,
              query_max_length=32, passage_max_length=32, total_steps=TOTAL, warmup_steps=4,
              learning_rate=1e-3, checkpoint_every_steps=EVERY, log_every_steps=1, eval_bitext="")


def train_cmd(tiny, workdir, *overrides):
  return ([sys.executable, "-m", "me5_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in run_settings(tiny).items()]
          + list(overrides))


def env(devices=8, **extra):
  """The compile cache settings (.cache/jax) come from conftest.py through os.environ."""
  return {**os.environ, "ME5_CPU_DEVICES": str(devices), **extra}


class Run:
  """A trainer subprocess with its output in a log file (a pipe could fill up and stall it)."""
  started: list["Run"] = []

  def __init__(self, cmd, log_path, **env_kw):
    self.log_path = str(log_path)
    self.log = open(self.log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(**env_kw), stdout=self.log, stderr=subprocess.STDOUT)
    Run.started.append(self)

  def wait(self, timeout=TIMEOUT) -> int:
    try:
      return self.proc.wait(timeout)
    finally:
      self.log.close()

  def output(self) -> str:
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def wait_for_step(self, workdir, step: int, saved: bool = False) -> None:
    """Blocks until metrics.jsonl records `step` (the step and its metrics are done) and, if `saved`, a
    checkpoint is complete (saves are asynchronous: one may still be in flight several steps later)."""
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + TIMEOUT
    while last_logged_step(path) < step or (saved and not checkpoint_steps(workdir)):
      assert self.proc.poll() is None, f"the run exited ({self.proc.returncode}) before step {step}:\n{self.output()}"
      assert time.time() < deadline, f"step {step} not reached in {TIMEOUT}s"
      time.sleep(0.01)


@pytest.fixture(autouse=True)
def kill_leftover_runs():
  """A failed test must not leave its trainer running (a lone multi-process peer would wait forever)."""
  yield
  for run in Run.started:
    if run.proc.poll() is None:
      run.proc.kill()
      run.proc.wait()
  Run.started.clear()


def last_logged_step(path) -> int:
  if not os.path.exists(path):
    return -1
  with open(path, encoding="utf-8") as f:
    return max([json.loads(line)["step"] for line in f if line.endswith("\n")], default=-1)


def train(tiny, workdir, *overrides, **env_kw):
  run = Run(train_cmd(tiny, workdir, *overrides), f"{workdir}.log", **env_kw)
  rc = run.wait()
  assert rc == 0, f"train exited {rc}:\n{run.output()[-3000:]}"
  return run.output()


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def exported(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def assert_same_params(got, want, atol=0.0):
  assert got.keys() == want.keys()
  for k in want:
    if atol:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)
    else:
      assert np.array_equal(got[k], want[k]), f"{k} differs (max |Δ| {np.abs(got[k] - want[k]).max():.3g})"


def alive(pid: int) -> bool:
  """Whether process `pid` runs (an exited one not yet reaped by its new parent is a zombie: not alive)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def resumed_step(output: str) -> int:
  found = re.findall(r"resumed from \S+ at step (\d+)", output)
  assert found, f"the run did not resume:\n{output[-3000:]}"
  return int(found[0])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
  """The uninterrupted run (with bitext evaluation before, every EVERY steps during, and after training;
  evaluation only reads the params, so the other tests' runs without it must still match bitwise)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  train(tiny, workdir, f"--config.eval_bitext={tiny[2]}", f"--config.eval_every_steps={EVERY}")
  return workdir


def test_run_writes_metrics_config_checkpoints_and_export(reference, tiny):
  with open(os.path.join(reference, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == list(range(1, TOTAL + 1))
  for r in train_records:
    for key in ("loss", "lr", "grad_norm", "seq_per_s"):
      assert np.isfinite(r[key]), (key, r)
  assert train_records[0]["lr"] == 0.0 and train_records[4]["lr"] == pytest.approx(1e-3)  # warmup of 4 steps
  evals = {r["step"]: r for r in records if "eval/bitext/mean_p@1_to_pivot" in r}
  assert sorted(evals) == sorted({0, TOTAL} | set(range(EVERY, TOTAL, EVERY)))  # in-loop evals logged too

  with open(os.path.join(reference, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert (config["batch_size"], config["total_steps"], config["init_checkpoint"]) == (16, TOTAL, tiny[0])
  assert config["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert checkpoint_steps(reference) == [TOTAL - 2 * EVERY, TOTAL - EVERY, TOTAL]  # keep_checkpoints=3
  assert os.path.exists(os.path.join(reference, "export", "modules.json"))


def test_train_and_evaluate_in_process_with_a_profile_matches_the_cli_run(reference, tiny, tmp_path):
  """The loop called in this process (the same 8 simulated devices) ends with the CLI run's parameters
  bitwise, and profile_steps writes a trace of the steps asked for without changing them."""
  import importlib.util

  from me5_jax import profiling, train
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.update(run_settings(tiny))
  config.profile_steps = "3,2"
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert_same_params(exported(workdir), exported(reference))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
  assert all({"loss", "lr", "grad_norm", "seq_per_s", "step_time_s", "mfu"} <= r.keys() for r in records)
  ops = profiling.top_ops(os.path.join(workdir, "profile"))
  assert ops and any("fusion" in name or "dot" in name for name, _, _ in ops[:20]), ops[:20]

  config.total_steps, config.learning_rate = TOTAL + 4, 1e10  # resumes at TOTAL; the update blows up
  with pytest.raises(train.TrainError, match=r"(?i)nan.* at step \d+"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir)[-1] == TOTAL  # nothing of the bad steps saved


def test_sigkill_and_restart_match_the_uninterrupted_run_bitwise(reference, tiny, tmp_path):
  """Killed as the save of a random checkpoint step starts (that save, maybe an older one too, is in
  flight), once at least one checkpoint is complete; then restarted. The killed run reads with 2 worker
  processes (which must not outlive it), the restarted one with 1, the reference with none."""
  workdir, kill_at = str(tmp_path / "run"), random.choice(range(2 * EVERY, TOTAL - 1, EVERY))
  run = Run(train_cmd(tiny, workdir, "--config.read_workers=2"), tmp_path / "killed.log")
  run.wait_for_step(workdir, kill_at, saved=True)
  run.proc.send_signal(signal.SIGKILL)
  assert run.wait() == -signal.SIGKILL
  saved = checkpoint_steps(workdir)  # complete ones; an interrupted save leaves a *.orbax-checkpoint-tmp folder
  assert saved and max(saved) < TOTAL and not os.path.exists(os.path.join(workdir, "export")), saved
  pids = re.findall(r"2 read worker processes \(pids (\d+) (\d+)\)", run.output())[0]
  deadline = time.time() + 10
  while any(alive(int(p)) for p in pids) and time.time() < deadline:  # they notice within read_workers.POLL_S
    time.sleep(0.2)
  assert not any(alive(int(p)) for p in pids), f"read workers {pids} outlived the killed trainer"

  out = train(tiny, workdir, "--config.read_workers=1")
  assert resumed_step(out) == max(saved), (saved, kill_at)
  assert_same_params(exported(workdir), exported(reference))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, TOTAL + 1))  # no step logged twice


def test_sigterm_saves_the_current_step_exits_0_and_resumes_from_it(reference, tiny, tmp_path):
  workdir, stop_at = str(tmp_path / "run"), random.choice([s for s in range(2, TOTAL - 3) if s % EVERY])
  run = Run(train_cmd(tiny, workdir), tmp_path / "terminated.log")
  run.wait_for_step(workdir, stop_at)
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 0, run.output()[-3000:]
  step = int(re.findall(r"SIGTERM at step (\d+)", run.output())[0])
  assert stop_at <= step < TOTAL and max(checkpoint_steps(workdir)) == step

  assert resumed_step(train(tiny, workdir)) == step
  assert_same_params(exported(workdir), exported(reference))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tiny, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "export"))
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(workdir, "checkpoints", str(TOTAL)))
           for n in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)

  out = train(tiny, workdir)
  warning = [line for line in out.splitlines() if "WARNING" in line and "damaged" in line]
  assert warning and f"step {TOTAL} " in warning[0], out[-3000:]
  assert resumed_step(out) == TOTAL - EVERY
  assert_same_params(exported(workdir), exported(reference))
  assert len(os.listdir(os.path.join(workdir, "checkpoints.damaged"))) == 1  # kept aside for inspection


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_of_it(tiny, tmp_path):
  """learning_rate 1e10: the first real update blows the params up and the next forward pass gives NaN."""
  workdir = str(tmp_path / "run")
  run = Run(train_cmd(tiny, workdir, "--config.learning_rate=1e10", "--config.checkpoint_every_steps=1"),
            tmp_path / "nan.log")
  assert run.wait() == 1  # a failure while running (me5_jax.cli)
  last_line = run.output().strip().splitlines()[-1]
  assert last_line.startswith("me5_jax.train: error: "), last_line
  found = re.search(r"(loss|gradient norm|parameters) .* at step (\d+)", last_line)
  assert found and "nan" in last_line.lower(), run.output()[-3000:]
  bad_step = int(found[2])
  assert checkpoint_steps(workdir) and max(checkpoint_steps(workdir)) < bad_step


@pytest.mark.parametrize("override, key", [
    ("--config.nope=1", "nope"),
    ("--config.batch_size=-3", "batch_size"),
    ("--config.batch_size=12", "batch_size"),  # not a multiple of the 8 devices
    ("--config.init_checkpoint=/no/such/folder", "init_checkpoint: model folder /no/such/folder does not exist"),
    ("--nope=1", "Unknown command line flag 'nope'"),
])
def test_bad_config_fails_fast_with_one_line_naming_the_key(override, key, tiny, tmp_path):
  workdir = tmp_path / "run"
  start = time.time()
  proc = subprocess.run(train_cmd(tiny, workdir, override), cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=TIMEOUT)
  elapsed = time.time() - start
  assert proc.returncode == 2  # bad input (me5_jax.cli)
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("me5_jax.train: error: ") and key in lines[-1], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "initialised" not in proc.stderr and not os.path.exists(workdir / "checkpoints")  # before any work
  assert elapsed < 30, f"took {elapsed:.1f}s"  # imports only; a compile would add more on this machine


def test_data_built_with_another_tokenizer_fails_before_compiling(tiny, me5_small_dir, tmp_path):
  """The run's tokenizer is MiniLM's; the data stores me5-small's (XLM-R) ids: one line naming both, exit 2."""
  from data_pipelines import builders, pretokenized
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(32)),
                   encoding="utf-8")
  data_dir = str(tmp_path / "tfds")
  builders.build("custom", data_dir, [str(pairs)], tokenizer_dir=me5_small_dir)
  workdir = tmp_path / "run"
  proc = subprocess.run(train_cmd(tiny, workdir, f"--config.data_dir={data_dir}"), cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=TIMEOUT)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 2 and last.startswith("me5_jax.train: error: source 'custom' stores token ids of "
                                                  f"tokenizer {pretokenized.fingerprint(me5_small_dir)}"), proc.stderr[-3000:]
  assert pretokenized.fingerprint(tiny[0]) in last and "Traceback" not in proc.stderr
  assert not os.path.exists(workdir / "checkpoints")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_resume_and_match_one_process(reference, tiny, tmp_path):
  """2 processes × 4 devices on loopback, each with 2 read workers: preempted (SIGTERM to both),
  restarted, finished."""
  workdir = str(tmp_path / "run")

  def start(tag):  # each process reads with 2 worker processes
    port = free_port()
    return [Run(train_cmd(tiny, workdir, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}", "--config.read_workers=2"), tmp_path / f"{tag}{i}.log", devices=4)
            for i in range(2)]

  runs = start("first")
  runs[0].wait_for_step(workdir, EVERY + 1)
  for r in runs:
    r.proc.send_signal(signal.SIGTERM)
  assert [r.wait() for r in runs] == [0, 0], runs[0].output()[-3000:] + runs[1].output()[-3000:]
  step = int(re.findall(r"SIGTERM at step (\d+)", runs[0].output())[0])
  assert step < TOTAL and max(checkpoint_steps(workdir)) == step

  runs = start("second")
  assert [r.wait() for r in runs] == [0, 0], runs[0].output()[-3000:] + runs[1].output()[-3000:]
  assert resumed_step(runs[0].output()) == step
  assert not re.search(r"step \d+/\d+ loss", runs[1].output())  # only process 0 logs progress
  # Gradients summed in another order differ by float32 rounding; Adam divides by sqrt(v), which magnifies
  # that for near-zero gradients (rare tokens, attention key biases) to ~1e-6 of a 1e-3 step.
  assert_same_params(exported(workdir), exported(reference), atol=1e-5)



def test_export_cli_matches_the_trainers_params_in_sentence_transformers(reference, tmp_path, capsys):
  from safetensors.numpy import load_file
  from sentence_transformers import SentenceTransformer

  from me5_jax import export
  from me5_jax.embedder import Embedder
  from me5_jax.tokenize import Tokenizer
  out = str(tmp_path / "hf")
  assert export.main(["--workdir", reference, "--out", out]) == 0
  assert_same_params(load_file(os.path.join(out, "model.safetensors")), exported(reference))  # = end of run

  step, params, enc_cfg, _, tokenizer_dir = export.restore_params(reference)  # the final checkpoint
  assert step == TOTAL
  texts = ["Im Anfang schuf Gott den Himmel und die Erde.", "In the beginning God created the heavens.",
           "Au commencement, Dieu créa les cieux et la terre. " * 6, "x"]  # the third is truncated to 32
  want = Embedder(enc_cfg, params, Tokenizer.from_dir(tokenizer_dir)).encode(texts, max_length=32)
  model = SentenceTransformer(out, device="cpu")
  assert model.max_seq_length == 32
  np.testing.assert_allclose(model.encode(texts), want, rtol=0, atol=1e-5)

  older = str(tmp_path / "older")
  assert export.main(["--workdir", reference, "--out", older, "--step", str(TOTAL - EVERY)]) == 0
  older_params = load_file(os.path.join(older, "model.safetensors"))
  assert not np.array_equal(older_params["embeddings.word_embeddings.weight"],
                            exported(reference)["embeddings.word_embeddings.weight"])

  capsys.readouterr()
  assert export.main(["--workdir", reference, "--out", str(tmp_path / "x"), "--step", "3"]) == 2
  err = capsys.readouterr().err.strip()
  assert "step 3" in err and str([TOTAL - 2 * EVERY, TOTAL - EVERY, TOTAL]) in err and "\n" not in err
  assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
  assert "config.json is missing" in capsys.readouterr().err
