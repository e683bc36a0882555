"""Read workers (data_pipelines.read_workers): the batches, state and skipped-record counts of the pipeline
alone, for stage 1 (padded, packed, a second host) and stage 2, from lists and from a TFDS dataset read as
stored token ids; resume from a state saved under workers; a worker's failure or death raises."""
import json
import os
import signal

import pytest

from data_pipelines import builders, open_source
from data_pipelines.input_pipeline import InputPipeline
from data_pipelines.mixture import MixtureConfig
from data_pipelines.preprocess import PreprocessConfig
from data_pipelines.pretokenized import fingerprint
from data_pipelines.read_workers import ReadWorkers
from me5_jax.tokenize import Tokenizer
from test_data_builders import texts, write_jsonl
from test_input_pipeline import pairs, triples


@pytest.fixture(scope="module")
def tok(me5_small_dir):
  return Tokenizer.from_dir(me5_small_dir)


def same(want, got):
  assert want.keys() == got.keys()
  for key in want:
    assert want[key].dtype == got[key].dtype and want[key].shape == got[key].shape, key
    assert want[key].tobytes() == got[key].tobytes(), key


def damaged_pairs(tag, n):
  records = pairs(tag, n)
  records[3]["passage"] = "  "
  records[7]["query"] = None
  return records


CASES = {
    "stage1_padded": (lambda: {"wikipedia": damaged_pairs("wiki", 40), "reddit": pairs("reddit", 25)},
                      PreprocessConfig(max_query_length=64), {}),
    "stage1_packed_second_host": (lambda: {"wikipedia": damaged_pairs("wiki", 40), "reddit": pairs("reddit", 25)},
                                  PreprocessConfig(max_query_length=64, pack_rows=True, row_multiple=2),
                                  {"process_index": 1, "process_count": 2}),
    "stage2_teacher": (lambda: {"nli": triples("nli", 30, lambda i: i % 3), "nq": triples("nq", 20, lambda i: 1 + i % 4)},
                       PreprocessConfig(stage=2, num_hard_negatives=2, max_passage_length=64), {}),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_give_the_pipelines_batches_state_and_counts_and_resume(tok, case):
  make_sources, prep, hosts = CASES[case]
  make = lambda: InputPipeline(make_sources(), tok, MixtureConfig(8, seed=3, alpha=0.5), prep, **hosts)  # noqa: E731
  plain = make()
  with ReadWorkers(make(), num_workers=2, depth=2) as workers:
    for _ in range(6):
      same(next(plain), next(workers))
      assert workers.get_state() == plain.get_state() and workers.epochs() == plain.epochs()
      assert workers.bad_records == plain.bad_records
    state = json.loads(json.dumps(workers.get_state()))
  assert case != "stage1_padded" or plain.bad_records  # the damaged records were met and counted
  resumed = make()
  resumed.set_state(state)
  with ReadWorkers(resumed, num_workers=2) as workers:
    for _ in range(3):
      same(next(plain), next(workers))


@pytest.mark.timeout(240)
def test_workers_read_a_tfds_dataset_as_stored_ids(tmp_path, tok, me5_small_dir):
  raw = [{"query": q, "passage": p} for q, p in zip(texts(60, 1), texts(60, 2))]
  builders.build("custom", str(tmp_path), [write_jsonl(tmp_path / "pairs.jsonl", raw)],
                 tokenizer_dir=me5_small_dir, max_tokens=64)
  make = lambda: InputPipeline({"custom": open_source(str(tmp_path), "custom")}, tok,  # noqa: E731
                               MixtureConfig(16, seed=0), PreprocessConfig(max_query_length=64, max_passage_length=64),
                               tokenizer_fingerprint=fingerprint(me5_small_dir))
  plain = make()
  assert plain.with_ids == {"custom": True}
  with ReadWorkers(make(), num_workers=2) as workers:
    for _ in range(5):
      same(next(plain), next(workers))


@pytest.mark.timeout(120)
def test_a_failing_or_dead_worker_raises_instead_of_waiting(tok):
  strict = InputPipeline({"wikipedia": [{"query": "q", "passage": ""}] * 4}, tok, MixtureConfig(4),
                         PreprocessConfig(), strict=True)
  with ReadWorkers(strict, num_workers=1) as workers:
    for _ in range(2):  # the worker's error reaches the consumer, every time it asks
      with pytest.raises(RuntimeError, match=r"(?s)read worker failed building batch 0.*strict mode"):
        next(workers)
  pipe = InputPipeline({"wikipedia": pairs("wiki", 40)}, tok, MixtureConfig(8), PreprocessConfig())
  with ReadWorkers(pipe, num_workers=2) as workers:
    next(workers)
    for worker in workers._workers:
      os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"read worker read_worker_\d exited \(status -9\)"):
      for _ in range(10):  # batches already built may still come; then the death is noticed
        next(workers)
