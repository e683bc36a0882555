"""The read path over token ids stored at build time (`build --tokenizer`) gives the very batches of the
on-the-fly path (ids, masks, hashes, packed layout, teacher scores), for both real tokenizers, stage 1 and
stage 2, with the E5 prefixes and with the instruct template; a mismatched tokenizer or a max length beyond
the stored ids is a one-line error at construction."""
import json

import numpy as np
import pytest

from data_pipelines import builders, pretokenized
from data_pipelines.input_pipeline import InputPipeline
from data_pipelines.mixture import MixtureConfig
from data_pipelines.preprocess import PreprocessConfig
from data_pipelines.source import open_source
from me5_jax.tokenize import Tokenizer
from multilingual_texts import LONG_TEXT, SENTENCES

TEXTS = SENTENCES + [LONG_TEXT, "  leading and trailing spaces  "]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module", params=["all-MiniLM-L6-v2", "me5-small-q4"])
def built(request, tmp_path_factory):
  """(tokenizer, {stage: (text-only source, source with ids)}) for one real tokenizer."""
  from conftest import realdata_path
  tokenizer_dir = realdata_path(request.param)
  tmp = tmp_path_factory.mktemp("pretok")
  n = len(TEXTS)
  pairs = [{"query": TEXTS[i], "passage": TEXTS[(i * 7 + 3) % n]} for i in range(n)]
  stage2 = [{"query": TEXTS[i], "positive": TEXTS[(i + 1) % n],
             "negatives": [TEXTS[(i + j * 5) % n] for j in range(2, 2 + i % 4)],
             "positive_score": 3.0, "negative_scores": [1.0 - j for j in range(i % 4)],
             "task": "Given a question, retrieve passages that answer it" if i % 2 else ""} for i in range(n)]
  out = {}
  for stage, name, rows in ((1, "custom", pairs), (2, "stage2", stage2)):
    files = [write_jsonl(tmp / f"{name}.jsonl", rows)]
    builders.build(name, str(tmp / "text"), files)
    builders.build(name, str(tmp / "ids"), files, tokenizer_dir=tokenizer_dir, max_tokens=128)
    out[stage] = (open_source(str(tmp / "text"), name), open_source(str(tmp / "ids"), name))
  return Tokenizer.from_dir(tokenizer_dir), out


@pytest.mark.parametrize("stage,instruct,packed", [(1, False, False), (1, False, True), (2, False, False),
                                                   (2, True, False), (2, True, True)])
def test_batches_from_stored_ids_equal_the_tokenized_ones(built, stage, instruct, packed):
  tokenizer, sources = built
  text_source, ids_source = sources[stage]
  name = "custom" if stage == 1 else "stage2"
  cfg = PreprocessConfig(stage=stage, max_query_length=64, max_passage_length=128,
                         num_hard_negatives=2 if stage == 2 else 0, instruct=instruct,
                         instructions={name: "Retrieve a passage"}, pack_rows=packed)
  fingerprint = pretokenized.fingerprint(tokenizer.path)
  on_the_fly = InputPipeline({name: text_source}, tokenizer, MixtureConfig(8, seed=3), cfg,
                             tokenizer_fingerprint=fingerprint)
  from_ids = InputPipeline({name: ids_source}, tokenizer, MixtureConfig(8, seed=3), cfg,
                           tokenizer_fingerprint=fingerprint)
  assert from_ids.with_ids == {name: True} and on_the_fly.with_ids == {name: False}
  for _ in range(4):
    want, got = next(on_the_fly), next(from_ids)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("packed", [False, True])
def test_a_mixture_of_text_and_ids_sources_equals_all_text(built, packed):
  """A batch mixing texts to tokenize and stored ids (Batcher._token_rows' mixed case) is the all-text one."""
  tokenizer, sources = built
  text_source, ids_source = sources[1]
  cfg = PreprocessConfig(max_query_length=64, max_passage_length=128, pack_rows=packed)
  fingerprint = pretokenized.fingerprint(tokenizer.path)
  mixture = MixtureConfig(16, seed=1, weights={"custom": 1, "nllb": 1})
  mixed = InputPipeline({"custom": ids_source, "nllb": text_source}, tokenizer, mixture, cfg,
                        tokenizer_fingerprint=fingerprint)
  texts = InputPipeline({"custom": text_source, "nllb": text_source}, tokenizer, mixture, cfg,
                        tokenizer_fingerprint=fingerprint)
  assert mixed.with_ids == {"custom": True, "nllb": False}
  for _ in range(4):
    want, got = next(texts), next(mixed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert min(mixed.get_state()["consumed"].values()) >= 16  # both kinds in the batches


def test_other_tokenizer_or_longer_max_length_is_one_line_naming_both(built, minilm_dir, me5_small_dir):
  tokenizer, sources = built
  _, ids_source = sources[1]
  other = me5_small_dir if tokenizer.path == minilm_dir else minilm_dir
  with pytest.raises(ValueError, match="stores token ids of tokenizer .* but training tokenizes with") as e:
    InputPipeline({"custom": ids_source}, Tokenizer.from_dir(other), MixtureConfig(8), PreprocessConfig(),
                  tokenizer_fingerprint=pretokenized.fingerprint(other))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"passage_max_length \(source 'custom'\) 256 needs up to 254 ids per "
                                       "text, but the dataset stores at most 128"):
    InputPipeline({"custom": ids_source}, tokenizer, MixtureConfig(8), PreprocessConfig(max_passage_length=256),
                  tokenizer_fingerprint=pretokenized.fingerprint(tokenizer.path))
