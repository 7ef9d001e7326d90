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
import typing

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax import collectives
from sae_jax import validation

# Columns whose largest value is below 2**_MIN_EXPONENT are summed at that
# scale; it keeps the power-of-two scale factors inside float32 range.
_MIN_EXPONENT = -90
# Above this many tokens in one (global) batch the int32 digits would overflow.
MAX_TOKENS = 2**22
# Tokens per scan step when XLA:CPU sums block by block.
_CPU_BLOCK = 8

NEVER_FIRED_ENTROPY = -1.0
LEVERAGE_RIDGE = 0.01  # the authors' ridge_lambda


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

  XLA:CPU reduces a leading axis slowly; a tree of elementwise maxima of
  whole quarters is many times faster there (docs/speed.md). Other backends
  reduce directly.
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
  leading axis (it writes a [B, F] temporary): there a scan takes 8 tokens
  at a time and writes none (docs/speed.md). Other backends reduce
  directly.

  Args:
    x_BxF: [B, F] input, tokens first.
    sums_of_block: [T, F] -> pytree of [F] int32 sums over its T tokens.
  """
  return lax.platform_dependent(
      x_BxF, cpu=lambda x: _scan_sums(x, sums_of_block), default=sums_of_block)


def _fixed_point(top_F, n: int) -> tuple:
  """(width, exponent_F): sums of n values per column, each below top_F[j] in
  magnitude, in int32 digits of `width` bits at scale 2**(width - exponent_F[j])."""
  if n > MAX_TOKENS:
    raise ValueError(
        f"at most {MAX_TOKENS} tokens per (global) batch are supported by the "
        f"exact column sums; got {n}")
  headroom = max(1, math.ceil(math.log2(n)))
  width = 30 - headroom  # bits per digit; n digits then sum below 2**30
  return width, jnp.maximum(jnp.frexp(top_F)[1], _MIN_EXPONENT)  # |v| < 2**e


def _global_column_max(x_BxF, axis_name):
  top_F = column_max(x_BxF)
  return top_F if axis_name is None else lax.pmax(top_F, axis_name)


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
  values = lambda x: fn(x).astype(jnp.float32)
  top_F = (_global_column_max(jnp.abs(values(x_BxF)), axis_name) if bound is None
           else jnp.full(x_BxF.shape[1], bound, jnp.float32))
  width, exponent_F = _fixed_point(top_F, global_tokens(x_BxF.shape[0], axis_name))
  headroom = 30 - width
  # Enough digits that the truncated rest of all n values stays below one
  # float32 ulp of the column maximum.
  n_digits = math.ceil((24 + headroom) / width)
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


def count_sketch(a_BxF: jax.Array, size: int, key, axis_name=None) -> jax.Array:
  """S·a [size, F] for a CountSketch S of the (global) batch's tokens: each
  token is added, with a random sign, to one of `size` rows chosen uniformly
  (E[SᵀS] = I, so (S·a)ᵀ(S·a) estimates aᵀa). S comes from `key` over global
  token indices.

  One pass in fixed point: each value is rounded to 2^-w of its column's
  (global) maximum, w = 30 - ceil(log2 B) (18 bits at B = 4096), and those
  are summed exactly as int32. So every device, and a single device holding
  the whole batch, get the same bits, whatever the order of the tokens.

  >>> count_sketch(jnp.ones((4, 2)), 4, jax.random.key(0)).shape
  (4, 2)
  """
  n_rows = a_BxF.shape[0]
  n = global_tokens(n_rows, axis_name)
  bucket_key, sign_key = jax.random.split(key)
  bucket_N = jax.random.randint(bucket_key, (n,), 0, size)
  sign_N = jax.random.rademacher(sign_key, (n,), jnp.float32)
  if axis_name is not None:
    first = lax.axis_index(axis_name) * n_rows
    bucket_N = lax.dynamic_slice_in_dim(bucket_N, first, n_rows)
    sign_N = lax.dynamic_slice_in_dim(sign_N, first, n_rows)
  x_BxF = a_BxF.astype(jnp.float32)
  width, exponent_F = _fixed_point(_global_column_max(jnp.abs(x_BxF), axis_name), n)
  unit_1xF = jnp.ldexp(jnp.float32(1), exponent_F - width)[None, :]
  # |x| / unit < 2**width, so n rounded values sum below 2**30.
  q_BxF = jnp.round(sign_N[:, None] * x_BxF / unit_1xF).astype(jnp.int32)
  sums_SxF = jax.ops.segment_sum(q_BxF, bucket_N, size)
  sums_SxF = sums_SxF if axis_name is None else lax.psum(sums_SxF, axis_name)
  return sums_SxF.astype(jnp.float32) * unit_1xF


def ridge_leverage(r_MxF: jax.Array, ridge: float, latent_axis=None) -> jax.Array:
  """s_j = r_jᵀ (r rᵀ + ridge·I)⁻¹ r_j for every column j of r [M, F],
  through the M×M side: ||L⁻¹ r_j||² with L the Cholesky factor of
  r rᵀ + ridge·I. In [0, 1); 0 exactly for a zero column. With
  `latent_axis`, r's columns are split over that mapped axis, and r rᵀ is
  summed over it (in one order)."""
  eye_MxM = jnp.eye(r_MxF.shape[0], dtype=jnp.float32)
  gram_MxM = jnp.matmul(r_MxF, r_MxF.T, precision=lax.Precision.HIGHEST)
  if latent_axis is not None:
    gram_MxM = collectives.ordered_psum(gram_MxM, latent_axis)
  chol_MxM = jnp.linalg.cholesky(gram_MxM + ridge * eye_MxM)
  # L⁻¹ once (M×M), then a matmul: faster on CPU than a triangular solve
  # with F right-hand sides (docs/speed.md), and as accurate here (tested).
  inv_MxM = jax.scipy.linalg.solve_triangular(chol_MxM, eye_MxM, lower=True)
  y_MxF = jnp.matmul(inv_MxM, r_MxF, precision=lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(y_MxF), axis=0)


def shared_key(key, axis_name):
  """Under `axis_name`, every device uses the first device's key."""
  if key is None or axis_name is None:
    return key
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(key) if typed else key
  data = lax.all_gather(data, axis_name, to="invarying")[0]
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


@functools.partial(jax.jit,
                   static_argnames=("method", "axis_name", "ridge", "sketch", "latent_axis"))
def column_scores(a: jax.Array, method: str = "l2", *, axis_name=None,
                  ridge: float = LEVERAGE_RIDGE, sketch: typing.Optional[int] = None,
                  key=None, bias=None, latent_axis=None) -> jax.Array:
  """Scores every latent (column) of `a` over all tokens.

  Negative entries count as zero. Methods (see SPEC.md):
    "l2": ||a_:,j||_2;  "squared_l2": ||a_:,j||_2^2;
    "entropy": -sum_b p_bj log p_bj with p_bj = a_bj / sum_b a_bj, in nats.
      A column that never fires scores -1, below every column that does;
      one that fires on a single token scores 0.
    "uniform": all ones (meaningful only for a sampled pool).
    "leverage": ridge leverage scores a_:,jᵀ (a aᵀ + ridge·I)⁻¹ a_:,j, in
      [0, 1), through the B×B side (never an F×F inverse); 0 for a column
      that never fires. With `sketch=m`, those of an m-row CountSketch S·a of
      the tokens instead (an estimate: m² F work after one pass over a).

  Args:
    a: [..., F] activations; every leading axis is tokens.
    method: one of "l2", "squared_l2", "entropy", "uniform", "leverage".
    axis_name: mapped axis the tokens are split over. With it, the scores are
      those of the whole (concatenated) batch, bit for bit, on every device.
      Exact leverage gathers the whole batch [B, F] on every device; the
      sketch sums S·a exactly over the devices instead.
    ridge: "leverage": the ridge λ > 0 (the authors' 0.01).
    sketch: "leverage": rows m of the CountSketch, or None for exact scores.
    key: "leverage" with a sketch: PRNG key that draws S (default: key 0);
      under `axis_name` the first device's key is used everywhere.
    bias: optional [F], added to every token's row first: the scores of
      a + bias, for a caller that holds a matmul's product and a bias (the
      encoder's x @ W_enc and b_enc). The same bits as scoring the sum; on
      CPU the block sums then read the product where it lies instead of a
      copy of the sum written out for them.
    latent_axis: mapped axis the columns are split over (`latent_select`),
      if any: the scores of this device's columns. Only "leverage" looks
      across columns (its Gram matrix is summed over the axis).

  Returns:
    [F] float32 scores.

  >>> column_scores(jnp.array([[3., -1.], [4., 0.]]))
  Array([5., 0.], dtype=float32)
  """
  validation.check_activations(a)
  validation.check_score_method(method)
  validation.check_bias(bias, a.shape[-1])
  a_BxF = a.reshape(-1, a.shape[-1])
  if bias is None:
    positive = lambda x: jnp.maximum(x.astype(jnp.float32), 0.0)
  else:
    bias_1xF = bias.astype(jnp.float32)[None, :]
    positive = lambda x: jnp.maximum(x.astype(jnp.float32) + bias_1xF, 0.0)
  if method == "uniform":
    return jnp.ones(a.shape[-1], jnp.float32)
  if method == "leverage":
    validation.check_leverage(ridge, sketch)
    if sketch is None:
      rows_MxF = positive(a_BxF)  # gathered after the bias: no device's bias stays in them
      if axis_name is not None:
        rows_MxF = lax.all_gather(rows_MxF, axis_name, tiled=True, to="invarying")
      return ridge_leverage(rows_MxF, ridge, latent_axis)
    key = jax.random.key(0) if key is None else shared_key(key, axis_name)
    return ridge_leverage(count_sketch(positive(a_BxF), sketch, key, axis_name), ridge,
                          latent_axis)
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
