"""Column scores: how strongly each latent fires across the batch.

Scores decide the candidate pool, so they must be the same bits however the
batch is split over devices. A float sum over tokens is not: its rounding
depends on the order of the additions, and `psum` adds per-device partial sums
in yet another order. We therefore sum in fixed point. Each value is cut into
int32 digits at a scale set by its column's (global) maximum; integer sums are
exact and so independent of order and sharding, and the digits are put back
together into a float32 that carries float32 precision.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import validation

# Columns whose largest value is below 2**_MIN_EXPONENT are summed at that
# scale; it keeps the power-of-two scale factors inside float32 range.
_MIN_EXPONENT = -90
# Above this many tokens in one (global) batch the int32 digits would overflow.
MAX_TOKENS = 2**22

NEVER_FIRED_ENTROPY = -1.0


def global_tokens(n_local: int, axis_name) -> int:
  """Tokens in the whole batch: the local count times the axis size."""
  return n_local if axis_name is None else n_local * lax.axis_size(axis_name)


def _pmax(x, axis_name):
  return x if axis_name is None else lax.pmax(x, axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def exact_column_sum(v_BxF: jax.Array, axis_name=None) -> jax.Array:
  """Sum over tokens whose bits do not depend on token order or sharding.

  Args:
    v_BxF: float32 values, tokens along the first axis.
    axis_name: mapped axis the tokens are split over, if any.

  Returns:
    [F] float32 sums, accurate to float32 rounding of the column maximum.

  >>> exact_column_sum(jnp.ones((3, 2)))
  Array([3., 3.], dtype=float32)
  """
  n = global_tokens(v_BxF.shape[0], axis_name)
  if n > MAX_TOKENS:
    raise ValueError(
        f"at most {MAX_TOKENS} tokens per (global) batch are supported by the "
        f"exact column sums; got {n}")
  headroom = max(1, math.ceil(math.log2(n)))
  width = 30 - headroom  # bits per digit; n digits then sum below 2**30
  # Enough digits that the truncated rest of all n values stays below one
  # float32 ulp of the column maximum.
  n_digits = math.ceil((24 + headroom) / width)

  v_BxF = v_BxF.astype(jnp.float32)
  top_F = _pmax(jnp.max(jnp.abs(v_BxF), axis=0), axis_name)
  exponent_F = jnp.maximum(jnp.frexp(top_F)[1], _MIN_EXPONENT)  # |v| < 2**e
  x_BxF = v_BxF * jnp.ldexp(jnp.float32(1), width - exponent_F)[None, :]  # |x| < 2**width
  sums = []
  for _ in range(n_digits):
    digit_BxF = jnp.floor(x_BxF)
    x_BxF = (x_BxF - digit_BxF) * float(2**width)  # exact: a fraction, shifted
    sums.append(_psum(jnp.sum(digit_BxF.astype(jnp.int32), axis=0), axis_name))
  total_F = jnp.zeros_like(top_F)
  for i in reversed(range(n_digits)):  # least significant first
    total_F = total_F + jnp.ldexp(sums[i].astype(jnp.float32),
                                  exponent_F - width * (i + 1))
  return total_F


@functools.partial(jax.jit, static_argnames=("method", "axis_name"))
def column_scores(a: jax.Array, method: str = "l2", *,
                  axis_name=None) -> jax.Array:
  """Scores every latent (column) of `a` over all tokens.

  Negative entries count as zero. Methods (see SPEC.md):
    "l2": ||a_:,j||_2;  "squared_l2": ||a_:,j||_2^2;
    "entropy": -sum_b p_bj log p_bj with p_bj = a_bj / sum_b a_bj, in nats.
      A column that never fires scores -1, below every column that does;
      one that fires on a single token scores 0.
    "uniform": all ones (meaningful only for a sampled pool).

  Args:
    a: [..., F] activations; every leading axis is tokens.
    method: one of "l2", "squared_l2", "entropy", "uniform".
    axis_name: mapped axis the tokens are split over. With it, the scores are
      those of the whole (concatenated) batch, bit for bit, on every device.

  Returns:
    [F] float32 scores.

  >>> column_scores(jnp.array([[3., -1.], [4., 0.]]))
  Array([5., 0.], dtype=float32)
  """
  validation.check_activations(a)
  validation.check_score_method(method)
  a_BxF = jnp.maximum(a.reshape(-1, a.shape[-1]).astype(jnp.float32), 0.0)
  if method == "uniform":
    return jnp.ones(a.shape[-1], jnp.float32)
  if method in ("l2", "squared_l2"):
    sq_F = exact_column_sum(a_BxF * a_BxF, axis_name)
    return jnp.sqrt(sq_F) if method == "l2" else sq_F
  # entropy
  mass_F = exact_column_sum(a_BxF, axis_name)
  p_BxF = a_BxF / jnp.where(mass_F > 0, mass_F, 1.0)[None, :]
  plogp_BxF = jnp.where(p_BxF > 0, p_BxF * jnp.log(jnp.where(p_BxF > 0, p_BxF, 1.0)), 0.0)
  entropy_F = jnp.maximum(-exact_column_sum(plogp_BxF, axis_name), 0.0)
  return jnp.where(mass_F > 0, entropy_F, NEVER_FIRED_ENTROPY)
