"""The optimiser recipe: schedule, decoder-row projection, clip + Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax import optimizer


def params(seed=0, F=12, D=5):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((F, D)).astype(np.float32)
  return {"params": {"W_dec": jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True)),
                     "W_enc": jnp.asarray(rng.standard_normal((D, F)), jnp.float32),
                     "b_dec": jnp.zeros(D)}}


def test_default_learning_rate_scales_with_dictionary_size():
  assert optimizer.default_learning_rate(2**14) == pytest.approx(2e-4)
  assert optimizer.default_learning_rate(2**16) == pytest.approx(1e-4)


def test_schedule_warms_up_holds_and_decays_to_zero():
  schedule = optimizer.learning_rate_schedule(3e-4, 10_000)
  values = np.array([schedule(s) for s in (0, 500, 1000, 5000, 8000, 9000, 10_000)])
  np.testing.assert_allclose(values, 3e-4 * np.array([0, 0.5, 1, 1, 1, 0.5, 0]), atol=1e-9)
  no_warmup = optimizer.learning_rate_schedule(1.0, 10, warmup_steps=0, decay_fraction=0.0)
  np.testing.assert_allclose([no_warmup(s) for s in (0, 9, 10)], [1, 1, 1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(total_steps=0), "total_steps must be >= 1"),
    (dict(total_steps=100, warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(total_steps=100, decay_fraction=1.5), "decay_fraction must be in [0, 1]"),
    (dict(total_steps=100, warmup_steps=90), "must end before the decay starts at step 80"),
])
def test_schedule_refuses_bad_arguments(kwargs, message):
  with pytest.raises(ValueError) as info:
    optimizer.learning_rate_schedule(1e-3, **kwargs)
  assert message in str(info.value)


def test_projected_decoder_gradient_is_orthogonal_to_each_row():
  p = params()
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3 + x, p)
  project = optimizer.project_out_parallel()
  out, _ = project.update(grads, project.init(p), p)
  dots = np.sum(np.asarray(out["params"]["W_dec"]) * np.asarray(p["params"]["W_dec"]), axis=1)
  np.testing.assert_allclose(dots, 0, atol=1e-6)
  # The part orthogonal to each row is kept; other parameters are untouched.
  w = np.asarray(p["params"]["W_dec"])
  g = np.asarray(grads["params"]["W_dec"])
  np.testing.assert_allclose(out["params"]["W_dec"], g - np.sum(g * w, 1, keepdims=True) * w,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["params"]["W_enc"], grads["params"]["W_enc"])
  with pytest.raises(ValueError, match="needs params"):
    project.update(grads, project.init(p))


def test_normalize_rows_touches_only_the_decoder():
  p = jax.tree.map(lambda x: x * 3.0 + 0.1, params(1))
  out = optimizer.normalize_rows(p)
  np.testing.assert_allclose(np.linalg.norm(out["params"]["W_dec"], axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(out["params"]["W_enc"], p["params"]["W_enc"])


def test_first_step_is_adam_on_the_projected_clipped_gradient():
  p = params(2)
  grads = jax.tree.map(lambda x: 100.0 * (x + 0.5), p)  # far above the clip norm
  opt = optimizer.make_optimizer(1e-3)
  updates, _ = opt.update(grads, opt.init(p), p)
  # Adam's first step is -lr * g / (|g| + eps): the sign of what it was fed.
  project = optimizer.project_out_parallel()
  fed = project.update(grads, project.init(p), p)[0]
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(fed)):
    np.testing.assert_allclose(u, -1e-3 * np.sign(g), rtol=1e-4, atol=1e-9)
  new = optimizer.normalize_rows(optax.apply_updates(p, updates))
  np.testing.assert_allclose(np.linalg.norm(new["params"]["W_dec"], axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("row_block", [1024, 5])
def test_update_is_the_optax_chain_then_unit_rows(row_block, monkeypatch):
  """`update` writes out make_optimizer + normalize_rows; with pooled
  gradients it equals the dense update of the same gradients scattered. The
  decoder's rows are updated in blocks (`ROW_BLOCK`): here all 12 in one
  remainder, or two blocks of 5 and a remainder of 2."""
  monkeypatch.setattr(optimizer, "ROW_BLOCK", row_block)
  rng = np.random.default_rng(7)
  D, F = 5, 12
  w = rng.standard_normal((F, D)).astype(np.float32)
  params = {"W_enc": jnp.asarray(w.T), "b_enc": jnp.zeros(F), "W_dec": optimizer._rows_unit(jnp.asarray(w)),
            "b_dec": jnp.asarray(rng.standard_normal(D), jnp.float32)}
  opt = optimizer.make_optimizer(0.1, clip_norm=0.5)
  state = opt.init(params)
  pool = jnp.array([1, 4, 7, 10])
  for step in range(3):
    pooled = {"W_enc": rng.standard_normal((D, 4)), "b_enc": rng.standard_normal(4),
              "W_dec": rng.standard_normal((4, D)), "b_dec": rng.standard_normal(D)}
    pooled = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pooled)
    dense = {"W_enc": jnp.zeros((D, F)).at[:, pool].set(pooled["W_enc"]),
             "b_enc": jnp.zeros(F).at[pool].set(pooled["b_enc"]),
             "W_dec": jnp.zeros((F, D)).at[pool].set(pooled["W_dec"]), "b_dec": pooled["b_dec"]}
    updates, want_state = opt.update(dense, state, params)
    want = optimizer.normalize_rows(optax.apply_updates(params, updates))
    for grads, at in ((dense, None), (pooled, pool)):
      got, got_state = optimizer.update(params, grads, state, 0.1, clip_norm=0.5, pool_P=at)
      for x, y in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # A skipped step changes nothing, bit for bit.
    same, same_state = optimizer.update(params, pooled, state, 0.1, pool_P=pool, apply=False)
    for x, y in zip(jax.tree.leaves((same, same_state)), jax.tree.leaves((params, state))):
      np.testing.assert_array_equal(x, y)
    params, state = want, want_state


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc"])
def test_add_at_adds_each_pooled_gradient_at_its_latent(name):
  """`add_at` (W_enc's columns by a gather, rows by a scatter) against a
  NumPy loop: latents distinct and unsorted, those past the last left out."""
  rng = np.random.default_rng(3)
  D, F = 5, 12
  pool = np.array([7, 0, 13, 11, 3, 12])  # 13 and 12 are past the last latent
  shape, pooled_shape = {"W_enc": ((D, F), (D, 6)), "W_dec": ((F, D), (6, D)),
                         "b_enc": ((F,), (6,))}[name]
  x, g = (rng.standard_normal(s).astype(np.float32) for s in (shape, pooled_shape))
  want = x.copy()
  for i, latent in enumerate(pool):
    if latent < F:
      if name == "W_enc":
        want[:, latent] += g[:, i]
      else:
        want[latent] += g[i]
  got = jax.jit(optimizer.add_at, static_argnums=0)(name, x, jnp.asarray(pool), g)
  np.testing.assert_array_equal(got, want)
