"""Transcoders: an SAE that reads one hook's activations and reconstructs
another's (`SAEConfig.transcoder`; `--target-hook`).

    pre_BxF  = x_BxD @ W_enc + b_enc        x: the input hook (not centred)
    yhat_BxD = z_BxF @ W_dec + b_dec        y: the target hook, row for row

The selection rules, their losses, AuxK (on the target's residual y - yhat)
and the inference thresholds are the SAE's, with y where the SAE has x in
the loss and x where it has x in the encoder. The encoder does not subtract
b_dec: b_dec is the target's bias, as in sparsify's transcoders and SAELens'
`transcoder` classes, which have no such term. b_dec starts at the targets'
geometric median.

Data rows are pairs: [N, 2, D] on disk (a cache's shards, or a .npy, as
dictionary_learning's "in_and_out" buffer holds them), read as [N, 2·D]
rows, the input's D columns first, so that batches, shuffling, hosts and
held-out rows are the SAE's. Each side has its scale: c_in with
E||c_in·x||² = D and c_out with E||c_out·y||² = D (`TrainState.input_scale`
and `target_scale`). Both hooks have the model's width D.
"""

import numpy as np

# Why a transcoder has no absorption metric (summary.json's absorption_skipped).
NO_ABSORPTION = ("a transcoder's decoder rows are directions of the target hook, onto which "
                 "absorption would project the input's activations")


def split(rows_NxW, d_model: int):
  """(inputs [..., D], targets [..., D]) of pair rows [..., 2·D].

  >>> x, y = split(np.arange(8.).reshape(2, 4), 2)
  >>> x.tolist(), y.tolist()
  ([[0.0, 1.0], [4.0, 5.0]], [[2.0, 3.0], [6.0, 7.0]])
  """
  return rows_NxW[..., :d_model], rows_NxW[..., d_model:]


def sides(rows_NxW, config):
  """(what the encoder reads, what the decoder reconstructs) of data rows,
  for an SAE of `config` (`SAEConfig`): a transcoder's pair split, an SAE's
  rows twice."""
  return split(rows_NxW, config.d_model) if config.transcoder else (rows_NxW, rows_NxW)


def scaled(rows_NxW, config, scales) -> np.ndarray:
  """Raw rows in scaled units (float32): each side times its scale, from
  `scales` = (c_in, c_out) (`train.scales`)."""
  rows_NxW = np.asarray(rows_NxW, np.float32)
  c_in, c_out = (np.float32(c) for c in scales)
  if not config.transcoder:
    return rows_NxW * c_in
  x_NxD, y_NxD = split(rows_NxW, config.d_model)
  return np.concatenate([x_NxD * c_in, y_NxD * c_out], axis=-1)

