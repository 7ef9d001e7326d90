"""Sparse probing and feature absorption: does a concept live in few latents,
and does it stay there? (SAEBench's two metrics, in NumPy, no torch.)

Both take an SAE's codes in the units of its input, as SAELens computes
them (`evaluate.reconstruct`'s codes divided by the input scale), with the
decoder rows they multiply.

* `sparse_probing`: for each binary task (a label per token, or per
  sequence), the k latents whose mean codes differ most between the classes,
  then a logistic regression on those k, scored on held-out examples;
  beside it, the same regression on all D dimensions of the raw activations.
* `absorption`: on examples where a concept is present, how much of its
  direction the SAE puts in latents other than the concept's own ("main")
  latents while those stay silent. `ground_truth_absorption` applies it to a
  synthetic hierarchy; `letter_absorption` to first letters, as SAEBench.
"""

import typing

import numpy as np

# SAEBench's thresholds (sae_bench/evals/absorption): an absorbing latent's
# decoder must have cosine >= 0.1 with the direction (0.025 for the single
# top latent of full absorption), the absorbers must carry >= 40% of the
# direction's projection, at most 3 of them count, and a main latent is
# silent below 1e-8.
ABSORBER_COSINE = 0.1
FULL_ABSORBER_COSINE = 0.025
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
SILENT = 1e-8
# k-sparse probes grow k while the held-out F1 improves by more than this
# (SAEBench's feature-splitting rule), up to MAX_MAIN_LATENTS latents.
F1_JUMP = 0.03
MAX_MAIN_LATENTS = 10
PROBE_KS = (1, 2, 5)
_CHUNK = 1024  # examples per [chunk, F] float64 block of `absorption`


def logistic_regression(x_NxK, y_N, *, C: float = 1.0, max_iter: int = 100,
                        tol: float = 1e-10, sample_weight=None) -> tuple[np.ndarray, float]:
  """L2-regularised logistic regression, scikit-learn's objective:
  min_w,b ½||w||² + C Σ_n s_n log(1 + exp(-y_n (x_n·w + b))), y in {-1, +1},
  the intercept b unpenalised. Newton's method in float64 with a
  backtracking line search, to the optimum (the objective is strictly convex).

  Args:
    x_NxK: features; y_N: labels (bool or 0/1); sample_weight: s_n (default 1).

  Returns:
    (w [K], b).

  >>> w, b = logistic_regression(np.array([[0.], [1.], [2.], [3.]]), np.array([0, 0, 1, 1]))
  >>> round(float(w[0]), 4), round(float(-b / w[0]), 4)  # the boundary halfway
  (0.9583, 1.5)
  """
  x = np.asarray(x_NxK, np.float64)
  n, k = x.shape
  sign = np.where(np.asarray(y_N).astype(bool), 1.0, -1.0)
  s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)
  penalty = np.ones(k + 1)
  penalty[-1] = 0.0  # the intercept

  def objective(theta):
    margin = sign * (xb @ theta)
    return 0.5 * np.sum(penalty * theta**2) + C * np.sum(s * np.logaddexp(0.0, -margin))

  theta = np.zeros(k + 1)
  value = objective(theta)
  for _ in range(max_iter):
    margin = sign * (xb @ theta)
    p = 0.5 * (1.0 + np.tanh(-0.5 * margin))  # sigmoid(-margin), stable both ways
    grad = penalty * theta - C * xb.T @ (s * sign * p)
    hess = np.diag(penalty) + C * (xb.T * (s * p * (1 - p))) @ xb
    hess[-1, -1] += 1e-12  # a constant column with all-equal labels has no curvature
    step = np.linalg.solve(hess, grad)
    decrease = grad @ step
    if decrease <= tol * max(1.0, abs(value)):
      break
    t = 1.0
    while (candidate := objective(theta - t * step)) > value - 0.25 * t * decrease:
      t *= 0.5
      if t < 1e-10:  # no decrease left at float64 precision: at the optimum
        return theta[:k], float(theta[k])
    theta, value = theta - t * step, candidate
  return theta[:k], float(theta[k])


def _f1(y_true, y_pred) -> float:
  """2·TP / (2·TP + FP + FN) for the positive class (0 with no positives at all)."""
  tp = np.sum(y_true & y_pred)
  denominator = 2 * tp + np.sum(~y_true & y_pred) + np.sum(y_true & ~y_pred)
  return float(2 * tp / denominator) if denominator else 0.0


def mean_difference_order(codes_NxF, y_N, rows=None, *, signed: bool = False) -> np.ndarray:
  """Latents by how much their mean code differs between positive and
  negative examples, largest first (|difference|, or the signed difference
  with `signed`); ties go to the lower latent. Only `rows` (indices) count,
  if given; the codes are never copied, so [N, F] may be large."""
  codes = np.asarray(codes_NxF)
  y = np.asarray(y_N, bool)
  counted = np.zeros(len(y), bool)
  counted[np.arange(len(y)) if rows is None else rows] = True
  # Mean codes as weighted sums over rows: one pass over the codes each.
  weights = [(counted & y) / np.sum(counted & y), (counted & ~y) / np.sum(counted & ~y)]
  positive, negative = (w.astype(codes.dtype) @ codes for w in weights)
  difference = positive.astype(np.float64) - negative
  return np.argsort(-(difference if signed else np.abs(difference)), kind="stable")


def _split(rows, y_N, rng, test_fraction: float):
  """(train, test): `rows` split at random, each class in the same proportion."""
  train, test = [], []
  for members in (rows[y_N[rows]], rows[~y_N[rows]]):
    members = rng.permutation(members)
    n_test = int(round(test_fraction * len(members)))
    test.append(members[:n_test])
    train.append(members[n_test:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _balanced_split(y_N, rng, test_fraction: float):
  """(train, test) indices: as many examples of each class, the smaller class
  whole and the larger drawn at random (SAEBench's balanced classes), split
  as `_split`."""
  positive, negative = np.flatnonzero(y_N), np.flatnonzero(~y_N)
  n = min(len(positive), len(negative))
  balanced = np.concatenate([rng.permutation(positive)[:n], rng.permutation(negative)[:n]])
  return _split(balanced, y_N, rng, test_fraction)


def _probe(x_train, y_train, x_test, y_test) -> tuple[float, float]:
  w, b = logistic_regression(x_train, y_train)
  predicted = np.asarray(x_test, np.float64) @ w + b > 0
  return float(np.mean(predicted == y_test)), _f1(y_test, predicted)


def pool_sequences(values_NxF, sequence_N) -> tuple[np.ndarray, np.ndarray]:
  """Mean of the rows of each sequence (SAEBench pools codes so), and the
  sequence ids in that order."""
  ids, inverse = np.unique(np.asarray(sequence_N), return_inverse=True)
  sums = np.zeros((len(ids), np.shape(values_NxF)[1]))
  np.add.at(sums, inverse, np.asarray(values_NxF, np.float64))
  return sums / np.bincount(inverse)[:, None], ids


def sparse_probing(codes_NxF, labels, *, dense_NxD=None, sequences=None,
                   ks: typing.Sequence[int] = PROBE_KS, test_fraction: float = 0.5,
                   min_examples: int = 4, seed: int = 0) -> dict:
  """k-sparse probing of binary labels from an SAE's codes (SAEBench's).

  For each task: all its positive examples and as many negatives drawn at
  random, split at random into train and held-out test (`test_fraction`).
  For each k: the k latents whose mean code differs most (in absolute
  value) between the train set's classes, a logistic regression on them
  (`logistic_regression`, C = 1, as scikit-learn's default that SAEBench
  uses), and its held-out accuracy and F1. With `dense_NxD`, the same
  regression on every dimension of the raw activations ("dense"), the
  ceiling a linear read-out reaches.

  Args:
    codes_NxF: codes per token (or per position).
    labels: [N] or [N, T] booleans: T tasks.
    dense_NxD: the activations the codes came from, for the dense probe.
    sequences: [N] sequence ids: codes (and activations) are mean-pooled
      per sequence, and the labels, which must be constant within a
      sequence, become one per sequence.
    ks: the k of the sparse probes.
    min_examples: a task with fewer positives or negatives than this is
      skipped (NaN).

  Returns:
    {"probe_acc_k{k}", "probe_f1_k{k}", for each k, "probe_acc_dense",
    "probe_f1_dense" (with dense_NxD): the mean over tasks evaluated;
    "probe_tasks": tasks evaluated; "per_task": the same metrics per task}.
  """
  codes = np.asarray(codes_NxF)
  labels = np.asarray(labels, bool)
  labels = labels[:, None] if labels.ndim == 1 else labels
  dense = None if dense_NxD is None else np.asarray(dense_NxD)
  if labels.shape[0] != codes.shape[0] or (dense is not None and len(dense) != len(codes)):
    raise ValueError(f"codes_NxF, labels and dense_NxD need the same N; got "
                     f"{codes.shape[0]}, {labels.shape[0]} and "
                     f"{None if dense is None else len(dense)}")
  for k in ks:
    if not 1 <= k <= codes.shape[1]:
      raise ValueError(f"ks must lie in [1, {codes.shape[1]}] (latents); got {k}")
  if sequences is not None:
    pooled, _ = pool_sequences(labels.astype(np.float64), sequences)
    if np.any((pooled > 0) & (pooled < 1)):
      raise ValueError("labels must be constant within each sequence to pool by sequence")
    codes = pool_sequences(codes, sequences)[0]
    dense = None if dense is None else pool_sequences(dense, sequences)[0]
    labels = pooled > 0.5
  names = [f"probe_{m}_k{k}" for k in ks for m in ("acc", "f1")]
  names += ["probe_acc_dense", "probe_f1_dense"] if dense is not None else []
  per_task = {name: np.full(labels.shape[1], np.nan) for name in names}
  rng = np.random.default_rng(seed)
  for t in range(labels.shape[1]):
    y = labels[:, t]
    if min(y.sum(), (~y).sum()) < min_examples:
      continue
    train, test = _balanced_split(y, rng, test_fraction)
    order = mean_difference_order(codes, y, train)
    for k in ks:
      acc, f1 = _probe(codes[np.ix_(train, order[:k])], y[train],
                       codes[np.ix_(test, order[:k])], y[test])
      per_task[f"probe_acc_k{k}"][t], per_task[f"probe_f1_k{k}"][t] = acc, f1
    if dense is not None:
      acc, f1 = _probe(dense[train], y[train], dense[test], y[test])
      per_task["probe_acc_dense"][t], per_task["probe_f1_dense"][t] = acc, f1
  evaluated = ~np.isnan(per_task[names[0]])
  out = {name: float(values[evaluated].mean()) if evaluated.any() else float("nan")
         for name, values in per_task.items()}
  return out | {"probe_tasks": int(evaluated.sum()), "per_task": per_task}


def absorption(x_NxD, codes_NxF, W_dec_FxD, direction_D, main_latents) -> tuple:
  """SAEBench's absorption of one concept, per example where it is present.

  With u the unit `direction_D`, the concept's projection is p = x·u, and
  latent j's share of it is c_j = z_j (W_dec_j·u), its code times its
  decoder row's projection (z_j cos(W_dec_j, u) for unit rows, as SAEBench
  writes it). Let m = Σ c_j over the main latents, and A the sum of the
  (at most 3) largest positive c_j of the other latents whose decoder has
  cosine >= 0.1 with u.

  * absorption fraction: 0 if p <= 0, m >= p or A < 0.4 p; else 1 if m <= 0;
    else a / (a + m) with a = min(A, p - m).
  * full absorption: every main latent silent (z_j < 1e-8), p >= 0, and the
    latent with the largest c_j has cosine >= 0.025 with u and c_j >= 0.4 p.

  (p <= 0 counts as no absorption here; SAEBench divides by p and only
  evaluates examples whose probe score is positive.)

  Args:
    x_NxD: the SAE's inputs, raw; codes_NxF: its codes in the same units;
    W_dec_FxD: its decoder rows; direction_D: the concept's direction;
    main_latents: the concept's own latents (ints).

  Returns:
    (fraction [N] float64, full [N] bool).
  """
  u = np.asarray(direction_D, np.float64)
  u = u / np.linalg.norm(u)
  W = np.asarray(W_dec_FxD, np.float64)
  along_F = W @ u
  cosine_F = along_F / np.maximum(np.linalg.norm(W, axis=1), 1e-30)
  main = np.zeros(W.shape[0], bool)
  main[np.asarray(main_latents, int)] = True
  x, codes = np.asarray(x_NxD), np.asarray(codes_NxF)
  fraction, full = [], []
  for start in range(0, len(codes), _CHUNK):  # [chunk, F] float64 at a time
    rows = slice(start, start + _CHUNK)
    f, g = _absorption(x[rows] @ u, np.asarray(codes[rows], np.float64), along_F, cosine_F, main)
    fraction.append(f)
    full.append(g)
  return (np.concatenate(fraction) if fraction else np.zeros(0),
          np.concatenate(full) if full else np.zeros(0, bool))


def _absorption(p, z, along_F, cosine_F, main):
  """`absorption` on a chunk: projections p [n], codes z [n, F]."""
  share_NxF = z * along_F[None, :]
  m = share_NxF[:, main].sum(1)
  candidate_NxF = np.where(~main[None, :] & (cosine_F[None, :] >= ABSORBER_COSINE)
                           & (share_NxF > 0), share_NxF, 0.0)
  top = min(MAX_ABSORBERS, len(along_F))
  absorbed = -np.partition(-candidate_NxF, top - 1, axis=1)[:, :top].sum(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    none = (p <= 0) | (m >= p) | (absorbed < PROJECTION_SHARE * p)
    a = np.minimum(absorbed, p - m)
    fraction = np.where(none, 0.0, np.where(m <= 0, 1.0, np.clip(a / (a + m), 0.0, 1.0)))
  best = np.argmax(share_NxF, axis=1)
  best_share = share_NxF[np.arange(len(z)), best]
  full = (np.all(z[:, main] < SILENT, axis=1) & (p >= 0)
          & (cosine_F[best] >= FULL_ABSORBER_COSINE) & (best_share >= PROJECTION_SHARE * p))
  return fraction, full


def ground_truth_absorption(x_NxD, codes_NxF, W_dec_FxD, true_NxM, dictionary_MxD,
                            parent_of_M, *, min_cosine: float = 0.9) -> dict:
  """Absorption of each parent of a synthetic hierarchy (`synthetic.py`).

  A parent's main latent is the latent whose decoder row has the largest
  cosine with the parent's true direction; a parent without one at cosine
  >= `min_cosine` (not recovered, as `gt_recovered` counts it) is skipped,
  as SAEBench skips a letter its probe cannot find: there is no latent of
  its own to be absorbed from. Its examples are the tokens on which the
  parent is present; `absorption` runs on those with the true direction as u.

  Returns:
    {"absorption": mean over the parents evaluated of the full-absorption
    rate, "absorption_fraction": of the mean absorption fraction,
    "absorption_child": the full-absorption rate over their tokens where a
    child fires too, "absorption_parents": parents evaluated,
    "per_parent": {parent: (rate, fraction)}}.
  """
  parent_of = np.asarray(parent_of_M)
  parents = np.unique(parent_of[parent_of >= 0])
  d = np.asarray(dictionary_MxD, np.float64)
  d = d / np.linalg.norm(d, axis=1, keepdims=True)
  W = np.asarray(W_dec_FxD, np.float64)
  cos_MxF = d @ (W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-30)).T
  present = np.asarray(true_NxM) > 0
  per_parent, with_child = {}, []
  for parent in parents:
    on = present[:, parent]
    if not on.any() or cos_MxF[parent].max() < min_cosine:
      continue
    fraction, full = absorption(np.asarray(x_NxD)[on], np.asarray(codes_NxF)[on], W, d[parent],
                                [int(np.argmax(cos_MxF[parent]))])
    per_parent[int(parent)] = (float(full.mean()), float(fraction.mean()))
    child_on = present[on][:, parent_of == parent].any(axis=1)
    with_child.append(full[child_on])
  if not per_parent:
    nan = float("nan")
    return {"absorption": nan, "absorption_fraction": nan, "absorption_child": nan,
            "absorption_parents": 0, "per_parent": {}}
  rates = np.array(list(per_parent.values()))
  child = np.concatenate(with_child)
  return {"absorption": float(rates[:, 0].mean()), "absorption_fraction": float(rates[:, 1].mean()),
          "absorption_child": float(child.mean()) if len(child) else float("nan"),
          "absorption_parents": len(per_parent), "per_parent": per_parent}


def main_latents(codes_NxF, y_N, *, rows=None, test_fraction: float = 0.5, seed: int = 0,
                 max_latents: int = MAX_MAIN_LATENTS) -> list:
  """A concept's main latents, by SAEBench's feature-splitting rule: the k
  latents with the largest signed mean-code difference (positive minus
  negative examples), for k = 1, 2, ..., while the held-out F1 of a
  logistic regression on them (class-balanced weights, all examples) rises
  by more than 0.03 over the best so far, on `rows` of the codes (default
  all), each class split at random into train and test. SAEBench ranks latents by an
  L1-regularised probe instead; the rule that follows is the same."""
  codes = np.asarray(codes_NxF)
  y = np.asarray(y_N, bool)
  rows = np.arange(len(y)) if rows is None else np.asarray(rows)
  train, test = _split(rows, y, np.random.default_rng(seed), test_fraction)
  order = mean_difference_order(codes, y, train, signed=True)
  weight = np.where(y[train], 0.5 / max(y[train].mean(), 1e-12),
                    0.5 / max((~y[train]).mean(), 1e-12))
  best, chosen = -np.inf, []
  for k in range(1, min(max_latents, codes.shape[1]) + 1):
    w, b = logistic_regression(codes[np.ix_(train, order[:k])], y[train], sample_weight=weight)
    f1 = _f1(y[test], codes[np.ix_(test, order[:k])] @ w + b > 0)
    if f1 <= best + F1_JUMP:
      break
    best, chosen = f1, order[:k].tolist()
  return chosen


def letter_absorption(x_NxD, codes_NxF, W_dec_FxD, letter_N, group_N=None, *,
                      test_fraction: float = 0.5, min_probe_f1: float = 0.6,
                      min_examples: int = 4, seed: int = 0) -> dict:
  """First-letter absorption, as SAEBench measures it.

  Examples are tokens (or words in a prompt) labelled with their first
  letter (`letter_N`: 0..25, or -1 for none), split into train and test by
  `group_N` (the word: a word is on one side only), or by example.

  For each letter: a probe for "starts with this letter" (a logistic
  regression on the raw activations of the train split, class-balanced),
  whose weight vector is the letter's direction; the letter's main latents
  (`main_latents` on the train split's codes); then `absorption` on the
  test examples of the letter that the probe calls positive (its true
  positives). A letter is skipped when it has fewer than `min_examples`
  examples on either side or its probe's test F1 is below `min_probe_f1`.

  Returns:
    {"absorption": mean over letters of the full-absorption rate,
    "absorption_fraction": mean over letters of the mean absorption
    fraction, "absorption_letters": letters evaluated, "split_latents":
    mean number of main latents, "per_letter": {letter: {...}}}.
  """
  x = np.asarray(x_NxD, np.float64)
  codes = np.asarray(codes_NxF)
  letter = np.asarray(letter_N)
  group = np.arange(len(letter)) if group_N is None else np.asarray(group_N)
  groups = np.unique(group)
  test_groups = np.random.default_rng(seed).permutation(groups)[
      :int(round(test_fraction * len(groups)))]
  test = np.isin(group, test_groups)
  per_letter = {}
  for value in np.unique(letter[letter >= 0]):
    y = letter == value
    if min(np.sum(y & ~test), np.sum(~y & ~test), np.sum(y & test), np.sum(~y & test)) \
        < min_examples:
      continue
    weight = np.where(y[~test], 0.5 / y[~test].mean(), 0.5 / (~y[~test]).mean())
    w, b = logistic_regression(x[~test], y[~test], sample_weight=weight)
    probe_test = x[test] @ w + b > 0
    probe_f1 = _f1(y[test], probe_test)
    if probe_f1 < min_probe_f1:
      continue
    main = main_latents(codes, y, seed=seed, rows=np.flatnonzero(~test))
    positive = test & y & (x @ w + b > 0)
    fraction, full = absorption(x[positive], codes[positive], W_dec_FxD, w, main)
    per_letter[int(value)] = {"absorption": float(full.mean()),
                              "absorption_fraction": float(fraction.mean()),
                              "true_positives": int(positive.sum()), "probe_f1": probe_f1,
                              "main_latents": main}
  if not per_letter:
    nan = float("nan")
    return {"absorption": nan, "absorption_fraction": nan, "absorption_letters": 0,
            "split_latents": nan, "per_letter": {}}
  mean = lambda key: float(np.mean([r[key] for r in per_letter.values()]))
  return {"absorption": mean("absorption"), "absorption_fraction": mean("absorption_fraction"),
          "absorption_letters": len(per_letter),
          "split_latents": float(np.mean([len(r["main_latents"]) for r in per_letter.values()])),
          "per_letter": per_letter}
