"""What a careless user and a flaky machine do to a run: Ctrl-C inside a
checkpoint save, damaged checkpoints, two runs in one --out, a disk that
fills up, a stopped sweep, non-finite rows, changed data, and bad input of
every kind (one `error:` line, never a traceback)."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import typing

import jax
import numpy as np
import pytest
from flax import struct

from sae_jax import checkpoint
from sae_jax import export
from sae_jax import memory
from sae_jax import outdir
from sae_jax import storage
from sae_jax import synthetic
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from tests import scripts
from tests import xla
from tests.helpers import SMALL
from tests.helpers import cli
from tests.helpers import outputs
from tests.helpers import train_script
from tests.helpers import wait_for_step

ROOT = scripts.EXPERIMENTS.parent
STEPS = 60


def run_args(out, steps=STEPS):
  return [*SMALL, "--data", "synthetic", "--steps", str(steps), "--ckpt-every", "10",
          "--log-every", "1", "--out", str(out)]


def env():
  return xla.env(4)


def error_lines(stderr: str) -> list:
  assert "Traceback" not in stderr, stderr
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_ctrl_c_before_training_exits_at_once(tmp_path):
  """Ctrl-C during the script's first seconds (imports, JAX's start-up, the
  re-execution under tcmalloc) was swallowed: the run trained to the end and
  exited 0. Now it stops at once, in one line, having trained nothing."""
  out = tmp_path / "run"
  process = subprocess.Popen(
      [sys.executable, str(scripts.EXPERIMENTS / "train.py"), *SMALL, "--data", "synthetic",
       "--steps", "300", "--out", str(out)],
      env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  maps, deadline = pathlib.Path(f"/proc/{process.pid}/maps"), time.time() + 60
  while time.time() < deadline and process.poll() is None and "jaxlib" not in maps.read_text():
    time.sleep(0.01)  # bounded: JAX's import has begun, long after the handler was set
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
  assert [line for line in stderr.splitlines() if line] == [
      "Ctrl-C: stopped at once (no file is left half-written); re-run to go on"]
  assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The run never interrupted: what every stopped and resumed run must end as."""
  out = tmp_path_factory.mktemp("straight") / "run"
  assert train_script.main(run_args(out)) == 0
  return out


def steps_logged(out) -> list:
  return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def finished_steps(out) -> list:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


# --- Ctrl-C -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_inside_a_checkpoint_save(tmp_path, straight, presses):
  """SIGINT lands inside orbax's save (tests/interrupt.py). Before, Python's
  KeyboardInterrupt there left a thread waiting out orbax's 300 s timeout,
  and no checkpoint was saved. Now one Ctrl-C finishes the step, saves and
  exits; a second exits at once. Either way the re-run ends as an
  uninterrupted run, bit for bit."""
  out = tmp_path / "run"
  done = subprocess.run([sys.executable, "-m", "tests.interrupt", "2", str(presses), "--",
                         *run_args(out)], cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 130, done.stderr
  error_lines(done.stderr)
  if presses == 1:
    assert "interrupt: SIGINT x1 sent inside orbax's save" in done.stdout
    assert "stopped by SIGINT at step 20; checkpoint saved" in done.stdout
    assert finished_steps(out) == [10, 20]
  else:  # the save of step 20 never finished
    assert "second Ctrl-C: exiting now" in done.stderr
    assert finished_steps(out) == [10]
  assert not (out / "summary.json").exists()

  assert train_script.main(run_args(out)) == 0
  assert outputs(out)["bytes"] == outputs(straight)["bytes"]
  assert steps_logged(out) == list(range(1, STEPS + 1))


# --- Damaged checkpoints ------------------------------------------------------

def largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_a_byte(path: pathlib.Path) -> None:
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  path.write_bytes(bytes(raw))


DAMAGE = {  # name: (damage(checkpoint dir), the damaged step)
    "a flipped byte": (lambda d: flip_a_byte(largest_file(d / "20")), 20),
    "a truncated file": (lambda d: (lambda p: p.write_bytes(p.read_bytes()[:100]))(
        largest_file(d / "20")), 20),
    "an empty file": (lambda d: largest_file(d / "20").write_bytes(b""), 20),
    "a missing file": (lambda d: largest_file(d / "20").unlink(), 20),
    "a stray empty step folder": (lambda d: (d / "30").mkdir(), 30),
    "a garbled checksum file": (lambda d: (d / "20.meta.json").write_text("{garbage"), 20),
}


@pytest.fixture(scope="module")
def two_states():
  c = TrainConfig(SAEConfig(16, 64, k=4, l=2), batch_size=64, steps=30, warmup_steps=2,
                  threshold_start=10)
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32))
  fresh = jax.tree.map(np.asarray, train.create_train_state(c, source.sample(0, 256)))
  return fresh, {step: fresh.replace(step=np.int32(step),
                                     params=jax.tree.map(lambda p: p + step, fresh.params))
                 for step in (10, 20)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_step(tmp_path, two_states,
                                                                   damage, capsys):
  like, saved = two_states
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory)
  for state in saved.values():
    ckpt.save(state, {"at": int(state.step)})
  ckpt.close()
  hurt, step = DAMAGE[damage]
  hurt(directory)

  ckpt = checkpoint.Checkpointer(directory)
  restored = ckpt.restore(like)
  fallback = 20 if step == 30 else 10
  assert int(restored.step) == fallback
  assert checkpoint.digest(restored) == checkpoint.digest(saved[fallback])
  assert ckpt.data_position(fallback) == {"at": fallback}
  said = capsys.readouterr().out
  assert f"checkpoint {directory / str(step)} is damaged" in said
  assert f"falling back to step {fallback}" in said
  assert (tmp_path / "checkpoints-damaged" / str(step) / "orbax").is_dir()
  # The run goes on from there and saves the damaged step's number anew.
  assert ckpt.latest_step() == fallback
  ckpt.save(saved[20])
  ckpt.close()
  again = checkpoint.Checkpointer(directory)
  assert checkpoint.digest(again.restore(like)) == checkpoint.digest(saved[20])
  again.close()


def test_an_intact_checkpoint_of_another_layout_is_refused_not_moved(tmp_path, two_states):
  """Files that match their record but do not restore into this state (a
  later version's TrainState, say) are not damage: nothing is moved aside."""
  like, saved = two_states
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(saved[10])
  ckpt.close()
  other = like.replace(params=dict(like.params, b_extra=np.zeros(3, np.float32)))
  ckpt = checkpoint.Checkpointer(directory)
  with pytest.raises(ValueError, match=r"checkpoints/10 is intact but does not restore into "
                                       r"this version's training state"):
    ckpt.restore(other)
  ckpt.close()
  assert (directory / "10").is_dir() and not (tmp_path / "checkpoints-damaged").exists()


def test_a_checkpoint_saved_before_checksums_restores_unverified(tmp_path, two_states,
                                                                 capsys):
  like, saved = two_states
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(saved[10])
  ckpt.close()
  (directory / "10.meta.json").unlink()  # as the versions before checksums wrote it
  (directory / "10.data.json").write_text(json.dumps({"round": 3}))
  ckpt = checkpoint.Checkpointer(directory)
  assert checkpoint.digest(ckpt.restore(like)) == checkpoint.digest(saved[10])
  assert ckpt.data_position(10) == {"round": 3}
  ckpt.close()
  assert "checkpoint step 10: saved without a checksum; restored unverified" in (
      capsys.readouterr().out)


class StateBeforeDeadAtMost(struct.PyTreeNode):
  """train.TrainState as the versions before `dead_at_most` (2026-12-03)
  saved it: the same fields in the same order, less that one."""
  step: typing.Any
  params: typing.Any
  opt_state: typing.Any
  threshold: typing.Any
  steps_since_fired_F: typing.Any
  bad_streak: typing.Any
  skipped_steps: typing.Any
  input_scale: typing.Any
  rng: typing.Any
  config: TrainConfig = struct.field(pytree_node=False)
  pool_P: typing.Any = None


@pytest.mark.parametrize("many", [False, True])
def test_a_checkpoint_from_before_dead_at_most_resumes(tmp_path, two_states, many, capsys):
  """Verified against the digest saved with it, and with dead_at_most
  counted from its own counters (the count for its next step); a sweep's
  list of states too."""
  like, saved = two_states
  dead_steps = like.config.dead_steps
  old = saved[10].replace(  # 1/8 of the latents can be dead on the next step
      steps_since_fired_F=(np.arange(64) % 8 + dead_steps - 8).astype(np.int32))
  as_before = StateBeforeDeadAtMost(**{f.name: getattr(old, f.name)
                                       for f in dataclasses.fields(StateBeforeDeadAtMost)})
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  ckpt.save([as_before, as_before] if many else as_before)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  restored = ckpt.restore([like, like] if many else like)
  ckpt.close()
  for state in restored if many else [restored]:
    assert checkpoint.digest(state.replace(dead_at_most=None)) == checkpoint.digest(as_before)
    assert int(state.dead_at_most) == 8 == np.sum(old.steps_since_fired_F + 1 >= dead_steps)
  assert "damaged" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_flipped_byte_in_the_latest_checkpoint_is_caught_on_resume(tmp_path, straight,
                                                                     capsys):
  """Before, the run resumed silently from the damaged state. The copy also
  resumes under another path: `out` is not part of a run's identity."""
  out = tmp_path / "moved"
  shutil.copytree(straight, out)
  flip_a_byte(largest_file(out / "checkpoints" / str(STEPS)))
  (out / "summary.json").unlink()
  capsys.readouterr()
  assert train_script.main(run_args(str(out) + "/")) == 0  # a trailing slash, too
  said = capsys.readouterr().out
  assert f"checkpoint {out / 'checkpoints' / str(STEPS)} is damaged" in said
  assert f"falling back to step {STEPS - 10}" in said and f"resuming at step {STEPS - 10}" in said
  assert outputs(out)["bytes"] == outputs(straight)["bytes"]
  assert steps_logged(out) == list(range(1, STEPS + 1))


# --- One run per --out --------------------------------------------------------

@pytest.mark.slow
def test_two_runs_cannot_share_an_out(tmp_path, capsys):
  out = tmp_path / "run"
  first = subprocess.Popen([sys.executable, str(scripts.EXPERIMENTS / "train.py"),
                            *run_args(out, steps=5000)], env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    wait_for_step(out, 5, first)
    assert train_script.main(run_args(out, steps=5000)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: --out {out} is in use by another run (pid {first.pid}): wait "
                     f"for it to end, or use another --out"]
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  finally:
    first.kill()
  logged = steps_logged(out)
  assert logged == list(range(1, len(logged) + 1))  # one writer: no interleaved lines
  release = outdir.claim(out)  # the lock died with its holder
  assert (out / outdir.LOCK).read_text() == f"{os.getpid()}\n"
  release()


# --- A full disk --------------------------------------------------------------

@pytest.mark.slow
def test_a_disk_that_fills_up(tmp_path, straight):
  """On a real 8 MiB tmpfs (tests/diskfull.py): full before the run, full
  mid-run (metrics.jsonl is cut mid-line there), then freed; and full when
  a run killed as it finished re-exports. Each failure is one line and leaves nothing a
  re-run trips on; the resumed run ends as an uninterrupted one."""
  report = tmp_path / "report.json"
  done = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.diskfull",
                         str(tmp_path / "disk"), str(report), "--", *run_args("")[:-2]],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr
  r = json.loads(report.read_text())
  left = lambda stage: [f for f in r[stage]["files"] if ".tmp-" in f or ".old-" in f]
  for stage in ("full_before", "filled_mid_run", "full_rerun"):
    assert r[stage]["rc"] != 0, stage
    assert len(error_lines(r[stage]["stderr"])) == 1, r[stage]["stderr"]
    assert "No space left on device" in r[stage]["stderr"]
    assert left(stage) == [], stage
  assert r["full_before"]["files"] == [outdir.LOCK]
  assert r["resumed"]["rc"] == 0, r["resumed"]["stderr"]
  steps = [json.loads(line)["step"] for line in r["finished"]["metrics"].splitlines()]
  assert steps == list(range(1, STEPS + 1))
  expected = (straight / "saelens" / "sae_weights.safetensors").read_bytes().hex()
  assert r["finished"]["weights"] == expected
  assert "could not write" in r["full_rerun"]["stderr"] and "saelens" in r["full_rerun"]["stderr"]
  assert r["full_rerun"]["weights"] == expected  # the saelens/ written before is intact


# --- The sweep ----------------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_sequential_sweep_says_so_and_keeps_its_variants(tmp_path):
  """--sequential (the one pass's stop: tests/test_sweep.py)."""
  out = tmp_path / "sweep"
  args = [*SMALL, "--data", "synthetic", "--steps", "3000", "--log-every", "1", "--ckpt-every",
          "1000", "--ls", "4", "--scores", "l2", "--sequential", "--out", str(out)]
  process = subprocess.Popen([sys.executable, str(scripts.EXPERIMENTS / "sweep_l.py"), *args],
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  wait_for_step(out / "topk", 5, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0 and error_lines(stderr) == []
  assert "sweep stopped by SIGTERM in topk" in stdout
  assert not outdir.finished(out / "topk") and (out / "topk" / "checkpoints").is_dir()
  assert not (out / "batchtopk").exists()


# --- Non-finite rows, strict JSON ---------------------------------------------

def strict_json(path):
  def refuse(constant):
    raise AssertionError(f"{path} holds {constant}")
  return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_non_finite_rows_are_dropped_and_counted(tmp_path, capsys):
  """NaN rows among the held-out rows used to give a summary.json full of
  NaN (not JSON); in the initialisation sample they stopped the run. Both
  are dropped and counted now, as training skips the steps they poison."""
  rows = np.array(synthetic.SyntheticSource(
      synthetic.SyntheticConfig(d_model=16, n_features=32)).sample(0, 8192))
  rows[np.arange(0, 7680, 960)] = np.nan  # 8 training rows
  rows[[-1, -7, -100, -200, -511]] = np.inf  # 5 of the 512 held-out rows
  np.save(tmp_path / "acts.npy", rows)
  out = tmp_path / "run"
  assert cli("--data", tmp_path / "acts.npy", "--steps", 40, "--out", out) == 0
  said = capsys.readouterr().out
  assert "the held-out rows: dropped 5 of 512 rows that are not finite" in said
  assert "the initialisation sample: dropped" in said
  summary = strict_json(out / "summary.json")
  assert (summary["eval_rows"], summary["eval_rows_dropped"]) == (507, 5)
  assert np.isfinite(summary["fvu"]) and summary["skipped_steps"] >= 1
  strict_json(out / "config.json")


@pytest.mark.slow
def test_a_start_that_failed_before_training_leaves_out_to_the_corrected_command(
    tmp_path, capsys):
  """A start that fails after config.json is written, before its first
  checkpoint (here: a learning rate that overflows at once), does not make
  the corrected command "another config"; once a run has saved a
  checkpoint, another config is refused as before."""
  out = tmp_path / "run"
  assert cli("--data", "synthetic", "--steps", 20, "--lr", "1e30", "--clip-norm", "1e30",
             "--out", out) == 1
  assert (out / "config.json").exists() and not outdir.saved_a_step(out / "checkpoints")
  capsys.readouterr()
  assert cli("--data", "synthetic", "--steps", 20, "--out", out) == 0
  assert f"{out}: its config.json is of a start that never trained" in capsys.readouterr().out
  assert cli("--data", "synthetic", "--steps", 30, "--out", out) == 2
  assert "holds a run with another config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resume_under_the_other_x64_mode_is_refused(tmp_path, capsys):
  """A run checkpointed with JAX_ENABLE_X64=1 (float64 biases and moments),
  resumed without it: refused before the checkpoint is restored (orbax
  would cast it, and it would fail its checksum and be set aside)."""
  out = tmp_path / "run"
  args = ["--data", "synthetic", "--steps", 20, "--ckpt-every", 10, "--out", out]
  with jax.enable_x64(True):  # warnings are errors (pyproject.toml): none under x64 either
    assert cli(*args) == 0
  (out / "summary.json").unlink()  # unfinished: the next command resumes it
  capsys.readouterr()
  assert cli(*args) == 2
  (line,) = error_lines(capsys.readouterr().err)
  assert f"error: {out} was checkpointed with JAX_ENABLE_X64=1, and this process has " in line
  assert "refusing to resume" in line
  assert outdir.saved_a_step(out / "checkpoints") and not (out / "checkpoints-damaged").exists()


def test_data_replaced_in_place_is_refused(tmp_path, capsys):
  npy = tmp_path / "acts.npy"
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32))
  np.save(npy, source.sample(0, 2048))
  out = tmp_path / "run"
  assert cli("--data", npy, "--steps", 20, "--out", out) == 0
  os.utime(npy, (1, 1))  # touched, not changed
  (out / "summary.json").unlink()  # unfinished: it resumes (a finished run only checks)
  capsys.readouterr()
  assert cli("--data", npy, "--steps", 20, "--out", out) == 0
  assert "was modified since the run began, but its size and first" in capsys.readouterr().out
  np.save(npy, source.sample(1, 2048))  # the same shape, other rows
  assert cli("--data", npy, "--steps", 20, "--out", out) == 2
  (line,) = error_lines(capsys.readouterr().err)
  assert f"--data {npy}: the data differ from those this run was checkpointed on" in line
  assert "sha256_ends" in line and " bytes " not in line


def test_a_garbage_metrics_line_is_named_not_fatal(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli("--data", "synthetic", "--steps", 20, "--log-every", 1, "--out", out) == 0
  lines = (out / "metrics.jsonl").read_text().splitlines()
  lines[4] = "not json"
  (out / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:50])
  (out / "summary.json").unlink()  # unfinished: it resumes (a finished run is left alone)
  capsys.readouterr()
  assert cli("--data", "synthetic", "--steps", 20, "--log-every", 1, "--out", out) == 0
  said = capsys.readouterr().out
  assert f"{out / 'metrics.jsonl'}:5: unreadable metrics line dropped" in said
  assert f"{out / 'metrics.jsonl'}:21: unreadable metrics line dropped" in said
  assert steps_logged(out) == [s for s in range(1, 21) if s != 5]


# --- Bad input: one line, never a traceback -----------------------------------

def _file(tmp_path):
  path = tmp_path / "f"
  path.write_text("")
  return path


def _npy(tmp_path, rows):
  path = tmp_path / "small.npy"
  np.save(path, np.ones((rows, 16), np.float32))
  return path


def _text_npy(tmp_path):
  path = tmp_path / "text.npy"
  path.write_text("these are not activations\n")
  return path


def _truncated_npy(tmp_path):
  path = _npy(tmp_path, 4096)
  path.write_bytes(path.read_bytes()[:5000])
  return path


def _broken_config(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  (out / "config.json").write_text('{"train": {"sae": ')
  return out


def _checkpoints_file(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  (out / "checkpoints").write_text("")
  return out


def _flip_last_shard(broken):
  flip_a_byte(broken / "acts-00005.npy")


def _cache_with(tmp_path, cache, change):
  broken = tmp_path / "cache"
  shutil.copytree(cache, broken)
  change(broken)
  return broken


def _wrong_rows(broken):
  manifest = export.read_manifest(broken)
  shards = [dict(s) for s in manifest["shards"]]
  shards[0]["rows"] = 5000
  export.write_manifest(broken, dict(manifest, shards=shards))


# name: (flags (a callable of tmp_path and the cache for files), what the line says)
BAD_INPUT = {
    "--out is a file": (lambda t, c: ["--out", _file(t)], "is a file, not a directory"),
    "--out under a file": (lambda t, c: ["--out", _file(t) / "run"],
                           "cannot write there (Not a directory)"),
    "--out under /proc": (lambda t, c: ["--out", "/proc/sae_jax_run/run"], "cannot write there"),
    "--out under /sys (read-only)": (lambda t, c: ["--out", "/sys/sae_jax_run"],
                                     "cannot write there"),
    "--out holds a broken config.json": (lambda t, c: ["--out", _broken_config(t)],
                                         "config.json is not a readable run config"),
    "--out/checkpoints is a file": (lambda t, c: ["--out", _checkpoints_file(t)],
                                    "checkpoints is a file, not a checkpoint directory"),
    "--data pythia, missing --model": (
        lambda t, c: ["--data", "pythia", "--model", t / "no-model", "--cache-dir", t / "cache"],
        "there is no such directory"),
    "non-finite steps": (lambda t, c: ["--lr", "1e30", "--clip-norm", "1e30"],
                         "non-finite loss or gradient"),
    "--steps past int32": (lambda t, c: ["--steps", "2147483648"],
                           "more than the step counter holds"),
    "a 5-row .npy": (lambda t, c: ["--data", _npy(t, 5)], "holds 5 rows: a run needs one batch"),
    "a text file named .npy": (lambda t, c: ["--data", _text_npy(t)],
                               "text.npy is not a readable .npy array"),
    "a truncated .npy": (lambda t, c: ["--data", _truncated_npy(t)],
                         "small.npy is not a readable .npy array"),
    "a manifest with wrong rows": (lambda t, c: ["--data", _cache_with(t, c, _wrong_rows)],
                                   "the manifest says (5000, 16)"),
    "--verify, a corrupted last shard": (
        lambda t, c: ["--data", _cache_with(t, c, _flip_last_shard), "--verify"],
        "shard 5 (acts-00005.npy) is corrupted"),
    "--coordinator alone": (lambda t, c: ["--coordinator", "127.0.0.1:1"],
                            "--coordinator needs all of --coordinator HOST:PORT, --num-processes"),
    "--coordinator without a port": (
        lambda t, c: ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
        "--coordinator must be HOST:PORT"),
    "--process-id out of range": (
        lambda t, c: ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
        "--process-id must be in [0, --num-processes)"),
    "--eval-tokens past the host's memory": (
        lambda t, c: ["--eval-tokens", str(10**9)], "needs at least 476.8 GiB of host memory for the held-out codes"),
    "--eval-tokens 1": (lambda t, c: ["--eval-tokens", "1"],
                        "RunConfig.eval_tokens must be an integer >= 2; got 1"),
    "--seed past 32 bits": (lambda t, c: ["--seed", str(2**64)],
                            "seed must be an integer in [0, 4294967295]; got 18446744073709551616"),
    "--join-timeout without --coordinator": (
        lambda t, c: ["--join-timeout", "5"], "--join-timeout 5 needs --coordinator"),
    "--join-timeout 0": (
        lambda t, c: ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0",
                      "--join-timeout", "0"], "join_timeout must be an integer >= 1; got 0"),
    "--out of 4000 characters": (lambda t, c: ["--out", t.joinpath(*["d" * 200] * 20, "run")],
                                 "the run writes paths up to 160 bytes longer under it"),
    "--out with a 300-byte name": (lambda t, c: ["--out", t / ("n" * 300)],
                                   "--out has a folder name of 300 bytes"),
    "a broken manifest": (
        lambda t, c: ["--data", _cache_with(t, c, lambda b: (b / "manifest.json").write_text("{"))],
        "manifest.json is not a readable manifest"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line(tmp_path, cache, capsys, case):
  """In process: a traceback here would be an exception out of main()."""
  flags, message = BAD_INPUT[case]
  flags = [str(f) for f in flags(tmp_path, cache)]
  if "--data" not in flags:
    flags += ["--data", "synthetic"]
  if "--out" not in flags:
    flags += ["--out", str(tmp_path / "run")]
  status = train_script.main([*SMALL, "--steps", "40", *flags])
  assert status != 0
  (line,) = error_lines(capsys.readouterr().err)
  assert message in line, line


def test_held_out_codes_of_disk_data_that_cannot_fit_are_refused(tmp_path, monkeypatch,
                                                                  capsys):
  """A .npy holds out a tenth of its rows (at most --eval-tokens): their
  codes are checked against the host's memory, here made small, before
  anything is trained."""
  npy = _npy(tmp_path, 1000)
  monkeypatch.setattr(memory, "device_memory", lambda: 2**40)  # training fits
  monkeypatch.setattr(memory, "host_memory", lambda: 2 * 4 * 100 * 64 - 1)  # 100 rows, F=64
  out = tmp_path / "run"
  assert train_script.main([*SMALL, "--steps", "40", "--data", str(npy), "--out", str(out)]) == 2
  (line,) = error_lines(capsys.readouterr().err)
  assert line.startswith("error: 100 held-out rows (a tenth of --data ") and "--dict-size 64" in line
  assert not out.exists()
  monkeypatch.setattr(memory, "host_memory", lambda: 2 * 4 * 100 * 64)  # just enough
  assert train_script.main([*SMALL, "--steps", "20", "--data", str(npy), "--out", str(out)]) == 0
  # The rows are all ones: no variance, so no FVU (null), and the run still ends.
  summary = json.loads((out / "summary.json").read_text())
  assert summary["fvu"] is None and summary["calibration_fvu_per_latent"] is None


def test_a_folder_write_removes_the_temporary_folders_of_killed_writers(tmp_path):
  """storage.write_folder (the browser, saelens/) killed with -9 leaves
  .<name>.tmp-<pid>; the next write removes those of dead processes only."""
  gone = subprocess.Popen(["true"])
  gone.wait()
  live = subprocess.Popen(["sleep", "30"])
  try:
    out = tmp_path / "browser"
    orphans = [tmp_path / f".browser.{kind}-{gone.pid}" for kind in ("tmp", "old")]
    held = tmp_path / f".browser.tmp-{live.pid}"
    for folder in (*orphans, held):
      (folder / "latents").mkdir(parents=True)
    storage.write_folder(out, lambda folder: (folder / "index.html").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["browser", held.name])
    assert (out / "index.html").read_text() == "x"
  finally:
    live.kill()
    live.wait()


def test_a_platform_jax_cannot_start_is_one_line(tmp_path):
  """JAX_PLATFORMS=cuda without the CUDA plugin: JAX itself ends in a bare
  AssertionError."""
  done = subprocess.run([sys.executable, str(scripts.EXPERIMENTS / "train.py"), "--data",
                         "synthetic", "--steps", "2", "--out", str(tmp_path / "run")],
                        env=env() | {"JAX_PLATFORMS": "cuda"}, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2
  assert error_lines(done.stderr) == [
      "error: JAX cannot start a backend for JAX_PLATFORMS='cuda' (no such backend is "
      "installed): install that platform's jax plugin (for CUDA, jax[cuda12]), or unset "
      "JAX_PLATFORMS to take what this machine has"]
  assert not (tmp_path / "run").exists()


def test_out_on_a_read_only_filesystem_is_one_line(tmp_path):
  """A real read-only mount: a tmpfs remounted ro in a user and mount
  namespace (`unshare -rm`)."""
  disk = tmp_path / "ro"
  disk.mkdir()
  train_py = " ".join([sys.executable, str(scripts.EXPERIMENTS / "train.py"), *SMALL,
                       "--data", "synthetic", "--steps", "20", "--out", str(disk / "run")])
  done = subprocess.run(["unshare", "-rm", "sh", "-c",
                         f"mount -t tmpfs tmpfs {disk} && mount -o remount,ro {disk} && "
                         f"{train_py}"], env=env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert error_lines(done.stderr) == [
      f"error: --out '{disk / 'run'}': cannot write there (Read-only file system)"]


@pytest.mark.parametrize("flags, message", [
    (["--dict-size", "100000000000"], "need at least"),
    (["--batch-size", "1000000000000", "--calibration-tokens", "1000000000000"], "need at least"),
])
def test_what_cannot_fit_is_refused_before_allocating(tmp_path, flags, message):
  """In a subprocess: these used to allocate 400 GB, or abort in C++."""
  done = subprocess.run([sys.executable, str(scripts.EXPERIMENTS / "train.py"), *SMALL,
                         "--data", "synthetic", "--steps", "40", "--out", str(tmp_path / "run"),
                         *flags], env=env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  (line,) = error_lines(done.stderr)
  assert message in line and "GiB on each device" in line and "devices has" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--hook", "blocks.x"], "hook must be 'blocks.N.hook_resid_pre'"),
    (["--dataset", "missing.txt"], "no such file"),
    (["--context-length", "0"], "context_length"),
    (["--backend", "torch", "--device", "cuda:99"], "--device 'cuda:99': torch "),
    (["--backend", "torch", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
])
def test_export_refusals_are_one_line(tmp_path, capsys, flags, message):
  export_script = scripts.load("export_activations")
  assert export_script.main([*flags, "--out", str(tmp_path / "cache")]) == 2
  (line,) = error_lines(capsys.readouterr().err)
  assert message in line, line
  assert not (tmp_path / "cache").exists()
