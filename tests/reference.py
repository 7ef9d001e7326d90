"""Slow, obviously-correct NumPy versions of the selection rules (float64)."""

import numpy as np


def tokens(a):
  a = np.asarray(a, np.float64)
  return a.reshape(-1, a.shape[-1])


def leverage(r, ridge=0.01):
  """Ridge leverage scores r_jᵀ (r rᵀ + ridge I)⁻¹ r_j of r's columns, by a solve."""
  r = np.asarray(r, np.float64)
  return np.sum(r * np.linalg.solve(r @ r.T + ridge * np.eye(len(r)), r), axis=0)


def scores(a, method):
  a = np.maximum(tokens(a), 0.0)
  if method == "uniform":
    return np.ones(a.shape[1])
  if method == "leverage":
    return leverage(a)
  if method == "squared_l2":
    return (a * a).sum(0)
  if method == "l2":
    return np.sqrt((a * a).sum(0))
  out = np.empty(a.shape[1])
  for j in range(a.shape[1]):
    mass = a[:, j].sum()
    if mass == 0:
      out[j] = -1.0
      continue
    p = a[:, j][a[:, j] > 0] / mass
    out[j] = -(p * np.log(p)).sum()
  return out


def pool(scores, size):
  """The `size` best columns by (score desc, index asc), in index order."""
  order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
  return np.sort(order[:size])


def batch_topk_mask(a, k, cols=None):
  """Keep the B*k largest positive entries among `cols`; ties by position."""
  a = tokens(a)
  n_rows, n_cols = a.shape
  allowed = np.zeros(n_cols, bool)
  allowed[np.arange(n_cols) if cols is None else cols] = True
  rows, cs = np.nonzero((a > 0) & allowed[None, :])
  values = a[rows, cs]
  order = np.lexsort((cs, rows, -values))[: n_rows * k]
  mask = np.zeros_like(a, bool)
  mask[rows[order], cs[order]] = True
  return mask


def topk_mask(a, k):
  a = tokens(a)
  mask = np.zeros_like(a, bool)
  for b, row in enumerate(a):
    cs = np.nonzero(row > 0)[0]
    order = np.lexsort((cs, -row[cs]))[:k]
    mask[b, cs[order]] = True
  return mask


def apply(a, mask):
  a = np.asarray(a)
  return np.where(mask.reshape(a.shape), a, 0).astype(a.dtype)
