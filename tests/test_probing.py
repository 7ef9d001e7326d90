"""Sparse probing and absorption: the regression against scikit-learn, the
absorption rule against a line-by-line transcription of SAEBench's, and the
metrics on hand-built SAEs whose answers are known."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from sae_jax import probing
from sae_jax import synthetic


@pytest.mark.parametrize("n, k, balanced", [(300, 1, False), (400, 5, True), (500, 40, False)])
def test_logistic_regression_equals_scikit_learn(n, k, balanced):
  rng = np.random.default_rng(k)
  x = rng.standard_normal((n, k)) * np.exp(rng.uniform(-1, 1, k))
  y = x @ rng.standard_normal(k) + rng.standard_normal(n) > 0.5
  weight = np.where(y, 0.5 / y.mean(), 0.5 / (~y).mean()) if balanced else None
  w, b = probing.logistic_regression(x, y, sample_weight=weight)
  theirs = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000,
                              class_weight="balanced" if balanced else None).fit(x, y)
  np.testing.assert_allclose(w, theirs.coef_[0], rtol=1e-5, atol=1e-5)
  assert b == pytest.approx(theirs.intercept_[0], abs=1e-5)


def saebench_absorption(x, codes, W_dec, direction, main):
  """SAEBench's FeatureAbsorptionCalculator.calculate_absorption, one example
  at a time (its decoder rows are unit: projection = code * cosine)."""
  u = direction / np.linalg.norm(direction)
  cos = W_dec @ u / np.linalg.norm(W_dec, axis=1)
  fractions, fulls = [], []
  for x_n, z in zip(x, codes):
    act_probe_proj = float(x_n @ u)
    proj = z * cos
    main_proj = sum(proj[j] for j in main)
    others = [proj[j] for j in range(len(z))
              if j not in main and cos[j] >= 0.1 and proj[j] > 0]
    top = sum(sorted(others, reverse=True)[:3])
    if act_probe_proj <= 0 or main_proj >= act_probe_proj or top / act_probe_proj < 0.4:
      fraction = 0.0  # (p <= 0: SAEBench never evaluates such an example)
    elif main_proj <= 0:
      fraction = 1.0
    else:
      absorbed = min(top, act_probe_proj - main_proj)
      fraction = float(np.clip(absorbed / (absorbed + main_proj), 0, 1))
    best = int(np.argmax(proj))
    full = (all(z[j] < 1e-8 for j in main) and cos[best] >= 0.025 and act_probe_proj >= 0
            and proj[best] / act_probe_proj >= 0.4)
    fractions.append(fraction)
    fulls.append(full)
  return np.array(fractions), np.array(fulls)


def test_absorption_equals_saebench_rule():
  rng = np.random.default_rng(0)
  D, F, N = 12, 30, 400
  W = rng.standard_normal((F, D))
  W /= np.linalg.norm(W, axis=1, keepdims=True)
  u = rng.standard_normal(D)
  W[:6] = 0.8 * u / np.linalg.norm(u) + 0.3 * W[:6]  # some rows along the direction
  W /= np.linalg.norm(W, axis=1, keepdims=True)
  codes = np.maximum(rng.standard_normal((N, F)), 0) * (rng.random((N, F)) < 0.2)
  codes[:100, :2] = 0  # main latents silent: full absorption possible
  x = codes @ W + 0.3 * rng.standard_normal((N, D))
  fraction, full = probing.absorption(x, codes, W, u, [0, 1])
  want_fraction, want_full = saebench_absorption(x, codes, W, u, [0, 1])
  np.testing.assert_allclose(fraction, want_fraction, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(full, want_full)
  assert 0 < full.mean() < 0.5 and 0 < fraction.mean() < 1 and (fraction == 1).any()


def hierarchy(n_tokens=6000):
  """Orthonormal true directions (D = F), so a hand-built SAE is exact."""
  config = synthetic.SyntheticConfig(d_model=24, n_features=24, active=3.0, spread=0.2,
                                     noise=0.0, parents=2, children=4, child_given_parent=0.5)
  source = synthetic.SyntheticSource(config)
  _, codes = source.sample_with_codes(0, n_tokens)
  return config, np.eye(24), codes


def test_a_perfect_sae_absorbs_nothing_and_probes_perfectly():
  config, dictionary, codes = hierarchy()
  x = codes @ dictionary
  result = probing.ground_truth_absorption(x, codes, dictionary, codes, dictionary,
                                           config.parent_of())
  assert result["absorption"] == 0 and result["absorption_fraction"] == 0
  assert sorted(result["per_parent"]) == [0, 1] and result["absorption_parents"] == 2
  # A parent with no latent of its own (best cosine below 0.9) is not evaluated.
  blurred = dictionary.copy()
  blurred[0] = (dictionary[0] + dictionary[8]) / np.sqrt(2)
  partial = probing.ground_truth_absorption(x, codes, blurred, codes, dictionary,
                                            config.parent_of())
  assert sorted(partial["per_parent"]) == [1] and partial["absorption_parents"] == 1
  probes = probing.sparse_probing(codes, codes > 0, dense_NxD=x)
  assert probes["probe_tasks"] == 24
  for k in (1, 2, 5):
    assert probes[f"probe_acc_k{k}"] == 1 and probes[f"probe_f1_k{k}"] == 1
  assert probes["probe_acc_dense"] > 0.95
  # The k = 1 probe picks each feature's own latent.
  order = probing.mean_difference_order(codes, codes[:, 5] > 0)
  assert order[0] == 5


def test_an_absorbing_sae_is_caught():
  """Each child's latent writes child + parent, and the parent's latent is
  silent whenever a child fires: every token with a child is fully
  absorbed, the parent alone never is."""
  config, dictionary, codes = hierarchy()
  parent_of = config.parent_of()
  W = dictionary.copy()
  z = codes.copy()
  for child in np.flatnonzero(parent_of >= 0):
    parent = parent_of[child]
    W[child] = (dictionary[child] + dictionary[parent]) / np.sqrt(2)
    on = codes[:, child] > 0
    z[on, child] = codes[on, child] * np.sqrt(2)  # so that the parent's share is still there
    z[on, parent] = 0
  x = codes @ dictionary
  result = probing.ground_truth_absorption(x, z, W, codes, dictionary, parent_of)
  for parent in (0, 1):
    on = codes[:, parent] > 0
    with_child = codes[on][:, parent_of == parent].any(1)
    rate, fraction = result["per_parent"][parent]
    assert rate == pytest.approx(with_child.mean()) and 0.4 < rate < 0.6
    assert fraction == pytest.approx(with_child.mean())
  assert result["absorption_child"] == 1.0
  # The parent's own latent no longer detects it on its own; with children it does.
  probes = probing.sparse_probing(z, codes > 0)
  per_task = probes["per_task"]
  assert per_task["probe_f1_k1"][0] < 0.8 and per_task["probe_f1_k5"][0] > 0.95


def letters(absorbed_share=0.25, words_per_letter=80, seed=0):
  """First-letter data: each word's activation is 2·(its letter's direction)
  plus a direction of its own. The perfect SAE has a latent per letter; the
  absorbing one gives `absorbed_share` of letter 0's words a latent of their
  own along 2·letter + word, and letter 0's latent stays silent on them."""
  rng = np.random.default_rng(seed)
  n_letters, D = 5, 64
  letter = np.repeat(np.arange(n_letters), words_per_letter)
  word_dir = rng.standard_normal((len(letter), D - n_letters)) / np.sqrt(D - n_letters)
  x = np.concatenate([2.0 * np.eye(n_letters)[letter], word_dir], axis=1)
  W = np.eye(D)[:n_letters]
  perfect = 2.0 * np.eye(n_letters)[letter]
  absorbed = (letter == 0) & (rng.random(len(letter)) < absorbed_share)
  own = x[absorbed]
  W_absorbing = np.concatenate([W, own / np.linalg.norm(own, axis=1, keepdims=True)])
  codes = np.concatenate([perfect, np.zeros((len(letter), absorbed.sum()))], axis=1)
  codes[absorbed, 0] = 0
  codes[np.flatnonzero(absorbed), n_letters + np.arange(absorbed.sum())] = np.linalg.norm(
      own, axis=1)
  return x, letter, W, perfect, W_absorbing, codes, absorbed


def test_first_letter_absorption_on_hand_built_saes():
  x, letter, W, perfect, W_absorbing, codes, absorbed = letters()
  words = np.arange(len(letter))
  clean = probing.letter_absorption(x, perfect, W, letter, words)
  assert clean["absorption_letters"] == 5 and clean["absorption"] == 0
  assert all(r["main_latents"] == [i] and r["probe_f1"] == 1
             for i, r in clean["per_letter"].items())
  caught = probing.letter_absorption(x, codes, W_absorbing, letter, words)
  zero = caught["per_letter"][0]
  assert zero["main_latents"] == [0] and zero["probe_f1"] == 1
  # The test split is the same in both calls: every test word of letter 0 is
  # a true positive, and exactly the absorbed ones are absorbed.
  share = np.mean([absorbed[w] for w in _test_words(words) if letter[w] == 0])
  assert zero["absorption"] == pytest.approx(share) and zero["absorption_fraction"] == pytest.approx(share)
  assert 0.1 < share < 0.4
  assert all(caught["per_letter"][i]["absorption"] == 0 for i in range(1, 5))
  assert caught["absorption"] == pytest.approx(share / 5)


def _test_words(words, seed=0, test_fraction=0.5):
  """The words `letter_absorption` holds out (its split, re-derived)."""
  groups = np.unique(words)
  return set(np.random.default_rng(seed).permutation(groups)[
      :int(round(test_fraction * len(groups)))].tolist())


def test_sequence_labels_pool_codes_per_sequence():
  rng = np.random.default_rng(1)
  sequence = np.repeat(np.arange(60), 5)
  label = np.repeat(rng.random(60) < 0.5, 5)
  codes = rng.random((300, 8)) + 3.0 * label[:, None] * (np.arange(8) == 2)
  pooled = probing.sparse_probing(codes, label, sequences=sequence, min_examples=2)
  direct = probing.sparse_probing(codes.reshape(60, 5, 8).mean(1), label[::5], min_examples=2)
  for name in ("probe_acc_k1", "probe_f1_k2", "probe_acc_k5"):
    assert pooled[name] == direct[name]
  assert pooled["probe_acc_k1"] == 1
  with pytest.raises(ValueError, match="labels must be constant within each sequence"):
    probing.sparse_probing(codes, rng.random(300) < 0.5, sequences=sequence)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"ks must lie in \[1, 4\] \(latents\); got 5"):
    probing.sparse_probing(np.ones((10, 4)), np.arange(10) < 5)
  with pytest.raises(ValueError, match="need the same N; got 10, 9"):
    probing.sparse_probing(np.ones((10, 4)), np.arange(9) < 5, ks=(1,))
