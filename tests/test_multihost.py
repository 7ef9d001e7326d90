"""Two processes x 2 CPU devices, started here with --coordinator on
127.0.0.1 (gloo collectives), against one process with 4 devices: the same
bits on a .npy, a cache, --stream and synthetic data; only process 0 writes
the run's files; SIGTERM then a relaunch ends as an uninterrupted run; a
process killed with -9 stops the other with one line, and the relaunch
resumes from the last complete checkpoint."""

import json
import signal
import time

import numpy as np
import pytest

from tests import scripts
from tests import tiny_lm
from tests.helpers import SMALL
from tests.helpers import finish
from tests.helpers import launch
from tests.helpers import no_traceback
from tests.helpers import same_run
from tests.helpers import train_script
from tests.helpers import wait_for_step

EXPORT = scripts.load("export_activations")
STEPS = 200  # the stopped runs' length: they are stopped past step 60


def steps_logged(out) -> list:
  return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_args(lm, cache, tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  rng = np.random.default_rng(0)
  npy = root / "acts.npy"
  np.save(npy, (rng.standard_normal((3000, 16)) * rng.uniform(0.5, 2, 16)).astype(np.float32))
  text = root / "long.txt"
  text.write_text("\n".join(" ".join(rng.choice(tiny_lm.WORDS, size=rng.integers(3, 40)))
                            for _ in range(400)) + "\n")
  return {
      "synthetic": ["--data", "synthetic"],
      "npy": ["--data", npy],
      "cache": ["--data", cache, "--batch-size", 32, "--eval-tokens", 64],
      "stream": ["--data", "pythia", "--stream", "--model", lm["model"], "--dataset", text,
                 "--hook", "blocks.1.hook_resid_post", "--context-length", 16, "--batch-size", 32,
                 "--stream-contexts", 16, "--eval-tokens", 64, "--downstream-contexts", 4,
                 "--cache-dir", root / "unused-cache"],
  }


@pytest.mark.parametrize("kind", ["synthetic", "npy", "cache", "stream"])
def test_two_processes_equal_one(data_args, tmp_path, kind):
  args = [*data_args[kind], "--steps", 12, "--log-every", 1, "--ckpt-every", 5]
  one = tmp_path / "one"
  assert train_script.main([*SMALL, *map(str, args), "--out", str(one)]) == 0
  two = tmp_path / "two"
  results = finish(launch([*args, "--out", two]))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
  same_run(one, two)
  # Only process 0 wrote the run's files: one line a step, one summary said.
  assert steps_logged(two) == list(range(1, 13))
  assert '"fvu"' in results[0][1].splitlines()[-1] and '"fvu"' not in results[1][1]
  assert "devices: 4 (2 local" in results[1][1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight") / "run"
  assert train_script.main([*SMALL, "--data", "synthetic", "--steps", str(STEPS), "--log-every",
                            "1", "--ckpt-every", "25", "--out", str(out)]) == 0
  return out


def checkpoints(out) -> list:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def launch_until_step_60(out) -> tuple:
  """(args, processes): a STEPS-step run on 2 processes, past step 60."""
  args = ["--data", "synthetic", "--steps", STEPS, "--log-every", 1, "--ckpt-every", 25,
          "--out", out]
  processes = launch(args)
  wait_for_step(out, 60, processes[0])
  return args, processes


def relaunch_ends_as(straight, out, args, step) -> None:
  """Relaunched, the run resumes at `step` and ends as the uninterrupted one."""
  results = finish(launch(args))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0]
  assert f"resuming at step {step}" in results[0][1]
  same_run(straight, out)
  assert steps_logged(out) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("who", ["both", "one"])
def test_sigterm_then_relaunch_ends_exactly(straight, tmp_path, who):
  """SIGTERM to both processes, or to process 1 alone (a preempted host):
  both stop after the same step, save, and exit 0; relaunched, the run ends
  bit for bit as the uninterrupted one."""
  out = tmp_path / "run"
  args, processes = launch_until_step_60(out)
  for process in processes if who == "both" else processes[1:]:
    process.send_signal(signal.SIGTERM)
  results = finish(processes)
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0]
  stopped = {line for _, stdout, _ in results for line in stdout.splitlines()
             if line.startswith("stopped by SIGTERM at step")}
  assert len(stopped) == 1  # the same step on both
  step = int(stopped.pop().split()[5].rstrip(";"))
  assert 60 <= step < STEPS and checkpoints(out)[-1] == step
  assert not (out / "summary.json").exists()
  relaunch_ends_as(straight, out, args, step)


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_stops_the_other(straight, tmp_path, killed):
  """kill -9 of process 1, or of process 0 (the coordinator): the other says
  so in one line (or, for the coordinator, JAX may say it first) and exits
  within a bounded time; relaunched, the run resumes from the last complete
  checkpoint and ends as the uninterrupted one (checked once)."""
  out = tmp_path / "run"
  args, processes = launch_until_step_60(out)
  processes[killed].kill()
  began = time.monotonic()
  results = finish(processes, timeout=90)
  assert time.monotonic() - began < 60
  code, _, stderr = results[1 - killed]
  if killed == 0 and code == -signal.SIGABRT:
    # The coordinator's death can reach JAX's own error polling first, which
    # ends the process itself (a C++ check failure, no hook to hand it over).
    assert "JAX distributed service detected fatal errors" in stderr
    return
  assert code == 1 and "Traceback" not in stderr and "Check failure" not in stderr
  (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
  # Its next collective fails, or, waiting elsewhere (a barrier), the watch
  # on the other processes' beats (`sae_jax/peers.py`) gives up on them.
  assert ("a collective with the other processes failed" in line
          or f"process {killed} stopped answering 10 s ago" in line
          or "the coordinator (process 0) cannot be reached" in line)
  assert "re-launch every process with the same command" in line
  if killed == 1:
    saved = checkpoints(out)[-1]
    assert 50 <= saved < STEPS
    relaunch_ends_as(straight, out, args, saved)


def test_the_export_refuses_several_processes(tmp_path, capsys):
  assert EXPORT.main(["--out", str(tmp_path / "cache"), "--coordinator", "127.0.0.1:1",
                      "--num-processes", "2", "--process-id", "0"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: --coordinator: the export runs as one process")
  assert not (tmp_path / "cache").exists()


def test_several_processes_refuse_to_export_a_cache_each(lm, tmp_path):
  """--data pythia without a complete cache would have every process export
  into one folder: refused, before anything is written, with what to run."""
  cache_dir = tmp_path / "cache"
  results = finish(launch(["--data", "pythia", "--model", lm["model"], "--dataset",
                           lm["texts"]["txt"][0], "--hook", "blocks.1.hook_resid_post",
                           "--cache-dir", cache_dir, "--steps", 20, "--out", tmp_path / "run"]),
                   timeout=120)
  no_traceback(results)
  for code, _, stderr in results:
    assert code != 0
    assert stderr.strip().splitlines()[-1].startswith(
        f"error: --data pythia on 2 processes reads the cache in --cache-dir {cache_dir}, "
        f"which holds 0 of the ")
  assert not cache_dir.exists() and not (tmp_path / "run").exists()
