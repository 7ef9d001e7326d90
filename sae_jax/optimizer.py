"""The training recipe's optimiser: clip, Adam, warm-up and decay, and the
unit-norm constraint on decoder rows (SPEC.md, "Training recipe")."""

import math
import typing

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sae_jax import collectives


def default_learning_rate(n_latents: int) -> float:
  """lr = 2e-4 / sqrt(F / 2^14), the recipe's scaling with dictionary size."""
  return 2e-4 / math.sqrt(n_latents / 2**14)


def learning_rate_schedule(peak: float, total_steps: int, *, warmup_steps: int = 1000,
                           decay_fraction: float = 0.2) -> optax.Schedule:
  """Linear warm-up to `peak`, constant, then linear decay to 0 over the last
  `decay_fraction` of `total_steps`.

  >>> schedule = learning_rate_schedule(1.0, 100, warmup_steps=10, decay_fraction=0.2)
  >>> [float(schedule(s)) for s in (0, 5, 10, 80, 90, 100)]
  [0.0, 0.5, 1.0, 1.0, 0.5, 0.0]
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1; got {total_steps}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
  if not 0 <= decay_fraction <= 1:
    raise ValueError(f"decay_fraction must be in [0, 1]; got {decay_fraction}")
  decay_start = total_steps - round(decay_fraction * total_steps)
  if warmup_steps > decay_start:
    raise ValueError(
        f"warmup_steps ({warmup_steps}) must end before the decay starts at step "
        f"{decay_start} (total_steps={total_steps}, decay_fraction={decay_fraction})")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    decay_steps = total_steps - decay_start
    decay = jnp.clip((total_steps - step) / decay_steps, 0.0, 1.0) if decay_steps else 1.0
    return peak * jnp.minimum(warm, decay)

  return schedule


def _rows_unit(w_FxD):
  return w_FxD / jnp.linalg.norm(w_FxD, axis=-1, keepdims=True)


def project_out_parallel(path_name: str = "W_dec") -> optax.GradientTransformation:
  """Removes the component of each `path_name` row's update along that row.

  For unit-norm rows w and update g: g - (g . w) w, so a step moves rows
  along their sphere to first order. Needs `params` in `update`.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("project_out_parallel needs params: call update(updates, state, params)")

    def project(path, g, w):
      if jax.tree_util.keystr(path[-1:], simple=True, separator="/") != path_name:
        return g
      w_FxD = _rows_unit(w)
      return g - jnp.sum(g * w_FxD, axis=-1, keepdims=True) * w_FxD

    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(init, update)


def normalize_rows(params: typing.Any, path_name: str = "W_dec") -> typing.Any:
  """`params` with every `path_name` row scaled back to unit norm."""

  def normalize(path, w):
    if jax.tree_util.keystr(path[-1:], simple=True, separator="/") != path_name:
      return w
    return _rows_unit(w)

  return jax.tree_util.tree_map_with_path(normalize, params)


def make_optimizer(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9,
                   b2: float = 0.999, clip_norm: float = 1.0) -> optax.GradientTransformation:
  """Projection of decoder-row gradients, global-norm clipping, then Adam.

  Projecting first means the clip sees the gradient that will be applied.
  """
  return optax.chain(
      project_out_parallel(),
      optax.clip_by_global_norm(clip_norm),
      optax.adam(learning_rate, b1=b1, b2=b2),
  )


def add_at_columns(x_DxF, cols_C, g_DxC):
  """x plus g at the distinct columns cols_C; a column past the last is
  left out.

  Written as a gather of g's columns in one pass over x, not as a scatter
  into x's columns: XLA:CPU scatters a strided column one element at a
  time, so a scatter's cost grows with the columns and the gather's does
  not (docs/speed.md has the measurements).
  """
  n_cols = cols_C.shape[0]
  slot_F = jnp.full(x_DxF.shape[1], n_cols, jnp.int32).at[cols_C].set(
      jnp.arange(n_cols, dtype=jnp.int32), mode="drop")
  g_DxC1 = jnp.concatenate([g_DxC, jnp.zeros((g_DxC.shape[0], 1), g_DxC.dtype)], axis=1)
  return x_DxF + g_DxC1.at[:, slot_F].get(mode="promise_in_bounds")


def add_at(name: str, x, pool_P, g):
  """x (parameter `name`'s shape) plus its pooled gradient g at the distinct
  latents pool_P: W_enc's columns, rows otherwise; an index past the last
  latent is left out."""
  g = g.astype(x.dtype)  # under JAX_ENABLE_X64 a rate may be float64
  if name == "W_enc":
    return add_at_columns(x, pool_P, g)
  return x.at[pool_P].add(g, mode="drop")


def add_pooled(into: dict, grads: dict, pool_P) -> dict:
  """`into` (dense gradients) plus pooled ones (W_enc [D, P], b_enc [P],
  W_dec [P, D], b_dec [D]) at the distinct latents pool_P; an index past
  the last latent is left out (such indices may repeat)."""
  return {name: into[name] + g if name == "b_dec" else add_at(name, into[name], pool_P, g)
          for name, g in grads.items()}


def dense_grads(grads: dict, pool_P, params: dict) -> dict:
  """Pooled gradients as dense ones, zero outside the pool (`add_pooled`);
  `grads` itself when pool_P is None."""
  if pool_P is None:
    return grads
  return add_pooled(jax.tree.map(jnp.zeros_like, params), grads, pool_P)


ROW_BLOCK = 1024
"""Rows `_by_row_blocks` takes at a time."""


def _by_row_blocks(fn, p_FxD, *others_FxD):
  """fn(p, *others) (arrays of rows, `fn` row by row), written over p_FxD
  in place a block of ROW_BLOCK rows at a time.

  Written as one expression, the decoder's update and renormalisation
  (a row sum, then a division) make XLA:CPU write the result out of place
  and copy it back; by blocks the rows stay in cache between the two
  (docs/speed.md has the measurements).
  """
  n_rows = p_FxD.shape[0]
  n_full = n_rows // ROW_BLOCK

  def block(i, p_FxD):
    rows = lambda x: lax.dynamic_slice_in_dim(x, i * ROW_BLOCK, ROW_BLOCK)
    return lax.dynamic_update_slice_in_dim(
        p_FxD, fn(rows(p_FxD), *map(rows, others_FxD)), i * ROW_BLOCK, axis=0)

  if n_full:
    p_FxD = lax.fori_loop(0, n_full, block, p_FxD)
  done = n_full * ROW_BLOCK
  if done < n_rows:
    p_FxD = p_FxD.at[done:].set(fn(p_FxD[done:], *(x[done:] for x in others_FxD)))
  return p_FxD


def global_norm(grads: dict, latent_axis=None):
  """The gradients' global norm; with `latent_axis`, all but b_dec's are
  split over that mapped axis (`mesh.py`), and their squares are summed
  over it in one order."""
  if latent_axis is None:
    return optax.tree.norm(grads)
  split = sum(jnp.sum(jnp.square(g)) for name, g in grads.items() if name != "b_dec")
  return jnp.sqrt(collectives.ordered_psum(split, latent_axis)
                  + jnp.sum(jnp.square(grads["b_dec"])))


def update(params: dict, grads: dict, opt_state, learning_rate, *, b1: float = 0.9,
           b2: float = 0.999, clip_norm: float = 1.0, pool_P=None, apply=True,
           eps: float = 1e-8, latent_axis=None):
  """One step of `make_optimizer` followed by `normalize_rows`, written out
  so that XLA updates parameters and moments in place.

  Args:
    params: the SAE's parameters {W_enc, b_enc, W_dec, b_dec}.
    grads: their gradients, or with `pool_P` their pooled gradients (see
      `dense_grads`): projection and clipping then look at the pool only.
    opt_state: `make_optimizer(...).init(params)`'s state, which this returns
      updated in the same structure.
    learning_rate: the step's learning rate.
    pool_P: distinct latent indices, or None when `grads` are dense; an
      index past the last latent is left out (its gradient must be zero).
    apply: bool scalar; where False, params and state come back unchanged
      (non-finite gradients are ignored).
    latent_axis: the mapped axis every F-sized array is split over, if any
      (the clip's norm is then summed over it: `global_norm`).

  Returns:
    (params, opt_state), as `make_optimizer` and `normalize_rows` give them.
    Adam still decays the moments and moves every parameter outside the
    pool; only the gradient is zero there.
  """
  project_state, clip_state, (adam, schedule_state) = opt_state
  grads = dict(grads)
  w_PxD = _rows_unit(params["W_dec"] if pool_P is None else
                     params["W_dec"].at[pool_P].get(mode="clip"))
  grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * w_PxD, -1, keepdims=True) * w_PxD
  norm = global_norm(grads, latent_axis)
  count = optax.safe_int32_increment(adam.count)
  correct1 = 1 - b1**count.astype(jnp.float32)
  correct2 = 1 - b2**count.astype(jnp.float32)
  # A skipped step is the same passes with rates that change nothing:
  # selecting between old and new values instead would make XLA copy the
  # moments. (1 - b) is taken in float64 first, as optax does.
  clip = jnp.where(apply, jnp.minimum(1.0, clip_norm / norm), 0.0)
  rate1, keep1 = jnp.where(apply, 1 - b1, 0.0), jnp.where(apply, b1, 1.0)
  rate2, keep2 = jnp.where(apply, 1 - b2, 0.0), jnp.where(apply, b2, 1.0)
  learning_rate = jnp.where(apply, learning_rate, 0.0)

  def moment(name, m, rate, keep, g):
    if pool_P is None or name == "b_dec":
      return rate * g + keep * m
    # Zero gradient outside the pool: decay everything, then add the pool's
    # term at its distinct indices (no [F, D] gradient is written).
    return add_at(name, keep * m, pool_P, rate * g)

  def adam_step(p, m, v):
    return p - learning_rate * ((m / correct1) / (jnp.sqrt(v / correct2) + eps))

  def unit_rows(p, m, v):  # the step, then rows back to unit norm
    new = adam_step(p, m, v)
    return new / jnp.where(apply, jnp.linalg.norm(new, axis=-1, keepdims=True), 1.0)

  mu, nu, new = {}, {}, {}
  for name, p in params.items():
    g = jnp.where(apply, grads[name], 0.0) * clip  # g may be NaN when skipped
    mu[name] = moment(name, adam.mu[name], rate1, keep1, g)
    nu[name] = moment(name, adam.nu[name], rate2, keep2, g**2)
    if name == "W_dec":
      new[name] = _by_row_blocks(unit_rows, p, mu[name], nu[name])
    else:
      new[name] = adam_step(p, mu[name], nu[name])
  adam = adam._replace(count=jnp.where(apply, count, adam.count), mu=mu, nu=nu)
  params = new
  return params, (project_state, clip_state, (adam, schedule_state))
