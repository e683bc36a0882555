"""The MTEB adapter end to end: two tasks built in memory (STS and retrieval, hand-written sentences, no
downloads) run through `mteb.evaluate` on the real all-MiniLM-L6-v2 folder. mteb's saved predictions (every
pair's cosine, every query-document score) must equal sentence-transformers on the texts the E5 / instruct
conventions prescribe, and its metrics the loop references of test_metrics."""
import json

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402 (mteb brings datasets)
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

from me5_jax.mteb_adapter import MtebEncoder  # noqa: E402
from test_evaluate_cli import CORPUS, QRELS, QUERIES, STS, st_model  # noqa: E402,F401 (fixture)
from test_metrics import ref_average_ranks, ref_pearson, ref_retrieval_metrics  # noqa: E402

NQ_TASK = "Given a question, retrieve Wikipedia passages that answer the question"
LOCAL = dict(description="in-memory test task", reference=None, dataset={"path": "local/none", "revision": "0"},
             category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None,
             task_subtypes=None, license=None, annotations_creators=None, modalities=["text"],
             sample_creation=None, bibtex_citation=None)


class LocalSTS(AbsTaskSTS):
  metadata = TaskMetadata(name="LocalSTS", type="STS", main_score="cosine_spearman", **LOCAL)
  min_score, max_score = 0, 5

  def load_data(self, **kwargs):
    columns = dict(zip(("sentence1", "sentence2", "score"), map(list, zip(*STS))))
    self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
    self.data_loaded = True


class LocalRetrieval(AbsTaskRetrieval):
  metadata = TaskMetadata(name="LocalRetrieval", type="Retrieval", main_score="ndcg_at_10", **LOCAL)

  def load_data(self, **kwargs):
    qrels = {}
    for q, d, s in QRELS:
      qrels.setdefault(q, {})[d] = s
    self.dataset = {"default": {"test": RetrievalSplitData(
        queries=Dataset.from_list([{"id": q, "text": t} for q, t in QUERIES]),
        corpus=Dataset.from_list([{"id": d, "title": t, "text": x} for d, t, x in CORPUS]),
        relevant_docs=qrels, top_ranked=None)}}
    self.data_loaded = True


@pytest.fixture(scope="module")
def encoder(minilm_dir):
  return MtebEncoder.from_pretrained(minilm_dir)


def _run(model, tmp_path):
  """mteb.evaluate without its result cache; returns ({task: scores}, {task: saved predictions})."""
  result = mteb.evaluate(model, [LocalSTS(), LocalRetrieval()], cache=None, prediction_folder=tmp_path,
                         encode_kwargs={"batch_size": 8}, show_progress_bar=False)
  scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
  predictions = {name: json.loads((tmp_path / f"{name}_predictions.json").read_text())["default"]["test"]
                 for name in scores}
  return scores, predictions


def _check(scores, predictions, st_model, sts_prefix, query_prefix, passage_prefix):
  cos = np.sum(st_model([a for a, _, _ in STS], sts_prefix) * st_model([b for _, b, _ in STS], sts_prefix), axis=1)
  np.testing.assert_allclose(predictions["LocalSTS"]["cosine_scores"], cos, atol=1e-5)
  gold = [s for _, _, s in STS]
  spearman = ref_pearson(ref_average_ranks(cos.tolist()), ref_average_ranks(gold))
  assert scores["LocalSTS"]["cosine_spearman"] == pytest.approx(spearman, abs=1e-5)

  passages = [(t + " " + x).strip() for _, t, x in CORPUS]  # BEIR's title + text, as unilm joins them
  sim = st_model([t for _, t in QUERIES], query_prefix) @ st_model(passages, passage_prefix).T
  run = {q: {d: float(sim[i, j]) for j, (d, _, _) in enumerate(CORPUS)} for i, (q, _) in enumerate(QUERIES)}
  got_run = predictions["LocalRetrieval"]
  assert set(got_run) == {q for q, _, s in QRELS if s > 0}  # mteb drops queries without a positive
  for q, docs in got_run.items():
    assert set(docs) == set(run[q])
    np.testing.assert_allclose([docs[d] for d in run[q]], list(run[q].values()), atol=1e-5)
  qrels = {}
  for q, d, s in QRELS:
    qrels.setdefault(q, {})[d] = s
  want = ref_retrieval_metrics(run, qrels)
  assert scores["LocalRetrieval"]["ndcg_at_10"] == pytest.approx(want["ndcg@10"], abs=1e-4)  # mteb rounds to 5
  assert scores["LocalRetrieval"]["mrr_at_10"] == pytest.approx(want["mrr@10"], abs=1e-4)


def test_mteb_runs_local_tasks_with_e5_prefixes(tmp_path, encoder, st_model):
  """"query: " on both STS sides, "query: " / "passage: " for retrieval (unilm's evaluation code)."""
  assert isinstance(encoder, EncoderProtocol)
  _check(*_run(encoder, tmp_path), st_model, "query: ", "query: ", "passage: ")


def test_mteb_runs_local_tasks_in_instruct_mode(tmp_path, encoder, st_model):
  """The STS instruction on every STS text; a per-task instruction (the override table) on retrieval
  queries and nothing on documents."""
  instruct = MtebEncoder(encoder.embedder, "me5_jax/instruct", instruct=True,
                         instructions={"LocalRetrieval": NQ_TASK})
  _check(*_run(instruct, tmp_path), st_model, "Instruct: Retrieve semantically similar text.\nQuery: ",
         f"Instruct: {NQ_TASK}\nQuery: ", "")


def test_mteb1_style_call_with_a_registry_task_name(encoder):
  """encode(sentences, task_name=..., prompt_type=...): the task's type comes from mteb's registry
  (metadata only, nothing downloaded)."""
  texts = ["A man plays the guitar.", "Two dogs run on the beach."]
  instruct = MtebEncoder(encoder.embedder, "me5_jax/instruct", instruct=True)
  got = instruct.encode(texts, task_name="STS12", batch_size=8)
  want = encoder.embedder.encode(texts, prefix="Instruct: Retrieve semantically similar text.\nQuery: ", batch_size=8)
  np.testing.assert_array_equal(got, want)
  got = encoder.encode(texts, task_name="SciFact", prompt_type="passage", batch_size=8)
  np.testing.assert_array_equal(got, encoder.embedder.encode(texts, prefix="passage: ", batch_size=8))
  with pytest.raises(ValueError, match="needs task_metadata"):
    encoder.encode(texts)
