"""Checkpoints through orbax: the whole TrainState, so a run continues exactly.

The state holds everything the next step reads — parameters, optimiser
state, threshold, dead-latent counters, skip counters, input scale, RNG — and
its step is the loader position (batches are a pure function of the step).
"""

import pathlib
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp

from sae_jax.train import TrainState


class Checkpointer:
  """Saves and restores TrainStates in `directory`, keeping the last `keep`."""

  def __init__(self, directory, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> typing.Optional[int]:
    return self._manager.latest_step()

  def save(self, state: TrainState) -> None:
    """Saves an unreplicated (host) state at its step; writes in the background."""
    host = jax.tree.map(np.asarray, state)
    step = int(host.step)
    if self._manager.latest_step() != step:
      self._manager.save(step, args=ocp.args.StandardSave(host))

  def restore(self, like: TrainState) -> typing.Optional[TrainState]:
    """The latest saved state (host arrays, with `like`'s config), or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, like))
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    """Waits for writes in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
