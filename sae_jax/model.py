"""The SAE's parameters and its two linear maps (SPEC.md, "The SAE").

    pre_BxF  = (x_BxD - b_dec) @ W_enc_DxF + b_enc
    xhat_BxD = z_BxF @ W_dec_FxD + b_dec

    z_BxF    = select(relu(pre_BxF))      training: batch-dependent (the config's rule)
             = relu(pre_BxF) > theta_F     inference: a threshold per latent (TopK: per token)

JumpReLU (`jumprelu.py`) does not subtract b_dec, and learns its thresholds
theta_F as a parameter. Nor does a transcoder (`transcoder.py`), whose
xhat reconstructs another hook than the x it reads.

The selection rules themselves live in `selection.py`; losses, optimisation
and I/O live elsewhere.
"""

import typing

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from sae_jax import selection
from sae_jax.config import SAEConfig

SKETCH_STREAM = 0x5CE7  # folded into a step's key for the leverage sketch
# JumpReLU's thresholds at init (scaled units): dictionary_learning's, from
# Appendix I of the paper.
INITIAL_THRESHOLD = 0.001


def _unit_rows(key, shape, dtype=jnp.float32):
  w = jax.random.normal(key, shape, dtype)
  return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def encoder_product(params: dict, x_BxD: jax.Array, compute_dtype: str, centre: bool = True
                    ) -> tuple[jax.Array, jax.Array]:
  """(x - b_dec in the compute dtype, (x - b_dec) @ W_enc [B, F] accumulated
  in float32): `encoder` before b_enc is added. `centre` False: x, not x - b_dec."""
  dtype = jnp.dtype(compute_dtype)
  centred_BxD = (x_BxD - params["b_dec"][None, :] if centre else x_BxD).astype(dtype)
  return centred_BxD, jnp.matmul(centred_BxD, params["W_enc"].astype(dtype),
                                 preferred_element_type=jnp.float32)


def encoder(params: dict, x_BxD: jax.Array, compute_dtype: str, centre: bool = True
            ) -> tuple[jax.Array, jax.Array]:
  """(x - b_dec in the compute dtype, pre-activations [B, F] accumulated in
  float32) from parameters {W_enc, b_enc, b_dec}; `centre` False (JumpReLU):
  x @ W_enc + b_enc."""
  centred_BxD, product_BxF = encoder_product(params, x_BxD, compute_dtype, centre)
  return centred_BxD, product_BxF + params["b_enc"][None, :]


class SAE(nn.Module):
  """Parameters W_enc [D, F], b_enc [F], W_dec [F, D] (unit rows), b_dec [D];
  JumpReLU also threshold [F].

  At init W_enc = W_dec^T and both biases are zero; `init_params` also sets
  b_dec to the geometric median of a data sample (not for JumpReLU, as
  dictionary_learning), and JumpReLU's thresholds start at INITIAL_THRESHOLD.
  """
  config: SAEConfig

  def setup(self):
    D, F = self.config.d_model, self.config.n_latents
    self.W_dec = self.param("W_dec", _unit_rows, (F, D))
    # Evaluated only at init, when W_dec has just been drawn.
    self.W_enc = self.param("W_enc", lambda key, shape: self.W_dec.T, (D, F))
    self.b_enc = self.param("b_enc", nn.initializers.zeros, (F,))
    self.b_dec = self.param("b_dec", nn.initializers.zeros, (D,))
    if self.config.selection == "jumprelu":
      self.threshold = self.param("threshold", nn.initializers.constant(INITIAL_THRESHOLD), (F,))

  def pre(self, x_BxD: jax.Array) -> jax.Array:
    """Encoder pre-activations [B, F], accumulated in float32."""
    params = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
    return encoder(params, x_BxD, self.config.compute_dtype, centre=self.config.centred)[1]

  def select(self, a_BxF: jax.Array, *, key=None, axis_name=None, pool=None) -> jax.Array:
    """The training selection of non-negative activations [B, F].

    Batch-dependent except for TopK. `key` is the step's: it draws the
    Sampled-SAE pool (with `sample_pool`) and the leverage sketch;
    `axis_name` makes the batch global; `pool` [P] is a kept Sampled-SAE
    pool to select in (`pool_every`), None to choose one on this batch.
    """
    c = self.config
    if c.selection == "jumprelu":  # the training forward, θ learned (relu(pre) as at inference)
      return a_BxF * (a_BxF > self.threshold[None, :])
    if c.selection == "topk":
      return selection.topk(a_BxF, c.k)
    if c.selection == "batchtopk":
      return selection.batch_topk(a_BxF, c.k, axis_name=axis_name)
    rule = c.pool_rule
    return selection.sampled_select(a_BxF, rule.pop("k"), rule.pop("l"), axis_name=axis_name,
                                    pool=pool, **sampled_options(key, **rule))

  def encode(self, x_BxD: jax.Array, *, key=None, axis_name=None, pool=None) -> jax.Array:
    """Training-mode codes [B, F]: the config's selection rule on relu(pre)."""
    return self.select(jax.nn.relu(self.pre(x_BxD)), key=key, axis_name=axis_name, pool=pool)

  def encode_inference(self, x_BxD: jax.Array, threshold: jax.Array) -> jax.Array:
    """Inference-mode codes [B, F]: a token's code never depends on other tokens.

    BatchTopK and Sampled-SAE keep the entries above `threshold`, one per
    latent [F] (`thresholds.calibrate`) or one for all; TopK keeps each
    token's k largest (and ignores `threshold`).
    """
    return self.select_inference(jax.nn.relu(self.pre(x_BxD)), threshold)

  def select_inference(self, a_BxF: jax.Array, threshold: jax.Array) -> jax.Array:
    """`encode_inference`'s rule on non-negative activations [B, F]."""
    if self.config.selection == "topk":
      return selection.topk(a_BxF, self.config.k)
    threshold_F = jnp.broadcast_to(threshold, a_BxF.shape[-1:])
    return jnp.where(a_BxF > threshold_F[None, :], a_BxF, 0)

  def decode(self, z_BxF: jax.Array) -> jax.Array:
    """Reconstruction [B, D] from codes [B, F]."""
    return z_BxF @ self.W_dec + self.b_dec[None, :]

  def decode_pooled(self, values_BxP: jax.Array, pool_P: jax.Array) -> jax.Array:
    """Reconstruction [B, D] from a pooled selection: values [B, P] of latents pool_P."""
    return values_BxP @ self.W_dec[pool_P] + self.b_dec[None, :]

  def __call__(self, x_BxD):  # used by `init` only: touches every parameter
    a_BxF = jax.nn.relu(self.pre(x_BxD))
    return self.decode(self.select(a_BxF) if self.config.selection == "jumprelu" else a_BxF)


def sampled_options(key, *, score: str, sample_pool: bool, ridge: float,
                    sketch: typing.Optional[int]) -> dict:
  """The score and pool arguments of `selection.sampled_select`, given the
  step's PRNG key (or None): the key draws the pool only with
  `sample_pool`, and the leverage sketch from a stream of its own."""
  return dict(score=score, key=key if sample_pool else None, ridge=ridge, sketch=sketch,
              sketch_key=None if key is None else jax.random.fold_in(key, SKETCH_STREAM))


def new_pool(a_BxF, key, *, k: int, l: float, axis_name=None, bias=None, **options):
  """A Sampled-SAE pool chosen on this batch (`selection.sampled_pool`); with
  `bias`, the pool of a_BxF + bias. `options` are `sampled_options`'s
  keywords (`SAEConfig.pool_rule` has them all, with k and l)."""
  return selection.sampled_pool(a_BxF, k, l, axis_name=axis_name, bias=bias,
                                **sampled_options(key, **options))


def step_pool(a_BxF, key, kept, *, axis_name=None, bias=None, **rule):
  """The pool a Sampled-SAE batch selects in: None (chosen on the batch by
  the selection itself) unless pools are kept; then `kept` is (the pool
  kept from earlier batches [P], whether this batch chooses a new one, by
  `new_pool` with `rule`)."""
  if kept is None:
    return None
  kept_P, renew = kept
  return lax.cond(renew, lambda: new_pool(a_BxF, key, axis_name=axis_name, bias=bias, **rule),
                  lambda: kept_P)


def geometric_median(x_NxD: jax.Array, n_iter: int = 100, eps: float = 1e-8) -> jax.Array:
  """The point minimising the sum of Euclidean distances to the rows of x,
  by Weiszfeld's iteration from the mean.

  Unlike the mean (25.25, 25.25), one far point barely moves it:

  >>> jnp.round(geometric_median(jnp.array([[0., 0.], [1., 0.], [0., 1.], [100., 100.]])), 3)
  Array([0.5, 0.5], dtype=float32)
  """
  x_NxD = x_NxD.astype(jnp.float32)

  def step(_, y_D):
    weight_N = 1.0 / jnp.maximum(jnp.linalg.norm(x_NxD - y_D[None, :], axis=1), eps)
    return weight_N @ x_NxD / jnp.sum(weight_N)

  return lax.fori_loop(0, n_iter, step, jnp.mean(x_NxD, axis=0))


def init_params(key: jax.Array, sae: SAE, sample_NxD: jax.Array, target_NxD=None) -> dict:
  """SAE parameters as the recipe initialises them.

  Args:
    key: PRNG key for the decoder directions.
    sae: the SAE module, for its sizes (init does not use its rule).
    sample_NxD: activations (already scaled) whose geometric median is b_dec.
    target_NxD: a transcoder's targets for those rows (already scaled): b_dec
      is their geometric median instead.

  Returns:
    A Flax variables dict {"params": {...}} for `sae`.
  """
  d_model = sae.config.d_model
  if sample_NxD.ndim != 2 or sample_NxD.shape[1] != d_model:
    raise ValueError(
        f"sample_NxD must have shape [N, {d_model}] (N tokens of width d_model); "
        f"got {sample_NxD.shape}")
  variables = sae.init(key, sample_NxD[:1])
  if sae.config.selection == "jumprelu":
    return {"params": dict(variables["params"])}
  params = dict(variables["params"],
                b_dec=geometric_median(sample_NxD if target_NxD is None else target_NxD))
  return {"params": params}
