"""Shard invariance: with `axis_name`, 4 devices give the single-device bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from tests import reference
from tests.helpers import AXIS
from tests.helpers import DEVICES
from tests.helpers import activations
from tests.helpers import run_shard_map


def run_pmap(fn, a):
  """fn(local_a) -> tuple of outputs with a leading token or device axis."""
  shards = a.reshape((DEVICES, -1) + a.shape[1:])
  return [np.asarray(x).reshape((-1,) + x.shape[2:])
          for x in jax.pmap(fn, axis_name=AXIS)(shards)]


def all_rules(a, k, l, key, axis_name, search="auto"):
  """Every output the invariance covers; per-device copies get a leading axis."""
  scores = [sae_jax.column_scores(a, m, axis_name=axis_name)
            for m in ("l2", "squared_l2", "entropy")]
  pooled = sae_jax.sampled_select_pooled(a, k, l, key=key, axis_name=axis_name, search=search)
  return (
      *[s[None] for s in scores],
      sae_jax.candidate_pool(scores[0], 5)[None],
      pooled.pool[None],
      pooled.values,
      sae_jax.batch_topk(a, k, axis_name=axis_name, search=search),
      sae_jax.sampled_select(a, k, l, key=key, axis_name=axis_name, search=search),
      sae_jax.sampled_select(a, k, l, score="entropy", key=key, axis_name=axis_name,
                             search=search),
  )


DATA = {
    # 12 tokens per device: the CPU column sums scan 8-token blocks plus a rest.
    "dense": activations((48, 37), seed=10, zeros=0.3, zero_rows=2),
    # Ties at the threshold that straddle shard boundaries.
    "ties": activations((24, 37), seed=11, zeros=0.2, levels=2),
    # Token 13 (on device 2) outranks everything: the exact fallback path.
    "concentrated": activations((24, 37), seed=12, zeros=0.1) + 50.0 * (np.arange(24) == 13)[:, None],
}


# shard_map (what training uses) on every data set; the legacy pmap, which
# compiles twice as slowly, on the dense one only: the rules are the same code.
RUNS = [(run_shard_map, data) for data in sorted(DATA)] + [(run_pmap, "dense")]


@pytest.mark.slow
@pytest.mark.parametrize("runner, data", RUNS)
@pytest.mark.parametrize("sampled", [False, True])
def test_sharded_equals_single_device_bit_for_bit(runner, data, sampled, threshold_path):
  a = DATA[data].astype(np.float32)
  k, l = 3, 2.5
  # Each device is handed a different key: the first device's must be used.
  key_for = lambda i: jax.random.fold_in(jax.random.key(7), i) if sampled else None
  single = all_rules(jnp.asarray(a), k, l, key_for(0), None, threshold_path)
  sharded = runner(lambda x: all_rules(x, k, l, key_for(jax.lax.axis_index(AXIS)), AXIS,
                                       threshold_path), a)
  for got, want in zip(sharded, single):
    want = np.asarray(want)
    if got.shape[0] == DEVICES and want.shape[0] == 1:  # replicated output
      want = np.broadcast_to(want, got.shape)
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(  # and the single device is right
      single[-3], reference.apply(a, reference.batch_topk_mask(a, k)))


@pytest.mark.slow
@pytest.mark.parametrize("runner", [run_pmap, run_shard_map])
def test_without_axis_name_each_shard_selects_alone(runner):
  a = DATA["dense"].astype(np.float32)
  k, l = 3, 2.5
  sharded = runner(lambda x: all_rules(x, k, l, None, None), a)
  shards = a.reshape(DEVICES, -1, a.shape[1])
  alone = [all_rules(jnp.asarray(s), k, l, None, None) for s in shards]
  for i, got in enumerate(sharded):
    np.testing.assert_array_equal(got, np.concatenate([np.asarray(x[i]) for x in alone]))
  assert not np.array_equal(sharded[-3], np.asarray(all_rules(jnp.asarray(a), k, l, None, None)[-3]))


@pytest.mark.parametrize("runner", [run_pmap, run_shard_map])
@pytest.mark.parametrize("sketch", [None, 8])
def test_leverage_scores_and_pools_are_shard_invariant(runner, sketch):
  # Exact scores gather the batch on every device; the sketch is summed
  # exactly. Either way every device computes the single-device bits.
  a = DATA["dense"].astype(np.float32)
  key_for = lambda i: jax.random.fold_in(jax.random.key(3), i)

  def rules(x, key, axis_name):
    options = dict(score="leverage", sketch=sketch, sketch_key=key, axis_name=axis_name)
    return (sae_jax.column_scores(x, "leverage", sketch=sketch, key=key, axis_name=axis_name)[None],
            sae_jax.sampled_pool(x, 3, 2.5, **options)[None],
            sae_jax.sampled_select(x, 3, 2.5, **options))

  single = rules(jnp.asarray(a), key_for(0), None)
  sharded = runner(lambda x: rules(x, key_for(jax.lax.axis_index(AXIS)), AXIS), a)
  for got, want in zip(sharded, single):
    want = np.asarray(want)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
  if sketch is None:
    np.testing.assert_allclose(single[0][0], reference.scores(a, "leverage"), rtol=1e-5,
                               atol=1e-7)
