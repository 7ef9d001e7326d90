"""The synthetic source: its statistics, determinism and ground truth."""

import dataclasses

import numpy as np
import pytest

from sae_jax import synthetic
from sae_jax.synthetic import SyntheticConfig

LOTTERY = SyntheticConfig(d_model=16, n_features=40, active=3.0, noise=0.0,
                          rare_fraction=0.25, rare_rate=0.1, rare_magnitude=5.0, seed=3)


def test_rates_magnitudes_and_classes():
  assert LOTTERY.n_rare == 10
  np.testing.assert_array_equal(LOTTERY.feature_class(), [1] * 10 + [0] * 30)
  rates = LOTTERY.firing_rates()
  assert rates.sum() == pytest.approx(3.0)
  assert rates[0] == pytest.approx(0.1 * rates[-1])
  np.testing.assert_allclose(LOTTERY.magnitudes(), [5.0] * 10 + [1.0] * 30)


def test_batches_follow_the_process():
  source = synthetic.SyntheticSource(LOTTERY)
  np.testing.assert_allclose(np.linalg.norm(source.dictionary, axis=1), 1, rtol=1e-6)
  x = source.sample(0, 20_000)
  # E[x] = Σ_i p_i m_i d_i, as E[u] = 1.
  codes_mean = LOTTERY.firing_rates() * LOTTERY.magnitudes()
  np.testing.assert_allclose(x.mean(0), codes_mean @ source.dictionary, atol=0.05)
  # Same step, same batch; another step, another batch; sharded layout for devices.
  np.testing.assert_array_equal(source.sample(7, 64), source.sample(7, 64))
  assert not np.array_equal(source.sample(7, 64), source.sample(8, 64))
  batches = source.batches(64, n_devices=4, start_step=7)
  first = next(batches)
  assert first.shape == (4, 16, 16)
  np.testing.assert_array_equal(first.reshape(64, 16), source.sample(7, 64))
  np.testing.assert_array_equal(next(batches).reshape(64, 16), source.sample(8, 64))


HIERARCHY = SyntheticConfig(d_model=16, n_features=40, active=3.0, noise=0.0, rare_fraction=0.1,
                            parents=3, children=4, child_given_parent=0.6, seed=4)


@pytest.mark.parametrize("parent_rate", [1.0, 3.0])
def test_hierarchy_children_fire_only_with_their_parent(parent_rate):
  c = dataclasses.replace(HIERARCHY, parent_rate=parent_rate)
  kind, parent_of = c.feature_class(), c.parent_of()
  np.testing.assert_array_equal(kind, [synthetic.RARE] * 4 + [synthetic.PARENT] * 3
                                + [synthetic.CHILD] * 12 + [synthetic.FREQUENT] * 21)
  np.testing.assert_array_equal(parent_of[7:19], np.repeat([4, 5, 6], 4))
  assert np.all(parent_of[kind != synthetic.CHILD] == synthetic.NO_PARENT)
  source = synthetic.SyntheticSource(c)
  x, codes = source.sample_with_codes(0, 40_000)
  np.testing.assert_array_equal(x, source.sample(0, 40_000))
  np.testing.assert_allclose(codes @ source.dictionary, x, rtol=1e-5, atol=1e-5)  # noise 0
  fires = codes > 0
  rates = c.firing_rates()
  assert rates.sum() == pytest.approx(3.0)
  assert rates[4] / rates[-1] == pytest.approx(parent_rate)  # a parent against a frequent one
  np.testing.assert_allclose(fires.mean(0), rates, atol=0.01)
  for parent in (4, 5, 6):
    kids = fires[:, parent_of == parent]
    assert not (kids.any(1) & ~fires[:, parent]).any()  # never without the parent
    assert kids.sum(1).max() == 1  # at most one child at a time
    # With the parent: a child 60% of the time, each child equally often.
    np.testing.assert_allclose(kids[fires[:, parent]].mean(0), 0.15, atol=0.02)
  rest = kind != synthetic.CHILD  # the others fire independently, as before
  np.testing.assert_allclose(np.corrcoef(fires[:, rest].T)[np.triu_indices(rest.sum(), 1)], 0,
                             atol=0.03)


def test_best_cosines():
  source = synthetic.SyntheticSource(LOTTERY)
  np.testing.assert_allclose(synthetic.best_cosines(3 * source.dictionary[::-1], source.dictionary),
                             1, rtol=1e-9)
  w = np.eye(16)[:2]
  d = np.array([[1.0, 1.0] + [0.0] * 14])
  np.testing.assert_allclose(synthetic.best_cosines(w, d), [np.sqrt(0.5)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=0), r"SyntheticConfig.d_model must be an integer >= 1; got 0"),
    (dict(active=-1.0), r"SyntheticConfig.active must be a number in \[0, 512\]; got -1.0"),
    (dict(n_features=1), r"SyntheticConfig: 1 features \(--synthetic-features\) cannot have 4 "
                         r"active per token on average: give at least 4 features"),
    (dict(spread=2.0), r"SyntheticConfig.spread must be a number in \[0, 1\]; got 2.0"),
    (dict(n_features=4, active=3.0, rare_fraction=0.5, rare_rate=3.0),
     r"needs a firing probability above 1"),
    (dict(seed=-2), r"SyntheticConfig.seed must be an integer in \[0, 4294967295\]; got -2"),
    (dict(n_features=9, active=2.0, parents=2, children=4),
     r"0 rare features and 2 parents with 4 children each need 10 features; n_features is 9"),
    (dict(child_given_parent=1.5), r"SyntheticConfig.child_given_parent must be a number in"),
    (dict(parent_rate=0.0), r"SyntheticConfig.parent_rate must be a number in"),
])
def test_bad_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SyntheticConfig(**kwargs)


def test_batches_must_split_over_devices():
  with pytest.raises(ValueError, match="batch_size 10 must be divisible by n_devices=4"):
    next(synthetic.SyntheticSource(LOTTERY).batches(10, n_devices=4))
