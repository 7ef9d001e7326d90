"""The Matryoshka loss against NumPy, its hand-written gradients against
autodiff, and its config's checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import matryoshka
from sae_jax import runconfig
from sae_jax import synthetic
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig

B, D, F = 12, 5, 10
NESTED = matryoshka.Nested((2, 3, 5), (2.0, 1.0, 0.5))


def codes(seed, density=0.3):
  rng = np.random.default_rng(seed)
  z = rng.exponential(size=(B, F)).astype(np.float32)
  return np.where(rng.random((B, F)) < density, z, 0).astype(np.float32)


def params(seed):
  rng = np.random.default_rng(seed)
  return {"W_enc": rng.standard_normal((D, F)).astype(np.float32),
          "b_enc": rng.standard_normal(F).astype(np.float32) * 0.1,
          "W_dec": rng.standard_normal((F, D)).astype(np.float32),
          "b_dec": rng.standard_normal(D).astype(np.float32)}


def test_loss_is_the_weighted_mean_over_prefixes():
  x, z, p = np.random.default_rng(0).standard_normal((B, D)), codes(1), params(2)
  want, ends = 0.0, np.cumsum(NESTED.sizes)
  for end, weight in zip(ends, NESTED.weights):  # prefix i: its groups' latents alone
    xhat = z[:, :end] @ p["W_dec"][:end] + p["b_dec"]
    want += weight * np.mean(np.sum((x - xhat) ** 2, axis=1))
  got, xhat = matryoshka.loss(jnp.asarray(x, jnp.float32), z, p["W_dec"], p["b_dec"], NESTED)
  np.testing.assert_allclose(float(got), want / 3, rtol=1e-5)
  np.testing.assert_allclose(xhat, z @ p["W_dec"] + p["b_dec"], rtol=1e-5, atol=1e-5)
  assert matryoshka.group_sizes((0.3, 0.3, 0.4), 10) == (3, 3, 4)
  assert matryoshka.group_of(jnp.arange(F), NESTED.sizes).tolist() == [0] * 2 + [1] * 3 + [2] * 5


def reference_grads(x, z_BxF, p):
  """Autodiff of `matryoshka.loss` through the codes z = relu(pre) on their support."""
  support = z_BxF > 0

  def f(p):
    centred = x - p["b_dec"][None, :]
    z = jnp.where(support, centred @ p["W_enc"] + p["b_enc"][None, :], 0)
    return matryoshka.loss(x, z, p["W_dec"], p["b_dec"], NESTED)[0]

  return jax.grad(f)(p)


def test_fast_gradients_equal_autodiff():
  """Dense codes over all F (groups as slices), a pool of columns in any
  order (groups by index), and a list of entries."""
  p, x = params(3), np.random.default_rng(4).standard_normal((B, D)).astype(np.float32)
  centred = x - p["b_dec"]
  pre = centred @ p["W_enc"] + p["b_enc"]
  z = np.where((codes(5) > 0) & (pre > 0), pre, 0).astype(np.float32)
  want = reference_grads(x, z, p)
  value, _ = matryoshka.loss(x, z, p["W_dec"], p["b_dec"], NESTED)

  def close(got, cols=slice(None)):
    for name, g in got.items():
      w = want[name] if name == "b_dec" else (want[name][..., cols] if name != "W_dec"
                                              else want[name][cols])
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)

  _, got_value, grads = matryoshka.through_codes(x, centred, z, p["W_enc"], p["W_dec"],
                                                 p["b_dec"], NESTED)
  np.testing.assert_allclose(got_value, value, rtol=1e-6)
  close(grads)
  pool = np.array([7, 0, 4, 9, 2, 5], np.int32)  # every used column must be in the pool
  z_pool = np.where(np.isin(np.arange(F), pool), z, 0).astype(np.float32)
  want = reference_grads(x, z_pool, p)
  _, _, grads = matryoshka.through_codes(
      x, centred, z_pool[:, pool], p["W_enc"][:, pool], p["W_dec"][pool], p["b_dec"], NESTED,
      matryoshka.group_of(pool, NESTED.sizes))
  close(grads, pool)
  rows, cols = np.nonzero(z)
  want = reference_grads(x, z, p)
  _, got_value, grads = matryoshka.through_entries(
      x, centred, jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), z[rows, cols],
      jax.tree.map(jnp.asarray, p), NESTED)
  np.testing.assert_allclose(got_value, value, rtol=1e-6)
  close(grads)


@pytest.mark.parametrize("kwargs, message", [
    (dict(matryoshka_groups=(0.5, 0.4)), r"must sum to 1 .* got \[0.5, 0.4\], which sum to 0.9"),
    (dict(matryoshka_groups=(0.5, 0.0, 0.5)), r"matryoshka_groups must be fractions"),
    (dict(matryoshka_groups=(0.05, 0.95)), r"cut the 10 latents into groups of \[0, 10\]"),
    (dict(matryoshka_groups=(0.5, 0.5), matryoshka_weights=(1.0,)),
     r"matryoshka_weights must be one non-negative number per group \(2\)"),
    (dict(matryoshka_weights=(1.0, 1.0)), r"matryoshka_weights .* give matryoshka_groups too"),
    (dict(matryoshka_groups=(0.5, 0.5), matryoshka_weights=(0.0, 0.0)), r"are all 0"),
])
def test_bad_groups_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(SAEConfig(D, F, k=2), batch_size=8, steps=10, **kwargs)


def test_a_config_json_round_trip_keeps_the_groups():
  """Through JSON and back, and as a resume compares a saved config.json."""
  c = TrainConfig(SAEConfig(D, F, k=2), batch_size=8, steps=10,
                  matryoshka_groups=(0.2, 0.8), matryoshka_weights=(1.0, 3.0))
  d = json.loads(json.dumps(c.to_dict()))
  assert d == c.to_dict() and TrainConfig.from_dict(d) == c
  run = RunConfig(train=c, out="run", data="synthetic",
                  synthetic=synthetic.SyntheticConfig(d_model=D))
  assert runconfig.differences(json.loads(json.dumps(run.to_dict())), run) == []
  assert c.nested == matryoshka.Nested((2, 8), (1.0, 3.0))
  assert TrainConfig(SAEConfig(D, F, k=2), batch_size=8, steps=10).nested is None
