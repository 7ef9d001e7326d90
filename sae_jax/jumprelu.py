"""JumpReLU (Rajamanoharan et al. 2024), trained as dictionary_learning
0.1.0's `JumpReluTrainer` trains it.

    pre_BxF  = x_BxD @ W_enc + b_enc                 (b_dec is not subtracted)
    f_BxF    = pre · H(pre - θ_F)                     θ: a learned threshold per latent
    xhat_BxD = f @ W_dec + b_dec
    loss     = mean_b ||x_b - xhat_b||²  +  c · s(step) · (L0 / target - 1)²
    L0       = mean_b Σ_F H(f - θ),   s(step) = min(step / sparsity_warmup_steps, 1)

H, the step, has no gradient. Straight-through estimators with the
rectangle kernel rect(u) = 1[-1/2 < u < 1/2] and bandwidth ε give θ one:

    ∂f/∂pre = H(pre - θ),            ∂f/∂θ = -(θ/ε) · rect((pre - θ)/ε)
    ∂H(f - θ)/∂f = 0,                ∂H(f - θ)/∂θ = -(1/ε) · rect((f - θ)/ε)

θ starts at `model.INITIAL_THRESHOLD`. The L0 estimator is taken at f, the jump's output (0 where the latent is
off), not at pre: so dictionary_learning's `StepFunction.apply(f, ...)`.
At inference a latent is on where relu(pre) > θ, as SAELens' jumprelu
architecture encodes (the same codes while θ >= 0).

Across devices L0 is the global batch's: the penalty's gradient is its
derivative at the global L0 times each device's d(L0)/dθ, whose mean over
the devices is the global one, so the step is the one-device step.
"""

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import gradients as gradients_lib
from sae_jax import losses
from sae_jax import model
from sae_jax import scoring


def _rectangle(u):
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(pre_BxF, threshold_F, bandwidth: float):
  """pre · H(pre - θ), with the straight-through gradient for θ."""
  return pre_BxF * (pre_BxF > threshold_F[None, :]).astype(pre_BxF.dtype)


def _jump_forward(pre_BxF, threshold_F, bandwidth):
  return jump(pre_BxF, threshold_F, bandwidth), (pre_BxF, threshold_F)


def _jump_backward(bandwidth, saved, g_BxF):
  pre_BxF, threshold_F = saved
  theta_1xF = threshold_F[None, :]
  on_BxF = (pre_BxF > theta_1xF).astype(g_BxF.dtype)
  theta_BxF = -(theta_1xF / bandwidth) * _rectangle((pre_BxF - theta_1xF) / bandwidth) * g_BxF
  return on_BxF * g_BxF, jnp.sum(theta_BxF, axis=0)  # θ_F is broadcast over the tokens


jump.defvjp(_jump_forward, _jump_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(f_BxF, threshold_F, bandwidth: float):
  """H(f - θ) as floats, with the straight-through gradient for θ (none for f)."""
  return (f_BxF > threshold_F[None, :]).astype(f_BxF.dtype)


def _step_forward(f_BxF, threshold_F, bandwidth):
  return step(f_BxF, threshold_F, bandwidth), (f_BxF, threshold_F)


def _step_backward(bandwidth, saved, g_BxF):
  f_BxF, threshold_F = saved
  theta_BxF = -(1 / bandwidth) * _rectangle((f_BxF - threshold_F[None, :]) / bandwidth) * g_BxF
  return jnp.zeros_like(f_BxF), jnp.sum(theta_BxF, axis=0)  # θ_F is broadcast over the tokens


step.defvjp(_step_forward, _step_backward)


def sparsity_scale(step_count, warmup_steps: int):
  """The penalty's warm-up factor: step / warmup_steps, at most 1 (1 with no warm-up)."""
  if not warmup_steps:
    return jnp.float32(1.0)
  return jnp.minimum(step_count.astype(jnp.float32) / warmup_steps, 1.0)


class Outputs(typing.NamedTuple):
  """What a JumpReLU step reports besides the gradients (this device's tokens)."""
  mse: jax.Array  # this device's share of the reconstruction loss
  sparsity: jax.Array  # the L0 penalty, c · s · (L0 / target - 1)², at the global L0
  xhat_BxD: jax.Array
  n_active: jax.Array  # int32 entries on
  fired_F: jax.Array  # bool, latents on at least once in the global batch


def encode(params: dict, x_BxD: jax.Array, bandwidth: float, compute_dtype: str = "float32"):
  """(pre-activations [B, F] in float32, codes f [B, F]) as training computes them."""
  pre_BxF = model.encoder(params, x_BxD, compute_dtype, centre=False)[1]
  return pre_BxF, jump(pre_BxF, params["threshold"], bandwidth)


def gradients(params: dict, x_BxD: jax.Array, step_count: jax.Array, axis_name, *,
              target_l0: float, bandwidth: float, sparsity_penalty: float,
              sparsity_warmup_steps: int, compute_dtype: str = "float32", target_BxD=None):
  """This device's gradient of its share of the loss (`pmean` over the
  devices gives the global one), and the step's `Outputs`; xhat reconstructs
  `target_BxD` (a transcoder's), or x_BxD itself when None."""
  y_BxD = x_BxD if target_BxD is None else target_BxD
  n_tokens = scoring.global_tokens(x_BxD.shape[0], axis_name)
  scale = sparsity_scale(step_count, sparsity_warmup_steps)

  def loss_fn(params):
    _, f_BxF = encode(params, x_BxD, bandwidth, compute_dtype)
    xhat_BxD = f_BxF @ params["W_dec"] + params["b_dec"][None, :]
    mse = losses.mse(y_BxD, xhat_BxD)
    on_BxF = step(f_BxF, params["threshold"], bandwidth)
    local_l0 = jnp.sum(on_BxF) / x_BxD.shape[0]
    count = jnp.sum(lax.stop_gradient(on_BxF) > 0, dtype=jnp.int32)  # exact in any order
    l0 = (count if axis_name is None else lax.psum(count, axis_name)) / n_tokens
    # d/dθ of c·s·(L0/target - 1)² is this factor times dL0/dθ.
    factor = 2 * sparsity_penalty * scale * (l0 / target_l0 - 1) / target_l0
    sparsity = sparsity_penalty * scale * jnp.square(l0 / target_l0 - 1)
    fired_F = jnp.any(f_BxF != 0, axis=0)
    if axis_name is not None:
      fired_F = lax.psum(fired_F.astype(jnp.int32), axis_name) > 0
    n_active = jnp.sum(f_BxF != 0, dtype=jnp.int32)
    return mse + lax.stop_gradient(factor) * local_l0, Outputs(mse, sparsity, xhat_BxD,
                                                               n_active, fired_F)

  (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      gradients_lib.varying(params, axis_name))
  return grads, out
