"""Checkpoints through orbax: the whole TrainState, so a run continues exactly.

The state holds everything the next step reads — parameters, optimiser
state, threshold, dead-latent counters, skip counters, input scale, RNG. For
data read from disk its step is the loader position (batches are a pure
function of the step); a data source with more to remember (the `--stream`
position) saves it as `<step>.data.json` beside the step's orbax directory.
"""

import json
import os
import pathlib
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp

from sae_jax.train import TrainState

_DATA = "{step}.data.json"


class Checkpointer:
  """Saves and restores TrainStates in `directory`, keeping the last `keep`."""

  def __init__(self, directory, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> typing.Optional[int]:
    return self._manager.latest_step()

  def save(self, state: TrainState, data_position: typing.Optional[dict] = None) -> None:
    """Saves an unreplicated (host) state at its step; writes in the background.

    `data_position` (JSON-able) is written first, under a temporary name and
    renamed, so a step orbax has finished always has it.
    """
    host = jax.tree.map(np.asarray, state)
    step = int(host.step)
    if self._manager.latest_step() == step:
      return
    if data_position is not None and jax.process_index() == 0:  # the same on every host
      path = self.directory / _DATA.format(step=step)
      tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
      tmp.write_text(json.dumps(data_position))
      os.replace(tmp, path)
    self._manager.save(step, args=ocp.args.StandardSave(host))
    kept = set(self._manager.all_steps()) | {step}
    for path in self.directory.glob(_DATA.format(step="*")):
      saved = int(path.name.split(".")[0])
      if saved < step and saved not in kept:
        path.unlink(missing_ok=True)

  def restore(self, like: TrainState) -> typing.Optional[TrainState]:
    """The latest saved state (host arrays, with `like`'s config), or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, like))
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def data_position(self, step: int) -> typing.Optional[dict]:
    """The data position saved with `step`'s checkpoint, or None."""
    path = self.directory / _DATA.format(step=step)
    return json.loads(path.read_text()) if path.exists() else None

  def close(self) -> None:
    """Waits for writes in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
