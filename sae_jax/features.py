"""What the feature browser (`browse.py`) shows of each latent, computed in
passes over a run's rows with the saved SAE (SAELens' formulas): how often it
fires, its activations' histogram, its top and sampled contexts (`scan`),
how often it makes a Sampled-SAE batch's pool (`pool_share`), its decoder
neighbours and its logit lens."""

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sae_jax import evaluate
from sae_jax import model
from sae_jax import saelens

# Histogram edges of a latent's activations: 4 per decade from 1e-3 to 1e3.
EDGES = 10.0 ** np.arange(-3, 3.01, 0.25)


@dataclasses.dataclass
class Pass:
  """What one pass over the rows keeps (host arrays)."""
  rows: int  # rows read
  held_out: int  # of them, held out in training
  count_F: np.ndarray  # firings on the held-out rows
  fired_F: np.ndarray  # firings on all rows
  total_F: np.ndarray  # summed activation, all rows
  hist_FB: np.ndarray  # firings per bin: below EDGES[0], between edges, above the last
  top_Fk: np.ndarray  # row indices of the largest activations (descending)
  top_value_Fk: np.ndarray
  sample_Fs: np.ndarray  # row indices of firings drawn uniformly (-1: fewer firings)
  kth_N: typing.Optional[np.ndarray]  # each row's k-th largest pre-activation (topk)


def _encode_h(weights, x_nD):
  """Pre-activations; weights["offset"] is `saelens.input_offset`."""
  return (x_nD - weights["offset"][None]) @ weights["W_enc"] + weights["b_enc"][None]


def _mix(v):
  """A 32-bit integer hash (murmur3's finaliser): cheap pseudo-random bits."""
  v = v ^ (v >> np.uint32(16))
  v = v * np.uint32(0x7FEB352D)
  v = v ^ (v >> np.uint32(15))
  v = v * np.uint32(0x846CA68B)
  return v ^ (v >> np.uint32(16))


def _bins(z):
  """Each activation's histogram bin: 0 below EDGES[0], i + 1 in [EDGES[i],
  EDGES[i + 1]), len(EDGES) from EDGES[-1] on."""
  b = np.floor(4 * np.log10(np.maximum(z, 1e-30)) + 12) + 1
  return np.clip(b, 0, len(EDGES)).astype(np.int64)


@functools.partial(jax.jit, static_argnames=("k_arch",))
def _codes(weights, x_nD, valid_n, *, k_arch):
  """A chunk's codes [n, F] (SAELens' rule; zero on padding rows), its fired
  entries as bits packed along F, and each row's k-th pre-activation (topk)."""
  h = _encode_h(weights, x_nD)
  if k_arch:
    kth = jax.lax.top_k(h, k_arch)[0][:, -1]
    z = jnp.where(h >= kth[:, None], jnp.maximum(h, 0), 0)
  else:
    kth = jnp.zeros(h.shape[0], h.dtype)
    z = jnp.where(h > weights["threshold"][None], jnp.maximum(h, 0), 0)
  z = jnp.where(valid_n[:, None], z, 0)
  return z, jnp.packbits(z > 0, axis=1), kth


def _fired(z_nF: np.ndarray, bits: np.ndarray) -> tuple:
  """(rows, latents, values) of the positive entries, in row-major order,
  found from the packed bits (scanning F/8 bytes a row, not F floats)."""
  nonzero = np.flatnonzero(bits)
  rows, byte = np.divmod(nonzero, bits.shape[1])
  at, bit = np.nonzero(np.unpackbits(bits.ravel()[nonzero][:, None], axis=1))
  rows, latents = rows[at], byte[at] * 8 + bit
  return rows, latents, z_nF[rows, latents]


class _Best:
  """Per latent, the k largest keys seen so far, each with its row; on equal
  keys the earlier row (rows come in increasing order). Entries that may
  enter wait in a buffer, merged once it holds as many as the table."""

  def __init__(self, n_latents: int, k: int):
    self.key = np.full((n_latents, k), -np.inf, np.float32)
    self.row = np.full((n_latents, k), -1, np.int64)
    self.pending: list = []
    self.waiting = 0

  def add(self, rows, latents, keys) -> None:
    better = keys > self.key[latents, -1]  # no other entry can enter
    self.pending.append((rows[better], latents[better], keys[better]))
    self.waiting += int(better.sum())
    if self.waiting >= self.key.size:
      self.merge()

  def merge(self) -> None:
    if not self.waiting:
      return
    rows, latents, keys = (np.concatenate(part) for part in zip(*self.pending))
    self.pending, self.waiting = [], 0
    k = self.key.shape[1]
    touched = np.unique(latents)
    latent = np.concatenate([np.repeat(touched, k), latents])
    key = np.concatenate([self.key[touched].ravel(), keys])
    row = np.concatenate([self.row[touched].ravel(), rows])
    order = np.lexsort((row, -key, latent))  # by latent, key descending, row
    latent, key, row = latent[order], key[order], row[order]
    rank = np.arange(len(latent)) - np.searchsorted(latent, latent)  # within its latent
    keep = rank < k
    self.key[latent[keep], rank[keep]] = key[keep]
    self.row[latent[keep], rank[keep]] = row[keep]


def scan(weights: dict, cfg: dict, rows: typing.Callable[[int, int], np.ndarray], n: int,
         held: tuple, *, contexts: int = 20, samples: int = 5,
         chunk_rows: typing.Optional[int] = None, seed: int = 0, progress: bool = True) -> Pass:
  """One pass over rows [0, n) (`rows(start, stop)` gives them, raw, float32);
  rows [held[0], held[1]) are the held-out ones. A chunk's codes [rows, F]
  are 2^25 entries by default (512 rows of F = 65536): the device encodes
  them, and the host keeps the statistics from their positive entries."""
  F = weights["W_enc"].shape[1]
  chunk_rows = chunk_rows or int(np.clip(2**25 // F, 64, 4096))
  k_arch = cfg["k"] if cfg["architecture"] == "topk" else 0
  device = {name: jnp.asarray(v) for name, v in weights.items() if name != "W_dec"}
  device["offset"] = jnp.asarray(saelens.input_offset(weights, cfg))
  count, fired, total = np.zeros(F, np.int64), np.zeros(F, np.int64), np.zeros(F, np.float64)
  hist = np.zeros(F * (len(EDGES) + 1), np.int64)
  top, drawn = _Best(F, contexts), _Best(F, samples)
  kth_all = np.zeros(n, np.float32) if k_arch else None
  bar = tqdm.tqdm(total=n, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True, desc="encoding")
  with bar:
    for start in range(0, n, chunk_rows):
      stop = min(start + chunk_rows, n)
      x = np.zeros((chunk_rows, weights["W_enc"].shape[0]), np.float32)
      x[:stop - start] = rows(start, stop)
      z, bits, kth = jax.device_get(_codes(device, x, np.arange(chunk_rows) < stop - start,
                                           k_arch=k_arch))
      r, j, v = _fired(z, bits)
      r = r + start
      held_out = (r >= held[0]) & (r < held[1])
      fired += np.bincount(j, minlength=F)
      count += np.bincount(j[held_out], minlength=F)
      total += np.bincount(j, weights=v, minlength=F)
      hist += np.bincount(_bins(v) + (len(EDGES) + 1) * j, minlength=len(hist))
      top.add(r, j, v)
      # Firings drawn uniformly: those of the largest hashed (row, latent, seed).
      hashed = _mix(_mix(r.astype(np.uint32) ^ np.uint32(seed))
                    + j.astype(np.uint32) * np.uint32(0x9E3779B1))
      drawn.add(r, j, (hashed >> np.uint32(8)).astype(np.float32))
      if k_arch:
        kth_all[start:stop] = kth[:stop - start]
      bar.update(stop - start)
  top.merge()
  drawn.merge()
  return Pass(n, held[1] - held[0], count, fired, total, hist.reshape(F, -1), top.row,
              np.where(top.row >= 0, top.key, 0).astype(np.float32), drawn.row, kth_all)


def pool_share(weights: dict, input_scale: float, sae: model.SAE,
               rows: typing.Callable[[int, int], np.ndarray],
               n: int, batch_size: int, *, block: int = 16, seed: int = 0,
               progress: bool = True) -> tuple:
  """How often each latent makes a Sampled-SAE pool: (pools that held it [F],
  pools chosen).

  The rows [0, n) are read `block` batches at a time, shuffled within that
  block (as the stream shuffles a round), and cut into batches of
  `batch_size` rows; the rows of an unfinished batch are left out. Each
  batch's pool is the one training would choose there (`evaluate.pool`, a
  drawn pool for `sample_pool` with a key per batch), from the saved
  SAE in training units (its biases times the input scale).
  """
  c = np.float32(input_scale)
  params = {"W_enc": jnp.asarray(weights["W_enc"]), "W_dec": jnp.asarray(weights["W_dec"]),
            "b_enc": jnp.asarray(weights["b_enc"] * c), "b_dec": jnp.asarray(weights["b_dec"] * c)}
  key = jax.random.key(evaluate.BATCH_MODE_KEY)
  held_F = np.zeros(weights["W_enc"].shape[1], np.int64)
  n_batches = n // batch_size
  rng = np.random.default_rng(seed)
  bar = tqdm.tqdm(total=n_batches * batch_size, unit="tok", unit_scale=True,
                  disable=not progress, dynamic_ncols=True, desc="pools")
  with bar:
    for start in range(0, n_batches * batch_size, block * batch_size):
      x = rows(start, min(start + block * batch_size, n_batches * batch_size))
      x = x[rng.permutation(len(x))]
      for i in range(0, len(x), batch_size):
        pool_P = evaluate.pool(params, c, jnp.asarray(x[i:i + batch_size], jnp.float32),
                                jax.random.fold_in(key, (start + i) // batch_size), sae)
        held_F[np.asarray(pool_P)] += 1
        bar.update(batch_size)
  return held_F, n_batches


def activation(weights: dict, cfg: dict, latent: int, x_mD: np.ndarray,
               kth_m: typing.Optional[np.ndarray]) -> np.ndarray:
  """Latent `latent`'s activation on rows x (SAELens' rule: its threshold, or
  the row's k-th largest pre-activation `kth_m` for topk, which the pass
  computed on the device: a relative 1e-5 absorbs the last bits by which the
  two matmuls may round that same number differently)."""
  h = (x_mD - saelens.input_offset(weights, cfg)) @ weights["W_enc"][:, latent] + \
      weights["b_enc"][latent]
  if cfg["architecture"] == "topk":
    fires = h >= kth_m - 1e-5 * np.maximum(np.abs(kth_m), 1e-6)
  else:
    fires = h > weights["threshold"][latent]
  return np.where(fires, np.maximum(h, 0), 0).astype(np.float32)


def unit(m: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length."""
  return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def neighbours(W_dec: np.ndarray, n: int = 5, block: int = 1024) -> tuple:
  """Each latent's `n` nearest other latents by decoder cosine: (ids, cosines)."""
  unit_FxD = jnp.asarray(unit(W_dec))
  n = min(n, len(W_dec) - 1)

  @jax.jit
  def nearest(first, rows):
    cos = rows @ unit_FxD.T
    cos = cos.at[jnp.arange(rows.shape[0]), first + jnp.arange(rows.shape[0])].set(-jnp.inf)
    return jax.lax.top_k(cos, n)

  ids, cosines = [], []
  for first in range(0, len(W_dec), block):
    rows = unit_FxD[first:first + block]
    if rows.shape[0] < block:
      rows = jnp.pad(rows, ((0, block - rows.shape[0]), (0, 0)))
    c, i = jax.device_get(nearest(first, rows))
    take = min(block, len(W_dec) - first)
    ids.append(i[:take])
    cosines.append(c[:take])
  return np.concatenate(ids), np.concatenate(cosines)


def logit_lens(W_dec: np.ndarray, W_U: np.ndarray, n: int = 10, block: int = 1024) -> tuple:
  """(top ids, top values, bottom ids, bottom values) of W_dec[j] @ W_U."""
  unembed = jnp.asarray(W_U)

  @jax.jit
  def ends(rows):
    logits = rows @ unembed
    top = jax.lax.top_k(logits, n)
    bottom = jax.lax.top_k(-logits, n)
    return top[1], top[0], bottom[1], -bottom[0]

  parts = [jax.device_get(ends(jnp.asarray(W_dec[f:f + block])))
           for f in range(0, len(W_dec), block)]
  return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
