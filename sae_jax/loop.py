"""The training loop: runs the cheapest sharded step whose dead-latent
promise holds, for one run (`train_loop`) or several on one stream of batches
(`train_many`), with logs, checkpoints, stops and a progress bar."""

import functools
import time
import typing

import jax
import numpy as np
import tqdm

from sae_jax import latent_step
from sae_jax import mesh as mesh_lib
from sae_jax import train
from sae_jax.config import TrainConfig


def _step_for(config: TrainConfig, dead_at_most: int, latent_axis: bool = False):
  """The cheapest step whose promise holds while at most `dead_at_most`
  latents can be dead (see `train_step`). JumpReLU has no AuxK: its one
  step, whatever the count (compiled once). A state whose latents are split
  over a mesh axis takes `latent_step.p_train_step`'s forms."""
  if latent_axis:
    return functools.partial(latent_step.p_train_step,
                             form="all_alive" if dead_at_most == 0 else "general")
  if dead_at_most == 0 or config.sae.selection == "jumprelu":
    return train.p_train_step_all_alive
  if config.sae.selection != "sampled":
    return train.p_train_step
  fits = [capacity for capacity in train.packed_capacities(config) if dead_at_most <= capacity]
  return functools.partial(train.p_train_step_packed,
                           capacity=fits[0] if fits else config.sae.n_latents)


def train_loop(state: train.TrainState, batches: typing.Iterable, *, log_every: int = 100,
               on_log: typing.Optional[typing.Callable[[int, dict], None]] = None,
               on_step: typing.Optional[typing.Callable[[int, train.TrainState], None]] = None,
               should_stop: typing.Optional[typing.Callable[[], bool]] = None,
               progress: bool = True) -> train.TrainState:
  """Runs `train.p_train_step` until the config's last step or the end of `batches`.

  While no latent can be dead it runs `train.p_train_step_all_alive` instead, the
  same step compiled without AuxK, and for Sampled-SAE while any can be,
  `train.p_train_step_packed` at the smallest capacity that holds them (F past
  F/2). It counts them from the state's `dead_at_most`
  and then from each step's `dead_soon` metric, read one step late, so the
  choice never needs the device to wait, and it depends on the states
  alone: a resumed run picks what the uninterrupted one picked.

  Args:
    state: a replicated state (`train.replicate`); it is donated.
    batches: this process's arrays [local devices, B / devices, D] of raw
      activations, or global arrays [devices, B / devices, D] already laid
      out on the state's mesh, starting with the batch for step `state.step`.
      Nothing is drawn from it after the last step.
    log_every: steps between calls of `on_log`; the last step is always logged.
    on_log: called as on_log(step, metrics) with the step's metrics as floats,
      plus "step" (steps done) and "tokens_per_second" (since the last log).
    on_step: called as on_step(step, state) after each step is dispatched
      (for checkpoints); `state` must not be kept, as the next step donates it.
    should_stop: checked after each step; True ends the loop there (SIGTERM).
    progress: show a tqdm bar (tokens, tokens/s, loss, fvu, l0).

  Returns:
    The final replicated state.

  Raises:
    train.NonFiniteError: after `config.max_bad_steps` consecutive skipped steps.

  >>> from sae_jax import SAEConfig, SyntheticConfig, SyntheticSource
  >>> source = SyntheticSource(SyntheticConfig(d_model=16, n_features=32))
  >>> config = TrainConfig(SAEConfig(16, 64, k=4, l=2), batch_size=64, steps=20,
  ...                      warmup_steps=2, threshold_start=10)
  >>> state = train.replicate(train.create_train_state(config, source.sample(10**6, 256)))
  >>> state = train_loop(state, source.batches(64, jax.local_device_count()), progress=False)
  >>> int(train.unreplicate(state).step), float(train.unreplicate(state).threshold) > 0
  (20, True)
  """
  return train_many(
      [state], batches, log_every=log_every,
      on_log=None if on_log is None else lambda i, step, m: on_log(step, m),
      on_step=None if on_step is None else lambda step, states: on_step(step, states[0]),
      should_stop=None if should_stop is None else lambda step: should_stop(),
      progress=progress)[0]


def train_many(states: typing.Sequence[train.TrainState], batches: typing.Iterable, *,
               log_every: int = 100,
               on_log: typing.Optional[typing.Callable[[int, int, dict], None]] = None,
               on_step: typing.Optional[typing.Callable[[int, list], None]] = None,
               should_stop: typing.Optional[typing.Callable[[int], bool]] = None,
               progress: bool = True, names: typing.Optional[typing.Sequence[str]] = None
               ) -> list:
  """`train_loop` for several SAEs on one stream of batches: each batch is
  read once, laid out on the devices once, and given to every state's step
  in turn. Each state keeps its own compiled step, so it ends with the same
  parameters, bit for bit, as when trained alone on the same batches.

  Args:
    states: replicated states on one mesh, at the same step, with the same
      batch_size, d_model and total steps (their rules and other settings
      may differ); they are donated.
    batches: as for `train_loop`.
    log_every: as for `train_loop`.
    on_log: called as on_log(i, step, metrics) for state i; metrics as for
      `train_loop` ("tokens_per_second": the batches' tokens per second).
    on_step: called as on_step(step, states) once all states took the step.
    should_stop: called as should_stop(step) after each step; True ends the
      loop there.
    progress: as for `train_loop`.
    names: the states' names in error messages (default "state 0", ...).

  Returns:
    The final replicated states, in order.

  Raises:
    train.NonFiniteError: after `config.max_bad_steps` consecutive skipped steps
      of any state.

  >>> from sae_jax import SAEConfig, SyntheticConfig, SyntheticSource
  >>> source = SyntheticSource(SyntheticConfig(d_model=16, n_features=32))
  >>> configs = [TrainConfig(SAEConfig(16, 64, k=4, l=l), batch_size=64, steps=20,
  ...                        warmup_steps=2) for l in (1, 4)]
  >>> states = [train.replicate(train.create_train_state(c, source.sample(10**6, 256)))
  ...           for c in configs]
  >>> states = train_many(states, source.batches(64, jax.local_device_count()), progress=False)
  >>> [int(train.unreplicate(s).step) for s in states]
  [20, 20]
  """
  states = list(states)
  names = list(names) if names is not None else [f"state {i}" for i in range(len(states))]
  if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be an integer >= 1; got {log_every!r}")
  if not states or len(names) != len(states):
    raise ValueError(f"states must be a non-empty list with one name each; got {len(states)} "
                     f"states and {len(names)} names")
  c = states[0].config
  mesh = states[0].step.sharding.mesh
  steps = [int(train.host(s.step)) for s in states]
  shared = lambda s: (s.config.batch_size, s.config.sae.row_width, s.config.total_steps)
  for name, s, step in zip(names, states, steps):
    if (shared(s), step, s.step.sharding.mesh) != (shared(states[0]), steps[0], mesh):
      raise ValueError(
          f"train_many's states must share the batch (batch_size, row width), the total steps, "
          f"the step they are at and the mesh: {name} has {shared(s)} at step {step}, "
          f"{names[0]} {shared(states[0])} at step {steps[0]}")
  n_data = mesh_lib.data_shards(mesh)
  latent_axis = mesh_lib.LATENT in mesh.axis_names
  want = (mesh_lib.local_data_shards(mesh), c.batch_size // n_data, c.sae.row_width)
  if c.batch_size % n_data:
    raise ValueError(
        f"batch_size {c.batch_size} must be divisible by the {n_data} data shards")
  step = steps[0]
  bar = tqdm.tqdm(total=c.total_steps * c.batch_size, initial=step * c.batch_size,
                  unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
  clock = {"time": time.perf_counter(), "step": step, "rate": 0.0}

  def report(i, done, metrics, last=False):
    m = {name: float(train.host(v)) for name, v in metrics.items()}
    if m["bad_streak"] >= c.max_bad_steps:
      who = f" of {names[i]}" if len(states) > 1 else ""
      raise train.NonFiniteError(
          f"training{who} stopped at step {done}: the last {int(m['bad_streak'])} steps had a "
          f"non-finite loss or gradient and were skipped ({int(m['skipped_steps'])} in all). "
          f"Check the activations for NaN/inf and the learning rate "
          f"({states[i].config.learning_rate:g}).")
    if i == 0:
      bar.update(c.batch_size)
    if done % log_every == 0 or last:
      if i == 0:
        now = time.perf_counter()
        clock.update(rate=(done - clock["step"]) * c.batch_size / max(now - clock["time"], 1e-9),
                     time=now, step=done)
        bar.set_postfix(loss=f"{m['loss']:.4g}", fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}")
      if on_log is not None:
        on_log(i, done, dict(m, step=done, tokens_per_second=clock["rate"]))
    return m

  # Per state, the most latents that can be dead on its next step: the
  # state's dead_at_most for the first, counted from the state's counters
  # for the second, then each step's dead_soon, read one step late. Each is
  # the count the state itself holds for that step, so a resumed run picks
  # the forms of the uninterrupted one.
  bounds = [int(train.host(s.dead_at_most)) for s in states]
  second = [int(train.can_be_dead(train.host(s.steps_since_fired_F), s.config.dead_steps, 1))
            for s in states]
  # Metrics are read one step late, so the next step is queued while we wait.
  pending = None
  on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
  batches = iter(batches)
  with bar:
    while step < c.total_steps:
      batch = next(batches, None)
      if batch is None:
        break
      if isinstance(batch, jax.Array) and batch.sharding == on_mesh:
        shape, expected = batch.shape, (n_data,) + want[1:]
      else:
        shape, expected = np.shape(batch), want
      if shape != expected:
        raise ValueError(
            f"batch for step {step} must have shape {expected} ([data shards, batch_size / data "
            f"shards, d_model, or 2·d_model for a transcoder's pairs]); got {shape}")
      batch = train.global_batch(batch, mesh)  # once, for every state
      metrics = []
      for i, state in enumerate(states):
        states[i], m = _step_for(state.config, bounds[i], latent_axis)(state, batch)
        metrics.append(m)
        bounds[i] = second[i]
      step += 1
      if pending is not None:
        done = pending[0]
        for i, m in enumerate(pending[1]):
          bounds[i] = int(report(i, done, m)["dead_soon"])  # bounds step `step`, the next
      pending = (step, metrics)
      if on_step is not None:
        on_step(step, states)
      if should_stop is not None and should_stop(step):
        break
    if pending is not None:
      for i, m in enumerate(pending[1]):
        report(i, pending[0], m, last=True)
  return states
