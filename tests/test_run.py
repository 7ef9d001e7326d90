"""experiments/train.py end to end: outputs, exact resume after SIGTERM and
kill -9, the SAELens export, refusals, and the Pythia path on a tiny model."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from sae_jax import evaluate
from sae_jax import model
from sae_jax import synthetic
from sae_jax import thresholds
from tests import tiny_lm
from tests.helpers import SCRIPT
from tests.helpers import SMALL
from tests.helpers import cli
from tests.helpers import outputs
from tests.helpers import subprocess_run
from tests.helpers import train_script
from tests.helpers import wait_for_step


def test_synthetic_run_writes_every_output(tmp_path, capsys):
  assert cli("--data", "synthetic", "--steps", 40, "--log-every", 10, "--ckpt-every", 15,
             "--out", tmp_path / "run") == 0
  said = capsys.readouterr().out  # where it writes, at the start and at the end
  assert f"{tmp_path / 'run'}: Sampled-SAE (l=" in said and "every flag in" in said
  assert "inference rule (per-latent thresholds) from" in said and "evaluated on" in said
  assert f"\nwrote {tmp_path / 'run'}: summary.json (above), saelens/" in said
  o = outputs(tmp_path / "run")
  assert {"fvu", "explained_variance", "mse", "l0", "dead_fraction", "tokens", "steps",
          "tokens_per_second", "gt_mmcs", "gt_recovered"} <= set(o["summary"])
  assert o["summary"]["steps"] == 40 and o["summary"]["tokens"] == 40 * 64
  assert o["summary"]["explained_variance"] == pytest.approx(1 - o["summary"]["fvu"])
  assert [m["step"] for m in o["metrics"]] == [10, 20, 30, 40]
  assert all(m["tokens_per_second"] > 0 for m in o["metrics"])
  # The end of the run, part by part; the whole holds them all.
  parts = o["summary"]["end_seconds"]
  assert set(parts) == {"calibration", "evaluation", "probing", "downstream", "export", "total"}
  assert all(v >= 0 for v in parts.values()) and parts["calibration"] > 0
  assert sum(v for k, v in parts.items() if k != "total") <= parts["total"] + 0.01
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
      "15", "15.meta.json", "30", "30.meta.json", "40", "40.meta.json"]
  assert o["config"].train.sae.k == 4 and o["config"].data == "synthetic"
  assert o["cfg"]["architecture"] == "jumprelu" and o["cfg"]["d_sae"] == 64
  # Re-running a finished run changes nothing; with another inference rule
  # (a field that only changes the end), the end runs again.
  again = lambda *extra: cli("--data", "synthetic", "--steps", 40, "--log-every", 10,
                             "--ckpt-every", 15, "--out", tmp_path / "run", *extra)
  capsys.readouterr()
  stamp = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
  assert again() == 0
  said = capsys.readouterr().out
  assert f"{tmp_path / 'run'}: finished already with this config" in said
  assert "resuming" not in said and "devices:" not in said  # a no-op: nothing opened
  assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == stamp
  assert outputs(tmp_path / "run")["bytes"] == o["bytes"]
  assert again("--inference", "global") == 0
  o = outputs(tmp_path / "run")
  assert o["summary"]["inference"] == "global" and o["config"].inference == "global"
  assert len(np.unique(o["weights"]["threshold"])) == 1


def saelens_forward(weights, cfg, x):
  """SAELens' formulas, from the files alone."""
  h = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
  if cfg["architecture"] == "jumprelu":
    z = np.maximum(h, 0) * (h > weights["threshold"])
  else:
    z = np.zeros_like(h)
    top = np.argsort(-h, axis=1, kind="stable")[:, :cfg["k"]]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(h, top, axis=1), 0), axis=1)
  return z, z @ weights["W_dec"] + weights["b_dec"]


@pytest.mark.parametrize("selection", ["sampled", "topk"])
def test_saelens_export_reproduces_inference(tmp_path, selection):
  npy = tmp_path / "acts.npy"
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(d_model=16, n_features=32))
  np.save(npy, 5.0 * source.sample(0, 4096) + 1.0)  # a scale for the export to fold
  # 30 steps: per-latent thresholds asked for, as auto would save each
  # token's top k′ for an SAE this young (test_saelens.py checks that export).
  assert cli("--data", npy, "--selection", selection, "--steps", 30, "--eval-tokens", 256,
             "--inference", "per-latent", "--out", tmp_path / "run") == 0
  o = outputs(tmp_path / "run")
  assert o["cfg"]["architecture"] == ("topk" if selection == "topk" else "jumprelu")
  assert o["cfg"]["normalize_activations"] == "none" and o["cfg"]["apply_b_dec_to_input"]
  assert o["cfg"]["metadata"]["sae_lens_version"] >= "6.0.0" and o["cfg"]["dtype"] == "float32"
  if selection == "topk":
    assert o["cfg"]["k"] == 4 and "threshold" not in o["weights"]
  x = np.load(npy)[-256:]
  z, xhat = saelens_forward(o["weights"], o["cfg"], x)

  from sae_jax import checkpoint, train
  c = o["config"].train
  state = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").restore(
      train.create_train_state(c, x))
  scale = float(state.input_scale)
  theta = state.threshold
  if selection != "topk":  # one threshold per latent, folded by the input scale
    theta_raw = o["weights"]["threshold"]
    never = theta_raw == thresholds.NEVER
    assert len(np.unique(theta_raw[~never])) > 1 and o["summary"]["inference"] == "per-latent"
    theta = np.where(never, thresholds.NEVER, theta_raw * np.float32(scale))
  our_z, our_xhat = evaluate.reconstruct(state.params, theta, state.input_scale, x,
                                         model.SAE(c.sae))
  np.testing.assert_allclose(z, our_z / scale, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(xhat, our_xhat, rtol=1e-4, atol=1e-4)
  assert np.mean(np.sum(z > 0, axis=1)) > 0
  assert o["summary"]["fvu"] == pytest.approx(
      evaluate.reconstruction_metrics(x, our_xhat, our_z)["fvu"], rel=1e-6)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
  """A run stopped by SIGTERM, then its relaunch killed with -9, then run to
  its end: the same parameters, thresholds and losses as a run never
  stopped."""
  steps = 300
  straight = tmp_path / "straight"
  assert cli("--data", "synthetic", "--steps", steps, "--log-every", 1, "--out", straight) == 0

  resumed = tmp_path / "resumed"
  stopped_at = 0
  for how, past in (("sigterm", 120), ("kill", 60)):
    process = subprocess_run(resumed, steps, ["--ckpt-every", "50"])
    wait_for_step(resumed, stopped_at + past, process)
    process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    if how == "sigterm":
      assert process.returncode == 0, stderr
      assert "stopped by SIGTERM" in stdout
      assert not (resumed / "summary.json").exists()
    else:
      assert process.returncode == -signal.SIGKILL
      assert f"resuming at step {stopped_at}" in stdout
    saved = max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    assert max(stopped_at, 50) <= saved < steps, how
    stopped_at = saved

  assert cli("--data", "synthetic", "--steps", steps, "--log-every", 1, "--ckpt-every", 50,
             "--out", resumed) == 0
  a, b = outputs(straight), outputs(resumed)
  assert a["bytes"] == b["bytes"]  # the same final parameters, bit for bit
  # ... and the same per-latent thresholds, calibrated after training.
  assert len(np.unique(b["weights"]["threshold"])) > 1
  np.testing.assert_array_equal(a["weights"]["threshold"], b["weights"]["threshold"])
  assert [m["step"] for m in b["metrics"]] == list(range(1, steps + 1))
  for ma, mb in zip(a["metrics"], b["metrics"]):
    assert ma["loss"] == mb["loss"]


def test_resume_with_another_config_is_refused(tmp_path, capsys):
  assert cli("--data", "synthetic", "--steps", 20, "--out", tmp_path / "run") == 0
  capsys.readouterr()
  assert cli("--data", "synthetic", "--steps", 20, "--out", tmp_path / "run", "--k", 3,
             "--l", 5) == 2
  err = capsys.readouterr().err
  assert "refusing to resume" in err
  assert "train.sae.k: saved 4, now 3" in err and "train.sae.l: saved 4.0, now 5.0" in err


def test_runs_saved_before_streaming_existed_still_resume(tmp_path):
  out = tmp_path / "run"
  assert cli("--data", "synthetic", "--steps", 20, "--out", out) == 0
  saved = json.loads((out / "config.json").read_text())
  del saved["stream"], saved["stream_contexts"]  # as an older version wrote it
  for name in ("ridge", "sketch", "pool_every"):
    del saved["train"]["sae"][name]
  (out / "config.json").write_text(json.dumps(saved))
  assert cli("--data", "synthetic", "--steps", 20, "--out", out) == 0
  assert cli("--data", "synthetic", "--steps", 20, "--out", out, "--stream-contexts", 8) == 2


@pytest.mark.slow
def test_a_kept_pool_resumes_exactly(tmp_path):
  """--pool-every keeps the pool in the checkpoint: a run resumed between
  renewals ends with the uninterrupted run's parameters."""
  args = ["--data", "synthetic", "--steps", 20, "--score", "leverage", "--sketch", 8,
          "--pool-every", 3, "--ckpt-every", 7]
  assert cli(*args, "--out", tmp_path / "straight") == 0
  resumed = tmp_path / "resumed"
  assert cli(*args, "--out", resumed) == 0
  for stale in ("summary.json", "saelens", "checkpoints/20", "checkpoints/20.meta.json"):
    path = resumed / stale
    subprocess.run(["rm", "-r", str(path)], check=True)
  assert cli(*args, "--out", resumed) == 0  # from step 14: the pool of step 12 is kept
  assert outputs(tmp_path / "straight")["bytes"] == outputs(resumed)["bytes"]


@pytest.mark.slow
def test_a_jumprelu_run_resumes_exactly(tmp_path, capsys):
  """JumpReLU's learned thresholds and their moments are in the checkpoint:
  a run resumed inside the penalty's warm-up ends as the uninterrupted one."""
  args = ["--data", "synthetic", "--steps", 20, "--selection", "jumprelu", "--bandwidth", 0.05,
          "--sparsity-warmup-steps", 10, "--ckpt-every", 7]
  assert cli(*args, "--out", tmp_path / "straight") == 0
  resumed = tmp_path / "resumed"
  assert cli(*args, "--out", resumed) == 0
  for stale in ("summary.json", "saelens", "checkpoints/20", "checkpoints/20.meta.json",
                "checkpoints/14", "checkpoints/14.meta.json"):
    subprocess.run(["rm", "-r", str(resumed / stale)], check=True)
  capsys.readouterr()
  assert cli(*args, "--out", resumed) == 0
  assert "resuming at step 7" in capsys.readouterr().out
  straight = outputs(tmp_path / "straight")
  assert straight["bytes"] == outputs(resumed)["bytes"]
  assert straight["summary"]["inference"] == "learned"


@pytest.mark.parametrize("args, message", [
    (["--k", "65", "--dict-size", "64"], r"SAEConfig.k must be an integer in \[1, 64\]"),
    (["--pool-every", "0"], r"SAEConfig.pool_every must be an integer >= 1; got 0"),
    (["--score", "leverage", "--sketch", "0"], r"SAEConfig.sketch must be None"),
    (["--l", "0.5"], r"SAEConfig.l must be a finite number >= 1; got 0.5"),
    (["--data", "missing/acts.npy"],
     r"--data must be 'pythia', .*; 'missing/acts.npy' is none of these"),
    (["--data", "RANK3"], r"must hold activations \[N, D\] \(or a transcoder's pairs "
                          r"\[N, 2, D\]\); got shape \(4, 4, 16\)"),
    (["--batch-size", "30"], r"--batch-size 30 must be divisible by the 4 devices"),
    (["--calibration-tokens", "10"],
     r"RunConfig.calibration_tokens \(10\) must be at least one batch \(64 tokens\)"),
    (["--stream"], r"--stream makes activations with the language model: it needs --data "
                   r"pythia; got --data 'synthetic'"),
    (["--stream", "--data", "pythia", "--backend", "torch"],
     r"--stream runs the model in JAX; got --backend 'torch'"),
])
def test_bad_input_exits_with_one_clear_line(tmp_path, capsys, args, message):
  np.save(tmp_path / "rank3.npy", np.zeros((4, 4, 16), np.float32))
  args = [str(tmp_path / "rank3.npy") if a == "RANK3" else a for a in args]
  if "--data" not in args:
    args += ["--data", "synthetic"]
  out = tmp_path / "run"
  assert cli(*args, "--steps", 20, "--out", out) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  import re
  assert re.search(message, err), err
  assert not out.exists()  # refused before any work


def test_a_short_first_run_scales_its_warmup(tmp_path):
  """No --warmup-steps or --threshold-start: both are 10% of an 80-step run."""
  small = [a for a in SMALL if a not in ("--warmup-steps", "5", "--threshold-start", "10")]
  assert train_script.main([*small, "--data", "synthetic", "--steps", "80",
                            "--out", str(tmp_path / "run")]) == 0
  o = outputs(tmp_path / "run")
  assert (o["config"].train.warmup_steps, o["config"].train.threshold_start) == (8, 8)
  assert o["summary"]["threshold"] > 0 and o["metrics"][-1]["step"] == 80


def without_hub(tmp_path):
  """The environment of a machine with no hub access and an empty cache."""
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), JAX_PLATFORMS="cpu")
  env.pop("HF_HUB_OFFLINE", None)
  with socket.socket() as s:  # a local port nothing listens on: the hub refuses at once
    s.bind(("127.0.0.1", 0))
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
  return env


@pytest.mark.parametrize("extra, offline", [([], False), (["--stream"], True)])
def test_the_main_command_without_hub_access_says_what_to_do(tmp_path, extra, offline):
  env = without_hub(tmp_path)
  if offline:
    env["HF_HUB_OFFLINE"] = "1"
  work = tmp_path / "work"
  work.mkdir()
  done = subprocess.run([sys.executable, str(SCRIPT), "--l", "8", "--k", "64", *extra],
                        cwd=work, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("error: could not reach the model 'EleutherAI/pythia-160m'")
  for way_out in ("--model DIR", "HF_HUB_OFFLINE=1", "--data synthetic"):
    assert way_out in lines[0]
  assert list(work.iterdir()) == []  # no runs/, no cache/


def test_a_missing_local_model_is_named(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli("--data", "pythia", "--model", str(tmp_path / "no-model"), "--out", out) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "there is no such directory" in err
  assert not out.exists()


@pytest.mark.slow
def test_pythia_path_on_a_tiny_model(lm, tmp_path, capsys):
  out, cache = tmp_path / "run", tmp_path / "cache"
  args = ["--data", "pythia", "--model", lm["model"], "--dataset", *lm["texts"]["txt"],
          "--hook", "blocks.1.hook_resid_post", "--context-length", 16, "--cache-dir", cache,
          "--batch-size", 32, "--steps", 12, "--eval-tokens", 64]
  assert cli(*args, "--out", out) == 0
  manifest = json.loads((cache / "manifest.json").read_text())
  assert manifest["complete"] and manifest["total_tokens"] == 12 * 32 + 64
  o = outputs(out)
  assert o["cfg"]["d_in"] == 16 and o["cfg"]["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
  assert o["cfg"]["metadata"]["model_name"] == lm["model"]
  assert o["cfg"]["metadata"]["context_size"] == 16 and o["cfg"]["metadata"]["prepend_bos"] is False
  assert o["summary"]["steps"] == 12
  s = o["summary"]
  # A random model predicts about uniformly either way; the numbers must still add up.
  assert s["downstream_kl"] > 0 and s["downstream_clean_ce"] == pytest.approx(
      np.log(len(tiny_lm.WORDS) + 2), rel=0.05)
  assert s["downstream_loss_recovered"] == pytest.approx(
      (s["downstream_zero_ce"] - s["downstream_spliced_ce"])
      / (s["downstream_zero_ce"] - s["downstream_clean_ce"]))
  # On the same cache, with no downstream contexts asked for: said, and skipped.
  capsys.readouterr()
  assert cli(*args, "--downstream-contexts", 0, "--out", tmp_path / "none") == 0
  assert "--downstream-contexts 0: downstream loss skipped" in capsys.readouterr().out
  assert "downstream_kl" not in outputs(tmp_path / "none")["summary"]


def test_optional_metric_sinks(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  out = tmp_path / "run"
  assert cli("--data", "synthetic", "--steps", 20, "--log-every", 10, "--wandb", "--tensorboard",
             "--out", out) == 0
  events = list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].read_bytes().count(b"fvu") == 2  # steps 10 and 20
  runs = list((out / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

  # Online without an account: one line, before any training.
  import wandb  # noqa: PLC0415
  wandb.teardown()  # forget the offline settings of the run above
  monkeypatch.setenv("WANDB_MODE", "online")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  assert cli("--data", "synthetic", "--steps", 20, "--wandb", "--out", tmp_path / "online") == 2
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert line.startswith("error: --wandb: could not start a W&B run (No API key configured")
  assert not (tmp_path / "online" / "checkpoints").exists()


@pytest.mark.slow
def test_streaming_run_resumes_exactly_after_sigterm(lm, tmp_path, capsys):
  """--stream: activations from the JAX model through the on-device shuffle
  buffer; a run stopped by SIGTERM mid-round resumes to the same parameters.
  More steps than the text holds are refused before training."""
  rng = np.random.default_rng(1)
  text = tmp_path / "long.txt"
  text.write_text("\n".join(" ".join(rng.choice(tiny_lm.WORDS, size=rng.integers(3, 40)))
                            for _ in range(800)) + "\n")
  steps = 300
  args = ["--data", "pythia", "--stream", "--model", lm["model"], "--dataset", str(text),
          "--hook", "blocks.1.hook_resid_post", "--context-length", "16", "--batch-size", "32",
          "--stream-contexts", "16", "--eval-tokens", "64", "--downstream-contexts", "4",
          "--ckpt-every", "10", "--cache-dir", str(tmp_path / "cache")]
  too_long = tmp_path / "too_long"
  assert cli(*args, "--steps", 10**5, "--out", too_long) == 2
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert line.startswith("error: --steps 100000: the text (") and "at most --steps" in line
  assert not (too_long / "checkpoints").exists() or not any((too_long / "checkpoints").iterdir())
  straight = tmp_path / "straight"
  assert cli(*args, "--steps", steps, "--log-every", 1, "--out", straight) == 0
  resumed = tmp_path / "resumed"
  process = subprocess_run(resumed, steps, args)
  wait_for_step(resumed, 60, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  assert "stopped by SIGTERM" in stdout
  saved = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  assert 60 <= saved[-1] < steps
  meta = json.loads((resumed / "checkpoints" / f"{saved[-1]}.meta.json").read_text())
  position = meta["data_position"]
  assert position["step"] <= saved[-1] and position["round"] >= 1

  assert cli(*args, "--steps", steps, "--log-every", 1, "--out", resumed) == 0
  a, b = outputs(straight), outputs(resumed)
  assert a["bytes"] == b["bytes"]
  assert [m["step"] for m in b["metrics"]] == list(range(1, steps + 1))
  assert [m["loss"] for m in a["metrics"]] == [m["loss"] for m in b["metrics"]]
  assert a["summary"]["downstream_kl"] == b["summary"]["downstream_kl"] > 0
  assert a["summary"]["fvu"] == b["summary"]["fvu"]
  # Probing and absorption, on the first letters of the held-out tokens.
  assert a["summary"]["probe_tasks"] >= 1 and "absorption" in a["summary"]
  assert a["summary"]["probe_f1_k1"] == b["summary"]["probe_f1_k1"]
  assert a["config"].stream and a["config"].export.backend == "jax"
  assert not (tmp_path / "cache").exists()  # nothing written to disk but the run
