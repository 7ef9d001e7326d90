"""Losses: NumPy references, and shares that average to the global value."""

import jax
import numpy as np

from sae_jax import losses
from tests import reference

B, D, F, K_AUX = 16, 5, 12, 3


def data(seed=0):
  rng = np.random.default_rng(seed)
  pre = rng.standard_normal((B, F)).astype(np.float32)
  residual = rng.standard_normal((B, D)).astype(np.float32)
  w = rng.standard_normal((F, D)).astype(np.float32)
  dead = np.arange(F) % 3 == 0
  return pre, dead, residual, w


def auxk_reference(pre, dead, residual, w):
  a = np.where(dead[None, :], np.maximum(np.asarray(pre, np.float64), 0), 0)
  z = reference.apply(a, reference.topk_mask(a, K_AUX))
  e = np.asarray(residual, np.float64)
  return ((e - z @ w) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


def test_auxk_matches_reference_and_is_zero_without_dead_latents():
  pre, dead, residual, w = data()
  np.testing.assert_allclose(losses.auxk_loss(pre, dead, residual, w, K_AUX),
                             auxk_reference(pre, dead, residual, w), rtol=1e-5)
  assert losses.auxk_loss(pre, np.zeros(F, bool), residual, w, K_AUX) == 0


def test_auxk_gradient_reaches_only_dead_latents_and_not_the_residual():
  pre, dead, residual, w = data(1)
  g_pre, g_res, g_w = jax.grad(losses.auxk_loss, argnums=(0, 2, 3))(pre, dead, residual, w, K_AUX)
  assert np.all(np.asarray(g_pre)[:, ~dead] == 0) and np.any(np.asarray(g_pre)[:, dead] != 0)
  assert np.all(np.asarray(g_res) == 0)
  assert np.all(np.asarray(g_w)[~dead] == 0)


def test_fvu_and_mse():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((B, D)).astype(np.float32)
  xhat = x + 0.3 * rng.standard_normal((B, D)).astype(np.float32)
  x64, xhat64 = np.float64(x), np.float64(xhat)
  np.testing.assert_allclose(losses.fvu(x, xhat),
                             ((x64 - xhat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum(),
                             rtol=1e-5)
  # Summed over D, averaged over tokens, as dictionary_learning's and SAELens' losses.
  np.testing.assert_allclose(losses.mse(x, xhat), ((x64 - xhat64) ** 2).sum(1).mean(), rtol=1e-5)
  assert losses.fvu(x, x) == 0


def test_device_shares_average_to_the_global_value():
  pre, dead, residual, w = data(3)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((B, D)).astype(np.float32)

  def shares(pre, residual, x):
    return (losses.auxk_loss(pre, dead, residual, w, K_AUX, axis_name="data"),
            losses.fvu(x, residual, axis_name="data"),
            losses.mse(x, residual))

  split = lambda v: v.reshape(4, -1, v.shape[-1])
  auxk, fvu, mse = jax.pmap(shares, axis_name="data")(split(pre), split(residual), split(x))
  np.testing.assert_allclose(np.mean(auxk), losses.auxk_loss(pre, dead, residual, w, K_AUX),
                             rtol=1e-5)
  np.testing.assert_allclose(fvu, np.full(4, losses.fvu(x, residual)), rtol=1e-5)
  np.testing.assert_allclose(np.mean(mse), losses.mse(x, residual), rtol=1e-5)
  # The gradients average too, as pmean takes them.
  grad = jax.pmap(jax.grad(lambda p, r: losses.auxk_loss(p, dead, r, w, K_AUX, "data")),
                  axis_name="data")(split(pre), split(residual))
  np.testing.assert_allclose(np.asarray(grad).reshape(B, F) / 4,
                             jax.grad(losses.auxk_loss)(pre, dead, residual, w, K_AUX),
                             rtol=1e-5, atol=1e-7)


def test_dead_latents_count_this_step_as_dictionary_learning_does():
  dead_steps = 3
  silent = np.array([0, 1, 2, 2, 3, 3])
  fired = np.array([False, False, False, True, False, True])
  # Silent 2 steps before and not firing now: the third silent step, dead.
  np.testing.assert_array_equal(losses.dead_latents(silent, fired, dead_steps),
                                [False, False, True, False, True, False])
