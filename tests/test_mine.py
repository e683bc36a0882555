"""me5_jax.mine on real data: German Bible verses as queries, English verses as the corpus, the aligned verse
and the Bible's own cross-references (bible.db) as positives. The mined negatives are checked against a
from-scratch reference (full sort of Embedder.encode cosines, list filters), the teacher column against the
cross-encoder run with transformers directly; the output builds with the stage-2 builder, streams into
contract batches, and trains with `python -m me5_jax.train --config configs/small.py:finetune`."""
import dataclasses
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import builders, open_source
from data_pipelines.input_pipeline import InputPipeline
from data_pipelines.mixture import MixtureConfig
from data_pipelines.preprocess import PreprocessConfig
from me5_jax import mine
from me5_jax.evaluate import load_retrieval_files
from me5_jax.tokenize import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY_COL, DOC_COL = "de:s", "en:4"
MAX_CROSS_REFS = 2   # per query, to keep the corpus small
TOP_K, SKIP_TOP, RATIO, NUM_NEG = 30, 2, 0.98, 8
MAX_LENGTH = 64      # verses are short; caps the encoder's shapes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)
  return str(path)


@pytest.fixture(scope="module")
def beir(tmp_path_factory, bible_tsv, bible_db):
  """queries: de:s of every 240th verse; corpus: en:4 of every 120th verse plus the queries' cross-referenced
  verses (titled with their reference, to exercise the title join); qrels: aligned verse 2, up to two
  cross-references 1, and the next sampled verse 0 (judged non-relevant: must stay a candidate)."""
  with open(bible_tsv, encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  header, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
  qi, di = header.index(QUERY_COL), header.index(DOC_COL)
  rows = [r for r in rows if r[qi].strip() and r[di].strip()]
  by_ref = {r[0]: r for r in rows}
  sampled = rows[::120]
  queries = sampled[::2]
  db = sqlite3.connect(bible_db)
  corpus = {r[0]: ("", r[di]) for r in sampled}
  qrels = []
  for n, q in enumerate(queries):
    qrels.append((q[0], q[0], 2))
    refs = db.execute("SELECT bNumberTo, cNumberTo, vNumberTo FROM bibleCrossRef WHERE bNumberFrom=? AND "
                      "cNumberFrom=? AND vNumberFrom=? ORDER BY crId", tuple(map(int, q[0].split("."))))
    refs = [".".join(map(str, r)) for r in refs]
    for ref in [r for r in refs if r in by_ref and r != q[0]][:MAX_CROSS_REFS]:
      corpus.setdefault(ref, (ref, by_ref[ref][di]))
      qrels.append((q[0], ref, 1))
    other = sampled[(2 * n + 1) % len(sampled)][0]
    if (q[0], other) not in {(a, b) for a, b, _ in qrels}:
      qrels.append((q[0], other, 0))
  db.close()
  d = tmp_path_factory.mktemp("bible_beir")
  paths = {
      "queries": _write(d / "queries.jsonl", [json.dumps({"_id": q[0], "text": q[qi]}, ensure_ascii=False)
                                              for q in queries]),
      "corpus": _write(d / "corpus.jsonl", [json.dumps({"_id": k, "title": t, "text": x}, ensure_ascii=False)
                                            for k, (t, x) in corpus.items()]),
      "qrels": _write(d / "qrels.tsv", ["query-id\tcorpus-id\tscore"] + [f"{a}\t{b}\t{s}" for a, b, s in qrels])}
  doc_ids, queries = sorted(corpus), sorted(queries)  # rows in id order, as mine keeps them
  return {**paths, "doc_ids": doc_ids, "query_ids": [q[0] for q in queries], "query_texts": [q[qi] for q in queries],
          "docs": [(corpus[k][0] + " " + corpus[k][1]).strip() for k in doc_ids],
          "positives": [sorted(doc_ids.index(b) for a, b, s in qrels if a == q[0] and s > 0) for q in queries],
          "titled": sum(bool(t) for t, _ in corpus.values())}


@pytest.fixture(scope="module")
def embedder(me5_small_dir):
  from me5_jax.embedder import Embedder
  return Embedder.from_pretrained(me5_small_dir)


@pytest.fixture(scope="module")
def emb(beir, embedder):
  """The test's own embeddings, with the E5 prefixes (mine's defaults), rows in sorted-id order."""
  q_QxD = embedder.encode(beir["query_texts"], prefix="query: ", max_length=MAX_LENGTH)
  p_NxD = embedder.encode(beir["docs"], prefix="passage: ", max_length=MAX_LENGTH)
  return q_QxD, p_NxD


def reference_negatives(q_QxD, p_NxD, positives, top_k, skip_top=0, ratio=None, num=None, docs=None):
  """Per query: the corpus rows mine should keep, from a full sort and plain list filtering (with `docs`,
  also of the texts equal to a positive's or to a better candidate's, whitespace normalised)."""
  sim_QxN = q_QxD @ p_NxD.T
  words = lambda j: docs[j].split() if docs else j  # noqa: E731
  out = []
  for i, pos in enumerate(positives):
    ranked = np.lexsort((np.arange(len(p_NxD)), -sim_QxN[i]))[:top_k].tolist()
    cands, seen = [], [words(j) for j in pos]
    for j in ranked:
      if j not in set(pos) and words(j) not in seen:
        cands.append(j)
      seen.append(words(j))
    cands = cands[skip_top:]
    if ratio is not None:
      s_pos = min(sim_QxN[i, j] for j in pos)
      limit = ratio * s_pos if s_pos >= 0 else (2 - ratio) * s_pos
      cands = [j for j in cands if sim_QxN[i, j] <= limit]
    out.append(cands[:num])
  return out


def _tiny_bert_dir(path, minilm_dir, classifier):
  """A random 2-layer, hidden-32 BERT with the MiniLM tokenizer: a cross-encoder (num_labels=1) or an encoder."""
  import torch
  from transformers import BertConfig, BertForSequenceClassification, BertModel
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.2)
  (BertForSequenceClassification if classifier else BertModel)(cfg).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(minilm_dir, name), path)
  return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_dir):
  return _tiny_bert_dir(tmp_path_factory.mktemp("tiny_ce"), minilm_dir, classifier=True)


@pytest.fixture(scope="module")
def mined(beir, me5_small_dir, teacher_dir, tmp_path_factory):
  """The CLI (in process) with every filter and the teacher: (output lines, stdout summary)."""
  out = str(tmp_path_factory.mktemp("mined") / "stage2.jsonl")
  import io
  from contextlib import redirect_stdout
  stdout = io.StringIO()
  with redirect_stdout(stdout):
    rc = mine.main(["--model", me5_small_dir, "--queries", beir["queries"], "--corpus", beir["corpus"],
                    "--qrels", beir["qrels"], "--out", out, "--top-k", str(TOP_K), "--skip-top", str(SKIP_TOP),
                    "--max-score-ratio", str(RATIO), "--num-negatives", str(NUM_NEG), "--teacher", teacher_dir,
                    "--max-length", str(MAX_LENGTH),
                    "--task", "Retrieve parallel sentences."])
  assert rc == 0
  with open(out, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  return out, lines, json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_cli_lines_match_reference_and_drop_positives(beir, emb, mined):
  _, lines, summary = mined
  positives, docs = beir["positives"], beir["docs"]
  expected = reference_negatives(*emb, positives, TOP_K, SKIP_TOP, RATIO, NUM_NEG, docs)
  want = [(q, docs[j], [docs[n] for n in neg]) for q, pos, neg in zip(beir["query_texts"], positives, expected)
          for j in pos]
  assert [(r["query"], r["positive"], r["negatives"]) for r in lines] == want  # one line per (query, positive)
  positive_texts = [{docs[j] for j in pos} for pos in positives for _ in pos]
  for pos_texts, r in zip(positive_texts, lines):
    assert not pos_texts & set(r["negatives"])
    assert r["task"] == "Retrieve parallel sentences."
  # The data exercise what is tested: multi-positive queries, titled docs, every filter removing something.
  assert len(lines) > len(positives) and beir["titled"] > 0
  c = summary["candidates"]
  assert c["known_positive"] > 0 and c["skip_top"] == SKIP_TOP * len(positives)
  assert c["max_score_ratio"] > 0 and c["num_negatives"] > 0 and c["kept"] > 0
  fates = ("known_positive", "positive_text", "repeated_text", "skip_top", "max_score_ratio", "num_negatives", "kept")
  assert c["retrieved"] == sum(c.get(f, 0) for f in fates)
  assert summary["lines"] == len(lines)


@pytest.mark.parametrize("skip_top,ratio,num", [(0, None, None), (3, None, None), (0, 0.9, None),
                                                (1, 1.0, 5), (0, 0.5, None)])
def test_select_negatives_filters_match_reference(beir, emb, skip_top, ratio, num):
  # On a 2^-8 grid every dot product of these unit vectors is exact in float32, whatever the summation order
  # (the device's or numpy's), so rankings compare exactly, near-ties included.
  emb = tuple(np.round(e * 256) / 256 for e in emb)
  positives = beir["positives"]
  cfg = mine.MiningConfig(top_k=TOP_K, skip_top=skip_top, max_score_ratio=ratio, num_negatives=num)
  got, counts = mine.select_negatives(*emb, [np.array(p) for p in positives], beir["docs"], cfg)
  want = reference_negatives(*emb, positives, TOP_K, skip_top, ratio, num, beir["docs"])
  assert [g.tolist() for g in got] == want
  if skip_top == 3:  # --approximate-search: lax.approx_max_k, exact off TPU
    approx, _ = mine.select_negatives(*emb, [np.array(p) for p in positives], beir["docs"],
                                      dataclasses.replace(cfg, approximate=True))
    assert [a.tolist() for a in approx] == want
  if ratio is not None:
    assert counts["max_score_ratio"] > 0


def test_ratio_filter_on_negative_positive_scores():
  """Random directions in 16 dims: many positives score below zero, where a plain ratio × score would put
  the threshold above the positive; the filter must stay below it."""
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  q_QxD, p_NxD = unit(rng.normal(size=(40, 16))), unit(rng.normal(size=(200, 16)))
  positives = [rng.choice(200, size=1 + i % 3, replace=False) for i in range(40)]
  assert sum(min(p_NxD[p] @ q_QxD[i]) < 0 for i, p in enumerate(positives)) > 5
  for ratio in (0.8, 1.2):
    got, _ = mine.select_negatives(q_QxD, p_NxD, positives, [f"doc {j}" for j in range(200)],
                                   mine.MiningConfig(top_k=200, max_score_ratio=ratio))
    want = reference_negatives(q_QxD, p_NxD, [p.tolist() for p in positives], 200, ratio=ratio)
    assert [g.tolist() for g in got] == want


def test_planted_duplicates_of_positives_never_become_negatives(beir, embedder, tmp_path):
  """Every positive stored twice more under other ids (the same text, and with its whitespace changed), and
  some other documents twice: no line's negatives hold its positives' words, and none repeats a text."""
  with open(beir["corpus"], encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  positive_ids = {beir["doc_ids"][j] for pos in beir["positives"] for j in pos}
  extra = []
  for i, d in enumerate(docs):
    if d["_id"] in positive_ids:
      extra.append({**d, "_id": "copy." + d["_id"]})
      extra.append({"_id": "spaced." + d["_id"], "title": d["title"],
                    "text": "  " + d["text"].replace(" ", " \n ") + "\t"})
    elif i % 3 == 0:
      extra.append({**d, "_id": "again." + d["_id"]})
  corpus = _write(tmp_path / "corpus.jsonl", [json.dumps(d, ensure_ascii=False) for d in docs + extra])
  data = load_retrieval_files(corpus, beir["queries"], beir["qrels"])
  records, counts = mine.mine(embedder, data, mine.MiningConfig(top_k=TOP_K), max_length=MAX_LENGTH)
  assert counts["positive_text"] >= 2 * len(beir["positives"]) and counts["repeated_text"] > 0
  key = lambda text: " ".join(text.split())  # noqa: E731
  positives_of = {}
  for r in records:
    positives_of.setdefault(r["query"], set()).add(key(r["positive"]))
  for r in records:
    negatives = [key(n) for n in r["negatives"]]
    assert not positives_of[r["query"]] & set(negatives), r["query"]
    assert len(set(negatives)) == len(negatives) > 0


def test_teacher_scores_are_the_cross_encoders_logits(mined, teacher_dir):
  import torch
  from sentence_transformers import CrossEncoder
  from transformers import AutoTokenizer, BertForSequenceClassification
  _, lines, _ = mined
  pairs = [(r["query"], p) for r in lines for p in [r["positive"], *r["negatives"]]]
  got = np.array([s for r in lines for s in [r["positive_score"], *r["negative_scores"]]])
  assert len(got) == len(pairs) and np.std(got) > 0.05  # scores that differ, so the check can fail
  ce = CrossEncoder(teacher_dir, device="cpu").predict(pairs, activation_fn=torch.nn.Identity(),
                                                       show_progress_bar=False)
  np.testing.assert_allclose(got, ce, rtol=1e-5, atol=1e-5)
  tok = AutoTokenizer.from_pretrained(teacher_dir)  # transformers alone, without sentence-transformers
  model = BertForSequenceClassification.from_pretrained(teacher_dir).eval()
  with torch.no_grad():
    enc = tok([a for a, _ in pairs[:64]], [b for _, b in pairs[:64]], padding=True, truncation=True,
              return_tensors="pt")
    logits = model(**enc).logits[:, 0].numpy()
  np.testing.assert_allclose(got[:64], logits, rtol=1e-4, atol=1e-4)


def test_without_teacher_scores_are_left_out(beir, emb):
  """The builder then stores NaN (trainable with use_teacher=False); JSON has no NaN to write instead."""
  data = load_retrieval_files(beir["corpus"], beir["queries"], beir["qrels"])
  positives = mine.positive_indices(data)
  assert [p.tolist() for p in positives] == beir["positives"]
  negatives, _ = mine.select_negatives(*emb, positives, data.passages, mine.MiningConfig(top_k=TOP_K))
  records = mine.stage2_records(data, positives, negatives)
  assert len(records) == sum(map(len, positives))
  assert all(set(r) == {"query", "positive", "negatives", "task"} and r["task"] == "" for r in records)


@pytest.fixture(scope="module")
def stage2_dir(mined, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  report = builders.build("stage2", data_dir, [mined[0]])
  return data_dir, report


def test_output_builds_and_streams_into_contract_batches(mined, stage2_dir, minilm_dir):
  _, lines, _ = mined
  data_dir, report = stage2_dir
  assert report["valid"] == len(lines) and report["skipped_total"] == 0
  source = open_source(data_dir, "stage2")
  by_pair = {(r["query"], r["positive"]): r for r in lines}
  for rec in source.__getitems__(list(range(len(source)))):
    line = by_pair.pop((rec["query"], rec["positive"]))
    assert rec["negatives"] == line["negatives"] and rec["task"] == line["task"]
    np.testing.assert_allclose([rec["positive_score"], *rec["negative_scores"]],
                               [line["positive_score"], *line["negative_scores"]], rtol=1e-6)
  assert not by_pair
  pre = PreprocessConfig(stage=2, max_query_length=32, max_passage_length=32, num_hard_negatives=3)
  pipe = InputPipeline({"stage2": source}, Tokenizer.from_dir(minilm_dir), MixtureConfig(global_batch_size=16),
                       pre)
  for _ in range(2):
    batch = next(pipe)
    assert batch["query_ids"].shape[0] == 16 and batch["query_ids"].shape == batch["query_mask"].shape
    assert batch["passage_ids"].shape[:2] == (16, 4) and batch["passage_ids"].shape == batch["passage_mask"].shape
    assert batch["passage_hash"].shape == (16, 4, 2) and batch["teacher_scores"].shape == (16, 4)
    assert all(v.dtype == np.int32 for k, v in batch.items() if k != "teacher_scores")
    assert batch["teacher_scores"].dtype == np.float32 and np.isfinite(batch["teacher_scores"]).all()
    positive_scores = {np.float32(r["positive_score"]) for r in lines}
    assert set(batch["teacher_scores"][:, 0].tolist()) <= positive_scores
  # Queries whose hardest positive scores below every candidate keep no negatives (the ratio filter's
  # price); the pipeline counts their lines and draws others in their place.
  assert set(pipe.bad_records.get("stage2", {})) <= {"no_negatives"}


def test_stage2_training_smoke(stage2_dir, minilm_dir, tmp_path):
  """Three finetune steps of a tiny random BERT on the mined data: runs, and distils (loss_kd logged)."""
  data_dir, _ = stage2_dir
  init = _tiny_bert_dir(tmp_path / "tiny_bert", minilm_dir, classifier=False)
  workdir = tmp_path / "work"
  overrides = dict(init_checkpoint=init, train_data="stage2", data_dir=data_dir, batch_size=16,
                   num_hard_negatives=3, query_max_length=32, passage_max_length=32, total_steps=3,
                   warmup_steps=1, **{"mesh.data": -1, "mesh.fsdp": 1, "gradcache.chunk_size": 0},
                   dtype="float32", remat="none", eval_bitext="", export_at_end=False)
  cmd = [sys.executable, "-m", "me5_jax.train", "--config", "configs/small.py:finetune", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  env = {**os.environ, "ME5_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  last = [r for r in rows if r.get("step") == 3 and "loss_kd" in r]
  assert last and math.isfinite(last[0]["loss_kd"]) and last[0]["loss_kd"] > 0
  with open(workdir / "config.json", encoding="utf-8") as f:
    alpha = json.load(f)["loss"]["kd_alpha"]
  assert last[0]["loss"] == pytest.approx(last[0]["loss_kd"] + alpha * last[0]["loss_contrastive"], rel=1e-5)


def test_bad_inputs_fail_in_one_line_naming_the_file(beir, me5_small_dir, tmp_path, capsys):
  bad_qrels = _write(tmp_path / "qrels.tsv", ["qid\tdid\tscore", "a\tb\t1"])
  base = ["--model", me5_small_dir, "--queries", beir["queries"], "--corpus", beir["corpus"],
          "--out", str(tmp_path / "o.jsonl")]
  proc = subprocess.run([sys.executable, "-m", "me5_jax.mine", *base, "--qrels", bad_qrels], cwd=REPO,
                        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2 and proc.stderr.strip() == (
      f"me5_jax.mine: error: {bad_qrels}:1: expected header 'query-id<TAB>corpus-id<TAB>score', got ['qid', 'did', 'score']")
  for args, named in [(["--qrels", str(tmp_path / "missing.tsv")], "missing.tsv"),
                      (["--qrels", beir["qrels"], "--teacher", str(tmp_path)], "config.json"),
                      (["--qrels", beir["qrels"], "--skip-top", "-1"], "--skip-top")]:
    assert mine.main(base + args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("me5_jax.mine: error: ") and "\n" not in err and named in err, err
  assert not os.path.exists(tmp_path / "o.jsonl")


