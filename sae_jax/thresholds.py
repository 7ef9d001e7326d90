"""Inference thresholds: one θ_j per latent, calibrated so that the saved SAE
fires each latent as often as training did (SPEC.md, "Inference").

BatchTopK and Sampled-SAE select over a whole batch, which a saved SAE
cannot do token by token; it keeps a_j > θ_j instead. `calibrate` runs the
training rule over calibration batches with the final parameters, counting
n_j, the tokens on which it selects latent j, and sets θ_j to latent j's
(n_j + 1)-th largest activation on the same tokens: exactly n_j of them lie
above it (fewer only on ties), so on those tokens inference fires every
latent exactly as often as the training rule. A latent the training rule
never selects gets θ_j = the largest float32, so it never fires.

It encodes the tokens twice. Pass 1 counts n_j. Pass 2 keeps, of every
batch's column of latent j, its few largest activations (`_capture_width`:
enough, unless shuffled tokens crowd a batch beyond odds of 1e-7), and
θ_j is the (n_j + 1)-th largest of those wherever it is at least every
activation a batch left out. A latent where one may be larger (rows given
in an order that crowds its largest into a batch) goes to a third pass,
which merges each batch's whole column into a buffer of its n_j + 1
largest (`_largest`). Until 2026-12-07 it bisected θ_j on its float bits,
encoding the tokens 32 times after the count (33 passes in all); the tests
keep that bisection as their reference, and the thresholds are the same
bits.

The alternative, each latent's EMA of its smallest selected activation, is
measured against this in docs/inference-thresholds.md: inside a small pool
the budget takes almost every positive entry, so that minimum sits near 0,
and a latent that is in the pool on a few batches then fires on nearly all
its positive activations at inference.
"""

import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax import inference
from sae_jax import model
from sae_jax import selection
from sae_jax import transcoder

NEVER = float(np.finfo(np.float32).max)  # θ of a latent that must never fire
# The Sampled-SAE pools of `sample_pool` runs, drawn during calibration.
CALIBRATION_KEY = 0x51A7


class Calibration(typing.NamedTuple):
  """What `calibrate` found on its tokens."""
  threshold_F: np.ndarray  # float32 θ_j (scaled units)
  counts_F: np.ndarray  # int64 n_j: tokens the training rule selected latent j on
  tokens: int  # calibration tokens
  training_sse: float  # Σ‖x − x̂‖² of the training rule on them (scaled units)
  # `inference.choose`'s errors of the thresholds and of each top k′ (and
  # the latter's firings) on them, found by these passes (`calibrate`'s
  # rule_errors); None where they were not.
  errors: typing.Optional[tuple] = None


def batches(x_NxD, batch_size: int) -> np.ndarray:
  """x cut into floor(N / batch_size) whole batches [n, batch_size, D] (float32)."""
  n_batches = len(x_NxD) // batch_size
  if n_batches < 1:
    raise ValueError(f"calibration needs at least one batch of {batch_size} tokens; "
                     f"got {len(x_NxD)}")
  return np.asarray(x_NxD[:n_batches * batch_size], np.float32).reshape(
      n_batches, batch_size, -1)


def _activations(params, x_NxBxD, sae: model.SAE):
  """i -> batch i's activations relu(pre) [B, F], as training computes them
  (a transcoder's from the input half of its rows)."""
  inputs = lambda i: transcoder.sides(x_NxBxD[i], sae.config)[0]
  return lambda i: jax.nn.relu(sae.apply({"params": params}, inputs(i), method=model.SAE.pre))


@functools.partial(jax.jit, static_argnames=("sae", "rule_errors"))
def _count(params, x_NxBxD, sae: model.SAE, rule_errors: bool = False):
  """Pass 1: n_j, the tokens the training rule selects latent j on, and the
  rule's squared error, batch by batch as in training; with `rule_errors`
  also each top k′'s error and firings (`inference.top_k_errors`), else
  None."""
  config = sae.config
  variables = {"params": params}
  n_batches, _, _ = x_NxBxD.shape
  key = jax.random.key(CALIBRATION_KEY)
  acts = _activations(params, x_NxBxD, sae)

  def count_selected(i, carry):
    """The counts and squared error with batch i's, and the pool kept for
    the next (`pool_every`)."""
    total_F, sse, pool_P, top = carry
    a_BxF, key_i = acts(i), jax.random.fold_in(key, i)
    y_BxD = transcoder.sides(x_NxBxD[i], config)[1]
    if rule_errors:
      top = jax.tree.map(jnp.add, top, inference.top_k_errors(params, a_BxF, y_BxD, config.k))
    # Renewed on every pool_every-th batch, as in training.
    pool_P = model.step_pool(a_BxF, key_i,
                             None if pool_P is None else (pool_P, i % config.pool_every == 0),
                             **config.pool_rule)
    if config.selection == "sampled":  # the selection in the pool's P columns, as training
      rule = config.pool_rule
      chosen = selection.sampled_select_pooled(a_BxF, rule.pop("k"), rule.pop("l"), pool=pool_P,
                                               **model.sampled_options(key_i, **rule))
      xhat_BxD = sae.apply(variables, chosen.values, chosen.pool, method=model.SAE.decode_pooled)
      total_F = total_F.at[chosen.pool].add(jnp.sum(chosen.values > 0, axis=0, dtype=jnp.int32))
    else:
      z_BxF = sae.apply(variables, a_BxF, key=key_i, pool=pool_P, method=model.SAE.select)
      xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode)
      total_F = total_F + jnp.sum(z_BxF > 0, axis=0, dtype=jnp.int32)
    error = y_BxD - xhat_BxD
    return total_F, sse + jnp.sum(jnp.square(error)).astype(sse.dtype), pool_P, top

  kept_P = jnp.zeros(config.pool_size, jnp.int32) if config.keeps_pool else None
  top = (jnp.zeros(config.k, jnp.float32),
         jnp.zeros((config.k, config.n_latents), jnp.int32)) if rule_errors else None
  counts_F, sse, _, top = lax.fori_loop(
      0, n_batches, count_selected,
      (jnp.zeros(config.n_latents, jnp.int32), jnp.zeros((), jnp.float32), kept_P, top))
  return counts_F, sse, top


@functools.partial(jax.jit, static_argnames=("sae", "widths"))
def _largest(params, x_NxBxD, latents, sae: model.SAE, widths: tuple):
  """The third pass, for the latents `_captured` cannot be sure of: for each
  tier t, the widths[t] largest activations of each of its latents
  (latents[t], int32) over all tokens, in descending order,
  -inf where there are fewer, and the tokens they are at (their index in
  x's rows, -1 for none). A latent's buffer merges each batch's column into
  it: top widths[t] of (buffer, column)."""
  n_batches, batch_size, _ = x_NxBxD.shape
  acts = _activations(params, x_NxBxD, sae)
  dtype = jax.eval_shape(acts, 0).dtype  # float64 under jax_enable_x64

  def merge(i, buffers):
    a_BxF = acts(i)
    a_BxF = jnp.where(jnp.isnan(a_BxF), -jnp.inf, a_BxF)  # never above θ, as in a count
    tokens_B = i * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    out = []
    for (values, tokens), index, width in zip(buffers, latents, widths):
      values = jnp.concatenate([values, a_BxF[:, index].T], axis=1)
      tokens = jnp.concatenate([tokens, jnp.broadcast_to(tokens_B, (len(index), batch_size))],
                               axis=1)
      values, top = lax.top_k(values, width)
      out.append((values, jnp.take_along_axis(tokens, top, axis=1)))
    return tuple(out)

  return lax.fori_loop(0, n_batches, merge, tuple(
      (jnp.full((len(index), width), -jnp.inf, dtype), jnp.full((len(index), width), -1))
      for index, width in zip(latents, widths)))


# Capture widths a batch may keep per latent, each at most 1.25 times the
# last (top_k's time grows with the width).
CAPTURE_WIDTHS = tuple(sorted({int(round(m * 2 ** e)) for e in range(1, 11)
                               for m in (1, 1.25, 1.5, 1.75)}))
# The chance, bounded per latent, that shuffled tokens put more of its
# n_j + 1 largest activations in one batch than that batch keeps, which
# sends the latent to the merge (`_largest`).
MISS = 1e-7


def _capture_width(needed_F: np.ndarray, n_batches: int, batch_size: int) -> np.ndarray:
  """Per latent, how many activations each batch keeps of its column
  (`_captured`): the least width in `CAPTURE_WIDTHS` (or the whole batch)
  that holds every one of the latent's m = n_j + 1 largest a batch has,
  with probability at least 1 − MISS were the tokens shuffled. A batch holds
  X of them, hypergeometric, whose tail is under the binomial's (p = 1 / n
  batches); over c the binomial's terms shrink faster than their first
  ratio r, so P(X > c) ≤ P(X = c + 1) / (1 − r), and n · that ≤ MISS.
  Always width · n ≥ m.

  >>> _capture_width(np.array([2, 145, 1468]), 54, 1024).tolist()
  [2, 20, 64]
  """
  distinct, back = np.unique(np.asarray(needed_F, np.int64), return_inverse=True)
  m_F = distinct.astype(np.float64)
  p = 1.0 / n_batches
  out = np.full(len(m_F), batch_size, np.int64)
  for width in reversed([w for w in CAPTURE_WIDTHS if w < batch_size]):
    x = width + 1.0  # more than `width` of them in one batch
    with np.errstate(divide="ignore", invalid="ignore"):
      log_term = (_log_choose(m_F, x) + x * np.log(p) + (m_F - x) * np.log1p(-p))
      ratio = (m_F - x) / (x + 1) * p / (1 - p)
      log_tail = np.where(m_F < x, -np.inf, log_term - np.log1p(-np.minimum(ratio, 1.0)))
    fits = (np.log(n_batches) + log_tail <= np.log(MISS)) & (width * n_batches >= m_F)
    out = np.where(fits, width, out)
  return out[back]


def _log_choose(n, k):
  """log C(n, k), elementwise; where k > n a finite value the caller masks."""
  lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
  safe = np.maximum(n - k, 0) + 1
  return lgamma(n + 1) - lgamma(k + 1) - lgamma(safe)


@functools.partial(jax.jit, static_argnames=("sae", "widths", "keeps"))
def _captured(params, x_NxBxD, latents, sae: model.SAE, widths: tuple, keeps: tuple):
  """Pass 2: for each tier t, the widths[t] largest activations of each of
  its latents (latents[t], int32) in every batch (`kept_columns`); of all
  those, the keeps[t] largest with their tokens, and per latent the largest
  activation a batch may have left out (`joined`)."""
  n_batches, batch_size, _ = x_NxBxD.shape
  acts = _activations(params, x_NxBxD, sae)
  kept = lax.map(lambda i: kept_columns(acts(i), i * batch_size, latents, widths),
                 jnp.arange(n_batches))
  return tuple(joined(values, tokens, keep, width == batch_size)
               for (values, tokens), width, keep in zip(kept, widths, keeps))


def kept_columns(a_BxF, first_token, latents, widths: tuple) -> tuple:
  """One group of tokens' capture (pass 2): for each tier t, the widths[t]
  largest activations of each of its latents (latents[t], columns of a),
  in descending order, and their tokens (the group's first is
  `first_token`). NaN activations count as -inf: never above θ, as in a
  count."""
  a_FxB = a_BxF.T
  a_FxB = jnp.where(jnp.isnan(a_FxB), -jnp.inf, a_FxB)
  out = []
  for index, width in zip(latents, widths):
    values, rows = lax.top_k(a_FxB[index], width)
    out.append((values, rows + first_token))
  return tuple(out)


def joined(values_NxLxW, tokens_NxLxW, keep: int, whole: bool) -> tuple:
  """One tier's `kept_columns` over its n groups, joined: of each latent's
  kept activations, the `keep` largest (at most all n · W), in descending
  order, with their tokens; and per latent the largest activation a group
  may have left out (the least it kept of one group; -inf where each kept
  its `whole` column)."""
  n_groups, n_latents, width = values_NxLxW.shape
  left_out_L = (jnp.full(n_latents, -jnp.inf, values_NxLxW.dtype) if whole
                else jnp.max(values_NxLxW[:, :, -1], axis=0))
  join = lambda v: jnp.moveaxis(v, 0, 1).reshape(n_latents, n_groups * width)
  values, top = lax.top_k(join(values_NxLxW), min(keep, n_groups * width))
  return values, jnp.take_along_axis(join(tokens_NxLxW), top, axis=1), left_out_L


def held_for_certain(values_LxK, left_out_L, counts_L) -> np.ndarray:
  """Where the kept activations give θ_j for certain: the (n_j + 1)-th
  largest kept is at least every activation left out, so it is the
  (n_j + 1)-th largest of all."""
  keep = values_LxK.shape[1]
  nth = values_LxK[np.arange(len(counts_L)), np.minimum(counts_L, keep - 1)]
  return (counts_L < keep) & (nth >= left_out_L)


def _tiers(needed, width_F: np.ndarray) -> tuple:
  """`needed` latents grouped by width_F, each group padded (`_rounded_up`)
  by repeating its first so that few shapes compile: (widths, latents)."""
  widths, latents = [], []
  for width in np.unique(width_F):
    index = needed[width_F == width]
    padded = _rounded_up(len(index))
    widths.append(int(width))
    latents.append(np.concatenate([index, np.full(padded - len(index), index[0])]).astype(np.int32))
  return tuple(widths), latents


def _rounded_up(n: int) -> int:
  """n rounded up to m · 2^e with 8 ≤ m < 16: at most 1/8 more, few values."""
  step = 2 ** max(int(np.log2(n)) - 3, 0)
  return -(-n // step) * step


def _power_of_two(n) -> np.ndarray:
  return 2 ** np.ceil(np.log2(n)).astype(np.int64)


def per_latent_thresholds(params, x_NxBxD, sae: model.SAE, counts_F: np.ndarray,
                          entries: bool = False):
  """θ_j = latent j's (n_j + 1)-th largest activation on the tokens x, 0 where
  n_j is every token or that activation is 0, NEVER where n_j = 0: the
  smallest non-negative float32 with at most n_j activations above it, found
  in one pass (`_captured`), and a second for the latents whose largest
  crowd a batch (`_largest`).

  Args:
    params: the SAE's parameters (scaled units).
    x_NxBxD: the tokens as batches [n, B, D] (scaled units).
    sae: the SAE module.
    counts_F: n_j per latent (`calibrate`'s first pass), int.
    entries: also return the codes the thresholds give on x, from the
      buffers (every entry above θ_j is among latent j's n_j + 1 largest).

  Returns:
    float32 θ [F]; with `entries`, (θ, (tokens, latents, values) of every
    activation above its θ, float32 as the saved SAE compares them, or None
    where some latent is selected on every token: its θ is 0 and its
    codes are not in a buffer).
  """
  n_batches, batch_size, _ = x_NxBxD.shape
  counts_F = np.asarray(counts_F, np.int64)
  theta_F = np.where(counts_F > 0, 0.0, NEVER).astype(np.float32)
  needed = np.flatnonzero((counts_F > 0) & (counts_F < n_batches * batch_size))
  found, left = [], np.zeros(0, np.int64)
  if len(needed):
    found, left = _from_batches(params, x_NxBxD, sae, counts_F, needed)
  if len(left):  # more of their largest in one batch than it kept: the merge
    widths, latents = _tiers(left, _power_of_two(counts_F[left] + 1))
    merged = _largest(params, x_NxBxD, [jnp.asarray(i) for i in latents], sae, widths)
    found += [_unpadded(index, values, tokens) for index, (values, tokens) in zip(latents, merged)]
  fired = []
  for index, values, tokens in found:
    theta_F[index] = threshold_of(values[np.arange(len(index)), counts_F[index]])
    if entries:
      values32 = values.astype(np.float32)
      above = values32 > theta_F[index][:, None]
      fired.append((tokens[above], np.broadcast_to(index[:, None], above.shape)[above],
                    values32[above]))
  if not entries:
    return theta_F
  if np.any(counts_F == n_batches * batch_size):
    return theta_F, None
  joined = [np.concatenate(parts) for parts in zip(*fired)] if fired else [
      np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)]
  return theta_F, tuple(joined)


def threshold_of(value) -> np.ndarray:
  """θ from latents' (n_j + 1)-th largest activations: the float32 at or just
  above each (under x64 the activations are float64), 0 (never -0) where
  it is not positive."""
  value = np.asarray(value)
  theta = value.astype(np.float32)
  theta = np.where(theta < value, np.nextafter(theta, np.float32(np.inf)), theta)
  return np.where(value > 0, theta, np.float32(0.0))


def _unpadded(index, *arrays) -> tuple:
  """A tier's latents and their rows of `arrays`, without its padding."""
  rows = np.unique(index, return_index=True)[1]
  return (index[rows], *(np.asarray(array)[rows] for array in arrays))


def _from_batches(params, x_NxBxD, sae: model.SAE, counts_F, needed) -> tuple:
  """Pass 2 (`_captured`): (latents, buffers, tokens) per tier for the
  latents whose n_j + 1 largest activations it holds for certain, and the
  others: those a batch may have left one of out (`_capture_width`)."""
  n_batches, batch_size, _ = x_NxBxD.shape
  widths, latents = _tiers(needed, _capture_width(counts_F[needed] + 1, n_batches, batch_size))
  keeps = tuple(int(min(width * n_batches, _power_of_two(counts_F[index].max() + 1)))
                for width, index in zip(widths, latents))
  found, left = [], []
  captured = _captured(params, x_NxBxD, [jnp.asarray(i) for i in latents], sae, widths, keeps)
  for index, (values, tokens, left_out) in zip(latents, captured):
    index, values, tokens, left_out = _unpadded(index, values, tokens, left_out)
    sure = held_for_certain(values, left_out, counts_F[index])
    found.append((index[sure], values[sure], tokens[sure]))
    left.append(index[~sure])
  return found, np.concatenate(left)


def thresholded_sse(params, x_NxBxD, sae: model.SAE, entries: tuple) -> float:
  """Σ‖x − x̂‖² over x's rows (a transcoder's targets) of the codes
  `entries` (tokens, latents, values; `per_latent_thresholds`), decoded
  batch by batch as the saved SAE decodes them, without an encoder pass."""
  n_batches, batch_size, _ = x_NxBxD.shape
  tokens, latents, values = entries
  order = np.argsort(tokens, kind="stable")
  tokens, latents, values = tokens[order], latents[order], values[order]
  per_batch = np.bincount(tokens // batch_size, minlength=n_batches)
  width = max(int(per_batch.max(initial=0)), 1)
  # Each batch's entries, padded with value-0 entries on its last token (sorted).
  slot = np.arange(len(tokens)) - np.repeat(np.cumsum(per_batch) - per_batch, per_batch)
  shape = (n_batches, width)
  padded = [np.full(shape, batch_size - 1, np.int32), np.zeros(shape, np.int32),
            np.zeros(shape, np.float32)]
  where = (tokens // batch_size, slot)
  for array, column in zip(padded, (tokens % batch_size, latents, values)):
    array[where] = column
  y_NxBxD = transcoder.sides(jnp.asarray(x_NxBxD, jnp.float32), sae.config)[1]
  return float(_decoded_sse(params, y_NxBxD, *map(jnp.asarray, padded)))


@jax.jit
def _decoded_sse(params, y_NxBxD, rows_NxM, latents_NxM, values_NxM):
  W_dec_FxD = params["W_dec"].astype(jnp.float32)
  n_rows = y_NxBxD.shape[1]

  def one(total, batch):
    y_BxD, rows_M, latents_M, values_M = batch
    decoded = jax.ops.segment_sum(values_M[:, None] * W_dec_FxD[latents_M], rows_M, n_rows,
                                  indices_are_sorted=True)
    error_BxD = y_BxD - decoded - params["b_dec"][None, :].astype(jnp.float32)
    return total + jnp.sum(jnp.square(error_BxD)), None

  total, _ = lax.scan(one, jnp.zeros((), jnp.float32),
                      (y_NxBxD, rows_NxM, latents_NxM, values_NxM))
  return total


def calibrate(params, x_NxD, sae: model.SAE, *, batch_size: int,
              per_latent: bool = True, rule_errors: bool = False) -> Calibration:
  """Per-latent inference thresholds from the training rule on x.

  Args:
    params: the SAE's parameters (scaled units).
    x_NxD: calibration tokens, already multiplied by the input scale (a
      transcoder's pairs by theirs, `transcoder.scaled`); cut into
      floor(N / batch_size) batches of `batch_size`, the training batch (the
      rule's budget is batch_size · k).
    sae: the SAE module; TopK needs no thresholds (its counts are still
      found), but a TopK transcoder does (`saelens.py`).
    batch_size: tokens per batch, as in training.
    per_latent: False only counts (for `--inference global`); threshold_F is 0.
    rule_errors: also find `inference.choose`'s errors (`Calibration.errors`)
      in these two passes: the top k′ ones in the first, the thresholds'
      from the second's buffers (None where those cannot give them).

  Returns:
    Calibration(threshold_F, counts_F, tokens, training_sse, errors).

  >>> from sae_jax import SAEConfig
  >>> sae = model.SAE(SAEConfig(2, 3, k=1, selection="batchtopk"))
  >>> params = {"W_enc": jnp.eye(2, 3), "b_enc": jnp.zeros(3), "W_dec": jnp.eye(3, 2),
  ...           "b_dec": jnp.zeros(2)}
  >>> x = jnp.array([[4., 0.], [0., 3.], [2., 0.], [1., 1.]])
  >>> c = calibrate(params, x, sae, batch_size=4)  # keeps 4, 3, 2 and one 1
  >>> c.counts_F.tolist(), c.threshold_F[:2].tolist(), bool(c.threshold_F[2] == NEVER)
  ([3, 1, 0], [0.0, 1.0], True)
  """
  x_NxBxD = jnp.asarray(batches(x_NxD, batch_size))
  per_latent = per_latent and (sae.config.selection != "topk" or sae.config.transcoder)
  rule_errors = rule_errors and per_latent
  counts_F, sse, top = _count(params, x_NxBxD, sae, rule_errors)
  counts_F = np.asarray(counts_F).astype(np.int64)
  tokens = x_NxBxD.shape[0] * batch_size
  if not per_latent:
    return Calibration(np.zeros(sae.config.n_latents, np.float32), counts_F, tokens, float(sse))
  if not rule_errors:
    return Calibration(per_latent_thresholds(params, x_NxBxD, sae, counts_F), counts_F, tokens,
                       float(sse))
  theta_F, entries = per_latent_thresholds(params, x_NxBxD, sae, counts_F, entries=True)
  errors = None
  if entries is not None:
    errors = (thresholded_sse(params, x_NxBxD, sae, entries), *map(np.asarray, top))
  return Calibration(theta_F, counts_F, tokens, float(sse), errors)


def log10_density(counts_F, tokens: int) -> np.ndarray:
  """log10 of each latent's firing frequency, as SAELens' sparsity.safetensors
  holds it (log10(frequency + 1e-10))."""
  return np.log10(np.asarray(counts_F, np.float64) / tokens + 1e-10).astype(np.float32)
