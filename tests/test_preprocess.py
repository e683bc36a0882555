"""Preprocessing: read-time record checks, prefixes and the instruct template, tokens against HF
`tokenizers`, bucket lengths, batch layout, hard-negative choice."""
import numpy as np
import pytest
import tokenizers

from data_pipelines import batch as batch_contract
from data_pipelines.batch import hash_ids
from data_pipelines.preprocess import (Batcher, PreprocessConfig, bucket_lengths, check_record,
                                       choose_negatives, pick_bucket)
from me5_jax.tokenize import Tokenizer

PAD, EOS = 1, 2  # XLM-R <pad>, </s>


@pytest.fixture(scope="module")
def tok(me5_small_dir):
  return Tokenizer.from_dir(me5_small_dir)


@pytest.fixture(scope="module")
def hf(me5_small_dir):
  """The reference: HF's Rust tokenizer read straight from tokenizer.json, truncating like transformers."""
  backend = tokenizers.Tokenizer.from_file(f"{me5_small_dir}/tokenizer.json")
  backend.no_padding()

  def encode(text, max_length):  # <s> content </s>, content cut so the whole fits max_length
    ids = backend.encode(text).ids
    return ids if len(ids) <= max_length else ids[:max_length - 1] + [EOS]
  return encode


@pytest.mark.parametrize("max_length,expected", [
    (128, (32, 64, 128)), (192, (32, 64, 128, 192)), (100, (32, 64, 100)), (32, (32,)),
    (512, (32, 64, 128, 256, 512))])
def test_bucket_lengths(max_length, expected):
  assert bucket_lengths(max_length) == expected


def test_pick_bucket_is_the_smallest_that_fits():
  assert [pick_bucket(n, (32, 64, 128)) for n in (1, 32, 33, 64, 65, 128)] == [32, 32, 64, 64, 128, 128]


def test_formats_by_stage_source_and_instruct_mode():
  rec = {"query": "how are you", "task": ""}
  default = PreprocessConfig()
  assert default.query_text(rec, "wikipedia") == "query: how are you"
  assert default.passage_text("fine", "wikipedia") == "passage: fine"
  assert default.passage_text("gut", "nllb") == "query: gut"  # symmetric: translation pairs
  assert default.passage_text("gut", "bible/demo") == "query: gut"
  custom = PreprocessConfig(prefixes={"reddit": ("", "")})
  assert custom.query_text(rec, "reddit") == "how are you" and custom.passage_text("x", "reddit") == "x"
  instruct = PreprocessConfig(stage=2, instruct=True, instructions={"nli": "Retrieve similar text."})
  assert instruct.query_text(rec, "nli") == "Instruct: Retrieve similar text.\nQuery: how are you"
  assert instruct.query_text({**rec, "task": "Find the answer."}, "nli") == \
      "Instruct: Find the answer.\nQuery: how are you"
  assert instruct.passage_text("fine", "nli") == "fine"  # instruct mode: no prefix on documents


GOOD_PAIR = {"query": "q", "passage": "p", "lang": "en", "source": "x"}
GOOD_TRIPLE = {"query": "q", "positive": "p", "negatives": ["n1", "n2"], "positive_score": 2.0,
               "negative_scores": [1.0, 0.5], "task": ""}


@pytest.mark.parametrize("record,stage,reason", [
    (GOOD_PAIR, 1, None),
    ({"query": "q"}, 1, "missing_field"),
    ({**GOOD_PAIR, "passage": "   \n"}, 1, "empty_text"),
    ({**GOOD_PAIR, "query": 7}, 1, "non_string"),
    ({**GOOD_PAIR, "query": b"q"}, 1, "non_string"),
    (GOOD_TRIPLE, 2, None),
    ({k: v for k, v in GOOD_TRIPLE.items() if k != "negative_scores"}, 2, "missing_field"),
    ({**GOOD_TRIPLE, "negatives": ["n1", ""]}, 2, "empty_text"),
    ({**GOOD_TRIPLE, "negatives": "n1"}, 2, "bad_negatives"),
    ({**GOOD_TRIPLE, "negatives": ["n1", 2]}, 2, "non_string"),
    ({**GOOD_TRIPLE, "positive_score": float("nan")}, 2, "no_teacher_score"),
    ({**GOOD_TRIPLE, "positive_score": None}, 2, "missing_field"),
    ({**GOOD_TRIPLE, "positive_score": "2"}, 2, "bad_score"),
    ({**GOOD_TRIPLE, "negative_scores": [1.0, "high"]}, 2, "bad_score"),
    ({**GOOD_TRIPLE, "negative_scores": [1.0]}, 2, "bad_score"),
    ({**GOOD_TRIPLE, "negatives": [], "negative_scores": []}, 2, "no_negatives"),
])
def test_check_record_reasons(record, stage, reason):
  cfg = PreprocessConfig(stage=stage, num_hard_negatives=2 if stage == 2 else 0)
  assert check_record(record, "src", cfg) == reason


def test_records_without_teacher_scores_need_use_teacher_off():
  unscored = {**GOOD_TRIPLE, "positive_score": float("nan"), "negative_scores": [float("nan")] * 2}
  assert check_record(unscored, "src", PreprocessConfig(stage=2, num_hard_negatives=2)) == "no_teacher_score"
  no_teacher = PreprocessConfig(stage=2, num_hard_negatives=2, use_teacher=False)
  assert check_record(unscored, "src", no_teacher) is None


def test_instruct_mode_needs_a_task():
  cfg = PreprocessConfig(stage=2, num_hard_negatives=1, instruct=True, instructions={"nli": "Find it."})
  assert check_record(GOOD_TRIPLE, "msmarco", cfg) == "no_task"
  assert check_record(GOOD_TRIPLE, "nli", cfg) is None
  assert check_record({**GOOD_TRIPLE, "task": "Answer."}, "msmarco", cfg) is None


def test_choose_negatives_is_deterministic_without_replacement():
  picks = [choose_negatives(10, 4, seed=0, step=s, row=r) for s in range(3) for r in range(5)]
  assert all(len(set(p.tolist())) == 4 and p.max() < 10 for p in picks)
  assert len({tuple(p.tolist()) for p in picks}) > 1
  np.testing.assert_array_equal(picks[7], choose_negatives(10, 4, seed=0, step=1, row=2))
  assert sorted(choose_negatives(3, 5, seed=0, step=0, row=0).tolist()) == [0, 1, 2]


def test_batch_tokens_buckets_and_layout(tok, hf):
  cfg = PreprocessConfig(stage=2, num_hard_negatives=1, max_query_length=64, max_passage_length=128)
  # no trailing whitespace: there the raw tokenizer.json keeps a lone "▁" that transformers (and ours) drop
  long_text = ("Multilingual embeddings map text in many languages into one space. " * 30).strip()
  queries = ["query: hello", "query: " + ("a short question about the weather " * 3).strip()]
  passages = ["passage: one", "passage: two", "passage: " + long_text, "passage: one"]
  batch = Batcher(tok, cfg)(queries, passages, [[3.0, 1.0], [2.5, 0.5]])
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "query_ids": (np.int32, (2, 32)), "query_mask": (np.int32, (2, 32)),
      "passage_ids": (np.int32, (2, 2, 128)), "passage_mask": (np.int32, (2, 2, 128)),
      "passage_hash": (np.int32, (2, 2, 2)), "teacher_scores": (np.float32, (2, 2))}
  for ids_L, mask_L, text, limit in [(batch["query_ids"][i], batch["query_mask"][i], queries[i], 64)
                                     for i in range(2)] + \
      [(batch["passage_ids"][i // 2, i % 2], batch["passage_mask"][i // 2, i % 2], passages[i], 128)
       for i in range(4)]:
    expected = hf(text, limit)
    n = int(mask_L.sum())
    assert ids_L[:n].tolist() == expected and np.all(mask_L[:n] == 1)
    assert np.all(ids_L[n:] == PAD) and np.all(mask_L[n:] == 0)
  assert batch["passage_mask"][1, 0].sum() == 128 and batch["passage_ids"][1, 0, -1] == EOS  # truncated
  np.testing.assert_array_equal(batch["teacher_scores"], [[3.0, 1.0], [2.5, 0.5]])
  hashes = batch["passage_hash"].reshape(4, 2)
  np.testing.assert_array_equal(hashes, hash_ids(batch["passage_ids"].reshape(4, -1),
                                                 batch["passage_mask"].reshape(4, -1)))
  assert (hashes[0] == hashes[3]).all() and not (hashes[0] == hashes[1]).all()
  short = Batcher(tok, cfg)(["query: hi"], ["passage: one", "passage: b"], [[1.0, 0.0]])
  assert short["query_ids"].shape == (1, 32) and short["passage_ids"].shape == (1, 2, 32)
  np.testing.assert_array_equal(short["passage_hash"][0, 0], hashes[0])  # hash ignores padding length


def test_packed_batch_holds_the_padded_batch_tokens(tok):
  """The packed layout carries exactly the padded layout's texts: each slot's tokens are its text's."""
  cfg = PreprocessConfig(stage=2, num_hard_negatives=1, max_query_length=64, max_passage_length=128)
  queries = ["query: hello", "query: " + ("a short question about the weather " * 3).strip()]
  passages = ["passage: one", "passage: two", "passage: " + "many words here " * 60, "passage: one"]
  padded = Batcher(tok, cfg)(queries, passages, [[3.0, 1.0], [2.5, 0.5]])
  packed_cfg = PreprocessConfig(**{**cfg.__dict__, "pack_rows": True, "row_multiple": 4})
  asked = []
  agree = lambda kind, n: asked.append((kind, n)) or n + 4  # noqa: E731
  packed = Batcher(tok, packed_cfg, agree, process_index=1)(queries, passages, [[3.0, 1.0], [2.5, 0.5]])
  assert asked == [("rows", 4)] and packed["packed_ids"].shape == (8, 128)
  for key in ("passage_hash", "teacher_scores"):
    np.testing.assert_array_equal(packed[key], padded[key])
  num_slots = 128 // 4
  texts = [(padded["query_ids"][i], padded["query_mask"][i], packed["query_slots"][i]) for i in range(2)]
  texts += [(padded["passage_ids"][i, g], padded["passage_mask"][i, g], packed["passage_slots"][i, g])
            for i in range(2) for g in range(2)]
  for ids_L, mask_L, slot in texts:
    row, seg = divmod(int(slot), num_slots)
    row -= 8  # host 1's rows come after host 0's 8
    np.testing.assert_array_equal(packed["packed_ids"][row][packed["packed_segments"][row] == seg + 1],
                                  ids_L[mask_L > 0])
  # Both are the contract's batches (data_pipelines.batch.shapes: what aot compiles the step for).
  lq, lp = padded["query_ids"].shape[1], padded["passage_ids"].shape[2]
  for batch, rows in ((padded, 0), (packed, 8)):
    want = batch_contract.shapes(2, lq, lp, 2, teacher=True, packed_rows=rows)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want


def test_agree_length_sets_the_padded_length(tok):
  cfg = PreprocessConfig(max_query_length=64, max_passage_length=128)
  asked = []
  agree = lambda kind, n: asked.append((kind, n)) or {"query": 64, "passage": 128}[kind]  # noqa: E731
  batch = Batcher(tok, cfg, agree)(["query: hi"], ["passage: there"])
  assert asked == [("query", 32), ("passage", 32)]
  assert batch["query_ids"].shape == (1, 64) and batch["passage_ids"].shape == (1, 1, 128)


def test_bad_bucket_configuration_fails():
  with pytest.raises(ValueError, match="must be increasing and end at the max length 128"):
    PreprocessConfig(query_buckets=(64, 32, 128))
  with pytest.raises(ValueError, match="num_hard_negatives must be 0"):
    PreprocessConfig(stage=1, num_hard_negatives=3)


def test_clipping_long_texts_keeps_the_ids_of_the_whole_text(tok, hf, bible_tsv):
  """Long passages are cut to max_length words before tokenizing; ids must equal the full text's."""
  with open(bible_tsv, encoding="utf-8") as f:
    header, *lines = [line.rstrip("\n").split("\t") for _, line in zip(range(60), f)]
  texts = [" ".join(row[c] for row in lines) for c in range(1, len(header))]  # 18 versions, 59 verses each
  texts += ["\u200b " * 300 + "words the normalizer erases come first",  # erased words: falls back
            "ab" * 2000,  # no whitespace: not clipped
            "passage: " + "  spaced \t out\n\n" * 200]
  cfg = PreprocessConfig(max_query_length=32, max_passage_length=64)
  batch = Batcher(tok, cfg)(texts[:len(texts)], texts)
  for ids_L, mask_L, text in zip(batch["passage_ids"][:, 0], batch["passage_mask"][:, 0], texts):
    assert ids_L[mask_L == 1].tolist() == hf(text, 64)
  for ids_L, mask_L, text in zip(batch["query_ids"], batch["query_mask"], texts):
    assert ids_L[mask_L == 1].tolist() == hf(text, 32)
  assert batch["passage_mask"][-3].sum() < 64  # erased words really were erased


def test_the_read_path_imports_no_jax():
  """DESIGN.md "Dependency direction": data_pipelines' read path needs no accelerator runtime."""
  import subprocess
  import sys
  code = ("import sys, data_pipelines.input_pipeline, data_pipelines.read_workers, data_pipelines.records, "
          "data_pipelines.batch; "
          "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
