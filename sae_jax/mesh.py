"""Where a training state lives: the devices' mesh, and each array's place on it.

The mesh has axis "data", over which the batch is split, and with
`--latent-shards M` > 1 a second axis "latent" of M devices, over which
every F-sized array is split: W_enc's columns, b_enc, W_dec's rows, their
Adam moments and the dead-latent counters (`latent_spec`). Everything else
is replicated. A row of M devices (a latent group) is some of one
process's devices, or all the devices of M / (local devices) processes,
which then feed it the same tokens (`process_data`). A process whose
groups lie within it reads the SAE back by itself; otherwise the processes
gather it together (`host`). The step over such a mesh is `latent_step.py`.
"""

import typing

import jax
import numpy as np
from jax.experimental import multihost_utils

DATA = "data"
LATENT = "latent"

P = jax.sharding.PartitionSpec

# The F-sized parameters (and their Adam moments, which sit under the same
# names) and the axis of each that indexes latents.
LATENT_AXIS_OF = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
# The state's other F-sized fields.
LATENT_FIELDS = ("steps_since_fired_F",)


def make_mesh(n_devices: typing.Optional[int] = None, latent_shards: int = 1
              ) -> jax.sharding.Mesh:
  """All devices, or the first `n_devices` local ones: a 1-D mesh over
  "data", or with `latent_shards` M > 1 a ("data", "latent") mesh of
  devices / M rows, each row M consecutive devices: of one process, or all
  the devices of M / (local devices) processes."""
  if n_devices is None:
    devices = jax.devices()
  else:
    local = jax.local_devices()
    if jax.process_count() > 1 or not 1 <= n_devices <= len(local):
      raise ValueError(f"n_devices must be in [1, {len(local)}] (local devices) on a "
                       f"single process, or None (all devices); got {n_devices}")
    devices = local[:n_devices]
  if latent_shards == 1:
    return jax.sharding.Mesh(np.array(devices), (DATA,))
  check_latent_shards(latent_shards, len(devices) // jax.process_count(), len(devices))
  grid = np.array(devices).reshape(-1, latent_shards)
  for row in grid:
    processes = {device.process_index for device in row}
    whole = all(device.process_index not in processes or device in row for device in devices)
    if len(processes) > 1 and not whole:
      raise ValueError(f"--latent-shards {latent_shards}: the devices {list(row)} of one "
                       f"latent group hold only part of each of processes {sorted(processes)}; "
                       f"a group must lie within one process or be whole processes")
  return jax.sharding.Mesh(grid, (DATA, LATENT))


def check_latent_shards(latent_shards: int, local_devices: int, devices: int) -> None:
  """A latent group must be some of one process's devices or whole processes."""
  if (not isinstance(latent_shards, int) or latent_shards < 1 or devices % latent_shards
      or (local_devices % latent_shards and latent_shards % local_devices)):
    raise ValueError(f"--latent-shards must divide the {local_devices} devices of each "
                     f"process, or be a multiple of them that divides all {devices} devices; "
                     f"got {latent_shards}")


def process_data(latent_shards: int) -> tuple:
  """(this process's data shards, the share of each batch it reads, the
  shares): its own share with its local devices / M data shards, or, when
  a latent group spans M / (local devices) processes, one data shard whose
  tokens every process of the group reads alike."""
  local, p, n = jax.local_device_count(), jax.process_index(), jax.process_count()
  if latent_shards <= local:
    return local // latent_shards, p, n
  spanned = latent_shards // local
  return 1, p // spanned, n // spanned


def latent_shards(mesh: jax.sharding.Mesh) -> int:
  """M, the devices the latents are split over (1 without a "latent" axis)."""
  return dict(mesh.shape).get(LATENT, 1)


def data_shards(mesh: jax.sharding.Mesh) -> int:
  """The devices the batch is split over."""
  return dict(mesh.shape)[DATA]


def local_data_shards(mesh: jax.sharding.Mesh) -> int:
  """The data shards this process feeds (`process_data`)."""
  return max(1, len(mesh.local_devices) // latent_shards(mesh))


def latent_spec(path, leaf) -> P:
  """Where the state's leaf at `path` lies on a ("data", "latent") mesh:
  split on "latent" along its latent axis, or replicated."""
  names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
  ndim = np.ndim(leaf)
  for name, axis in LATENT_AXIS_OF.items():
    if name in names and ndim > axis:
      return P(*([None] * axis), LATENT)
  if any(name in names for name in LATENT_FIELDS):
    return P(LATENT)
  return P()


def specs(tree, mesh: jax.sharding.Mesh):
  """`tree`'s leaves' PartitionSpecs on `mesh` (all P() without a "latent" axis)."""
  if LATENT not in mesh.axis_names:
    return jax.tree.map(lambda leaf: P(), tree)
  return jax.tree_util.tree_map_with_path(latent_spec, tree)


def place(tree, mesh: jax.sharding.Mesh):
  """`tree` (host values, the same on every process) laid out on `mesh` by
  `specs`: each device gets its part (works across hosts)."""
  tree = jax.device_get(tree)

  def put(x, spec):
    x = np.asarray(x)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree, specs(tree, mesh))


def host(x) -> np.ndarray:
  """An array's value, read from this process's devices: the first copy of a
  replicated array, or a latent-sharded one put together from its parts;
  gathered from every process (all must call this together) when its
  latent groups span processes."""
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  whole, seen, covered = np.empty(x.shape, x.dtype), set(), 0
  for shard in x.addressable_shards:  # each part once (the "data" rows hold copies)
    key = tuple((s.start, s.stop) for s in shard.index)
    if key not in seen:
      seen.add(key)
      whole[shard.index] = np.asarray(shard.data)
      covered += shard.data.size
  if covered != x.size:  # latent groups across processes: gathered together
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return whole


def global_batch(batch, mesh: jax.sharding.Mesh) -> jax.Array:
  """This process's [local data shards, b, D] as the global [data shards, b, D]
  array, split on "data" (each latent group sees its row's tokens)."""
  sharding = jax.sharding.NamedSharding(mesh, P(DATA))
  if isinstance(batch, jax.Array) and batch.sharding == sharding:
    return batch
  batch = np.asarray(batch)
  return jax.make_array_from_process_local_data(sharding, batch,
                                                (data_shards(mesh),) + batch.shape[1:])
