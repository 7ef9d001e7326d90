"""Two processes x 2 CPU devices, started here with --coordinator on
127.0.0.1 (gloo collectives), against one process with 4 devices: the same
bits on a .npy, a cache, --stream, synthetic data and with the latents split
over each process's devices (--latent-shards 2) or over both processes'
(--latent-shards 4), with the end of the run whole or split over the
latent groups; only process 0 writes
the run's files; SIGTERM then a relaunch ends as an uninterrupted run; a
process killed with -9 stops the other with one line, and the relaunch
resumes from the last complete checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import scripts
from tests import tiny_lm
from tests.helpers import SMALL
from tests.helpers import TRAIN
from tests.helpers import finish
from tests.helpers import free_port
from tests.helpers import launch
from tests.helpers import no_traceback
from tests.helpers import same_run
from tests.helpers import train_script
from tests.helpers import wait_for_step

EXPORT = scripts.load("export_activations")
STEPS = 240  # the stopped run's length: 40 steps or more between its stops


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
      # JumpReLU here: its L0 penalty counts over every process's tokens.
      "cache": ["--data", cache, "--batch-size", 32, "--eval-tokens", 64,
                "--selection", "jumprelu"],
      # The latents split over each process's 2 devices, the batch over the processes.
      "latent": ["--data", npy, "--latent-shards", 2, "--score", "leverage",
                 "--dead-tokens", 128],
      # One latent group of both processes' 4 devices: they read the same tokens.
      "latent_rows": ["--data", npy, "--latent-shards", 4, "--selection", "batchtopk",
                      "--dead-tokens", 128],
      "stream": ["--data", "pythia", "--stream", "--model", lm["model"], "--dataset", text,
                 "--hook", "blocks.1.hook_resid_post", "--context-length", 16, "--batch-size", 32,
                 "--stream-contexts", 16, "--eval-tokens", 64, "--downstream-contexts", 4,
                 "--cache-dir", root / "unused-cache"],
  }


def only_process_0_wrote(results, out, steps: int) -> None:
  """One metrics line a step, and the summary said and written by process 0 alone."""
  assert steps_logged(out) == list(range(1, steps + 1))
  said = results[0][1].splitlines()  # the summary, where it was written (and any warning)
  wrote = said.index(f"wrote {out}: summary.json (above), saelens/ (the SAE, for SAELens), "
                     f"metrics.jsonl")
  assert said[wrote - 1].startswith('{"fvu": ') and all(
      line.startswith("warning: the saved SAE") for line in said[wrote + 1:])
  assert '"fvu"' not in results[1][1] and "wrote" not in results[1][1]
  assert "devices: 4 (2 local" in results[1][1]


# Synthetic data on two processes: test_stopped_three_ways_and_relaunched_a_run_ends_exactly.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["npy", "cache", "stream", "latent", "latent_rows"])
def test_two_processes_equal_one(data_args, tmp_path, kind):
  args = [*data_args[kind], "--steps", 12, "--log-every", 1, "--ckpt-every", 5]
  one = tmp_path / "one"
  assert train_script.main([*SMALL, *map(str, args), "--out", str(one)]) == 0
  two = tmp_path / "two"
  results = finish(launch([*args, "--out", two]))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
  same_run(one, two)
  only_process_0_wrote(results, two, 12)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight") / "run"
  assert train_script.main([*SMALL, "--data", "synthetic", "--steps", str(STEPS), "--log-every",
                            "1", "--ckpt-every", "25", "--out", str(out)]) == 0
  return out


def checkpoints(out) -> list:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def stop_args(out) -> list:
  return ["--data", "synthetic", "--steps", STEPS, "--log-every", 1, "--ckpt-every", 25,
          "--out", out]


def launched_past(out, step) -> list:
  """The run in `out` launched (or relaunched) on 2 processes, past `step`."""
  processes = launch(stop_args(out))
  wait_for_step(out, step, processes[0])
  return processes


def said_killed(processes, killed) -> bool:
  """After process `killed` got kill -9: the other says so in one line and
  exits within a bounded time. False when the coordinator's death reached
  JAX's own error polling first, which ends the process itself (a C++ check
  failure, no hook to hand it over)."""
  began = time.monotonic()
  results = finish(processes, timeout=90)
  assert time.monotonic() - began < 60
  code, _, stderr = results[1 - killed]
  if killed == 0 and code == -signal.SIGABRT:
    assert "JAX distributed service detected fatal errors" in stderr
    return False
  assert code == 1 and "Traceback" not in stderr and "Check failure" not in stderr
  (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
  # Its next collective fails, or, waiting elsewhere (a barrier), the watch
  # on the other processes' beats (`sae_jax/peers.py`) gives up on them.
  assert ("a collective with the other processes failed" in line
          or f"process {killed} stopped answering 10 s ago" in line
          or "the coordinator (process 0) cannot be reached" in line)
  assert "re-launch every process with the same command" in line
  return True


@pytest.mark.slow
def test_stopped_three_ways_and_relaunched_a_run_ends_exactly(straight, tmp_path):
  """One run on 2 processes, stopped and relaunched three times:
    1. SIGTERM to process 1 alone (a preempted host), then
    2. SIGTERM to both: each time both stop after the same step, save, and
       exit 0, and the relaunch resumes there;
    3. kill -9 of process 1: process 0 says so in one line and exits within
       a bounded time; the relaunch resumes from the last complete checkpoint.
  It ends bit for bit as the uninterrupted run on one process, every step
  logged once, and only process 0 wrote the run's files."""
  out = tmp_path / "run"
  step = 0
  for who in ("one", "both"):
    processes = launched_past(out, step + 40)
    for process in processes if who == "both" else processes[1:]:
      process.send_signal(signal.SIGTERM)
    results = finish(processes)
    no_traceback(results)
    assert [code for code, _, _ in results] == [0, 0]
    assert not step or f"resuming at step {step}" in results[0][1]
    stopped = {line for _, stdout, _ in results for line in stdout.splitlines()
               if line.startswith("stopped by SIGTERM at step")}
    assert len(stopped) == 1, who  # the same step on both
    stopped_at = int(stopped.pop().split()[5].rstrip(";"))
    assert step + 40 <= stopped_at < STEPS and checkpoints(out)[-1] == stopped_at
    assert not (out / "summary.json").exists()
    step = stopped_at
  processes = launched_past(out, step + 40)
  processes[1].kill()
  assert said_killed(processes, killed=1)
  saved = checkpoints(out)[-1]
  assert step < saved < STEPS  # a checkpoint 15 steps or more before the kill
  results = finish(launch(stop_args(out)))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0]
  assert f"resuming at step {saved}" in results[0][1]
  same_run(straight, out)
  only_process_0_wrote(results, out, STEPS)


@pytest.mark.slow
def test_a_killed_coordinator_stops_the_other(tmp_path):
  """kill -9 of process 0 (the coordinator): process 1 says so in one line
  (or JAX says it first) and exits within a bounded time."""
  processes = launched_past(tmp_path / "run", 40)
  processes[0].kill()
  said_killed(processes, killed=0)


def test_the_export_refuses_several_processes(tmp_path, capsys):
  assert EXPORT.main(["--out", str(tmp_path / "cache"), "--coordinator", "127.0.0.1:1",
                      "--num-processes", "2", "--process-id", "0"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: --coordinator: the export runs as one process")
  assert not (tmp_path / "cache").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_process_whose_peers_never_join_says_so_then_gives_up(tmp_path):
  """Process 0 of 2 with process 1 never started: it says at once what it
  waits for, and stops with one line after --join-timeout (JAX would wait
  silently, then abort with a C++ stack trace)."""
  address = f"127.0.0.1:{free_port()}"
  process = subprocess.Popen(
      [sys.executable, str(TRAIN), *SMALL, "--out", str(tmp_path / "run"), "--coordinator",
       address, "--num-processes", "2", "--process-id", "0",
       "--join-timeout", "4"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  ((code, stdout, stderr),) = finish([process], timeout=120)
  assert code == 1
  assert f"process 0 of 2: waiting at {address} for the other processes to join (0 of 4 s" in stdout
  assert stderr.strip().splitlines() == [
      f"error: process 0 of 2 waited 4 s (--join-timeout) at {address} for the others "
      f"to join; start every process with the same --coordinator and --num-processes, and a "
      f"--process-id each"]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("shards", [2, 4])
def test_a_split_end_on_two_processes_equals_one(tmp_path, monkeypatch, shards):
  """An end of run split over the latent groups (devices made too small for
  the whole end: `memory.splits_end`) on 2 processes x 2 devices, the
  groups within each process (M = 2) or across both (M = 4), ends as one
  process with 4 devices: the same bits. Only the second process's
  devices are small, from a sitecustomize on the launched processes'
  PYTHONPATH: the first splits its end too (`memory.splits_end_agreed`)."""
  from sae_jax import memory  # noqa: PLC0415

  small = 60 * 2**10  # training needs about 49 KiB a device at M = 2; the whole end 72 KiB
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      "import jax\nimport sae_jax.memory\nwhole = sae_jax.memory.device_memory\n"
      f"sae_jax.memory.device_memory = lambda: {small} if jax.process_index() == 1 else whole()\n")
  args = ["--data", "synthetic", "--selection", "batchtopk", "--steps", 12, "--batch-size", 256,
          "--eval-tokens", 511, "--latent-shards", shards]
  monkeypatch.setattr(memory, "device_memory", lambda: small)
  one = tmp_path / "one"
  assert train_script.main([*SMALL, *map(str, args), "--out", str(one)]) == 0
  path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
  monkeypatch.setenv("PYTHONPATH", path)
  two = tmp_path / "two"
  results = finish(launch([*args, "--out", two]))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
  same_run(one, two)
  summary = json.loads((two / "summary.json").read_text())
  assert summary["eval_rows"] == 511 - 511 % 256 % (4 // shards)  # whole rows per data shard
