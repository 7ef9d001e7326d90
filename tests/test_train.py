"""The training step: one step against NumPy, 1 vs 4 devices, the threshold,
dead latents, non-finite batches, the loop, and learning a known dictionary."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax import auxk
from sae_jax import gradients
from sae_jax import loop
from sae_jax import losses
from sae_jax import model
from sae_jax import optimizer
from sae_jax import cut as cut_lib
from sae_jax import selection
from sae_jax import synthetic
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from tests import reference

B, D, F, K = 32, 8, 24, 3
N_DEAD = 6  # latents 0..5 start dead, so every step exercises AuxK


def config(selection, **sae_kwargs):
  return TrainConfig(SAEConfig(D, F, k=K, selection=selection, l=2.0, **sae_kwargs),
                     batch_size=B, steps=50, lr=1e-3, warmup_steps=0, threshold_start=0,
                     dead_tokens=2 * B, max_bad_steps=3)

# JumpReLU with a bandwidth wide enough that its thresholds learn on every step.
JUMPRELU = {"jumprelu": dataclasses.replace(config("jumprelu"), bandwidth=0.05, target_l0=2.0,
                                            sparsity_warmup_steps=2)}

# Shared by the tests below, so each compiles once.
RULES = {
    "topk": config("topk"),
    "batchtopk": config("batchtopk"),
    "sampled": config("sampled"),
    "sampled_drawn": config("sampled", score="entropy", sample_pool=True),
}
# Leverage scores: exact, and sketched with the pool kept for 2 steps.
LEVERAGE = {
    "sampled_leverage": config("sampled", score="leverage"),
    "sampled_kept": config("sampled", score="leverage", sketch=8, pool_every=2),
}
# The Matryoshka loss (groups of 6, 6 and 12 latents; the dead ones are the
# first group) through each way the fast step decodes: dense codes, entries, a pool.
NESTED = dict(matryoshka_groups=(0.25, 0.25, 0.5), matryoshka_weights=(2.0, 1.0, 0.5))
MATRYOSHKA = {
    "matryoshka_batchtopk": dataclasses.replace(config("batchtopk"), **NESTED),
    "matryoshka_entries": dataclasses.replace(config("batchtopk"), layout="entries", **NESTED),
    "matryoshka_sampled": dataclasses.replace(config("sampled"), **NESTED),
}


def batch(seed, n=B):
  rng = np.random.default_rng(seed)
  return (3 * rng.standard_normal((n, D)) + 1).astype(np.float32)


def fresh_state(c, sample=None):
  """A new state whose first N_DEAD latents count as dead: silent for
  dead_steps, and with weak encoder columns so that they rarely fire now."""
  state = train.create_train_state(c, batch(100, 4 * B) if sample is None else sample)
  dead_F = np.arange(F) < N_DEAD
  weak = np.where(dead_F, 0.05, 1.0).astype(np.float32)[None, :]
  return state.replace(params=dict(state.params, W_enc=state.params["W_enc"] * weak),
                       steps_since_fired_F=jnp.where(dead_F, c.dead_steps, 0))


def tree_equal(a, b):
  return all(np.array_equal(x, y, equal_nan=True)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- One step against a NumPy float64 reference -------------------------------

def reference_step(state, x_raw, c):
  """Forward, loss, hand-derived gradients and metrics of one step; a
  transcoder's rows are (input, target) pairs, its input not centred."""
  p = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  x = np.asarray(x_raw, np.float64)[:, :D] * float(state.input_scale)
  if c.sae.transcoder:
    y, centred = np.asarray(x_raw, np.float64)[:, D:] * float(state.target_scale), x
  else:
    y, centred = x, x - p["b_dec"]
  a = np.maximum(centred @ p["W_enc"] + p["b_enc"], 0)
  if c.sae.selection == "topk":
    mask = reference.topk_mask(a, K)
  elif c.sae.selection == "batchtopk":
    mask = reference.batch_topk_mask(a, K)
  else:
    pool = reference.pool(reference.scores(a, c.sae.score), c.sae.pool_size)
    mask = reference.batch_topk_mask(a, K, cols=pool)
  z = a * mask
  xhat = z @ p["W_dec"] + p["b_dec"]
  e = y - xhat
  fired = mask.any(0)
  # Dead as dictionary_learning counts it: silent dead_steps steps, this one included.
  silent = np.asarray(state.steps_since_fired_F)
  dead = (silent + 1 >= c.dead_steps) & ~fired
  a_dead = np.where(dead[None, :], a, 0)
  aux_mask = reference.topk_mask(a_dead, c.auxk_k)
  variance = ((e - e.mean(0)) ** 2).sum()
  e_aux = e - (a_dead * aux_mask) @ p["W_dec"]
  mse = (e ** 2).sum() / len(e)  # summed over D, averaged over tokens
  auxk_value = (e_aux ** 2).sum() / variance

  g_xhat = -2 * e / len(e)
  g_ehat = -2 * c.auxk_weight * e_aux / variance
  g_pre = (g_xhat @ p["W_dec"].T) * mask + (g_ehat @ p["W_dec"].T) * aux_mask
  grads = {
      "W_dec": z.T @ g_xhat + (a_dead * aux_mask).T @ g_ehat,
      "W_enc": centred.T @ g_pre,
      "b_enc": g_pre.sum(0),
      "b_dec": g_xhat.sum(0) - (0 if c.sae.transcoder else (g_pre @ p["W_enc"].T).sum(0)),
  }
  since = np.where(fired, 0, np.minimum(silent + 1, c.dead_steps))
  # The threshold's target: the smallest selected value (TopK: of each token, averaged).
  z_min = np.where(mask, z, np.inf)
  theta = z_min.min(1).mean() if c.sae.selection == "topk" else z_min.min()
  metrics = {
      "loss": mse + c.auxk_weight * auxk_value, "mse": mse, "auxk_loss": auxk_value,
      "fvu": (e ** 2).sum() / ((y - y.mean(0)) ** 2).sum(),
      "l0": mask.sum() / B, "threshold": theta,
      "grad_norm": np.sqrt(sum((g ** 2).sum() for g in grads.values())),
      "dead_fraction": (since >= c.dead_steps).mean(), "lr": c.learning_rate,
  }
  return grads, since, dead, metrics


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "sampled", "sampled_leverage"])
def test_one_step_matches_numpy(rule):
  c = (RULES | LEVERAGE)[rule]
  # Step 1, the first after threshold_start = 0: the threshold EMA starts here.
  check_one_step(c, fresh_state(c).replace(step=jnp.int32(1)), batch(1))


def check_one_step(c, state, x):
  """One step from `state` on x against `reference_step`."""
  grads, since, dead, want = reference_step(state, x, c)
  assert dead.any() and not dead.all()
  new, metrics = train.p_train_step(train.replicate(state, 1), x[None])
  new, metrics = train.unreplicate(new), {k: float(v) for k, v in metrics.items()}

  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, err_msg=name)
  assert 0 < metrics["auxk_loss"] and metrics["skipped_steps"] == 0
  np.testing.assert_array_equal(new.steps_since_fired_F, since)
  np.testing.assert_allclose(new.threshold, want["threshold"], rtol=1e-5)
  assert int(new.step) == 2

  # The optimiser saw the gradient with decoder-row components removed, clipped.
  w = np.asarray(state.params["W_dec"], np.float64)
  grads["W_dec"] -= (grads["W_dec"] * w).sum(1, keepdims=True) * w
  norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
  scale = min(1.0, c.clip_norm / norm)
  mu = optax.tree_utils.tree_get(new.opt_state, "mu")
  nu = optax.tree_utils.tree_get(new.opt_state, "nu")
  for name, g in grads.items():
    np.testing.assert_allclose(mu[name], (1 - c.b1) * scale * g, rtol=1e-4,
                               atol=1e-6 * scale * norm, err_msg=name)
    # Adam's first step, then unit decoder rows.
    step = c.learning_rate * (mu[name] / (1 - c.b1)) / (np.sqrt(nu[name] / (1 - c.b2)) + 1e-8)
    updated = np.asarray(state.params[name], np.float64) - step
    if name == "W_dec":
      updated /= np.linalg.norm(updated, axis=1, keepdims=True)
    np.testing.assert_allclose(new.params[name], updated, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_threshold_ema_starts_after_threshold_start():
  c = TrainConfig(RULES["batchtopk"].sae, batch_size=B, steps=50, lr=1e-3, warmup_steps=0,
                  threshold_start=2, threshold_beta=0.9)
  state = train.replicate(train.create_train_state(c, batch(100, 4 * B)), 1)
  sae = model.SAE(c.sae)
  expected = 0.0
  for step in range(5):
    host = train.unreplicate(state)
    x = batch(10 + step)
    z = sae.apply({"params": host.params}, jnp.asarray(x) * host.input_scale,
                  method=model.SAE.encode)
    smallest = float(np.min(np.asarray(z)[np.asarray(z) > 0]))
    if step == c.threshold_start + 1:  # dictionary_learning: step > threshold_start_step
      expected = smallest
    elif step > c.threshold_start + 1:
      expected = c.threshold_beta * expected + (1 - c.threshold_beta) * smallest
    state, _ = train.p_train_step(state, x[None])
    np.testing.assert_allclose(train.unreplicate(state).threshold, expected, rtol=1e-5)
  assert expected > 0


# --- Devices -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES) + ["sampled_kept", "jumprelu"])
def test_four_devices_equal_one(rule, caplog):
  c = (RULES | LEVERAGE | JUMPRELU)[rule]
  state = fresh_state(c)
  one, four = train.replicate(state, 1), train.replicate(state, 4)
  for step in range(5):
    x = batch(20 + step)
    previous = four
    one, _ = train.p_train_step(one, x[None])
    if step == 1:
      caplog.clear()
      jax.config.update("jax_log_compiles", True)
    four, metrics = train.p_train_step(four, train.shard_batch(x, 4))
    assert previous.params["W_enc"].is_deleted()  # donated
  jax.config.update("jax_log_compiles", False)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]

  for leaf in jax.tree.leaves(four):  # every device holds the same state, bit for bit
    copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    assert len(copies) == 4 and all(np.array_equal(x, copies[0]) for x in copies)
  one, four = train.unreplicate(one), train.unreplicate(four)
  np.testing.assert_array_equal(four.steps_since_fired_F, one.steps_since_fired_F)
  np.testing.assert_allclose(four.threshold, one.threshold, rtol=1e-5)
  for name in one.params:
    np.testing.assert_allclose(four.params[name], one.params[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  # The decoder keeps unit rows.
  np.testing.assert_allclose(np.linalg.norm(four.params["W_dec"], axis=1), 1, rtol=1e-6)
  assert int(four.step) == 5 and float(metrics["skipped_steps"]) == 0


@pytest.mark.slow
@pytest.mark.xla_default
def test_pmap_runs_the_same_step():
  """train_step also runs under jax.pmap (every argument mapped), bit for bit."""
  c = RULES["sampled_drawn"]
  pmapped = jax.pmap(train.train_step, axis_name=train.AXIS)
  state = fresh_state(c)
  mapped = train.replicate(state, 4)
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (4,) + np.shape(x)), state)
  for i in range(2):
    x = train.shard_batch(batch(60 + i), 4)
    stacked, _ = pmapped(stacked, x)
    mapped, _ = train.p_train_step(mapped, x)
  assert tree_equal(jax.tree.map(lambda x: np.asarray(x[0]), stacked), train.unreplicate(mapped))


# --- The fast step against the dense autodiff reference -------------------------

@functools.partial(jax.pmap, axis_name=train.AXIS, in_axes=(None, 0, None, None),
                   static_broadcasted_argnums=3)
def fast_and_dense_gradients(params, x_BxD, silent_F, c):
  """(fast, rows, dense): global gradients, mse, auxk and selection
  statistics; `rows` is Sampled-SAE's AuxK as rows next to the pool
  (`train_step`'s packed form, every dead latent packed), made dense, and
  the fast step's otherwise."""
  key = jax.random.key(3)
  pooled, pool_P, out, with_auxk = gradients.fast(params, x_BxD, silent_F, key, train.AXIS,
                                                  **train.fast_rule(c))
  grads, auxk_value = with_auxk.dense(optimizer.dense_grads(pooled, pool_P, params))
  rows = (grads, auxk_value)
  if pool_P is not None:
    capacity = auxk.auxk_capacities(F, c.auxk_k)[-1]
    assert capacity >= N_DEAD
    rows_grads, rows_R, rows_auxk = with_auxk.rows(pooled, pool_P, capacity)
    rows = (optimizer.dense_grads(rows_grads, rows_R, params), rows_auxk)
  dense, ref = gradients.dense(params, x_BxD, silent_F, key, model.SAE(c.sae), train.AXIS,
                               **train.loss_rule(c))
  stats = lambda o: (jax.lax.psum(o.n_active, train.AXIS),
                     jax.lax.psum(o.fired_F.astype(jnp.int32), train.AXIS),
                     o.token_min_B, o.dead_F)
  return (jax.lax.pmean((grads, out.mse, auxk_value), train.AXIS) + stats(out),
          jax.lax.pmean(rows, train.AXIS),
          jax.lax.pmean((dense, ref.mse, ref.auxk), train.AXIS) + stats(ref))


CONCENTRATED = batch(70) * np.where(np.arange(B) < 8, 30.0, 1.0)[:, None].astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES) + ["topk_entries", "batchtopk_entries"])
def test_fast_gradients_equal_dense_on_four_devices(rule):
  """TopK's and BatchTopK's gradients in both layouts (`TrainConfig.layout`;
  at these sizes "auto" is codes)."""
  if rule.endswith("_entries"):
    rule = rule.removesuffix("_entries")
    c = dataclasses.replace(RULES[rule], layout="entries")
  else:
    c = RULES[rule]
  state = fresh_state(c)
  x = train.shard_batch(batch(71) * state.input_scale, 4)
  silent = np.where(np.arange(F) < N_DEAD, c.dead_steps, 0).astype(np.int32)
  cases = [(x, np.zeros(F, np.int32)), (x, silent)]
  if rule == "batchtopk":  # 8 tokens hold most of the budget: the offers miss entries
    cut, entries = cut_lib.batch_topk_entries(
        jax.nn.relu(model.SAE(c.sae).apply({"params": state.params},
                                           jnp.asarray(CONCENTRATED) * state.input_scale,
                                           method=model.SAE.pre)), K)
    assert not bool(entries.complete)
    cases.append((train.shard_batch(CONCENTRATED * state.input_scale, 4), np.zeros(F, np.int32)))
  # Dead latents 0-2 and 3-5 as two triples of equal encoder columns: each
  # token's top auxk_k = 4 dead activations end inside a tie.
  tied_W_enc = state.params["W_enc"].at[:, :6].set(state.params["W_enc"][:, [0, 0, 0, 3, 3, 3]])
  tied = dict(state.params, W_enc=tied_W_enc)
  a_tied = jax.nn.relu(model.SAE(c.sae).apply({"params": tied}, jnp.asarray(x).reshape(B, D),
                                              method=model.SAE.pre))[:, :6]
  fourth, fifth = -np.sort(-np.asarray(a_tied), axis=1)[:, 3:5].T
  assert c.auxk_k == 4 and np.any((fourth == fifth) & (fifth > 0))
  cases = [(state.params, *case) for case in cases] + [(tied, x, silent)]
  for params, x_shards, silent_F in cases:
    fast, rows, dense = fast_and_dense_gradients(params, x_shards, silent_F, c)
    fast, rows, dense = jax.tree.map(lambda v: np.asarray(v[0]), (fast, rows, dense))
    (fast_grads, *fast_rest), (dense_grads, *dense_rest) = fast, dense
    for grads in (fast_grads, rows[0]):
      for name in dense_grads:
        np.testing.assert_allclose(grads[name], dense_grads[name], rtol=1e-5,
                                   atol=1e-6 * np.abs(dense_grads[name]).max(), err_msg=name)
    np.testing.assert_allclose(rows[1], dense_rest[1], rtol=1e-5)  # auxk
    dead_F = dense_rest[-1]
    assert dead_F.any() == silent_F.any() and not (dead_F & ~(silent_F > 0)).any()
    assert (fast_rest[1] > 0) == dead_F.any()  # auxk
    np.testing.assert_allclose(fast_rest[:2], dense_rest[:2], rtol=1e-5)
    for got, want in zip(fast_rest[2:], dense_rest[2:]):  # counts, fired, token minima, dead
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["entries", "codes", "codes_top_k"])
def test_auxk_layouts_equal_autodiff_on_four_devices(layout, monkeypatch):
  """AuxK's value and gradients by entries and by dense codes (their TopK by
  bisection on the bits, or by a per-row top-k) equal autodiff through
  `losses.auxk_loss`, with ties at each token's k_aux-th dead latent, for
  dead sets packed into each of `auxk_capacities` and for one too large to
  pack."""
  if layout == "codes_top_k":
    layout = "codes"
    monkeypatch.setattr(auxk, "BITS_UP_TO", 1)
  c = RULES["batchtopk"]
  params = fresh_state(c).params
  params = dict(params, W_enc=params["W_enc"].at[:, :6].set(params["W_enc"][:, [0, 0, 0, 3, 3, 3]]))
  capacities = auxk.auxk_capacities(F, c.auxk_k)
  assert capacities == (4, 6, 12)

  @functools.partial(jax.pmap, axis_name=train.AXIS, in_axes=(None, 0, 0, None))
  def both(params, x_BxD, residual_BxD, dead_F):
    params = gradients.varying(params, train.AXIS)
    centred_BxD, pre_BxF = model.encoder(params, x_BxD, "float32")
    got = auxk.dense_grads(params, centred_BxD, residual_BxD, jax.nn.relu(pre_BxF), dead_F,
                           c.auxk_k, c.auxk_weight, train.AXIS, layout=layout)

    def loss(params):
      pre_BxF = model.encoder(params, x_BxD, "float32")[1]
      return c.auxk_weight * losses.auxk_loss(pre_BxF, dead_F, residual_BxD, params["W_dec"],
                                              c.auxk_k, train.AXIS)

    value, want = jax.value_and_grad(loss)(params)
    return jax.lax.pmean((got, (want, value / c.auxk_weight)), train.AXIS)

  x, residual = (train.shard_batch(batch(seed), 4) for seed in (90, 91))
  # Packed into 4 (latent 3 dead, its equals 4 and 5 alive), into 6 (ties
  # inside both triples), into 12 (9 dead), and not packed (17 dead).
  dead_sets = [np.arange(F) < 4, np.arange(F) < 6, np.isin(np.arange(F), [0, 1, 2, 3, 4, 5,
                                                                          10, 11, 20]),
               np.arange(F) < 17]
  assert [int(np.searchsorted(capacities, d.sum())) for d in dead_sets] == [0, 1, 2, 3]
  for dead_F in dead_sets:
    (got, got_value), (want, want_value) = jax.tree.map(lambda v: np.asarray(v[0]),
                                                        both(params, x, residual, dead_F))
    assert want_value > 0
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5,
                                 atol=1e-6 * np.abs(want[name]).max(), err_msg=name)
      if name in ("W_dec", "b_enc"):  # nothing reaches a latent that is not dead
        assert not np.any(got[name][~dead_F])


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "sampled"] + [
    pytest.param(rule, marks=pytest.mark.slow) for rule in (
        "sampled_drawn", "sampled_kept", "matryoshka_batchtopk", "matryoshka_entries",
        "matryoshka_sampled")])
def test_fast_step_equals_dense_step_on_four_devices(rule):
  check_fast_step_equals_dense((RULES | LEVERAGE | MATRYOSHKA)[rule], batch)


def check_fast_step_equals_dense(fast_config, batch, start=None):
  """Three steps: the first two with no dead latent (Sampled-SAE's pooled
  update), the third with N_DEAD latents dead (AuxK)."""
  dense_config = dataclasses.replace(fast_config, step="dense")
  start = fresh_state(fast_config) if start is None else start
  states = {c.step: train.replicate(start.replace(config=c), 4) for c in (fast_config, dense_config)}
  for step in range(3):
    silent_F = np.where((np.arange(F) < N_DEAD) & (step == 2), fast_config.dead_steps, 0)
    states = {name: train.replicate(train.unreplicate(state).replace(
        steps_since_fired_F=silent_F.astype(np.int32)), 4) for name, state in states.items()}
    x = train.shard_batch(batch(80 + step), 4)
    (states["fast"], fast), (states["dense"], dense) = (
        train.p_train_step(states[name], x) for name in ("fast", "dense"))
    fast, dense = ({k: float(v) for k, v in m.items()} for m in (fast, dense))
    for name in ("loss", "mse", "fvu", "auxk_loss", "grad_norm", "threshold"):
      np.testing.assert_allclose(fast[name], dense[name], rtol=1e-4, err_msg=name)
    assert fast["l0"] == dense["l0"]
    assert (fast["auxk_loss"] > 0) == (step == 2)
  assert fast["dead_fraction"] == dense["dead_fraction"]
  fast, dense = (train.unreplicate(states[name]) for name in ("fast", "dense"))
  np.testing.assert_array_equal(fast.steps_since_fired_F, dense.steps_since_fired_F)
  for name in dense.params:
    np.testing.assert_allclose(fast.params[name], dense.params[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  for moment in ("mu", "nu"):
    got, want = (optax.tree_utils.tree_get(s.opt_state, moment) for s in (fast, dense))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-3,
                                 atol=1e-5 * np.abs(want[name]).max(), err_msg=name)


@pytest.mark.slow
def test_a_kept_pool_is_renewed_every_pool_every_steps():
  c = LEVERAGE["sampled_kept"]
  state = train.replicate(fresh_state(c), 4)
  sae = model.SAE(c.sae)
  for step in range(4):
    before = train.unreplicate(state)
    x = batch(90 + step)
    state, _ = train.p_train_step(state, train.shard_batch(x, 4))
    pool_P = train.unreplicate(state).pool_P
    if step % 2:  # kept
      np.testing.assert_array_equal(pool_P, before.pool_P)
    else:  # chosen on this batch, with this step's key, before the update
      a = jax.nn.relu(sae.apply({"params": before.params}, x * before.input_scale,
                                method=model.SAE.pre))
      key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), step)
      rule = c.sae.pool_rule
      np.testing.assert_array_equal(pool_P, selection.sampled_pool(
          a, rule.pop("k"), rule.pop("l"), **model.sampled_options(key, **rule)))
      assert step == 0 or not np.array_equal(pool_P, before.pool_P)
  assert fresh_state(RULES["sampled"]).pool_P is None  # states without kept pools are as before


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["sampled", "sampled_kept"])
def test_packed_step_equals_dense_step_on_four_devices(rule):
  """p_train_step_packed (AuxK on the dead latents packed into the smallest
  capacity, 4 columns here, its gradients as rows next to the pool's; or
  with capacity F, dense gradients and no branch) against the dense
  autodiff step: with 0, 3 and 4 latents dead, and 6 at capacity F, two
  steps each."""
  fast_config = dataclasses.replace((RULES | LEVERAGE)[rule], dead_tokens=10 * B)
  dense_config = dataclasses.replace(fast_config, step="dense")
  assert train.packed_capacities(fast_config) == (4, 6, 12)  # and no other latent dies in 2 steps
  start = fresh_state(fast_config)
  for n_dead, capacity in ((0, 4), (3, 4), (4, 4), (6, F)):
    silent_F = np.where(np.arange(F) < n_dead, fast_config.dead_steps, 0).astype(np.int32)
    fast, dense = (train.replicate(start.replace(config=c, steps_since_fired_F=silent_F), 4)
                   for c in (fast_config, dense_config))
    for step in range(2):
      x = train.shard_batch(batch(60 + step), 4)
      fast, got = train.p_train_step_packed(fast, x, capacity)
      dense, want = train.p_train_step(dense, x)
      for name in ("loss", "mse", "auxk_loss", "grad_norm", "fvu"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4,
                                   err_msg=f"{name}, {n_dead} dead")
      assert (float(got["auxk_loss"]) > 0) == (n_dead > 0)
    fast, dense = train.unreplicate(fast), train.unreplicate(dense)
    np.testing.assert_array_equal(fast.steps_since_fired_F, dense.steps_since_fired_F)
    for name in dense.params:
      np.testing.assert_allclose(fast.params[name], dense.params[name], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name}, {n_dead} dead")
    for moment in ("mu", "nu"):
      got, want = (optax.tree_utils.tree_get(state.opt_state, moment) for state in (fast, dense))
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3,
                                   atol=1e-5 * np.abs(want[name]).max(),
                                   err_msg=f"{moment} {name}, {n_dead} dead")


# Dead after 4 silent steps; every latent in the pool (P = k·l = F), so that
# only the weak latents of `dying_start` die.
DYING = dataclasses.replace(RULES["sampled"], sae=dataclasses.replace(RULES["sampled"].sae, l=8.0),
                            dead_tokens=4 * B)


def dying_start():
  """A new DYING state whose latents 0-5 are weak, each less than the next:
  from step 3 on, 2 to 5 of them can be dead at a time."""
  start = train.create_train_state(DYING, batch(100, 4 * B))
  weak = np.ones(F, np.float32)
  weak[:6] = np.linspace(0.1, 0.5, 6)
  return start.replace(params=dict(start.params, W_enc=start.params["W_enc"] * weak[None]))


def form_name(fn) -> str:
  """"all_alive", "general" (TopK, BatchTopK) or "packed C" for a step
  `loop._step_for` picked."""
  if fn is train.p_train_step_all_alive:
    return "all_alive"
  if fn is train.p_train_step:
    return "general"
  assert fn.func is train.p_train_step_packed
  return f"packed {fn.keywords['capacity']}"


def recorded_forms(monkeypatch):
  """Records (step, form) for each step train_loop dispatches, checking
  each form's promise on the state it is given."""
  picked = []

  def step_for(config, dead_at_most, latent_axis=False):
    fn = pick(config, dead_at_most, latent_axis)
    name = form_name(fn)
    limits = {"all_alive": 0, "general": F}
    limit = limits[name] if name in limits else fn.keywords["capacity"]

    def step(state, x):
      since = jax.device_get(state.steps_since_fired_F)
      assert int(np.sum(since + 1 >= DYING.dead_steps)) <= limit, name
      assert int(jax.device_get(state.dead_at_most)) == dead_at_most
      picked.append((int(jax.device_get(state.step)), name))
      return fn(state, x)
    return step

  pick = loop._step_for
  monkeypatch.setattr(loop, "_step_for", step_for)
  return picked


@pytest.mark.slow
def test_loop_picks_the_cheapest_form_whose_promise_holds(monkeypatch):
  """train_loop runs the step without AuxK while no latent can be dead, and
  for Sampled-SAE the packed step at the smallest capacity that holds
  those that can be (F past the largest); each promise holds, and the run
  ends as p_train_step alone ends it, up to rounding."""
  picked = recorded_forms(monkeypatch)
  start = dying_start()
  xs = [batch(90 + i)[None] for i in range(12)]
  looped = loop.train_loop(train.replicate(start, 1), xs, progress=False)
  stepped = train.replicate(start, 1)
  auxk_values = []
  for x in xs:
    stepped, metrics = train.p_train_step(stepped, x)
    auxk_values.append(float(metrics["auxk_loss"]))
  names = [name for _, name in picked]
  assert names.count("all_alive") >= 2 and {"packed 4", "packed 6"} <= set(names), names
  assert max(auxk_values) > 0
  looped, stepped = train.unreplicate(looped), train.unreplicate(stepped)
  np.testing.assert_array_equal(looped.steps_since_fired_F, stepped.steps_since_fired_F)
  for name in stepped.params:
    np.testing.assert_allclose(looped.params[name], stepped.params[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_resumed_loop_picks_the_forms_of_the_uninterrupted_one(monkeypatch):
  """The forms are not bit for bit alike, so the choice must depend on the
  states alone: trained one batch per train_loop call (each call a resume
  from the state), the run picks the forms of one call over all the
  batches and ends with its bits. At some step the resumed call could not
  have known the bound from the state's counters: latents close to dead
  fired on the step before, and only dead_at_most remembers them."""
  pick = loop._step_for
  picked = recorded_forms(monkeypatch)
  start = dying_start()
  xs = [batch(90 + i)[None] for i in range(12)]
  whole = train.unreplicate(loop.train_loop(train.replicate(start, 1), xs, progress=False))
  whole_forms, picked[:] = list(picked), []
  state, stale = start, 0
  for x in xs:
    counted = int(train.can_be_dead(np.asarray(state.steps_since_fired_F), DYING.dead_steps, 0))
    stale += form_name(pick(DYING, counted)) != form_name(pick(DYING, int(state.dead_at_most)))
    state = train.unreplicate(loop.train_loop(train.replicate(state, 1), [x], progress=False))
  assert picked == whole_forms and stale >= 1, (whole_forms, stale)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(got, want)


# --- Non-finite steps ------------------------------------------------------------

@pytest.mark.parametrize("rule", ["batchtopk", "sampled"])
def test_non_finite_batch_is_skipped_and_counted(rule):
  c = RULES[rule]
  state = train.replicate(fresh_state(c), 4)
  before = train.unreplicate(state)
  x = batch(30)
  x[5, 2] = np.nan
  state, metrics = train.p_train_step(state, train.shard_batch(x, 4))
  after = train.unreplicate(state)
  assert np.isnan(np.asarray(metrics["loss"])).all()
  assert (int(after.step), int(after.skipped_steps), int(after.bad_streak)) == (1, 1, 1)
  # dead_at_most bounds the next step from this one's counters, skipped or not.
  assert int(after.dead_at_most) == np.sum(before.steps_since_fired_F + 2 >= c.dead_steps)
  assert tree_equal(after.replace(step=before.step, skipped_steps=before.skipped_steps,
                                  bad_streak=before.bad_streak,
                                  dead_at_most=before.dead_at_most), before)

  state, metrics = train.p_train_step(state, train.shard_batch(batch(31), 4))
  after = train.unreplicate(state)
  assert (int(after.step), int(after.skipped_steps), int(after.bad_streak)) == (2, 1, 0)
  assert np.isfinite(np.asarray(metrics["loss"])).all()
  assert not np.array_equal(after.params["W_enc"], before.params["W_enc"])


def test_training_stops_after_max_bad_steps():
  c = RULES["batchtopk"]
  bad = np.full((4, B // 4, D), np.inf, np.float32)
  good = train.shard_batch(batch(32), 4)
  batches = [good, bad, bad, good, bad, bad, bad, good]
  with pytest.raises(train.NonFiniteError, match=r"at step 7: the last 3 steps .* \(5 in all\)"):
    loop.train_loop(train.replicate(fresh_state(c), 4), batches, progress=False)


# --- The loop ----------------------------------------------------------------------

def test_no_step_recompiles(monkeypatch):
  """Ten steps of a run trace train_step once (`chex.assert_max_traces`):
  the step number, the learning rate and the threshold are arrays, never
  constants of the compiled step."""
  c = TrainConfig(SAEConfig(16, 64, k=4, l=2), batch_size=64, steps=10, warmup_steps=2,
                  threshold_start=3)
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32))
  state = train.replicate(train.create_train_state(c, source.sample(10**6, 256)))
  train._mapped_step.cache_clear()  # traced afresh, through the counted step
  monkeypatch.setattr(train, "train_step", chex.assert_max_traces(train.train_step, n=1))
  try:
    state = loop.train_loop(state, source.batches(64, jax.local_device_count()),
                            log_every=1, progress=False)
  finally:
    train._mapped_step.cache_clear()
  assert int(train.unreplicate(state).step) == 10


@pytest.mark.slow
def test_train_logs_and_stops_at_the_end_of_the_batches(capsys):
  c = RULES["sampled"]
  logs = []
  batches = [train.shard_batch(batch(40 + i), 4) for i in range(5)]
  state = loop.train_loop(train.replicate(fresh_state(c), 4), batches, log_every=2,
                      on_log=lambda step, m: logs.append((step, m)))
  assert [step for step, _ in logs] == [2, 4, 5]
  assert set(logs[0][1]) == {"loss", "mse", "fvu", "l0", "dead_fraction", "most_silent_steps",
                             "dead_soon", "auxk_loss", "threshold", "lr", "grad_norm",
                             "skipped_steps", "bad_streak", "step", "tokens_per_second"}
  assert all(m["tokens_per_second"] > 0 and m["l0"] == pytest.approx(K) for _, m in logs)
  assert int(train.unreplicate(state).step) == 5
  assert "tok/s" in capsys.readouterr().err

  # Resumed from step 5 with a config of 7 steps, it stops after step 7.
  short = TrainConfig.from_dict(dict(c.to_dict(), steps=7))
  state = state.replace(config=short)
  state = loop.train_loop(state, batches, progress=False)
  assert int(train.unreplicate(state).step) == 7


@pytest.mark.slow
def test_train_many_equals_each_state_trained_alone():
  """One stream of batches, drawn once, for three rules (one keeping its pool
  between renewals; dead latents, so AuxK runs): each ends bit for bit as
  when trained alone, and logs the same losses."""
  rules = [RULES["topk"], RULES["batchtopk"], LEVERAGE["sampled_kept"]]
  xs = [train.shard_batch(batch(60 + i), 4) for i in range(6)]
  drawn = []

  def stream():
    for x in xs:
      drawn.append(1)
      yield x

  logs = []
  many = loop.train_many([train.replicate(fresh_state(c), 4) for c in rules], stream(),
                          log_every=2, progress=False,
                          on_log=lambda i, step, m: logs.append((i, step, m["loss"],
                                                                 m["auxk_loss"])))
  assert len(drawn) == len(xs)
  for i, c in enumerate(rules):
    alone_logs = []
    alone = loop.train_loop(train.replicate(fresh_state(c), 4), xs, log_every=2,
                             progress=False,
                             on_log=lambda step, m: alone_logs.append((step, m["loss"],
                                                                       m["auxk_loss"])))
    assert tree_equal(train.unreplicate(many[i]), train.unreplicate(alone)), i
    assert [log[1:] for log in logs if log[0] == i] == alone_logs
    assert alone_logs[0][2] > 0  # AuxK ran
  assert not tree_equal(train.unreplicate(many[0]).params, train.unreplicate(many[1]).params)


def test_train_many_refuses_states_that_cannot_share_batches():
  other = dataclasses.replace(RULES["topk"], batch_size=2 * B)
  with pytest.raises(ValueError, match=r"must share the batch .* state 1 has \(64, 8, 50\)"):
    loop.train_many([train.replicate(fresh_state(c), 4) for c in (RULES["topk"], other)], [],
                     progress=False)


def test_train_refuses_a_batch_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"batch for step 0 must have shape \(4, 8, 8\)"):
    loop.train_loop(train.replicate(fresh_state(RULES["batchtopk"]), 4),
                [batch(0).reshape(2, 16, D)], progress=False)
  with pytest.raises(ValueError, match=r"log_every must be an integer >= 1; got 0"):
    loop.train_loop(train.replicate(fresh_state(RULES["batchtopk"]), 4), [], log_every=0)


def test_input_scale_makes_the_mean_squared_norm_d():
  x = batch(50, 256) * 7
  state = train.create_train_state(RULES["topk"], x)
  np.testing.assert_allclose(np.mean(np.sum((x * float(state.input_scale)) ** 2, axis=1)), D,
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"sample_NxD must have shape \[N, 8\]"):
    train.create_train_state(RULES["topk"], x[:, :5])
  with pytest.raises(ValueError, match=r"finite and not all zero"):
    train.create_train_state(RULES["topk"], np.zeros((4, D)))


# --- Dead latents --------------------------------------------------------------------

@pytest.mark.slow
def test_auxk_revives_dead_latents():
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32, active=3))
  dead_F = np.arange(32) < 8
  revived = {}
  for weight in (1 / 32, 0.0):
    c = TrainConfig(SAEConfig(16, 32, k=3, selection="batchtopk"), batch_size=128, steps=200,
                    lr=2e-3, warmup_steps=0, threshold_start=0, dead_tokens=5 * 128,
                    auxk_weight=weight)
    state = train.create_train_state(c, source.sample(10**6, 1024))
    # Latents 0..7 respond weakly, so they never win a place and count as dead.
    weak = np.where(dead_F, 0.02, 1.0).astype(np.float32)[None, :]
    state = state.replace(params=dict(state.params, W_enc=state.params["W_enc"] * weak),
                          steps_since_fired_F=jnp.where(dead_F, c.dead_steps, 0))
    state = loop.train_loop(train.replicate(state, 1), source.batches(128), progress=False)
    since_F = train.unreplicate(state).steps_since_fired_F
    revived[weight] = int(np.sum(since_F[dead_F] < c.dead_steps))
  assert revived[0.0] == 0  # nothing else ever trains them
  assert revived[1 / 32] >= 6


# --- Learning a known dictionary -----------------------------------------------------

@pytest.mark.parametrize("rule, max_fvu", [
    ("batchtopk", 0.15),
    ("sampled", 0.15),
    # TopK keeps exactly k = 4 per token while ~Poisson(4) features fire, so the
    # tokens with more lose some: its floor here is ~0.16.
    ("topk", 0.2),
])
@pytest.mark.slow
def test_learns_a_known_dictionary(rule, max_fvu):
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=32, n_features=64, active=4))
  c = TrainConfig(SAEConfig(32, 128, k=4, selection=rule, l=16.0), batch_size=256, steps=1500,
                  warmup_steps=100, threshold_start=750, dead_tokens=256 * 200)
  state = train.create_train_state(c, source.sample(10**6, 2048))
  state = train.unreplicate(loop.train_loop(train.replicate(state, 1), source.batches(256),
                                        progress=False))
  cosines = synthetic.best_cosines(state.params["W_dec"], source.dictionary)
  assert np.mean(cosines >= 0.9) >= 0.8

  # Held out, in inference mode: a fixed threshold (TopK: per-token top-k).
  x = jnp.asarray(source.sample(10**6 + 1, 4096)) * state.input_scale
  sae = model.SAE(c.sae)
  variables = {"params": state.params}
  z = sae.apply(variables, x, state.threshold, method=model.SAE.encode_inference)
  xhat = sae.apply(variables, z, method=model.SAE.decode)
  fvu = float(jnp.sum((x - xhat) ** 2) / jnp.sum((x - x.mean(0)[None, :]) ** 2))
  assert fvu < max_fvu
  l0 = float(jnp.mean(jnp.sum(z > 0, axis=1)))
  assert abs(l0 - c.sae.k) <= 0.25 * c.sae.k
