"""The SAE module: initialisation and its two linear maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax
from sae_jax import model
from sae_jax.config import SAEConfig

D, F = 6, 20
CONFIG = SAEConfig(D, F, k=2, l=2)


def sample(n=50, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, D)).astype(np.float32) + 3.0
  x[:3] += 40.0  # outliers the median must resist
  return jnp.asarray(x)


def test_init_follows_the_recipe():
  x = sample()
  p = model.init_params(jax.random.key(0), model.SAE(CONFIG), x)["params"]
  assert {k: v.shape for k, v in p.items()} == {
      "W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  np.testing.assert_array_equal(p["b_enc"], 0)
  np.testing.assert_array_equal(p["b_dec"], model.geometric_median(x))
  other = model.init_params(jax.random.key(1), model.SAE(CONFIG), x)["params"]
  assert not np.allclose(other["W_dec"], p["W_dec"])


def test_geometric_median_is_the_minimiser():
  x = np.asarray(sample(seed=1), np.float64)
  y = np.asarray(model.geometric_median(jnp.asarray(x)), np.float64)
  cost = lambda z: np.linalg.norm(x - z, axis=1).sum()
  # Optimality: the unit vectors towards the points sum to (nearly) zero.
  pull = ((x - y) / np.linalg.norm(x - y, axis=1, keepdims=True)).sum(0)
  assert np.linalg.norm(pull) < 1e-2 * len(x)
  rng = np.random.default_rng(2)
  for _ in range(20):
    assert cost(y) <= cost(y + 1e-2 * rng.standard_normal(D)) + 1e-6
  assert cost(y) < cost(x.mean(0))


def test_maps_match_their_formulas():
  x = sample(8)
  variables = model.init_params(jax.random.key(3), model.SAE(CONFIG), x)
  rng = np.random.default_rng(4)
  variables = jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32),
                           variables)
  p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
  sae = model.SAE(CONFIG)
  pre = sae.apply(variables, x, method=model.SAE.pre)
  np.testing.assert_allclose(pre, (np.asarray(x) - p["b_dec"]) @ p["W_enc"] + p["b_enc"],
                             rtol=1e-5, atol=1e-5)
  bf16 = model.SAE(SAEConfig(D, F, k=2, compute_dtype="bfloat16")).apply(
      variables, x, method=model.SAE.pre)
  assert bf16.dtype == jnp.float32
  # bfloat16 keeps 8 bits: errors of a few parts in 1000 of the largest terms.
  np.testing.assert_allclose(bf16, pre, atol=0.01 * float(np.abs(pre).max()))
  z = np.maximum(np.asarray(pre), 0)
  np.testing.assert_allclose(sae.apply(variables, z, method=model.SAE.decode),
                             z @ p["W_dec"] + p["b_dec"], rtol=1e-5, atol=1e-5)
  pool = jnp.array([1, 4, 7])
  z_pool = z[:, [1, 4, 7]]
  z_dense = np.zeros_like(z)
  z_dense[:, [1, 4, 7]] = z_pool
  np.testing.assert_allclose(
      sae.apply(variables, z_pool, pool, method=model.SAE.decode_pooled),
      sae.apply(variables, z_dense, method=model.SAE.decode), rtol=1e-5, atol=1e-5)


def test_init_refuses_a_sample_of_the_wrong_width():
  with pytest.raises(ValueError, match=r"sample_NxD must have shape \[N, 6\]"):
    model.init_params(jax.random.key(0), model.SAE(CONFIG), jnp.ones((4, 5)))


def variables_and_pre(seed=5):
  x = sample(16, seed)
  variables = model.init_params(jax.random.key(seed), model.SAE(CONFIG), x)
  pre = model.SAE(CONFIG).apply(variables, x, method=model.SAE.pre)
  return x, variables, pre


@pytest.mark.parametrize("rule, select", [
    ("topk", lambda a: sae_jax.topk(a, 2)),
    ("batchtopk", lambda a: sae_jax.batch_topk(a, 2)),
    ("sampled", lambda a: sae_jax.sampled_select(a, 2, 3.0, score="entropy")),
])
def test_training_encode_is_the_configured_rule(rule, select):
  x, variables, pre = variables_and_pre()
  sae = model.SAE(SAEConfig(D, F, k=2, selection=rule, l=3.0, score="entropy"))
  np.testing.assert_array_equal(sae.apply(variables, x, method=model.SAE.encode),
                                select(jax.nn.relu(pre)))


def test_sampled_pool_is_drawn_only_when_configured():
  x, variables, pre = variables_and_pre()
  a = jax.nn.relu(pre)
  key = jax.random.key(7)
  drawn = model.SAE(SAEConfig(D, F, k=2, l=2, sample_pool=True)).apply(
      variables, x, key=key, method=model.SAE.encode)
  np.testing.assert_array_equal(drawn, sae_jax.sampled_select(a, 2, 2, key=key))
  top = model.SAE(CONFIG).apply(variables, x, key=key, method=model.SAE.encode)
  np.testing.assert_array_equal(top, sae_jax.sampled_select(a, 2, 2))


@pytest.mark.xla_default
def test_inference_keeps_entries_above_the_threshold_token_by_token():
  x, variables, pre = variables_and_pre()
  a = np.maximum(np.asarray(pre), 0)
  theta = float(np.quantile(a[a > 0], 0.5))
  for rule in ("batchtopk", "sampled"):
    sae = model.SAE(SAEConfig(D, F, k=2, selection=rule))
    z = sae.apply(variables, x, theta, method=model.SAE.encode_inference)
    np.testing.assert_array_equal(z, np.where(a > theta, a, 0))
    # One token alone gets the code it gets inside the batch.
    np.testing.assert_array_equal(
        sae.apply(variables, x[3:4], theta, method=model.SAE.encode_inference), z[3:4])
  topk = model.SAE(SAEConfig(D, F, k=2, selection="topk"))
  np.testing.assert_array_equal(
      topk.apply(variables, x, theta, method=model.SAE.encode_inference),
      sae_jax.topk(jnp.asarray(a), 2))
