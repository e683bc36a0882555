"""Sequence packing: the first-fit packer, packed encoder rows against padded rows (BERT and XLM-R
positions), the Batcher's packed layout, and the hash dropout the encoder uses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.batch import slots_per_row
from data_pipelines.preprocess import agree_shapes, pack_texts, pack_token_rows
from me5_jax import encoder as enc
from me5_jax.tokenize import pad_rows
from me5_jax.variants import get_variant


def first_fit_decreasing(lengths, row_length, max_segments):
  """The packing rule, text by text: longest first (ties by index), each into the first row with room."""
  rows, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    r = next((r for r in range(len(rows)) if room[r] >= lengths[i] and len(rows[r]) < max_segments), len(rows))
    if r == len(rows):
      rows.append([])
      room.append(row_length)
    rows[r].append(i)
    room[r] -= lengths[i]
  return rows


def test_pack_texts_places_every_text_once_within_capacity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 33, 200).tolist()
  row_T, segment_T = pack_texts(lengths, 32, 4)
  assert sorted(zip(row_T.tolist(), segment_T.tolist())) == sorted(set(zip(row_T.tolist(), segment_T.tolist())))
  assert all(np.bincount(row_T, weights=lengths) <= 32) and np.bincount(row_T).max() <= 4
  assert row_T.max() + 1 < 200 * 0.75  # short texts share rows
  with pytest.raises(ValueError, match="33 tokens does not fit packed rows of 32"):
    pack_texts([33], 32, 4)


@pytest.mark.parametrize("seed", range(40))
def test_pack_texts_is_first_fit_decreasing_text_by_text(seed):
  """pack_texts places a length's texts in one array step; the layout is the text-by-text one."""
  rng = np.random.default_rng(seed)
  row_length = int(rng.choice([8, 32, 128]))
  lengths = rng.integers(0 if seed % 5 == 0 else 1, row_length + 1, int(rng.integers(0, 300))).tolist()
  if seed % 3 == 0:  # many equal lengths, as short Bible verses give
    lengths = rng.choice([2, 3, row_length // 2, row_length], len(lengths)).tolist()
  max_segments = int(rng.choice([1, 2, 4, row_length // 4]))
  row_T, segment_T = pack_texts(lengths, row_length, max_segments)
  want = first_fit_decreasing(lengths, row_length, max_segments)
  assert [[t for t in np.flatnonzero(row_T == r)[np.argsort(segment_T[row_T == r])]] for r in range(len(want))] == want
  assert row_T.max(initial=-1) + 1 == len(want)


def test_pack_token_rows_layout_and_slots():
  rows = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
  ids, segments, slots = pack_token_rows(*pad_rows(rows, 1), 8, pad_id=1, row_multiple=4, process_index=2)
  assert ids.shape == (4, 8)  # 2 rows needed → 4 (multiple)
  batch = agree_shapes({"packed_ids": ids, "packed_segments": segments, "query_slots": slots[:2],
                        "passage_slots": slots[2:]}, lambda kind, n: n + 4, 2, pad_id=1)
  ids, segments, slots = (batch["packed_ids"], batch["packed_segments"],
                          np.concatenate([batch["query_slots"], batch["passage_slots"]]))
  assert ids.shape == segments.shape == (8, 8)  # → 8 (agreed)
  num_slots = slots_per_row(8)
  for t, row in enumerate(rows):
    r, s = divmod(int(slots[t]), num_slots)
    r -= 2 * 8  # host 2's rows follow hosts 0 and 1
    assert ids[r][segments[r] == s + 1].tolist() == row
  assert (ids[segments == 0] == 1).all()


@pytest.mark.parametrize("variant", ["tiny-bert", "tiny-xlmr"])
def test_packed_rows_embed_like_padded_rows(variant):
  cfg = get_variant(variant)
  params = enc.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  rows = [rng.integers(5, 200, n).tolist() for n in rng.integers(2, 17, 12)]
  pad = cfg.pad_token_id
  ids = np.full((12, 16), pad, np.int32)
  mask = np.zeros((12, 16), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  expected = np.asarray(enc.embed(params, ids, mask, cfg))
  p_ids, p_segments, slots = pack_token_rows(*pad_rows(rows, pad), 32, pad)
  assert p_ids.shape[0] < 12
  emb = np.asarray(enc.embed_packed(params, p_ids, p_segments, slots_per_row(32), cfg))
  np.testing.assert_allclose(emb.reshape(-1, emb.shape[-1])[slots], expected, atol=1e-5)


def test_hash_dropout_rate_scale_and_keys():
  x = jnp.ones((4, 16, 128))
  text_ids = jnp.broadcast_to(jnp.arange(4)[:, None], (4, 16))
  token = enc.token_keys(text_ids, jnp.broadcast_to(jnp.arange(16), (4, 16)))
  drop = enc.Dropout(0.1)
  out = lambda seed, t=token: np.asarray(drop.apply({}, x, t, False, rngs={"dropout": jax.random.key(seed)}))
  a, b = out(0), out(1)
  assert abs((a == 0).mean() - 0.1) < 0.01
  np.testing.assert_allclose(a[a != 0], 1 / 0.9, rtol=1e-6)
  assert (a == out(0)).all() and ((a == 0) != (b == 0)).mean() > 0.1
  rows = (a == 0).reshape(64, 128)
  assert len({tuple(r) for r in rows}) == 64  # no repeating pattern across tokens
  # The mask follows the token key, not the array position: texts 0 and 3 swapped → rows swapped.
  swapped = out(0, token[::-1])
  np.testing.assert_array_equal(swapped, a[::-1])
  np.testing.assert_array_equal(drop.apply({}, x, token, True), x)
