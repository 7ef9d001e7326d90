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
# Tokens per scan step when XLA:CPU sums block by block.
_CPU_BLOCK = 8

NEVER_FIRED_ENTROPY = -1.0


def global_tokens(n_local: int, axis_name) -> int:
  """Tokens in the whole batch: the local count times the axis size."""
  return n_local if axis_name is None else n_local * lax.axis_size(axis_name)


def _fold_max(x_BxF):
  """Max over tokens as a tree of elementwise maxima of 4 quarters."""
  while x_BxF.shape[0] > 1:
    n = x_BxF.shape[0]
    ways = min(4, n)
    size = n // ways
    y_BxF = functools.reduce(jnp.maximum, [x_BxF[i * size:(i + 1) * size] for i in range(ways)])
    if ways * size < n:  # carry the leftover tokens to the next round
      y_BxF = jnp.concatenate([y_BxF, x_BxF[ways * size:]])
    x_BxF = y_BxF
  return x_BxF[0]


def column_max(x_BxF):
  """Max over tokens (axis 0) of a [B, F] array.

  XLA:CPU reduces a leading axis slowly (63 ms at [1024, 24576]); a tree of
  elementwise maxima takes 5 ms. Other backends reduce directly.
  """
  return lax.platform_dependent(
      x_BxF, cpu=_fold_max, default=functools.partial(jnp.max, axis=0))


def _scan_sums(x_BxF, sums_of_block):
  n = x_BxF.shape[0]
  whole = n - n % _CPU_BLOCK
  # The sums of no tokens: zeros that vary over shard_map's devices as x does.
  zeros = sums_of_block(x_BxF[:0])
  total = sums_of_block(x_BxF[whole:]) if whole < n else zeros
  if whole:
    blocks_NxTxF = x_BxF[:whole].reshape(whole // _CPU_BLOCK, _CPU_BLOCK, -1)
    step = lambda acc, blk: (jax.tree.map(jnp.add, acc, sums_of_block(blk)), None)
    total = jax.tree.map(jnp.add, total, lax.scan(step, zeros, blocks_NxTxF)[0])
  return total


def integer_sums(x_BxF, sums_of_block):
  """sums_of_block(x_BxF) for a map to int32 sums over tokens.

  Integer sums are exact, so any blocking gives the same bits. XLA:CPU is
  slow when per-token values are computed on the fly and reduced over a
  leading axis (a [B, F] temporary costs ~45 ms at [1024, 24576]): there a
  scan takes 8 tokens at a time (~10 ms). Other backends reduce directly.

  Args:
    x_BxF: [B, F] input, tokens first.
    sums_of_block: [T, F] -> pytree of [F] int32 sums over its T tokens.
  """
  return lax.platform_dependent(
      x_BxF, cpu=lambda x: _scan_sums(x, sums_of_block), default=sums_of_block)


def exact_column_sum(x_BxF: jax.Array, fn=lambda x: x, axis_name=None, *,
                     bound: float | None = None) -> jax.Array:
  """sum_b fn(x)_bF, with bits that do not depend on token order or sharding.

  Args:
    x_BxF: [B, F] input, tokens first.
    fn: elementwise map to the float32 values summed, applied on the fly.
    axis_name: mapped axis the tokens are split over, if any.
    bound: a known bound on |fn(x)|; without it each column's maximum is
      found first (one more pass), which keeps small columns precise.

  Returns:
    [F] float32 sums, accurate to float32 rounding of the column maximum
    (of `bound`, when given).

  >>> exact_column_sum(jnp.ones((3, 2)))
  Array([3., 3.], dtype=float32)
  """
  n = global_tokens(x_BxF.shape[0], axis_name)
  if n > MAX_TOKENS:
    raise ValueError(
        f"at most {MAX_TOKENS} tokens per (global) batch are supported by the "
        f"exact column sums; got {n}")
  headroom = max(1, math.ceil(math.log2(n)))
  width = 30 - headroom  # bits per digit; n digits then sum below 2**30
  # Enough digits that the truncated rest of all n values stays below one
  # float32 ulp of the column maximum.
  n_digits = math.ceil((24 + headroom) / width)
  values = lambda x: fn(x).astype(jnp.float32)

  if bound is None:
    top_F = column_max(jnp.abs(values(x_BxF)))
    top_F = top_F if axis_name is None else lax.pmax(top_F, axis_name)
  else:
    top_F = jnp.full(x_BxF.shape[1], bound, jnp.float32)
  exponent_F = jnp.maximum(jnp.frexp(top_F)[1], _MIN_EXPONENT)  # |v| < 2**e
  scale_1xF = jnp.ldexp(jnp.float32(1), width - exponent_F)[None, :]

  def digit_sums(x_TxF):
    scaled_TxF = values(x_TxF) * scale_1xF  # |.| < 2**width
    sums = []
    for _ in range(n_digits):
      digit_TxF = jnp.floor(scaled_TxF)
      scaled_TxF = (scaled_TxF - digit_TxF) * float(2**width)  # exact: a fraction, shifted
      sums.append(jnp.sum(digit_TxF.astype(jnp.int32), axis=0))
    return sums

  sums = integer_sums(x_BxF, digit_sums)
  total_F = jnp.zeros_like(top_F)
  for i in reversed(range(n_digits)):  # least significant first
    digit_sum_F = sums[i] if axis_name is None else lax.psum(sums[i], axis_name)
    total_F = total_F + jnp.ldexp(digit_sum_F.astype(jnp.float32),
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
  a_BxF = a.reshape(-1, a.shape[-1])
  positive = lambda x: jnp.maximum(x.astype(jnp.float32), 0.0)
  if method == "uniform":
    return jnp.ones(a.shape[-1], jnp.float32)
  if method in ("l2", "squared_l2"):
    sq_F = exact_column_sum(a_BxF, lambda x: jnp.square(positive(x)), axis_name)
    return jnp.sqrt(sq_F) if method == "l2" else sq_F
  # entropy
  mass_F = exact_column_sum(a_BxF, positive, axis_name)
  mass_1xF = jnp.where(mass_F > 0, mass_F, 1.0)[None, :]

  def surprisal(x):  # -p log p, with 0 log 0 = 0; at most 1/e
    p = positive(x) / mass_1xF  # a division: one firing token gets p = 1
    return jnp.where(p > 0, -p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)

  entropy_F = exact_column_sum(a_BxF, surprisal, axis_name, bound=1.0)
  return jnp.where(mass_F > 0, entropy_F, NEVER_FIRED_ENTROPY)
