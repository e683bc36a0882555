"""Instruct formatting: the exact `Instruct: {task}\\nQuery: {q}` template, on queries only for retrieval
and on every text for the other task types, the unilm instruction table and its aliases, the training
defaults per data source, and `evaluate --instruction` end to end against sentence-transformers."""
import json

import numpy as np
import pytest

from data_pipelines.preprocess import PreprocessConfig
from data_pipelines.source import DATASETS
from me5_jax import evaluate, instructions
from me5_jax.instructions import format_texts, instruction_for
from test_evaluate_cli import (CORPUS, QRELS, QUERIES, STS, _write, assert_retrieval_matches,  # noqa: F401
                               st_model)
from test_metrics import ref_average_ranks, ref_pearson

TEXTS = ["how do plants make oxygen", "Le chat dort."]
SYMMETRIC_TYPES = ["STS", "Classification", "Clustering", "BitextMining", "PairClassification", "Reranking",
                   "Summarization"]


def test_template_is_exact_and_queries_only_for_retrieval():
  task = "Given a question, retrieve Wikipedia passages that answer the question"
  assert format_texts(TEXTS[:1], "Retrieval", "query", "NQ", task) == [
      "Instruct: Given a question, retrieve Wikipedia passages that answer the question\n"
      "Query: how do plants make oxygen"]
  assert format_texts(TEXTS, "Retrieval", "document", "NQ", task) == TEXTS  # no prefix, not even "passage: "
  assert instructions.instruct_prefix(task) + TEXTS[0] == format_texts(TEXTS, "Retrieval", "query", "NQ", task)[0]


def test_without_instruction_retrieval_gets_the_e5_prefixes():
  assert format_texts(TEXTS, "Retrieval", "query") == ["query: " + t for t in TEXTS]
  assert format_texts(TEXTS, "Retrieval", "document") == ["passage: " + t for t in TEXTS]
  assert instructions.prefixes("Reranking") == ("query: ", "query: ")  # unilm: "query: " on every non-retrieval text


@pytest.mark.parametrize("task_type", SYMMETRIC_TYPES)
def test_other_task_types_put_the_instruction_on_every_text(task_type):
  task = instruction_for("SomeTask", task_type)
  want = [f"Instruct: {task}\nQuery: {t}" for t in TEXTS]
  assert format_texts(TEXTS, task_type, "query", "SomeTask", task) == want
  assert format_texts(TEXTS, task_type, "document", "SomeTask", task) == want


def test_quora_corpus_is_embedded_as_queries():
  task = instruction_for("QuoraRetrieval", "Retrieval")
  assert instructions.prefixes("Retrieval", "QuoraRetrieval", task) == (instructions.instruct_prefix(task),) * 2
  assert instructions.prefixes("Retrieval", "QuoraRetrieval") == ("query: ", "query: ")


@pytest.mark.parametrize("name,task_type,want", [  # spot checks against unilm e5/utils.py
    ("STS12", "STS", "Retrieve semantically similar text."),
    ("STSBenchmark", "STS", "Retrieve semantically similar text."),
    ("Tatoeba", "BitextMining", "Retrieve parallel sentences."),
    ("BUCC", "BitextMining", "Retrieve parallel sentences."),
    ("SummEval", "Summarization", "Given a news summary, retrieve other semantically similar summaries"),
    ("Banking77Classification", "Classification", "Given a online banking query, find the corresponding intents"),
    ("TwentyNewsgroupsClustering", "Clustering", "Identify the topic or theme of the given news articles"),
    ("SciDocsRR", "Reranking", "Given a title of a scientific paper, retrieve the titles of other relevant papers"),
    ("SprintDuplicateQuestions", "PairClassification", "Retrieve duplicate questions from Sprint forum"),
    ("NQ", "Retrieval", "Given a question, retrieve Wikipedia passages that answer the question"),
    ("scifact", "Retrieval", "Given a scientific claim, retrieve documents that support or refute the claim"),
    ("trec-covid", "Retrieval", "Given a query on COVID-19, retrieve documents that answer the query"),
    ("fiqa", "Retrieval", "Given a financial question, retrieve user replies that best answer the question"),
    ("CQADupstackAndroidRetrieval", "Retrieval", "Given a question, retrieve detailed question descriptions "
     "from Stackexchange that are duplicates to the given question"),
    ("miracl", "Retrieval", "Given a question, retrieve Wikipedia passages that answer the question"),
])
def test_instruction_table(name, task_type, want):
  assert instruction_for(name, task_type, strict=True) == want


def test_unknown_tasks_get_the_type_default_unless_strict():
  assert instruction_for("MyRetrieval", "Retrieval") == instructions.TYPE_INSTRUCTIONS["Retrieval"]
  assert instruction_for("NQ", "Classification") == instructions.TASK_INSTRUCTIONS["NQ"]  # the name decides
  with pytest.raises(ValueError, match="no instruction for Retrieval task 'MyRetrieval'"):
    instruction_for("MyRetrieval", "Retrieval", strict=True)
  with pytest.raises(ValueError, match="no instructions for task type 'Regression'"):
    instruction_for("X", "Regression")


def test_source_defaults_cover_every_data_source_and_feed_preprocessing():
  assert set(DATASETS) <= set(instructions.SOURCE_INSTRUCTIONS)
  cfg = PreprocessConfig(instruct=True, instructions=instructions.SOURCE_INSTRUCTIONS)
  assert cfg.query_text({"query": "Hello."}, "nllb") == "Instruct: Retrieve parallel sentences.\nQuery: Hello."
  assert cfg.query_text({"query": "q", "task": "Do X"}, "stage2") == "Instruct: Do X\nQuery: q"  # record wins
  assert cfg.passage_text("Bonjour.", "nllb") == "Bonjour."


# ---------------------------------------------------------------------------------------------------
# evaluate --instruction / --instruction-task, in-process on the real MiniLM folder
# ---------------------------------------------------------------------------------------------------

def _main_json(capsys, *argv):
  assert evaluate.main(list(argv)) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_retrieval_with_instruction_matches_reference(tmp_path, capsys, minilm_dir, st_model):
  beir = tmp_path / "beir"
  _write(beir / "corpus.jsonl", [json.dumps({"_id": d, "title": t, "text": x}) for d, t, x in CORPUS])
  _write(beir / "queries.jsonl", [json.dumps({"_id": q, "text": t}) for q, t in QUERIES])
  _write(beir / "qrels.tsv", ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in QRELS])
  task = "Given a question, retrieve Wikipedia passages that answer the question"
  got = _main_json(capsys, "--model", minilm_dir, "--task", "retrieval", "--data", str(beir),
                   "--instruction-task", "NQ", "--batch-size", "8", "--max-length", "128")
  passages = [(t + " " + x).strip() for _, t, x in CORPUS]  # no "passage: "
  sim = st_model([t for _, t in QUERIES], f"Instruct: {task}\nQuery: ") @ st_model(passages).T
  assert_retrieval_matches(got, sim)
  # The same scores do not come out of the E5 prefixes: the instruction reached the model.
  e5 = st_model([t for _, t in QUERIES], "query: ") @ st_model(passages, "passage: ").T
  assert np.abs(e5 - sim).max() > 1e-2


def test_evaluate_sts_instruction_goes_on_every_text(tmp_path, capsys, minilm_dir, st_model):
  path = _write(tmp_path / "sts.tsv", ["sentence1\tsentence2\tscore"] + [f"{a}\t{b}\t{s}" for a, b, s in STS])
  prefix = "Instruct: Retrieve semantically similar text.\nQuery: "
  got = _main_json(capsys, "--model", minilm_dir, "--task", "sts", "--data", path, "--instruction-task", "STS12",
                   "--batch-size", "8", "--max-length", "128")
  cos = np.sum(st_model([a for a, _, _ in STS], prefix) * st_model([b for _, b, _ in STS], prefix), axis=1).tolist()
  gold = [s for _, _, s in STS]
  assert got["pearson"] == pytest.approx(ref_pearson(cos, gold), abs=1e-5)
  assert got["spearman"] == pytest.approx(ref_pearson(ref_average_ranks(cos), ref_average_ranks(gold)), abs=1e-5)


@pytest.mark.parametrize("task,extra,query_prefix,passage_prefix", [
    ("retrieval", ["--instruction", "Find it"], "Instruct: Find it\nQuery: ", ""),
    ("retrieval", ["--instruction-task", "scifact"],
     "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: ", ""),
    ("retrieval", ["--instruction-task", "QuoraRetrieval"], *[instructions.instruct_prefix(
        "Given a question, retrieve questions that are semantically equivalent to the given question")] * 2),
    ("bitext", ["--instruction-task", "Tatoeba"], *["Instruct: Retrieve parallel sentences.\nQuery: "] * 2),
    ("retrieval", [], None, None),  # the defaults ("query: "/"passage: ", none for bitext/sts) stay as they were
])
def test_instruction_flags_set_the_prefixes(task, extra, query_prefix, passage_prefix):
  """bitext/sts embed every text with the query prefix, so it alone carries the instruction there."""
  args = evaluate._parse_args(["--model", "m", "--task", task, "--data", "d", *extra])
  assert (args.query_prefix, args.passage_prefix) == (query_prefix, passage_prefix)


@pytest.mark.parametrize("extra,needle", [
    (["--instruction", "X", "--query-prefix", "query: "], "drop --query-prefix/--passage-prefix"),
    (["--instruction", "X", "--instruction-task", "NQ"], "not allowed with argument"),
    (["--instruction-task", "NoSuchTask"], "no instruction for Retrieval task 'NoSuchTask'"),
])
def test_instruction_flag_errors_come_before_any_work(tmp_path, capsys, extra, needle):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", str(tmp_path), "--task", "retrieval", "--data", str(tmp_path), *extra])
  assert exit_info.value.code == 2 and needle in capsys.readouterr().err
