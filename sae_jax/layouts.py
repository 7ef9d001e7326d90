"""How the gradients of a selection given as entries (TopK's, BatchTopK's,
AuxK's) are computed: by the entries themselves (gathers and scatters, work
independent of F) or as dense codes ([B, F] and B·F·D matmuls), and the
entries' weight gradients."""

import jax
import jax.numpy as jnp

# "auto" takes codes while F is below `CODES_UP_TO` entries per token for
# the backend, entries past that. On
# CPU XLA's gathers and scatters run far below its matmuls per flop, so
# codes win up to about 200 entries per token, where the TopK and BatchTopK
# steps cross (docs/speed.md has the measurements). Elsewhere entries from 16
# per token, where gathers run near memory bandwidth; not measured yet on an
# accelerator (benchmarks/train_step.py prints both layouts on any backend).
CODES_UP_TO = {"cpu": 200}
"""F per selected entry per token below which "auto" takes codes, by
backend (16 for any other)."""


def layout(n_latents: int, per_token: int, choice: str = "auto") -> str:
  """"entries" or "codes" for a selection of `per_token` entries per token
  (on average) among `n_latents`: `choice` (`TrainConfig.layout`), or with
  "auto" the one for the default backend."""
  if choice != "auto":
    return choice
  if n_latents < CODES_UP_TO.get(jax.default_backend(), 16) * per_token:
    return "codes"
  return "entries"


def entry_grads(rows_M, cols_M, values_M, dxhat_BxD, dpre_M, centred_BxD, n_latents):
  """The weight gradients of codes given as entries (token rows_M, latent
  cols_M, value values_M), from the reconstruction's cotangent dxhat and the
  entries' pre-activation cotangents dpre_M: W_enc [D, F], b_enc [F] and
  W_dec [F, D] (b_dec's encoder term is the caller's)."""
  D = dxhat_BxD.shape[1]
  # One scatter for both weight gradients: rows [dW_dec | dW_enc^T] per latent.
  updates_Mx2D = jnp.concatenate(
      [values_M[:, None] * dxhat_BxD.at[rows_M].get(mode="promise_in_bounds"),
       dpre_M[:, None] * centred_BxD.at[rows_M].get(mode="promise_in_bounds")], axis=1)
  both_Fx2D = jnp.zeros((n_latents, 2 * D), jnp.float32).at[cols_M].add(
      updates_Mx2D, mode="promise_in_bounds")
  db_enc_F = jnp.zeros(n_latents, jnp.float32).at[cols_M].add(dpre_M, mode="promise_in_bounds")
  return {"W_enc": both_Fx2D[:, D:].T, "b_enc": db_enc_F, "W_dec": both_Fx2D[:, :D]}


def b_dec_grad(dxhat_BxD, W_enc_DxP, db_enc_P, centre: bool = True):
  """b_dec's gradient [D]: Σ dxhat over the tokens, less W_enc @ db_enc when
  the encoder reads x - b_dec (`centre`; on P columns, those db_enc covers)."""
  total_D = jnp.sum(dxhat_BxD, axis=0)
  return total_D - W_enc_DxP @ db_enc_P if centre else total_D
