"""Transcoders (`transcoder.py`): the step against NumPy and against the
dense autodiff reference, for every rule."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import model
from sae_jax import train
from tests.test_train import B, D, JUMPRELU, MATRYOSHKA, RULES
from tests.test_train import batch, check_fast_step_equals_dense, check_one_step, fresh_state

MIX = np.random.default_rng(7).standard_normal((D, D)).astype(np.float32) / np.sqrt(D)


def pairs(seed, n=B):
  """(input, target) rows [n, 2·D]: the target a fixed nonlinear map of the
  input, on another scale and offset."""
  x = batch(seed, n)
  return np.concatenate([x, 5 * np.tanh(x @ MIX) + 2], axis=1)


def transcoder(c):
  return dataclasses.replace(c, sae=dataclasses.replace(c.sae, transcoder=True))


def start(c):
  return fresh_state(c, pairs(100, 4 * B))


def test_state_has_a_scale_per_side_and_b_dec_from_the_targets():
  c = transcoder(RULES["batchtopk"])
  state = train.create_train_state(c, pairs(100, 4 * B))
  x, y = pairs(100, 4 * B)[:, :D], pairs(100, 4 * B)[:, D:]
  for scale, side in ((state.input_scale, x), (state.target_scale, y)):
    np.testing.assert_allclose(np.mean(np.sum(np.square(side * float(scale)), 1)), D, rtol=1e-5)
  assert float(state.target_scale) != pytest.approx(float(state.input_scale), rel=0.1)
  # b_dec is the targets' geometric median, not the inputs'.
  for side, scale, equal in ((y, state.target_scale, True), (x, state.input_scale, False)):
    median = model.geometric_median(jnp.asarray(side * float(scale), jnp.float32))
    assert np.allclose(state.params["b_dec"], median, rtol=1e-5, atol=1e-6) == equal
  assert train.create_train_state(RULES["batchtopk"], batch(100, 4 * B)).target_scale is None
  with pytest.raises(ValueError, match=r"\[N, 16\].*pairs"):
    train.create_train_state(c, batch(100, 4 * B))


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "sampled"])
def test_one_step_matches_numpy(rule):
  """The input is not centred by b_dec, whose gradient has no encoder term;
  the loss, AuxK's residual and the FVU are the target's."""
  c = transcoder(RULES[rule])
  check_one_step(c, start(c).replace(step=jnp.int32(1)), pairs(1))


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "sampled"] + [
    pytest.param(rule, marks=pytest.mark.slow) for rule in (
        "matryoshka_batchtopk", "matryoshka_entries", "matryoshka_sampled")])
def test_fast_step_equals_dense_step_on_four_devices(rule):
  c = transcoder((RULES | MATRYOSHKA)[rule])
  check_fast_step_equals_dense(c, pairs, start(c))


def test_jumprelu_reconstructs_the_target():
  c = transcoder(JUMPRELU["jumprelu"])
  state = start(c)
  rows = pairs(2)
  _, metrics = train.p_train_step(train.replicate(state, 1), rows[None])
  p = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  x, y = rows[:, :D] * float(state.input_scale), rows[:, D:] * float(state.target_scale)
  pre = x @ p["W_enc"] + p["b_enc"]
  yhat = np.where(pre > p["threshold"], pre, 0) @ p["W_dec"] + p["b_dec"]
  np.testing.assert_allclose(float(metrics["mse"]), np.mean(np.sum((y - yhat) ** 2, 1)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["fvu"]), np.sum((y - yhat) ** 2)
                             / np.sum((y - y.mean(0)) ** 2), rtol=1e-5)
