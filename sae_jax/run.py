"""The driver: a pass trains a list of runs together on one stream of
batches, checkpointing them as one, then finishes each (`finish.py`).

`run` is a pass of one run in its own folder; `run_many` a pass of several,
each in its own folder, beside the folder that holds the pass's lock and
checkpoints. Re-running either resumes from the latest checkpoint and ends
with the same parameters as a pass that was never interrupted.
"""

import contextlib
import json
import os
import pathlib
import signal
import time
import typing

import jax
from jax.experimental import multihost_utils

from sae_jax import checkpoint
from sae_jax import finish
from sae_jax import memory
from sae_jax import mesh
from sae_jax import outdir
from sae_jax import runconfig
from sae_jax import sinks
from sae_jax import sources
from sae_jax import storage
from sae_jax import loop
from sae_jax import train
from sae_jax.runconfig import RunConfig

# What run_many's runs may set each their own way: the SAE (but its width),
# the recipe and the saved SAE's inference rule; everything that decides the
# batches is shared.
OWN_FIELDS = ("out", "train.sae", "train.learning_rate", "train.b1", "train.b2",
              "train.clip_norm", "train.warmup_steps", "train.decay_fraction",
              "train.auxk_weight", "train.dead_tokens", "train.threshold_beta",
              "train.threshold_start", "train.max_bad_steps", "train.step", "train.layout",
              "train.matryoshka_groups", "train.matryoshka_weights", "train.target_l0",
              "train.bandwidth", "train.sparsity_penalty", "train.sparsity_warmup_steps",
              "inference")


def run(config: RunConfig, *, progress: bool = True,
        verify: bool = False) -> typing.Optional[dict]:
  """Trains (or resumes), then evaluates and exports.

  SIGTERM and a first Ctrl-C (SIGINT) finish the step in flight, save a
  checkpoint and stop; a second Ctrl-C exits at once (exit status 130),
  leaving the last finished checkpoint to resume from.

  Args:
    verify: check every cache shard's sha256 before training.

  Returns:
    The summary, or None if SIGTERM stopped the run (after a checkpoint).

  Raises:
    KeyboardInterrupt: Ctrl-C stopped the run (after a checkpoint).
  """
  memory.check_devices(config.train, config.latent_shards)
  memory.check_memory(config.train, jax.device_count(), config.latent_shards)
  memory.check_end_of_run([config])
  sources.check_data_size(config)
  memory.check_evaluation([config], [sources.eval_rows(config)])
  summaries = _pass([config], storage.path(config.out), progress=progress, verify=verify)
  return None if summaries is None else summaries[0]


def run_many(configs: typing.Sequence[RunConfig], out, *, progress: bool = True,
             verify: bool = False) -> typing.Optional[list]:
  """Trains several runs in one pass over one stream of batches (each batch
  is read, or made by the model, once), then evaluates and exports each.

  Each run writes what `run` writes into its own `config.out`, except the
  checkpoints: one, of every run's state, in `out/checkpoints`. Each run
  ends with the same parameters, bit for bit, as when trained alone by
  `run`; re-running resumes them all, and a changed list of runs is refused.
  A run already finished (every output written) with the same config is not
  finished again.

  Args:
    configs: runs that differ only in their SAE (not its width) and recipe,
      each with its own `out`.
    out: the sweep's directory (the lock, sweep.json, checkpoints/).
    verify: check every cache shard's sha256 before training.

  Returns:
    The summaries, in order, or None if SIGTERM stopped the pass.

  Raises:
    KeyboardInterrupt: Ctrl-C stopped the pass (after a checkpoint).
  """
  configs, out = list(configs), storage.path(out)
  first = runconfig.flat(configs[0].to_dict())
  for config in configs[1:]:
    other = runconfig.flat(config.to_dict())
    differ = [k for k in sorted(set(first) | set(other))
              if not k.startswith(OWN_FIELDS) and first.get(k) != other.get(k)]
    for field in ("d_model", "transcoder"):  # the batches' rows
      if getattr(configs[0].train.sae, field) != getattr(config.train.sae, field):
        differ.append(f"train.sae.{field}")
    if differ:
      raise ValueError(f"run_many trains runs on one stream of batches: {config.out} and "
                       f"{configs[0].out} differ in {', '.join(differ)}")
  homes = [_absolute(config.out) for config in configs]
  if len(set(homes)) != len(homes) or _absolute(out) in homes:
    raise ValueError(f"run_many's runs need an out each, apart from the sweep's {out}; got "
                     f"{[config.out for config in configs]}")
  memory.check_devices(configs[0].train, configs[0].latent_shards)
  memory.check_memory_many(configs, jax.device_count())
  memory.check_end_of_run(configs)
  sources.check_data_size(configs[0])
  memory.check_evaluation(configs, [sources.eval_rows(config) for config in configs])
  return _pass(configs, out, progress=progress, verify=verify)


class Stopper:
  """Stops a pass after the step in flight on SIGTERM or a first Ctrl-C,
  which are noted, never interrupting a write (orbax's above all); a second
  Ctrl-C exits at once. Called with a step: whether to stop after it.

  Several processes must stop after the same step: SIGTERM goes to JAX's
  preemption notifier, and every process asks it, each step, whether a stop
  was agreed (`reached_preemption_sync_point`); Ctrl-C becomes a SIGTERM.
  """

  def __init__(self):
    self.together = jax.process_count() > 1
    self.signal = None  # the name of the signal that stopped the pass
    self._pressed = False  # a first Ctrl-C was pressed
    self._why = None  # several processes: the signal this one received
    self._previous = {}

  def __enter__(self) -> "Stopper":
    numbers = (signal.SIGINT,) if self.together else (signal.SIGTERM, signal.SIGINT)
    self._previous = {n: signal.signal(n, self._on_signal) for n in numbers}
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  def _on_signal(self, number, frame) -> None:
    if number == signal.SIGINT and self._pressed:  # the second Ctrl-C
      os.write(2, b"\nsecond Ctrl-C: exiting now; re-run to resume from the last checkpoint\n")
      os._exit(130)
    if number == signal.SIGINT:
      self._pressed = True
      os.write(2, b"\nCtrl-C: finishing the step and saving a checkpoint "
                  b"(Ctrl-C again exits at once)\n")
    if self.together:
      self._why = signal.Signals(number).name
      signal.raise_signal(signal.SIGTERM)  # to JAX's notifier, which tells the others
    else:
      self.signal = signal.Signals(number).name

  def __call__(self, step: int) -> bool:
    if self.together and multihost_utils.reached_preemption_sync_point(step):
      self.signal = self._why or "SIGTERM"
    return self.signal is not None


def _pass(configs: list, out: pathlib.PurePath, *, progress: bool,
          verify: bool) -> typing.Optional[list]:
  """Trains `configs` together under the lock on `out` (one data stream, one
  checkpoint in out/checkpoints), then finishes each in its own folder."""
  homes = [storage.path(config.out) for config in configs]
  sweep = any(_absolute(home) != _absolute(out) for home in homes)
  releases = []

  def folders() -> list:
    """Each folder locked (a sweep's variants too, so that no run writes
    into them) and each run's config checked against what it saved; whether
    each is finished with this config (then it is not finished again)."""
    outdir.check_kind(out, sweep)
    releases.append(outdir.claim(out))
    if sweep:
      outdir.check_runs(out, [home.name for home in homes])
      for home in homes:
        releases.append(outdir.claim(home))
    done, checkpointed = [], outdir.saved_a_step(out / "checkpoints")
    for home, config in zip(homes, configs):
      home.mkdir(parents=True, exist_ok=True)
      outdir.remove_stale(home)
      same = outdir.check_resume(home, config, trained=outdir.trained(home, checkpointed))
      done.append(same and outdir.finished(home))
      if not done[-1] and checkpointed:
        outdir.check_numerics(home, config.latent_shards)
    return done

  try:
    # --- Folders: process 0 decides (only its files need be on its disk,
    # and finishing is collective on --stream); a pass of finished runs only
    # checks its data.
    done = outdir.agreed(folders, len(homes))
    saved = lambda home: (json.loads((home / "summary.json").read_text())
                          if outdir.writes() else {})
    if all(done):
      for home, config in zip(homes, configs):
        outdir.check_data(home, config, resuming=True, trains=False)
        print(f"{home}: finished already with this config; its summary.json is as it was",
              flush=True)
      return [saved(home) for home in homes]

    # --- Training, to the end or to a stop.
    trained = _train(configs, homes, out, progress=progress, verify=verify)
    if trained is None:
      return None
    states, source, tokens_per_second = trained

    # --- The end of each run: thresholds, evaluation, export.
    summaries = []
    for home, config, state, finished in zip(homes, configs, states, done):
      if finished:
        print(f"--- {home.name}: finished already with this config", flush=True)
        summaries.append(saved(home))
        continue
      print(f"--- {home.name}: evaluation and export", flush=True)
      summaries.append(finish.finish(config, home, state, source, tokens_per_second))
    return summaries
  finally:
    for release in reversed(releases):
      release()


def _train(configs: list, homes: list, out: pathlib.PurePath, *, progress: bool,
           verify: bool) -> typing.Optional[tuple]:
  """(the trained states, the data source, tokens/s), or None when a signal
  stopped the pass before the last step (a checkpoint saved)."""
  c, first = configs[0].train, configs[0]
  shards = first.latent_shards
  n_devices, *share = mesh.process_data(shards)  # this process's data shards
  with contextlib.ExitStack() as stack:
    # --- Metric sinks.
    optional = []
    for home, config in zip(homes, configs):
      more, closers = sinks.optional_sinks(config, home) if outdir.writes() else ([], [])
      optional.append(more)
      for close in closers:
        stack.callback(close)
    split = (f", the latents split over {shards} devices ({c.sae.n_latents // shards} each)"
             if shards > 1 else "")
    print(f"devices: {jax.device_count()} ({jax.local_device_count()} local, "
          f"{jax.devices()[0].platform}); batch {c.batch_size} tokens, "
          f"{c.batch_size * shards // jax.device_count()} per device{split}; "
          f"{c.total_steps} steps" + (f"; {len(configs)} SAEs in one pass"
                                      if len(configs) > 1 else ""), flush=True)
    for home, config in zip(homes, configs):
      print(f"{home}: {_described(config)}; every flag in {home / 'config.json'}", flush=True)

    # --- Data (Ctrl-C while it is exported: the export resumes).
    source = sources.open_source(first, n_devices, verify=verify, share=tuple(share))
    stop = stack.enter_context(Stopper())

    # --- State: new, or the latest checkpoint's.
    ckpt = checkpoint.Checkpointer(out / "checkpoints", keep=first.keep_checkpoints)
    stack.callback(_close_quietly, ckpt)
    sample, _ = sources.finite(source.sample, "the initialisation sample")
    states = [train.create_train_state(config.train, sample) for config in configs]
    states = ckpt.restore(states) or states
    start = int(states[0].step)
    for home, config in zip(homes, configs):
      outdir.check_data(home, config, resuming=start > 0)
    position = ckpt.data_position(start) if start else None
    if start:
      print(f"resuming at step {start}", flush=True)

    # --- The loop, with metrics.jsonl open (cut back to the checkpoint).
    with contextlib.ExitStack() as files:
      logs = [_metrics_lines(home, start, more, first.ckpt_every, files)
              for home, more in zip(homes, optional)]

      def on_step(step, replicated):
        if step % first.ckpt_every == 0:
          for log in logs:
            log.flush()
          ckpt.save([train.unreplicate(r) for r in replicated], source.position(step))

      began = time.perf_counter()
      replicated = loop.train_many(
          [train.replicate(state, latent_shards=shards) for state in states],
          source.batches(start, position),
          log_every=first.log_every, on_log=lambda i, step, m: logs[i](step, m),
          on_step=on_step, should_stop=stop, progress=progress,
          names=[home.name for home in homes])
      seconds = time.perf_counter() - began
    states = [train.unreplicate(r) for r in replicated]
    ckpt.save(states, source.position(int(states[0].step)))
    ckpt.close()
  if stop.signal and int(states[0].step) < c.total_steps:
    print(f"stopped by {stop.signal} at step {int(states[0].step)}; checkpoint saved: re-run "
          f"the same command to resume", flush=True)
    if stop.signal == "SIGINT":
      raise KeyboardInterrupt
    return None
  return states, source, (int(states[0].step) - start) * c.batch_size / max(seconds, 1e-9)


class _Lines(typing.NamedTuple):
  """A run's metrics log: called with (step, metrics); flushed at checkpoints."""
  log: typing.Callable[[int, dict], None]
  flush: typing.Callable[[], None]

  def __call__(self, step, m):
    self.log(step, m)


def _metrics_lines(home: pathlib.PurePath, start: int, more: list, ckpt_every: int,
                   files: contextlib.ExitStack) -> _Lines:
  """home/metrics.jsonl cut back to `start` and opened for appending in
  `files`, then the optional sinks `more`; nothing on processes other than 0.

  Unbuffered: each line is one write, so a failed one leaves nothing pending
  for close() to fail on again. On gs:// the file is uploaded whole as each
  checkpoint is saved and with the checkpoint step's line (logged a step
  late), so a resumed run finds every line."""
  if not outdir.writes():
    return _Lines(lambda step, m: None, lambda: None)
  path = home / "metrics.jsonl"
  outdir.resume_metrics(path, start)
  lines = files.enter_context(storage.appender(path))
  return _Lines(sinks.metrics_log(path, lines, more, ckpt_every), lines.flush)


def _described(config: RunConfig) -> str:
  """The run in a few words: its rule, sizes and data."""
  s = config.train.sae
  rule = (f"Sampled-SAE (l={s.l:g}, score {s.score})" if s.selection == "sampled" else
          {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}[s.selection])
  nested = config.train.nested
  if nested is not None:
    rule = f"Matryoshka {rule} (groups {'/'.join(map(str, nested.sizes))})"
  sparsity = (f"target L0 {config.train.target_l0:g}" if s.selection == "jumprelu" else
              f"k={s.k}")
  return (f"{rule}, {sparsity}, F={s.n_latents}, D={s.d_model}, {config.train.total_steps} steps "
          f"of {config.train.batch_size} tokens on --data {config.data}")


def _close_quietly(ckpt: checkpoint.Checkpointer) -> None:
  with contextlib.suppress(Exception):  # closed already, or closing after an error
    ckpt.close()


def _absolute(path) -> str:
  """A path to compare: absolute if local, the URL if remote."""
  return str(path) if storage.is_remote(path) else str(pathlib.Path(path).absolute())
