"""What several test files share: the small run's flags, the scripts as
modules, launching and waiting for runs, and reading what they wrote."""

import json
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from sae_jax import finish as finish_lib
from sae_jax.runconfig import RunConfig
from tests import scripts
from tests import xla

SCRIPT = scripts.EXPERIMENTS / "train.py"

train_script = scripts.load("train")

SMALL = ["--synthetic-d-model", "16", "--synthetic-features", "32", "--dict-size", "64",
         "--k", "4", "--l", "4", "--batch-size", "64", "--warmup-steps", "5",
         "--threshold-start", "10", "--eval-tokens", "512", "--calibration-tokens", "1024",
         "--no-progress"]


def cli(*args):
  return train_script.main([*SMALL, *map(str, args)])


def outputs(out):
  out = pathlib.Path(out)
  return {"summary": json.loads((out / "summary.json").read_text()),
          "metrics": [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()],
          "config": RunConfig.from_dict(json.loads((out / "config.json").read_text())),
          "weights": load_file(str(out / "saelens" / "sae_weights.safetensors")),
          "cfg": json.loads((out / "saelens" / "cfg.json").read_text()),
          "bytes": (out / "saelens" / "sae_weights.safetensors").read_bytes()}


def subprocess_run(out, steps, extra=()):
  env = xla.env(4)
  args = [sys.executable, str(SCRIPT), *SMALL, "--data", "synthetic", "--steps", str(steps),
          "--log-every", "1", "--out", str(out), *extra]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for_step(out, step, process, timeout=120):
  metrics = pathlib.Path(out) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise AssertionError(f"run ended early: {process.communicate()}")
    # Complete lines only: the run may be writing the last one.
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
    if lines and json.loads(lines[-1])["step"] >= step:
      return
    time.sleep(0.05)
  raise AssertionError("run did not reach the step in time")

TRAIN = scripts.EXPERIMENTS / "train.py"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args) -> list:
  """train.py as processes 0 and 1 of 2, each with 2 CPU devices."""
  env = xla.env(2)
  port = free_port()
  return [subprocess.Popen([sys.executable, str(TRAIN), *SMALL, *map(str, args),
                            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i), "--heartbeat-timeout", "10"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(processes, timeout=240) -> list:
  """[(returncode, stdout, stderr)] of each; kills them all if one hangs."""
  out = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      out.append((process.returncode, stdout, stderr))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return out


def no_traceback(results):
  for code, stdout, stderr in results:
    assert "Traceback" not in stderr and "Check failure" not in stderr, stderr[-3000:]


def same_run(one, two):
  a, b = outputs(one), outputs(two)
  assert a["bytes"] == b["bytes"]  # the final parameters and thresholds, bit for bit
  assert [m["loss"] for m in a["metrics"]] == [m["loss"] for m in b["metrics"]]
  drop = lambda s: {k: v for k, v in s.items() if k not in finish_lib.TIMINGS}
  assert drop(a["summary"]) == drop(b["summary"])

sweep_script = scripts.load("sweep_l")

LM_ARGS = ["--dict-size", "32", "--k", "4", "--batch-size", "32", "--steps", "12",
           "--warmup-steps", "2", "--threshold-start", "4", "--eval-tokens", "64",
           "--calibration-tokens", "256", "--downstream-contexts", "4", "--ls", "2",
           "--scores", "l2", "--log-every", "1", "--no-progress"]

LM_NAMES = ["topk", "batchtopk", "sampled-l2-l2"]


def activations(shape, seed, *, zeros=0.5, zero_rows=0, levels=None):
  """ReLU-like data: a fraction of exact zeros, some all-zero tokens, and,
  with `levels`, values drawn from that many distinct numbers (many ties)."""
  rng = np.random.default_rng(seed)
  if levels is None:
    a = rng.standard_normal(shape).astype(np.float32)
  else:
    a = rng.integers(1, levels + 1, shape).astype(np.float32)
  a[rng.random(shape) < zeros] = 0.0
  a[rng.random(shape) < 0.1] *= -1.0  # negatives must be ignored
  flat = a.reshape(-1, shape[-1])
  flat[rng.permutation(flat.shape[0])[:zero_rows]] = 0.0
  return a

DEVICES = 4

AXIS = "data"


def run_shard_map(fn, a):
  mesh = jax.make_mesh((DEVICES,), (AXIS,))
  a = jax.device_put(a, jax.sharding.NamedSharding(mesh, P(AXIS)))
  out = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))(a)
  return [np.asarray(x) for x in out]
