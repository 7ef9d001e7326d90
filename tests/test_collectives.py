"""ordered_psum: the sum in the ring order its docstring gives, the same bits
on every device, under shard_map and pmap, for any shape."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sae_jax import collectives

N = 4


def ring_sum(xs_N):
  """NumPy float32: chunk c of the flattened arrays added device c+1, c+2, ..., c."""
  n, shape = len(xs_N), xs_N[0].shape
  size = xs_N[0].size
  m = -(-size // n)
  flat = [np.pad(x.reshape(-1), (0, n * m - size)).reshape(n, m) for x in xs_N]
  out = []
  for c in range(n):
    acc = flat[(c + 1) % n][c].copy()
    for step in range(2, n + 1):
      acc = (acc + flat[(c + step) % n][c]).astype(np.float32)
    out.append(acc)
  return np.concatenate(out)[:size].reshape(shape)


@pytest.mark.parametrize("shape", [(), (3,), (5, 7)])
@pytest.mark.parametrize("how", ["shard_map", "pmap"])
def test_ordered_psum_adds_in_ring_order(shape, how):
  rng = np.random.default_rng(0)
  # A wide dynamic range, so that another order of additions gives other bits.
  xs = (rng.standard_normal((N, *shape)) * 10.0 ** rng.integers(-4, 8, (N, *shape)))
  xs = xs.astype(np.float32)
  if how == "pmap":
    got = jax.pmap(lambda x: collectives.ordered_psum(x, "i"), "i")(xs)
  else:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("i",))
    f = jax.shard_map(lambda x: collectives.ordered_psum(x[0], "i")[None], mesh=mesh,
                      in_specs=P("i"), out_specs=P("i"))
    got = jax.jit(f)(xs)
  got = np.asarray(got)
  want = ring_sum(list(xs))
  for device in range(N):
    np.testing.assert_array_equal(got[device], want)
  if shape == (5, 7):  # the order matters for these numbers: a plain sum differs
    assert not np.array_equal(want, np.sum(xs, axis=0, dtype=np.float32))
