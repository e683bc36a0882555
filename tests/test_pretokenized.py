"""Ids stored at build time + the read-time prefix equal tokenizing the prefixed text directly, for the real
BERT WordPiece (all-MiniLM-L6-v2) and XLM-R sentencepiece (me5-small-q4) tokenizers, on multilingual text."""
import numpy as np
import pytest

from data_pipelines import pretokenized
from me5_jax.tokenize import PASSAGE_PREFIX, QUERY_PREFIX, Tokenizer, instruct_query
from multilingual_texts import LONG_TEXT, TEXTS

EDGE_CASES = [
    "\u0301accent first",        # a combining mark right after the prefix's space
    "\u00a0no-break space first", "ideographic\u3000space", "zero\u200bwidth",
    "emoji 🙂 and ﬁ ligature", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "\t\n  ", "x",
    "مرحبا بالعالم 123", "混合 mixed 文字 text", "ÄÖÜ äöü ß",
]
PREFIXES = ["", QUERY_PREFIX, PASSAGE_PREFIX,
            instruct_query("Given a web search query, retrieve relevant passages that answer the query", "")]


@pytest.fixture(scope="module", params=["all-MiniLM-L6-v2", "me5-small-q4"])
def tokenizer(request):
  from conftest import realdata_path
  return Tokenizer.from_dir(realdata_path(request.param))


@pytest.mark.parametrize("max_length", [8, 32, 128, 512])
def test_stored_ids_plus_prefix_equal_direct_tokenization(tokenizer, bible_tsv, max_length):
  with open(bible_tsv, encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t")[1:] for line in f][1:200:7]
  verses = [row[i % len(row)] for i, row in enumerate(rows)]  # every version and language in turn
  texts = list(TEXTS) + EDGE_CASES + verses + [LONG_TEXT, " ".join(verses)]
  pre = pretokenized.Pretokenizer(tokenizer)
  stored = pre.text_ids(texts, max_tokens=512)
  for prefix in PREFIXES:
    want = tokenizer.token_ids([prefix + t for t in texts], max_length)
    tokens, lengths = pre.ragged([(prefix, ids) for ids in stored], max_length)  # a batch's rows at once
    got = [row.tolist() for row in np.split(tokens, np.cumsum(lengths)[:-1])]
    mismatched = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatched, (prefix, mismatched[:3])
  assert max(len(ids) for ids in stored) == 512  # the long texts were cut to the stored maximum


def test_a_prefix_without_trailing_whitespace_or_a_length_beyond_the_stored_ids_is_refused(tokenizer):
  pre = pretokenized.Pretokenizer(tokenizer)
  with pytest.raises(ValueError, match="does not end in whitespace"):
    pre.row("query:", [5], 16)
  pre.check_max_length(130, 128)  # 2 special tokens
  with pytest.raises(ValueError, match="passage_max_length 131 needs up to 129 ids per text, but the dataset "
                                       "stores at most 128"):
    pre.check_max_length(131, 128, "passage_max_length")


def test_fingerprint_names_the_tokenizer_files(tmp_path, minilm_dir, me5_small_dir):
  import shutil
  assert pretokenized.fingerprint(minilm_dir) != pretokenized.fingerprint(me5_small_dir)
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in pretokenized.FINGERPRINT_FILES:
    src = f"{minilm_dir}/{name}"
    try:
      shutil.copy(src, copy / name)
    except FileNotFoundError:
      continue
  assert pretokenized.fingerprint(str(copy)) == pretokenized.fingerprint(minilm_dir)
  (copy / "tokenizer.json").write_text("{}", encoding="utf-8")
  assert pretokenized.fingerprint(str(copy)) != pretokenized.fingerprint(minilm_dir)


def test_a_tokenizer_that_is_not_word_by_word_is_refused_before_a_build(tmp_path):
  """A byte-level BPE (GPT-2 / RoBERTa style) puts a word's leading space into its first token, so "query: "
  + stored ids differs from tokenizing the prefixed text: the build refuses it, naming the folder."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from data_pipelines import builders, readers
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(["query: hello world", "passage: hello there", "x y z"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
  folder = tmp_path / "bytelevel"
  folder.mkdir()
  bpe.save(str(folder / "tokenizer.json"))
  pairs = tmp_path / "p.jsonl"
  pairs.write_text('{"query": "q", "passage": "p"}\n', encoding="utf-8")
  with pytest.raises(readers.InputError, match=f"--tokenizer {folder}: this tokenizer does not tokenize word by word"):
    builders.build("custom", str(tmp_path / "data"), [str(pairs)], tokenizer_dir=str(folder))
