"""Held-out evaluation in inference mode (a token's code never depends on the
other tokens): reconstruction and sparsity on raw activations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import model
from sae_jax.config import SAEConfig


@functools.partial(jax.jit, static_argnames=("config",))
def _reconstruct(params, threshold, input_scale, x_BxD, config: SAEConfig):
  sae = model.SAE(config)
  variables = {"params": params}
  z_BxF = sae.apply(variables, x_BxD * input_scale, threshold, method=model.SAE.encode_inference)
  xhat_BxD = sae.apply(variables, z_BxF, method=model.SAE.decode) / input_scale
  return z_BxF, xhat_BxD


def reconstruct(params, threshold, input_scale, x_BxD, config: SAEConfig,
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Inference-mode codes [B, F] (scaled units) and reconstructions [B, D]
  (raw units) of raw activations, `chunk` tokens at a time."""
  codes, recon = [], []
  for start in range(0, len(x_BxD), chunk):
    z, xhat = _reconstruct(params, jnp.float32(threshold), jnp.float32(input_scale),
                           jnp.asarray(x_BxD[start:start + chunk], jnp.float32), config)
    codes.append(np.asarray(z))
    recon.append(np.asarray(xhat))
  return np.concatenate(codes), np.concatenate(recon)


def reconstruction_metrics(x_BxD, xhat_BxD, z_BxF) -> dict:
  """fvu = Σ||x - xhat||² / Σ||x - mean x||², explained_variance = 1 - fvu,
  mse (per element), l0 (mean nonzero codes per token).

  >>> x = np.array([[1., 0.], [-1., 0.]])
  >>> reconstruction_metrics(x, x, np.array([[1., 0.], [0., 2.]]))
  {'fvu': 0.0, 'explained_variance': 1.0, 'mse': 0.0, 'l0': 1.0}
  """
  x = np.asarray(x_BxD, np.float64)
  error = np.square(x - np.asarray(xhat_BxD, np.float64))
  fvu = float(error.sum() / np.square(x - x.mean(0)).sum())
  return {"fvu": fvu, "explained_variance": 1 - fvu, "mse": float(error.mean()),
          "l0": float(np.mean(np.sum(np.asarray(z_BxF) != 0, axis=1)))}
