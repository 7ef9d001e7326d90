"""The training step (SPEC.md, "Training recipe"), its state, and its sharded forms.

`train_step(state, batch)` is a pure function of one device's shard of the
batch; `p_train_step` maps it over the devices with `jax.shard_map`, the
state replicated and the batch split on axis "data" (under `jax.pmap` the
same function runs unchanged). Through that axis, BatchTopK and Sampled-SAE
select over the global batch, gradients are averaged, and the threshold and
dead-latent counters come out identical on every device. The loop that runs
it is `loop.py`. With the latents split over a second mesh axis
(`--latent-shards`), `latent_step.py` steps the state instead.
"""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from sae_jax import auxk
from sae_jax import collectives
from sae_jax import gradients
from sae_jax import jumprelu
from sae_jax import losses
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import optimizer
from sae_jax import scoring
from sae_jax import transcoder
from sae_jax.config import TrainConfig

AXIS = mesh_lib.DATA
global_batch = mesh_lib.global_batch


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; the config rides along as static data."""
  step: jax.Array  # int32: steps taken, skipped ones included
  params: typing.Any
  opt_state: optax.OptState
  threshold: jax.Array  # float32 inference threshold theta (scaled units); 0 until learned
  steps_since_fired_F: jax.Array  # int32 per latent, saturating at config.dead_steps
  bad_streak: jax.Array  # int32: consecutive skipped steps
  skipped_steps: jax.Array  # int32: skipped steps in all
  input_scale: jax.Array  # float32 c with E||c·x||² = D
  rng: jax.Array  # uint32 key data for the sampled pools
  # int32: the most latents that can be dead on the step that takes this
  # state, counted from the state before it (from this one for a new
  # state). `loop.train_loop` picks the step's compiled form by it, so a resumed
  # run picks what the uninterrupted run picked.
  dead_at_most: jax.Array
  config: TrainConfig = struct.field(pytree_node=False)
  # int32 [P]: the Sampled-SAE pool kept between renewals; None unless the
  # config keeps pools (sae.pool_every > 1), so other states are unchanged.
  pool_P: typing.Optional[jax.Array] = None
  # float32 c_out with E||c_out·y||² = D for a transcoder's targets y
  # (`transcoder.py`); None for an SAE, whose target is its input.
  target_scale: typing.Optional[jax.Array] = None


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def estimate_input_scale(sample_NxD) -> float:
  """The constant c for which the mean of ||c·x||² over the sample is D."""
  x_NxD = np.asarray(sample_NxD, np.float64)
  mean_sq = float(np.mean(np.sum(np.square(x_NxD), axis=1)))
  if not np.isfinite(mean_sq) or mean_sq <= 0:
    raise ValueError(
        f"sample_NxD must be finite and not all zero to estimate the input scale; "
        f"its mean squared norm is {mean_sq}")
  return float(np.sqrt(x_NxD.shape[1] / mean_sq))


def _optimizer(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
  return optimizer.make_optimizer(learning_rate, b1=config.b1, b2=config.b2,
                                  clip_norm=config.clip_norm)


def _learning_rate(config: TrainConfig, step):
  return optimizer.learning_rate_schedule(
      config.learning_rate, config.total_steps, warmup_steps=config.warmup_steps,
      decay_fraction=config.decay_fraction)(step)


def create_train_state(config: TrainConfig, sample_NxD) -> TrainState:
  """A fresh state (on one device): input scale and b_dec come from `sample_NxD`,
  raw activations [N, D] (a transcoder's pairs: [N, 2·D])."""
  W = config.sae.row_width
  sample_NxD = np.asarray(sample_NxD)
  if sample_NxD.ndim != 2 or sample_NxD.shape[1] != W:
    what = "(input, target) pairs of width 2·d_model" if config.sae.transcoder else "width d_model"
    raise ValueError(
        f"sample_NxD must have shape [N, {W}] (N tokens of {what}); got {sample_NxD.shape}")
  x_NxD, y_NxD = transcoder.sides(sample_NxD, config.sae)
  scale = estimate_input_scale(x_NxD)
  target_scale = estimate_input_scale(y_NxD) if config.sae.transcoder else None
  init_key, pool_key = jax.random.split(jax.random.key(config.seed))
  params = model.init_params(
      init_key, model.SAE(config.sae), jnp.asarray(x_NxD * scale, jnp.float32),
      None if target_scale is None else jnp.asarray(y_NxD * target_scale, jnp.float32))
  params = params["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=_optimizer(config, 0.0).init(params),
      threshold=jnp.zeros((), jnp.float32),
      steps_since_fired_F=jnp.zeros((config.sae.n_latents,), jnp.int32),
      bad_streak=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
      input_scale=jnp.asarray(scale, jnp.float32),
      rng=jax.random.key_data(pool_key),
      dead_at_most=jnp.asarray(can_be_dead(np.zeros(config.sae.n_latents, np.int32),
                                           config.dead_steps, 0)),
      config=config,
      pool_P=jnp.zeros(config.sae.pool_size, jnp.int32) if config.sae.keeps_pool else None,
      target_scale=None if target_scale is None else jnp.asarray(target_scale, jnp.float32))


def scales(state: TrainState) -> tuple:
  """(c_in, c_out), the scales of what the encoder reads and of what the
  decoder reconstructs, as floats: an SAE's input scale twice."""
  c_in = float(np.asarray(state.input_scale))
  return c_in, c_in if state.target_scale is None else float(np.asarray(state.target_scale))


def scaled(state: TrainState, rows_BxW) -> tuple:
  """(what the encoder reads, what xhat reconstructs) of raw rows, each in
  its scaled units: for an SAE the same array, c·x."""
  rows_BxW = rows_BxW.astype(jnp.float32)
  if state.target_scale is None:
    x_BxD = rows_BxW * state.input_scale
    return x_BxD, x_BxD
  x_BxD, y_BxD = transcoder.sides(rows_BxW, state.config.sae)
  return x_BxD * state.input_scale, y_BxD * state.target_scale


def _batch_threshold(token_min_B: jax.Array, selection: str) -> jax.Array:
  """The value this step's threshold EMA moves towards (inf: none), as
  dictionary_learning computes it: the smallest selected activation of the
  global batch; for TopK the mean over tokens of each token's smallest."""
  if selection != "topk":
    return lax.pmin(jnp.min(token_min_B), AXIS)
  found_B = jnp.isfinite(token_min_B)
  total = collectives.ordered_psum(jnp.sum(jnp.where(found_B, token_min_B, 0)), AXIS)
  count = lax.psum(jnp.sum(found_B, dtype=jnp.int32), AXIS)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.inf)


def next_threshold(state: TrainState, token_min_B: jax.Array) -> jax.Array:
  """θ after a step whose tokens' smallest selected values are token_min_B
  (inf: none): the EMA of `_batch_threshold`, started by its first value
  after threshold_start (dictionary_learning's)."""
  c = state.config
  batch_theta = _batch_threshold(token_min_B, c.sae.selection)
  ema = jnp.where(state.threshold > 0,
                  c.threshold_beta * state.threshold + (1 - c.threshold_beta) * batch_theta,
                  batch_theta)
  return jnp.where((state.step > c.threshold_start) & jnp.isfinite(batch_theta),
                   ema, state.threshold)


def can_be_dead(silent_F, dead_steps: int, later: int):
  """How many latents can be dead `later` steps after the next step of a
  state whose steps_since_fired_F is silent_F (`losses.dead_latents`);
  an int32 scalar, or an int for a NumPy silent_F."""
  xp = np if isinstance(silent_F, np.ndarray) else jnp
  return xp.sum(silent_F + later + 1 >= dead_steps, dtype=xp.int32)


FORMS = ("general", "all_alive", "packed")
"""The compiled forms of the fast step (see `train_step`)."""


def loss_rule(config: TrainConfig) -> dict:
  """`gradients.dense`'s keywords: when a latent is dead, how AuxK weighs it,
  and Matryoshka's groups."""
  return dict(dead_steps=config.dead_steps, auxk_k=config.auxk_k, auxk_weight=config.auxk_weight,
              nested=config.nested)


def fast_rule(config: TrainConfig) -> dict:
  """`gradients.fast`'s keywords for this run."""
  sae = config.sae
  return dict(loss_rule(config), selection=sae.selection, k=sae.k, pool_rule=sae.pool_rule,
              compute_dtype=sae.compute_dtype, layout=config.layout, centre=sae.centred)


def train_step(state: TrainState, x_BxD: jax.Array, form: str = "general",
               capacity: typing.Optional[int] = None) -> tuple[TrainState, dict]:
  """One optimisation step on this device's tokens x_BxD (raw activations).

  Must run where axis "data" is bound: under `p_train_step` (shard_map,
  the state replicated and the batch split on "data"), or under `jax.pmap`.
  A step whose loss or gradient is not finite changes nothing but the step
  and skip counters (and `dead_at_most`, which counts from the state before).

  The metrics (replicated scalars; "scaled units" are those of c·x, with
  E||c·x||² = D):
    mse: mean over the global batch's tokens of ||c·x - xhat||², summed over
      D (dictionary_learning's l2_loss, SAELens' mse_loss); with Matryoshka
      groups, the nested loss's reconstruction term (`matryoshka.loss`).
    auxk_loss: Σ||e - ê||² / Σ||e - mean(e)||² over the batch, e = c·x - xhat
      the residual and ê its reconstruction from each token's top auxk_k dead
      latents (0 while none is dead); dictionary_learning's normalised AuxK.
    loss: mse + auxk_weight · auxk_loss, the value that is differentiated.
    fvu: Σ||c·x - xhat||² / Σ||c·x - mean(c·x)||² (no unit; 1 - explained variance).
    l0: selected entries per token. grad_norm: the gradient's global norm
      before projection and clip. threshold: θ after the step. dead_fraction:
      latents dead after the step. most_silent_steps, lr, skipped_steps, bad_streak.
    JumpReLU (`jumprelu.py`; no AuxK and no threshold EMA, its θ being
      parameters): sparsity_loss, its L0 penalty, in place of auxk_loss;
      loss: mse + sparsity_loss; threshold: the median θ.
    dead_soon: the most latents that can be dead on the step after next
      (`can_be_dead`); `loop.train_loop` picks that step's form by it.

  `form` (static) is "general", or a promise that makes the fast step
  cheaper; `loop.train_loop` picks the cheapest whose promise holds, from the
  state's `dead_at_most`:
    "all_alive": no latent can be dead on this step. The step is compiled
      without AuxK and without the branch that decides whether to run it,
      which would copy the parameters and moments.
    "packed" (Sampled-SAE): at most `capacity` latents can be dead, one of
      `auxk.auxk_capacities(F, auxk_k)` (default the smallest). AuxK
      runs on the dead latents packed into that many columns, its
      gradients are added as rows next to the pool's, and the optimiser
      updates those rows only (with Adam's decay everywhere), without dense
      gradients or that branch. `capacity` F promises nothing: the
      gradients are made dense for AuxK on every step, without the branch,
      for when latents are likely dead.
  With a promise broken, AuxK would leave dead latents out. The forms give
  the same numbers up to rounding, not the same bits.
  """
  c = state.config
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}; got {form!r}")
  if form == "packed" and capacity is None:  # the smallest (F for an SAE too small to pack)
    capacity = (packed_capacities(c) or (c.sae.n_latents,))[0]
  x_BxD, y_BxD = scaled(state, x_BxD)
  silent_F = state.steps_since_fired_F
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  lr = _learning_rate(c, state.step)
  kept = (state.pool_P, state.step % c.sae.pool_every == 0) if c.sae.keeps_pool else None

  def apply(grads, auxk_loss, pool_P):
    """The mean over devices (in one order: `collectives`), then the optimiser;
    a non-finite step leaves params and moments as they were."""
    grads, auxk_loss = collectives.ordered_pmean((grads, auxk_loss), AXIS)
    finite = jnp.isfinite(mse + c.auxk_weight * auxk_loss)
    for g in jax.tree.leaves(grads):
      finite &= jnp.all(jnp.isfinite(g))
    params, opt_state = optimizer.update(
        state.params, grads, state.opt_state, lr, b1=c.b1, b2=c.b2, clip_norm=c.clip_norm,
        pool_P=pool_P, apply=finite)
    return params, opt_state, auxk_loss, optax.tree.norm(grads), finite

  jump = c.sae.selection == "jumprelu"
  if jump:  # its own loss, no AuxK: `apply` checks its L0 penalty where AuxK's would be
    grads, out = jumprelu.gradients(state.params, x_BxD, state.step, AXIS, target_BxD=y_BxD,
                                    **jumprelu_rule(c))
    mse = collectives.ordered_pmean(out.mse, AXIS)
    params, opt_state, _, grad_norm, finite = apply(grads, out.sparsity, None)
    penalty = out.sparsity  # at the global L0: the same on every device
  elif c.step == "dense":
    grads, out = gradients.dense(state.params, x_BxD, silent_F, key, model.SAE(c.sae), AXIS,
                                 kept, target_BxD=y_BxD, **loss_rule(c))
    mse = collectives.ordered_pmean(out.mse, AXIS)
    params, opt_state, auxk_loss, grad_norm, finite = apply(grads, out.auxk, None)
  else:
    grads, pool_P, out, with_auxk = gradients.fast(state.params, x_BxD, silent_F, key, AXIS,
                                                   kept, target_BxD=y_BxD, **fast_rule(c))
    mse = collectives.ordered_pmean(out.mse, AXIS)

    def dense_with_auxk():
      return apply(*with_auxk.dense(optimizer.dense_grads(grads, pool_P, state.params)), None)

    if form == "all_alive":
      params, opt_state, auxk_loss, grad_norm, finite = apply(grads, out.auxk, pool_P)
    elif form == "packed" and pool_P is not None and capacity != c.sae.n_latents:
      rows_grads, rows, auxk_loss = with_auxk.rows(grads, pool_P, capacity)
      params, opt_state, auxk_loss, grad_norm, finite = apply(rows_grads, auxk_loss, rows)
    elif pool_P is None or form == "packed":
      # Dense gradients, and AuxK skips itself while none is dead: no branch.
      dense = optimizer.dense_grads(grads, pool_P, state.params)
      params, opt_state, auxk_loss, grad_norm, finite = apply(*with_auxk.dense(dense), None)
    else:  # AuxK runs only while some latent is dead (the same on every device).
      params, opt_state, auxk_loss, grad_norm, finite = lax.cond(
          jnp.any(out.dead_F), dense_with_auxk, lambda: apply(grads, out.auxk, pool_P))
  loss = mse + (penalty if jump else c.auxk_weight * auxk_loss)

  since_F = jnp.where(out.fired_F, 0, jnp.minimum(silent_F + 1, c.dead_steps))
  # JumpReLU's thresholds are parameters: no EMA.
  threshold = state.threshold if jump else next_threshold(state, out.token_min_B)

  state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      threshold=jnp.where(finite, threshold, state.threshold),
      steps_since_fired_F=jnp.where(finite, since_F, state.steps_since_fired_F),
      bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
      dead_at_most=can_be_dead(silent_F, c.dead_steps, 1),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
      pool_P=None if kept is None else jnp.where(finite, out.pool_P, state.pool_P))

  n_tokens = scoring.global_tokens(x_BxD.shape[0], AXIS)
  metrics = {
      "loss": loss,
      "mse": mse,
      **({"sparsity_loss": penalty} if jump else {}),
      "fvu": losses.fvu(y_BxD, out.xhat_BxD, AXIS),
      "l0": lax.psum(out.n_active, AXIS) / n_tokens,
      "dead_fraction": jnp.mean(state.steps_since_fired_F >= c.dead_steps),
      "most_silent_steps": jnp.max(state.steps_since_fired_F),
      "dead_soon": can_be_dead(state.steps_since_fired_F, c.dead_steps, 1),
      **({} if jump else {"auxk_loss": auxk_loss}),
      "threshold": jnp.median(state.params["threshold"]) if jump else state.threshold,
      "lr": lr,
      "grad_norm": grad_norm,
      "skipped_steps": state.skipped_steps,
      "bad_streak": state.bad_streak,
  }
  return state, metrics


def jumprelu_rule(config: TrainConfig) -> dict:
  """`jumprelu.gradients`' keywords for this run."""
  return dict(target_l0=config.target_l0, bandwidth=config.bandwidth,
              sparsity_penalty=config.sparsity_penalty,
              sparsity_warmup_steps=config.sparsity_warmup_steps,
              compute_dtype=config.sae.compute_dtype)


@functools.lru_cache(maxsize=None)
def _mapped_step(mesh: jax.sharding.Mesh, form: str, capacity: typing.Optional[int] = None):
  """train_step's `form` over `mesh`: the state replicated, the batch split on AXIS."""

  def local(state, x_1xbxD):
    return train_step(state, x_1xbxD[0], form, capacity)

  spec = jax.sharding.PartitionSpec
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(AXIS)),
                               out_specs=(spec(), spec())), donate_argnums=0)


def _mesh(state: TrainState) -> jax.sharding.Mesh:
  mesh = state.step.sharding.mesh
  if mesh_lib.LATENT in mesh.axis_names:
    raise ValueError("this state lies on a mesh with a latent axis: step it with "
                     "latent_step.p_train_step (loop.train_loop picks it)")
  return mesh


def p_train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
  """`train_step` on every device of the state's mesh (see `replicate`).

  Args:
    state: a replicated state; it is donated.
    batch: this process's tokens, [local devices, B / devices, D].

  Returns:
    The new replicated state and the step's metrics (replicated scalars).
  """
  mesh = _mesh(state)
  return _mapped_step(mesh, "general")(state, global_batch(batch, mesh))


def p_train_step_all_alive(state: TrainState, batch) -> tuple[TrainState, dict]:
  """`p_train_step` while no latent can be dead (see `train_step`);
  `loop.train_loop` picks it when it may."""
  mesh = _mesh(state)
  return _mapped_step(mesh, "all_alive")(state, global_batch(batch, mesh))


def p_train_step_packed(state: TrainState, batch, capacity: typing.Optional[int] = None
                        ) -> tuple[TrainState, dict]:
  """`p_train_step` while at most `capacity` latents can be dead, one of
  `auxk.auxk_capacities(F, auxk_k)` (by default the smallest) or F
  (see `train_step`); `loop.train_loop` picks it for Sampled-SAE while any
  latent can be dead (any other rule runs `p_train_step` here)."""
  mesh = _mesh(state)
  return _mapped_step(mesh, "packed", capacity)(state, global_batch(batch, mesh))


def packed_capacities(config: TrainConfig) -> tuple:
  """The packed step's capacities (`auxk.auxk_capacities`)."""
  n_latents = config.sae.n_latents
  return auxk.auxk_capacities(n_latents, min(config.auxk_k, n_latents))


def make_mesh(n_devices: typing.Optional[int] = None, latent_shards: int = 1
              ) -> jax.sharding.Mesh:
  """The mesh over all devices, or the first `n_devices` local ones
  (`mesh.make_mesh`; with `latent_shards` > 1, the latents' axis too)."""
  return mesh_lib.make_mesh(n_devices, latent_shards)


def replicate(state: TrainState, n_devices: typing.Optional[int] = None,
              latent_shards: int = 1) -> TrainState:
  """`state` on every device of a mesh (all devices, or the first `n_devices`
  local ones), laid out as `p_train_step` returns it; with `latent_shards`
  M > 1, its F-sized arrays split over M devices (`mesh.py`), as
  `latent_step.p_train_step` takes it."""
  return mesh_lib.place(state, make_mesh(n_devices, latent_shards))


def host(x) -> np.ndarray:
  """A state array's value on the host, read from this process's devices."""
  return mesh_lib.host(x)


def unreplicate(state: TrainState) -> TrainState:
  """A replicated (or latent-sharded) state's value, on the host."""
  return jax.tree.map(host, state)


def shard_batch(x_BxD, n_devices: int) -> np.ndarray:
  """[B, D] -> [n_devices, B / n_devices, D]."""
  x_BxD = np.asarray(x_BxD)
  if x_BxD.ndim != 2 or x_BxD.shape[0] % n_devices:
    raise ValueError(
        f"batch must have shape [B, D] with B divisible by {n_devices} devices; "
        f"got {x_BxD.shape}")
  return x_BxD.reshape(n_devices, -1, x_BxD.shape[1])
