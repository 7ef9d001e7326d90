"""Sums over the devices of a named axis in one order, fixed by the devices'
indices, so that a run gives the same bits however its devices are spread
over processes.

`lax.psum` leaves the order of its additions to the backend: XLA adds the
devices of one process in one order, gloo (CPU devices of several
processes) in another, and float addition is not associative, so a 2 x 2
device run and a 1 x 4 one drift apart by an ulp a step. `ordered_psum` adds
with data movement only (`ppermute`, `all_gather`, which copy bits): a ring
reduce-scatter, in which chunk c of the array is summed device c+1, c+2,
..., c, then an all-gather of the chunks. It moves what a ring all-reduce
moves, in n - 1 steps.
"""

import jax
import jax.numpy as jnp
from jax import lax


def ordered_psum(x: jax.Array, axis_name) -> jax.Array:
  """The sum of `x` over the devices of `axis_name`, added in an order that
  depends only on the devices' indices (the same value on every device).

  >>> n = jax.local_device_count()
  >>> sums = jax.pmap(lambda x: ordered_psum(x, "i"), "i")(jnp.arange(n, dtype=jnp.float32))
  >>> bool((sums == n * (n - 1) / 2).all())
  True
  """
  if axis_name is None:
    return x
  n = lax.axis_size(axis_name)
  if n == 1:
    return lax.psum(x, axis_name)  # one term: nothing to order
  size = x.size
  m = -(-size // n)
  chunks_NxM = jnp.pad(x.reshape(-1), (0, n * m - size)).reshape(n, m)
  i = lax.axis_index(axis_name)
  ring = [(j, (j + 1) % n) for j in range(n)]
  # After step s, device j holds the running sum of chunk (j - 1 - s) mod n.
  acc_M = lax.dynamic_index_in_dim(chunks_NxM, (i - 1) % n, keepdims=False)
  for s in range(1, n):
    acc_M = lax.ppermute(acc_M, axis_name, ring)
    acc_M = acc_M + lax.dynamic_index_in_dim(chunks_NxM, (i - 1 - s) % n, keepdims=False)
  # Device j now holds chunk j, summed from device j + 1 round to j.
  whole = lax.all_gather(acc_M, axis_name, tiled=True, to="invarying")
  return whole[:size].reshape(x.shape)


def ordered_pmean(tree, axis_name):
  """The mean over the devices of `axis_name` of every leaf, by `ordered_psum`."""
  n = 1 if axis_name is None else lax.axis_size(axis_name)
  return jax.tree.map(lambda x: ordered_psum(x, axis_name) / n, tree)
