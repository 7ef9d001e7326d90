"""Where a run's metrics go: a line of metrics.jsonl per logged step, and
Weights & Biases or TensorBoard when asked for."""

import json
import os
import pathlib
import typing

from sae_jax import outdir
from sae_jax import validation
from sae_jax.runconfig import RunConfig


# Seconds --wandb waits for W&B's servers before the run stops with one line
# (wandb's own default is 90; WANDB_INIT_TIMEOUT sets another).
WANDB_TIMEOUT = 30


def optional_sinks(config: RunConfig, out: pathlib.PurePath) -> tuple:
  """(log functions, close functions) of --wandb and --tensorboard, each
  package imported only when asked for."""
  sinks, closers = [], []
  if config.wandb:
    try:
      import wandb  # noqa: PLC0415 (optional)
    except ImportError:
      raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    try:
      # A WANDB_INIT_TIMEOUT of the user's wins (settings passed here would override it).
      wait = {} if "WANDB_INIT_TIMEOUT" in os.environ else {
          "settings": wandb.Settings(init_timeout=WANDB_TIMEOUT)}
      handle = wandb.init(project="sae_jax", dir=str(out), config=config.to_dict(),
                          id=out.name, resume="allow", **wait)
    except wandb.errors.Error as error:
      reason = validation.reason(error)
      raise ValueError(f"--wandb: could not start a W&B run ({reason}); log in (wandb "
                       f"login), or set WANDB_MODE=offline to keep it in {out / 'wandb'} "
                       f"for `wandb sync`, or leave --wandb out") from None
    sinks.append(lambda step, m: handle.log(m, step=step))
    closers.append(handle.finish)
  if config.tensorboard:
    try:
      import tensorboardX  # noqa: PLC0415 (optional)
    except ImportError:
      raise ValueError("--tensorboard needs the tensorboardX package: pip install tensorboardX") \
          from None
    writer = tensorboardX.SummaryWriter(str(out / "tensorboard"))
    sinks.append(lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()])
    closers.append(writer.close)
  return sinks, closers


def metrics_log(path: pathlib.PurePath, metrics_file, sinks: list,
                ckpt_every: int) -> typing.Callable[[int, dict], None]:
  """on_log(step, metrics): a line of `path` (open as `metrics_file`, flushed
  with each checkpoint step's line), then each sink."""

  def on_log(step, m):
    try:
      line = (json.dumps(outdir.strict(m)) + "\n").encode()
      while line:  # a raw write may take only part of it
        line = line[metrics_file.write(line):]
      if step % ckpt_every == 0:
        metrics_file.flush()
    except OSError as error:
      raise ValueError(f"could not write {path} at step {step} ({error.strerror}); free "
                       f"space and re-run to resume from the last checkpoint") from None
    for sink in sinks:
      sink(step, m)

  return on_log
