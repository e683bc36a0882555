"""Mixture sampler: proportions, same-source batches, host split, epochs, resume, bad configuration."""
import json

import numpy as np
import pytest

from data_pipelines.mixture import MixtureConfig, MixtureSampler, mixture_probs, permute

# mE5 report Table 1, sampled pairs (millions): the spec the default weights must follow.
TABLE1_M = {"wikipedia": 150, "mc4": 160, "cc_news": 160, "nllb": 160, "reddit": 160, "s2orc": 50,
            "stackexchange": 50, "xp3": 80, "sbert": 10}


def plans(sampler, steps):
  return [sampler.next_plan() for _ in range(steps)]


def stream(sampler, steps):
  """(source name, record index) in consumption order: by step, then by global row."""
  return [(sampler.names[s], i) for p in plans(sampler, steps) for s, i in zip(p.sources, p.indices)]


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_permute_is_a_bijection_and_keyed(n):
  perm = permute(np.arange(n), n, 7, 1)
  np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  if n >= 64:
    assert not np.array_equal(perm, permute(np.arange(n), n, 7, 2))
    assert not np.array_equal(perm, np.arange(n))
  np.testing.assert_array_equal(perm[3 % n::5], permute(np.arange(n)[3 % n::5], n, 7, 1))


def test_permute_of_many_sources_at_once_is_each_ones_permutation():
  """next_plan permutes a batch's rows of every source and epoch in one call: element i must get exactly
  permutation (n[i], key[i]) evaluated at its position."""
  rng = np.random.default_rng(0)
  n = rng.choice([1, 7, 4097, 31051, 10**9], 300)
  positions, epochs = rng.integers(0, n), rng.integers(0, 3, 300)
  together = permute(positions, n, 5, 3, epochs)
  alone = [permute(np.array([p]), int(m), 5, 3, int(e))[0] for p, m, e in zip(positions, n, epochs)]
  np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_mixed_proportions_match_weights_within_3_sigma(alpha):
  sampler = MixtureSampler({n: 10**6 for n in TABLE1_M}, MixtureConfig(global_batch_size=100, seed=3,
                                                                        alpha=alpha))
  names = [name for name, _ in stream(sampler, 100)]  # 10k examples
  w = np.array([TABLE1_M[n] for n in sorted(TABLE1_M)], float) ** alpha
  p = w / w.sum()
  counts = np.array([names.count(n) for n in sorted(TABLE1_M)])
  sigma = np.sqrt(len(names) * p * (1 - p))
  assert np.all(np.abs(counts - len(names) * p) <= 3 * sigma), (counts, len(names) * p, sigma)


def test_same_source_batches_are_pure_and_weighted():
  sizes = {"wikipedia": 500, "sbert": 500, "xp3": 500}
  sampler = MixtureSampler(sizes, MixtureConfig(global_batch_size=4, seed=1, same_source_batches=True))
  batch_sources = []
  for plan in plans(sampler, 3000):
    assert len(set(plan.sources.tolist())) == 1
    batch_sources.append(sampler.names[plan.sources[0]])
  w = np.array([TABLE1_M[n] for n in sorted(sizes)], float)
  p = w / w.sum()
  counts = np.array([batch_sources.count(n) for n in sorted(sizes)])
  assert np.all(np.abs(counts - 3000 * p) <= 3 * np.sqrt(3000 * p * (1 - p))), counts


@pytest.mark.parametrize("same_source", [False, True])
def test_two_hosts_are_disjoint_cover_each_epoch_and_match_one_host(same_source):
  sizes = {"wikipedia": 96, "nllb": 40}
  cfg = MixtureConfig(global_batch_size=8, seed=5, same_source_batches=same_source)
  hosts = [MixtureSampler(sizes, cfg, process_index=p, process_count=2) for p in range(2)]
  single = MixtureSampler(sizes, cfg)
  per_host = [plans(h, 60) for h in hosts]
  merged = []
  for step, (p0, p1, ref) in enumerate(zip(*per_host, plans(single, 60))):
    assert len(p0.indices) == len(p1.indices) == 4
    # the global batch does not depend on the number of hosts; each host holds its slice
    np.testing.assert_array_equal(np.concatenate([p0.indices, p1.indices]), ref.indices)
    np.testing.assert_array_equal(np.concatenate([p0.sources, p1.sources]), ref.sources)
    merged += [(single.names[s], i, host) for host, p in ((0, p0), (1, p1))
               for s, i in zip(p.sources, p.indices)]
  for name, n in sizes.items():
    seen = [(i, host) for src, i, host in merged if src == name]
    assert len(seen) >= 2 * n, "test needs two epochs of every source"
    first, second = seen[:n], seen[n:2 * n]
    for epoch in (first, second):  # each epoch is a permutation; hosts split it without overlap
      assert sorted(i for i, _ in epoch) == list(range(n))
      host0 = {i for i, h in epoch if h == 0}
      host1 = {i for i, h in epoch if h == 1}
      assert host0.isdisjoint(host1) and host0 | host1 == set(range(n))
    assert [i for i, _ in first] != [i for i, _ in second], "epochs must be reshuffled"
  assert hosts[0].get_state() == hosts[1].get_state() == single.get_state()


def test_epoch_counts():
  sampler = MixtureSampler({"a": 10, "b": 30}, MixtureConfig(global_batch_size=8, weights={"a": 1, "b": 1}))
  names = [name for name, _ in stream(sampler, 25)]
  epochs = sampler.epochs()
  assert epochs == {"a": names.count("a") / 10, "b": names.count("b") / 30}
  assert epochs["a"] > 5 and sum(epochs[n] * s for n, s in (("a", 10), ("b", 30))) == 200


@pytest.mark.parametrize("same_source", [False, True])
def test_resume_gives_the_same_following_plans(same_source):
  sizes = {"wikipedia": 37, "mc4": 11, "sbert": 5}
  cfg = MixtureConfig(global_batch_size=6, seed=9, same_source_batches=same_source, alpha=0.3)
  for process_index in range(2):
    first = MixtureSampler(sizes, cfg, process_index, 2)
    plans(first, 23)
    state = json.loads(json.dumps(first.get_state()))
    expected = plans(first, 17)
    fresh = MixtureSampler(sizes, cfg, process_index, 2)
    fresh.set_state(state)
    for a, b in zip(expected, plans(fresh, 17)):
      assert a.step == b.step
      np.testing.assert_array_equal(a.indices, b.indices)
      np.testing.assert_array_equal(a.sources, b.sources)


def test_seed_changes_the_stream_and_same_seed_repeats_it():
  sizes = {"a": 1000, "b": 1000}
  make = lambda seed: stream(MixtureSampler(sizes, MixtureConfig(16, seed=seed)), 5)  # noqa: E731
  assert make(1) == make(1) and make(1) != make(2)


def test_default_weights_fall_back_to_sizes_for_unknown_sources():
  probs = mixture_probs({"wikipedia": 10, "msmarco": 300, "nq": 100})
  total = 150e6 + 300 + 100
  assert probs == pytest.approx({"wikipedia": 150e6 / total, "msmarco": 300 / total, "nq": 100 / total})


@pytest.mark.parametrize("sizes,cfg,kwargs,message", [
    ({"a": 5}, MixtureConfig(4, weights={"a": 1, "nope": 2}), {}, "unknown source 'nope'"),
    ({"a": 5, "b": 5}, MixtureConfig(4, weights={"a": 1}), {}, "source 'b' has no mixture weight"),
    ({"a": 5}, MixtureConfig(4, weights={"a": -1}), {}, "must be >= 0"),
    ({"a": 0, "b": 3}, MixtureConfig(4, weights={"a": 1, "b": 1}), {}, "source 'a' is empty"),
    ({"a": 5}, MixtureConfig(4, weights={"a": 0}), {}, "all mixture weights are zero"),
    ({"a": 5}, MixtureConfig(6), {"process_count": 4}, "multiple of process_count=4"),
    ({"a": 5}, MixtureConfig(8), {"process_index": 2, "process_count": 2}, "outside [0, 2)"),
])
def test_bad_configuration_fails_at_construction(sizes, cfg, kwargs, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
    MixtureSampler(sizes, cfg, **kwargs)


def test_state_for_other_sources_is_refused():
  state = MixtureSampler({"a": 5}, MixtureConfig(4)).get_state()
  with pytest.raises(ValueError, match="iterator state is for sources"):
    MixtureSampler({"a": 6}, MixtureConfig(4)).set_state(state)
