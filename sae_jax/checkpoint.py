"""Checkpoints through orbax: the whole TrainState, so a run continues exactly.

The state holds everything the next step reads — parameters, optimiser
state, threshold, dead-latent counters, skip counters, input scale, RNG. For
data read from disk its step is the loader position (batches are a pure
function of the step); a data source with more to remember (the `--stream`
position) saves it beside the step.

Each step `<step>/` (orbax's) has a sidecar `<step>.meta.json`, written
whole or not at all (`storage.atomic_write`; the directory may be gs://):
before orbax starts, the sha256 of the state's arrays and the data
position; once orbax has finished the step (at the next save, or on close),
the size and sha256 of each of its files.
orbax keeps no checksum of what it reads back, so a restore first checks the
files (orbax is never handed a damaged one), then recomputes the digest from
the restored arrays. A step that fails either check or does not restore (a
flipped byte, a truncated, missing or empty file, an empty step folder) is
moved to `<checkpoints>-damaged/` and the next newest is tried, each said in
a line.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp

from sae_jax import export, storage
from sae_jax import train
from sae_jax import validation
from sae_jax.train import TrainState

_META = "{step}.meta.json"
_LEGACY_DATA = "{step}.data.json"  # the data position, before checksums


class _NoTraceback(logging.Filter):
  """orbax logs a failed background save with its traceback; the same error
  is raised again in the main thread, where it becomes one line. Its log
  record keeps its message and loses the traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


logging.getLogger("absl").addFilter(_NoTraceback())


def digest(state: TrainState) -> str:
  """sha256 over the state's arrays: each leaf's dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{leaf.dtype.str}{leaf.shape};".encode())
    h.update(leaf.reshape(-1).view(np.uint8))  # the bytes, not a copy
  return h.hexdigest()


def _step(saved) -> int:
  """The step of a saved TrainState, or of a list of them (all at one step)."""
  return int((saved[0] if isinstance(saved, (list, tuple)) else saved).step)


def _with_dead_at_most(saved):
  """A state (or list) restored without `dead_at_most`, with it counted from
  its own counters: the exact count for its next step."""
  def fill(state):
    since_F = np.asarray(state.steps_since_fired_F)
    return state.replace(dead_at_most=np.asarray(
        train.can_be_dead(since_F, state.config.dead_steps, 0), np.int32))
  return [fill(s) for s in saved] if isinstance(saved, (list, tuple)) else fill(saved)


def _alone(state):
  """A list of one state as that state (how a single run is saved)."""
  return state[0] if isinstance(state, list) and len(state) == 1 else state


def _write_atomic(path, text: str) -> None:
  storage.atomic_write(path, lambda f: f.write(text.encode()))


class Checkpointer:
  """Saves and restores TrainStates in `directory`, keeping the last `keep`."""

  def __init__(self, directory, keep: int = 3):
    directory = storage.path(directory)  # a local folder, or gs://
    self.directory = directory if storage.is_remote(directory) else directory.absolute()
    if self.directory.exists() and not self.directory.is_dir():
      raise ValueError(f"{self.directory} is a file, not a checkpoint directory: move it away "
                       f"or use another --out")
    self.directory.mkdir(parents=True, exist_ok=True)
    self._keep = keep
    self._manager = self._open()
    self._unrecorded: typing.Optional[int] = None  # a step whose files are not in its sidecar

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True))

  def latest_step(self) -> typing.Optional[int]:
    return self._manager.latest_step()

  def save(self, state: typing.Union[TrainState, list],
           data_position: typing.Optional[dict] = None) -> None:
    """Saves an unreplicated (host) state, or a list of states at one step
    (a pass of `run.run_many`), at its step; writes in the background. A
    list of one is saved as its state alone, the layout of a single run.

    The sidecar (digest and `data_position`, JSON-able) is written first, so
    a step orbax has finished always has it.
    """
    host = jax.tree.map(np.asarray, _alone(state))
    step = _step(host)
    with self._failing(f"save step {step}"):
      if self._manager.latest_step() == step:
        return
      self._record_files()
      if jax.process_index() == 0:  # the same on every host
        meta = {"sha256": digest(host), "data_position": data_position}
        _write_atomic(self.directory / _META.format(step=step), json.dumps(meta))
      self._manager.save(step, args=ocp.args.StandardSave(host))
      self._unrecorded = step
    kept = set(self._manager.all_steps()) | {step}
    for pattern in (_META, _LEGACY_DATA):
      for path in self.directory.glob(pattern.format(step="*")):
        saved = path.name.split(".")[0]
        if saved.isdigit() and int(saved) < step and int(saved) not in kept:
          path.unlink(missing_ok=True)

  def _files(self, step: int) -> dict:
    """{path in the step folder: [bytes, sha256]} of every file orbax wrote."""
    root = self.directory / str(step)
    return {name: [storage.size(root / name), export.sha256(root / name)]
            for name in storage.files(root)}

  def _record_files(self) -> None:
    """Waits for the save in flight, then adds its files to its sidecar."""
    self._manager.wait_until_finished()
    step, self._unrecorded = self._unrecorded, None
    if step is None or jax.process_index() or step not in self._manager.all_steps():
      return
    path = self.directory / _META.format(step=step)
    meta = json.loads(path.read_text())
    _write_atomic(path, json.dumps(meta | {"files": self._files(step)}))

  def _damaged_file(self, step: int, files: dict) -> typing.Optional[str]:
    """What is wrong with step `step`'s files against their record, or None."""
    root = self.directory / str(step)
    for name, (size, sha) in files.items():
      path = root / name
      if not path.is_file():
        return f"{name} is missing"
      if storage.size(path) != size:
        return f"{name} is {storage.size(path)} bytes, not {size}"
      if export.sha256(path) != sha:
        return f"{name} does not match its sha256"
    return None

  def _meta(self, step: int) -> typing.Optional[dict]:
    path = self.directory / _META.format(step=step)
    if path.exists():
      try:
        return json.loads(path.read_text())
      except (json.JSONDecodeError, UnicodeDecodeError):
        return {"sha256": "unreadable"}  # never matches: the step is damaged
    legacy = self.directory / _LEGACY_DATA.format(step=step)
    return {"data_position": json.loads(legacy.read_text())} if legacy.exists() else None

  def restore(self, like: typing.Union[TrainState, list]
              ) -> typing.Optional[typing.Union[TrainState, list]]:
    """The newest intact saved state, or list of states (host arrays, with
    `like`'s configs), or None.

    Damaged steps are moved aside, each said in a line, and the next newest
    is tried. A step saved before checksums existed is restored unverified.
    A list of one is restored from its state saved alone (`save`).
    """
    if isinstance(like, list) and len(like) == 1:
      restored = self.restore(like[0])
      return None if restored is None else [restored]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, like))
    damaged = []
    restored = None
    for step in sorted(self._manager.all_steps(), reverse=True):
      meta = self._meta(step)
      wrong = self._damaged_file(step, meta["files"]) if meta and "files" in meta else None
      if wrong is not None:
        damaged.append((step, wrong))
        continue
      try:
        state, legacy = self._manager.restore(step, args=ocp.args.StandardRestore(abstract)), False
      except Exception as error:  # orbax and tensorstore raise many kinds  # noqa: BLE001
        reason = validation.reason(error, 200)
        # A failed restore leaves orbax's handlers set up for that step's
        # layout, and every other step would then fail the same way.
        self._reopen()
        state = self._restore_before_dead_at_most(step, like)
        legacy = state is not None
        if state is None:
          if meta and "files" in meta:  # intact files: not damage, another layout
            raise ValueError(f"checkpoint {self.directory / str(step)} is intact but does not "
                             f"restore into this version's training state ({reason}); resume "
                             f"it with the sae_jax version that saved it") from None
          damaged.append((step, f"it does not restore: {reason}"))
          continue
      if meta is None or "sha256" not in meta:
        print(f"checkpoint step {step}: saved without a checksum; restored unverified",
              flush=True)
      elif digest(state) != meta["sha256"]:
        damaged.append((step, "its arrays do not match the checksum saved with them"))
        continue
      restored = _with_dead_at_most(state) if legacy else state
      break
    for step, reason in damaged:
      moved = self._move_aside(step)
      newest = f"falling back to step {_step(restored)}" if restored is not None else (
          "no intact step is left: starting from step 0")
      print(f"checkpoint {self.directory / str(step)} is damaged ({reason}); moved to "
            f"{moved}; {newest}", flush=True)
    if damaged:  # orbax lists steps when it opens
      self._reopen()
    return restored

  def _restore_before_dead_at_most(self, step: int, like):
    """Step `step` saved by a version whose states had no `dead_at_most`
    (before 2026-12-03), as states with dead_at_most None (whose digest is
    the one saved with them), or None if it does not restore that way
    either."""
    many = isinstance(like, (list, tuple))
    states = list(like) if many else [like]
    # Their fields by name (orbax matches the saved tree by names); those
    # versions trained no transcoders (target_scale None).
    target = [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)
               if f.name not in ("config", "dead_at_most", "target_scale")} for s in states]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            jax.tree.map(np.asarray, target if many else target[0]))
    try:
      saved = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception:  # noqa: BLE001
      self._reopen()
      return None
    states = [s.replace(**fields, dead_at_most=None)
              for s, fields in zip(states, saved if many else [saved])]
    return states if many else states[0]

  def _reopen(self) -> None:
    self._manager.close()
    self._manager = self._open()

  def _move_aside(self, step: int):
    """Moves step `step` (and its sidecar) into <directory>-damaged/."""
    aside = self.directory.with_name(self.directory.name + "-damaged")
    target, n = aside / str(step), 1
    while target.exists():
      target, n = aside / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
      target.mkdir(parents=True)
      storage.move(self.directory / str(step), target / "orbax")
      for pattern in (_META, _LEGACY_DATA):
        sidecar = self.directory / pattern.format(step=step)
        if sidecar.exists():
          storage.move(sidecar, target / sidecar.name)
    return target

  def data_position(self, step: int) -> typing.Optional[dict]:
    """The data position saved with `step`'s checkpoint, or None."""
    meta = self._meta(step)
    return None if meta is None else meta.get("data_position")

  def close(self) -> None:
    """Waits for writes in flight, then releases the manager."""
    with self._failing("finish writing"):
      self._record_files()
      self._manager.close()

  @contextlib.contextmanager
  def _failing(self, what: str):
    """A failed write (a full disk; orbax raises a save's error in a later
    call) becomes one line naming the directory."""
    try:
      yield
    except Exception as error:  # noqa: BLE001  (OSError, or tensorstore's ValueError)
      reason = validation.reason(error, 300)
      raise ValueError(f"could not {what} of the checkpoints in {self.directory} ({reason}); "
                       f"free space and re-run to resume from the last finished "
                       f"checkpoint") from None
