"""The whole read → mix → tokenize → batch path: pairing and prefixes against HF `tokenizers`, host
split, bit-for-bit resume, bad records, stage-2 groups, prefetching, no TensorFlow, and TFDS sources built
by the project's builders."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tokenizers

from data_pipelines.input_pipeline import InputPipeline, Prefetch
from data_pipelines.mixture import MixtureConfig
from data_pipelines.preprocess import PreprocessConfig
from me5_jax.tokenize import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(me5_small_dir):
  return Tokenizer.from_dir(me5_small_dir)


@pytest.fixture(scope="module")
def hf(me5_small_dir):
  """HF's own tokenizer, the reference the pipeline's tokens are checked against."""
  return tokenizers.Tokenizer.from_file(f"{me5_small_dir}/tokenizer.json")


@pytest.fixture(scope="module")
def decode(hf):
  """ids row + mask row → text."""
  return lambda ids_L, mask_L: hf.decode(ids_L[mask_L == 1].tolist(), skip_special_tokens=True)


def pairs(tag, n):
  return [{"query": f"{tag} question {i}", "passage": f"{tag} answer {i}", "lang": "en", "source": tag}
          for i in range(n)]


def triples(tag, n, negatives_per_record):
  """Negative j of record i reads "{tag} neg {i} {j}" and its score is j + 0.25: decodable from tokens."""
  return [{"query": f"{tag} q {i}", "positive": f"{tag} pos {i}",
           "negatives": [f"{tag} neg {i} {j}" for j in range(negatives_per_record(i))],
           "positive_score": 10.0 + i, "negative_scores": [j + 0.25 for j in range(negatives_per_record(i))],
           "task": ""} for i in range(n)]


def rows(batch, decode):
  """Decoded (query, [group passages]) per row."""
  b, g = batch["passage_ids"].shape[:2]
  return [(decode(batch["query_ids"][i], batch["query_mask"][i]),
           [decode(batch["passage_ids"][i, j], batch["passage_mask"][i, j]) for j in range(g)])
          for i in range(b)]


def test_stage1_rows_pair_query_and_passage_with_source_prefixes(tok, decode):
  sources = {"wikipedia": pairs("wiki", 50), "nllb": pairs("nllb", 50)}
  pipe = InputPipeline(sources, tok, MixtureConfig(global_batch_size=16, seed=2), PreprocessConfig())
  seen = set()
  for _ in range(4):
    batch = next(pipe)
    assert set(batch) == {"query_ids", "query_mask", "passage_ids", "passage_mask", "passage_hash"}
    assert batch["query_ids"].shape == (16, 32) and batch["passage_ids"].shape == (16, 1, 32)
    for query, (passage,) in rows(batch, decode):
      tag, _, i = query.removeprefix("query: ").split()
      expected = f"query: {tag} answer {i}" if tag == "nllb" else f"passage: {tag} answer {i}"
      assert query == f"query: {tag} question {i}" and passage == expected
      seen.add(tag)
  assert seen == {"wiki", "nllb"}


def test_stage2_groups_teacher_scores_and_fill(tok, hf, decode):
  records = triples("ms", 30, lambda i: i % 5)  # 0..4 negatives; record with 0 is rejected
  cfg = PreprocessConfig(stage=2, num_hard_negatives=3, instruct=True, instructions={"msmarco": "Find it."})
  pipe = InputPipeline({"msmarco": records}, tok, MixtureConfig(global_batch_size=12, seed=4), cfg)
  filled = 0
  for _ in range(5):
    batch = next(pipe)
    assert batch["passage_ids"].shape[:2] == (12, 4) and batch["teacher_scores"].shape == (12, 4)
    assert batch["teacher_scores"].dtype == np.float32
    for r, ((query, group), scores) in enumerate(zip(rows(batch, decode), batch["teacher_scores"])):
      i = int(query.split()[-1])
      n = batch["query_mask"][r].sum()  # the instruct template, newline included, and no passage prefix
      assert batch["query_ids"][r, :n].tolist() == hf.encode(f"Instruct: Find it.\nQuery: ms q {i}").ids
      positive = batch["passage_ids"][r, 0, :batch["passage_mask"][r, 0].sum()]
      assert positive.tolist() == hf.encode(f"ms pos {i}").ids
      assert i % 5 and group[0] == f"ms pos {i}" and scores[0] == 10.0 + i
      assert len(set(group)) == 4
      own = [j for j, p in enumerate(group[1:], 1) if p.startswith(f"ms neg {i} ")]
      assert len(own) == min(i % 5, 3)
      for j in own:
        assert scores[j] == int(group[j].split()[-1]) + 0.25
      for j in set(range(1, 4)) - set(own):  # filled with another record's positive, lowest known score
        assert group[j].startswith("ms pos ") and scores[j] == 0.25
        filled += 1
  assert filled > 0 and list(pipe.bad_records["msmarco"]) == ["no_negatives"]


@pytest.mark.parametrize("same_source", [False, True])
def test_two_hosts_disjoint_and_covering_over_an_epoch(tok, decode, same_source):
  sources = {"wikipedia": pairs("wiki", 48)}
  cfg = MixtureConfig(global_batch_size=8, seed=1, same_source_batches=same_source)
  prep = PreprocessConfig(max_query_length=64, max_passage_length=32)
  hosts = [InputPipeline(sources, tok, cfg, prep, process_index=p, process_count=2) for p in range(2)]
  seen = [[], []]
  for _ in range(6):  # 6 x 8 = one epoch
    for p, pipe in enumerate(hosts):
      batch = next(pipe)
      # several hosts must feed one global shape: without agree_length they pad to the max lengths
      assert batch["query_ids"].shape == (4, 64) and batch["passage_ids"].shape == (4, 1, 32)
      seen[p] += [int(q.split()[-1]) for q, _ in rows(batch, decode)]
  assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(48))


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_gives_the_same_batches_bit_for_bit_on_every_host(tok, stage):
  if stage == 1:
    damaged = pairs("wiki", 40)
    damaged[3]["passage"] = "  "
    damaged[7]["query"] = None
    sources = {"wikipedia": damaged, "reddit": pairs("reddit", 25)}
    prep = PreprocessConfig(max_query_length=64)
  else:
    sources = {"nli": triples("nli", 30, lambda i: i % 3), "nq": triples("nq", 20, lambda i: 1 + i % 4)}
    prep = PreprocessConfig(stage=2, num_hard_negatives=2, max_passage_length=64)
  cfg = MixtureConfig(global_batch_size=8, seed=11, alpha=0.5)
  for p in range(2):
    first = InputPipeline(sources, tok, cfg, prep, process_index=p, process_count=2)
    for _ in range(5):
      next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(4)]
    fresh = InputPipeline(sources, tok, cfg, prep, process_index=p, process_count=2)
    fresh.set_state(state)
    for want, got in zip(expected, [next(fresh) for _ in range(4)]):
      assert want.keys() == got.keys()
      for key in want:
        assert want[key].dtype == got[key].dtype and want[key].tobytes() == got[key].tobytes(), key


def test_bad_records_counted_by_reason_and_strict_names_the_record(tok, decode):
  records = pairs("wiki", 20)
  records[4]["passage"] = ""
  records[9]["query"] = 12
  del records[13]["passage"]
  cfg = MixtureConfig(global_batch_size=20, seed=0)
  pipe = InputPipeline({"wikipedia": records}, tok, cfg, PreprocessConfig())
  batch = next(pipe)  # one epoch: every record read once, each bad one replaced by a random good one
  queries = {q for q, _ in rows(batch, decode)}
  assert queries == {f"query: wiki question {i}" for i in range(20) if i not in (4, 9, 13)}
  counts = pipe.bad_records["wikipedia"]  # bad reads: a replacement draw can hit a bad record again
  assert set(counts) == {"empty_text", "non_string", "missing_field"} and sum(counts.values()) >= 3
  strict = InputPipeline({"wikipedia": records}, tok, cfg, PreprocessConfig(), strict=True)
  with pytest.raises(ValueError, match=r"source 'wikipedia' record (4|9|13): \w+ \(strict mode\)"):
    next(strict)
  broken = InputPipeline({"wikipedia": [{"query": "q", "passage": " "}] * 5}, tok, cfg, PreprocessConfig())
  with pytest.raises(ValueError, match="64 bad records in a row"):
    next(broken)


def test_prefetch_gives_the_same_batches_and_the_state_of_those_handed_out(tok):
  records = pairs("wiki", 30)
  records[2]["passage"] = ""
  sources = {"wikipedia": records, "reddit": pairs("reddit", 20)}
  make = lambda: InputPipeline(sources, tok, MixtureConfig(8, seed=6), PreprocessConfig())  # noqa: E731
  plain = make()
  with Prefetch(make(), size=3) as ahead:
    for _ in range(4):
      want, got = next(plain), next(ahead)
      assert all(want[k].tobytes() == got[k].tobytes() for k in want)
      assert ahead.get_state() == plain.get_state() and ahead.epochs() == plain.epochs()
      assert ahead.bad_records == plain.bad_records
    for _ in range(200):  # it really works ahead: 3 batches buffered, 1 waiting to be put
      if ahead.pipeline.sampler.step >= 8:
        break
      time.sleep(0.05)
    assert ahead.pipeline.sampler.step == 8 and ahead.get_state()["step"] == 4
    state = ahead.get_state()
  fresh = make()
  fresh.set_state(state)
  assert next(fresh)["passage_ids"].tobytes() == next(plain)["passage_ids"].tobytes()
  strict = InputPipeline({"wikipedia": [{"query": "q", "passage": ""}] * 4}, tok, MixtureConfig(4),
                         PreprocessConfig(), strict=True)
  with Prefetch(strict) as ahead:
    for _ in range(2):  # the producer's error reaches the consumer, every time it asks
      with pytest.raises(ValueError, match="strict mode"):
        next(ahead)


class DiesWithoutAWord:
  """A pipeline whose thread ends by an exception that is not an Exception (nothing reaches the queue)."""
  def get_state(self):
    return {}

  bad_records = {}

  def epochs(self):
    return {}

  def __next__(self):
    raise SystemExit("killed")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_prefetch_does_not_wait_forever_on_a_dead_producer():
  with Prefetch(DiesWithoutAWord()) as ahead:
    with pytest.raises(RuntimeError, match="stopped without handing over a batch"):
      next(ahead)


class Untouchable:
  """A source that must not be read: configuration errors come before any work."""
  def __len__(self):
    return 10

  def __getitem__(self, index):
    raise AssertionError("read before the configuration was checked")


def test_weight_for_a_missing_source_fails_before_reading(tok):
  with pytest.raises(ValueError, match="mixture weight for unknown source 'mc4'"):
    InputPipeline({"wikipedia": Untouchable()}, tok, MixtureConfig(8, weights={"wikipedia": 1, "mc4": 1}),
                  PreprocessConfig())


NO_TF = r"""
import importlib.abc
import sys


# Makes tensorflow look uninstalled, as on the GPU machine: no finder finds it. `sys.modules["tensorflow"]
# = None` is harsher (tfds' own TF-less detection then fails), so it guards only the in-memory path.
class HideTensorFlow(importlib.abc.MetaPathFinder):
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow":
      return None
    return self.finder.find_spec(name, path, target)

  def invalidate_caches(self):
    getattr(self.finder, "invalidate_caches", lambda: None)()


if len(sys.argv) > 2:
  sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
else:
  sys.modules["tensorflow"] = None
from data_pipelines.input_pipeline import InputPipeline, Prefetch
from data_pipelines.mixture import MixtureConfig
from data_pipelines.preprocess import PreprocessConfig
from me5_jax.tokenize import Tokenizer
tok = Tokenizer.from_dir(sys.argv[1])
if len(sys.argv) > 2:
  from data_pipelines import open_source
  sources = {"custom": open_source(sys.argv[2], "custom")}
else:
  sources = {"wikipedia": [{"query": f"q {i}", "passage": f"p {i}"} for i in range(8)]}
pipe = InputPipeline(sources, tok, MixtureConfig(8), PreprocessConfig())
batch = next(pipe)
loaded_tf = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "tensorflow"]
print(sorted(sources), batch["passage_ids"].shape, len(loaded_tf))
"""


def run_without_tf(*args):
  out = subprocess.run([sys.executable, "-c", NO_TF, *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.split("\n")[-2]


def test_input_pipeline_runs_without_tensorflow(me5_small_dir):
  assert run_without_tf(me5_small_dir) == "['wikipedia'] (8, 1, 32) 0"


def test_streams_a_tfds_dataset_built_by_the_builders(tmp_path, me5_small_dir, tok, decode):
  """Built with the project's builder (TF allowed there), read back with TensorFlow blocked."""
  from data_pipelines import builders
  lines = [json.dumps({"query": f"frage {i}", "passage": f"antwort {i}"}) for i in range(24)]
  lines[5] = "{not json"
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(lines) + "\n")
  report = builders.build("custom", str(tmp_path / "data"), [str(path)])
  assert report["splits"] == {"train": 23}
  assert run_without_tf(me5_small_dir, str(tmp_path / "data")) == "['custom'] (8, 1, 32) 0"
  from data_pipelines import open_source
  pipe = InputPipeline({"custom": open_source(str(tmp_path / "data"), "custom")}, tok,
                       MixtureConfig(global_batch_size=23, seed=3), PreprocessConfig())
  got = sorted((q, p) for q, (p,) in rows(next(pipe), decode))  # one epoch = every record once
  assert got == sorted((f"query: frage {i}", f"passage: antwort {i}") for i in range(24) if i != 5)
