"""A small l-sweep on synthetic data, end to end, and its resume; the one
pass (every variant on one stream of batches) against the sequential sweep,
on synthetic data, a cache and --stream; its one checkpoint after SIGTERM
and kill -9; its memory estimate."""

import csv
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from sae_jax import finish
from sae_jax import outdir
from sae_jax import sweep as sweep_lib
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig
from tests import scripts
from tests import xla
from tests.helpers import LM_ARGS
from tests.helpers import LM_NAMES
from tests.helpers import cli
from tests.helpers import outputs
from tests.helpers import sweep_script
from tests.helpers import wait_for_step


ARGS = ["--data", "synthetic", "--synthetic-d-model", "16", "--synthetic-features", "32",
        "--rare-fraction", "0.1", "--parents", "2", "--children", "3", "--dict-size", "64",
        "--k", "4", "--batch-size", "64", "--steps", "30", "--warmup-steps", "5",
        "--threshold-start", "10", "--eval-tokens", "512", "--calibration-tokens", "1024",
        "--ls", "1", "16", "--scores", "l2", "leverage", "--sketch", "16", "--no-progress"]


def read_rows(out):
  with open(out / "results.csv") as f:
    return list(csv.DictReader(f))


def same_runs(a, b, names):
  """Variant by variant: the same final weights, bit for bit, and the same
  losses at every logged step and evaluation."""
  for name in names:
    x, y = outputs(a / name), outputs(b / name)
    assert x["bytes"] == y["bytes"], name
    assert [m["loss"] for m in x["metrics"]] == [m["loss"] for m in y["metrics"]], name
    drop = lambda summary: {k: v for k, v in summary.items() if k not in finish.TIMINGS}
    assert drop(x["summary"]) == drop(y["summary"]), name


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, capsys):
  out = tmp_path / "sweep"
  assert sweep_script.main([*ARGS, "--out", str(out)]) == 0
  said = capsys.readouterr().out
  assert "6 SAEs in one pass" in said and "memory: the one pass needs at least" in said
  assert not list(out.glob("*/checkpoints")) and (out / "checkpoints").is_dir()
  rows = read_rows(out)
  assert [r["variant"] for r in rows] == ["topk", "batchtopk", "sampled-l2-l1", "sampled-l2-l16",
                                          "sampled-leverage-l1", "sampled-leverage-l16"]
  assert all(0 <= float(r["fvu"]) and 0 <= float(r["gt_recovered_rare"]) <= 1 for r in rows)
  # Probing of the 32 true features and absorption of the 2 parents, per variant.
  for r in rows:
    assert 0.5 <= float(r["probe_acc_k1"]) <= float(r["probe_acc_dense"]) + 0.1
    # Absorption is of the parents the SAE recovered (none, after 30 steps: NaN).
    evaluated = int(float(r["absorption_parents"]))
    assert 0 <= evaluated <= 2
    assert (evaluated == 0) == np.isnan(float(r["absorption"]))
    assert evaluated == 0 or 0 <= float(r["absorption_fraction"]) <= 1
    assert 0 <= float(r["gt_recovered_parent"]) <= 1 and r["absorption_letters"] == "nan"
  assert rows[0]["pool_jaccard"] == "nan" and float(rows[2]["pool_jaccard"]) > 0
  # l = 16 puts all 64 latents in the pool: the same selections as BatchTopK.
  # The fast step computes the two rules' gradients by different routes (a
  # pooled matmul, an entry list), so the runs agree to float rounding.
  for metric in ("fvu", "gt_mmcs", "l0"):
    np.testing.assert_allclose(float(rows[3][metric]), float(rows[1][metric]), rtol=1e-5)
  table = (out / "results.md").read_text()
  assert table.startswith("| variant | selection |") and "sampled-leverage-l16" in table
  header = table.splitlines()[0]  # the columns that hold a value (results.csv has all)
  for column in rows[0]:
    assert (f"| {column} |" in header) == any(r[column] not in ("", "nan") for r in rows), column
  assert "| absorption_letters |" not in header and "| probe_f1_k1 |" in header
  # Both modes of the same held-out tokens: the saved SAE's and the training rule's.
  assert all(float(r["batch_l0"]) > 0 and float(r["batch_fvu"]) > 0 for r in rows)
  for metric in ("fvu", "batch_fvu", "l0", "batch_l0", "gt_recovered_rare", "pool_jaccard",
                 "probe_f1_k1"):
    assert (out / f"plot_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # A second call trains nothing: finished runs are skipped.
  stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
  (out / "batchtopk" / "summary.json").unlink()  # ...except this one, redone
  assert sweep_script.main([*ARGS, "--out", str(out)]) == 0
  for path, stamp in stamps.items():
    if path.parent.name != "batchtopk":
      assert path.stat().st_mtime_ns == stamp
  assert (out / "batchtopk" / "summary.json").exists()
  assert read_rows(out)[1]["fvu"] == rows[1]["fvu"]

  # A variant is finished only with every output: summary.json is written
  # last, and one without saelens/ (a kill -9 between the two, when
  # summary.json came first) is exported again, not skipped for ever.
  for variant in out.glob("*/summary.json"):
    assert variant.stat().st_mtime_ns >= (
        variant.parent / "saelens" / "cfg.json").stat().st_mtime_ns
  weights = (out / "topk" / "saelens" / "sae_weights.safetensors").read_bytes()
  shutil.rmtree(out / "topk" / "saelens")
  assert sweep_script.main([*ARGS, "--out", str(out)]) == 0
  assert (out / "topk" / "saelens" / "sae_weights.safetensors").read_bytes() == weights

  # A finished sweep answers only its own command. Another --steps (or
  # --seed, --data...) is refused with the differences, in either mode,
  # before anything is trained or rewritten. (That the sequential sweep ends
  # bit for bit as the one pass: test_one_pass_on_a_cache_equals_sequential
  # and test_one_pass_with_stream_equals_sequential.)
  capsys.readouterr()
  written = [*out.glob("*/summary.json"), *out.glob("results.*"), *out.glob("*.png")]
  stamps = {path: path.stat().st_mtime_ns for path in written}
  at = ARGS.index("--steps") + 1
  for mode in ("--one-pass", "--sequential"):
    assert sweep_script.main([*ARGS[:at], "40", *ARGS[at + 1:], mode, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'topk'} holds a run with another config" in error
    assert "train.steps: saved 30, now 40" in error
  assert {path: path.stat().st_mtime_ns for path in written} == stamps
  # An end-only field (--inference) finishes every variant again, untrained.
  assert sweep_script.main([*ARGS, "--inference", "global", "--out", str(out)]) == 0
  assert "resuming at step 30" in capsys.readouterr().out
  for r in rows[1:]:  # TopK's inference is its own rule (each token's top k)
    assert outputs(out / r["variant"])["summary"]["inference"] == "global", r["variant"]


def sweep_pair(tmp_path, args):
  """The sweep run in one pass and sequentially: (one-pass out, sequential out)."""
  one, each = tmp_path / "one", tmp_path / "each"
  assert sweep_script.main([*args, "--one-pass", "--out", str(one)]) == 0
  assert sweep_script.main([*args, "--sequential", "--out", str(each)]) == 0
  return one, each


@pytest.mark.slow
def test_one_pass_on_a_cache_equals_sequential(cache, tmp_path):
  one, each = sweep_pair(tmp_path, ["--data", str(cache), *LM_ARGS])
  same_runs(one, each, LM_NAMES)
  # One checkpoint folder for the one pass, one per variant sequentially.
  assert not list(one.glob("*/checkpoints")) and (one / "checkpoints").is_dir()
  assert all((each / name / "checkpoints").is_dir() for name in LM_NAMES)
  assert not (each / "checkpoints").exists()


@pytest.mark.slow
def test_one_pass_with_stream_equals_sequential(lm, tmp_path):
  """--stream: the tiny GPT-NeoX makes each batch once for all variants."""
  one, each = sweep_pair(tmp_path, [
      "--data", "pythia", "--stream", "--model", lm["model"], "--dataset", *lm["texts"]["txt"],
      "--hook", "blocks.1.hook_resid_post", "--context-length", "16", "--stream-contexts", "16",
      "--cache-dir", str(tmp_path / "cache"), *LM_ARGS])
  same_runs(one, each, LM_NAMES)
  assert outputs(one / "batchtopk")["summary"]["downstream_kl"] > 0
  assert not (tmp_path / "cache").exists()


RESUME = [*ARGS[:ARGS.index("--steps")], "--steps", "300", "--warmup-steps", "5",
          "--threshold-start", "10", "--eval-tokens", "512", "--calibration-tokens", "1024",
          "--ls", "4", "--scores", "l2", "--log-every", "1", "--ckpt-every", "50",
          "--no-progress"]
RESUME_NAMES = ["topk", "batchtopk", "sampled-l2-l4"]


@pytest.fixture(scope="module")
def straight_sweep(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight") / "sweep"
  assert sweep_script.main([*RESUME, "--out", str(out)]) == 0
  return out


@pytest.mark.slow
def test_a_stopped_one_pass_resumes_exactly(tmp_path, straight_sweep, capsys):
  """A one-pass sweep stopped by SIGTERM, then its relaunch killed with -9:
  each leaves the pass's one checkpoint of every variant and no finished
  variant; another list of variants is refused; the last relaunch ends each
  variant as the uninterrupted sweep did."""
  out = tmp_path / "sweep"
  env = xla.env(4)
  saved = 0
  for how, past in (("sigterm", 120), ("kill", 60)):
    process = subprocess.Popen(
        [sys.executable, str(scripts.EXPERIMENTS / "sweep_l.py"), *RESUME, "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "sampled-l2-l4", saved + past, process)
    process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    if how == "sigterm":
      assert process.returncode == 0, stderr
      assert "sweep stopped by SIGTERM: re-run the same command" in stdout
    else:
      assert process.returncode == -signal.SIGKILL
      assert f"resuming at step {saved}" in stdout
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert max(saved, 50) <= steps[-1] < 300, how
    assert not any((out / n / "summary.json").exists() for n in RESUME_NAMES)
    saved = steps[-1]
  # Another list of variants is refused, with what changed, and nothing is touched.
  capsys.readouterr()
  changed = [*RESUME[:RESUME.index("--ls")], "--ls", "8", *RESUME[RESUME.index("--scores"):]]
  assert sweep_script.main([*changed, "--out", str(out)]) == 2
  error = capsys.readouterr().err
  assert "holds a sweep of other runs" in error and "removed sampled-l2-l4" in error
  assert "added sampled-l2-l8" in error and not (out / "sampled-l2-l8").exists()

  assert sweep_script.main([*RESUME, "--out", str(out)]) == 0
  assert f"resuming at step {saved}" in capsys.readouterr().out
  same_runs(straight_sweep, out, RESUME_NAMES)
  assert [m["step"] for m in outputs(out / "topk")["metrics"]] == list(range(1, 301))


def test_a_variant_given_twice_is_refused(tmp_path, capsys):
  for flags, said in (
      (["--ls", "2", "2"], "--ls gives 2 more than once; each value is one variant"),
      (["--scores", "l2", "entropy", "l2"], "--scores gives l2 more than once; each value is "
       "one variant"),
      (["--baselines", "topk", "topk"], "--baselines gives topk more than once; each value is "
       "one variant"),
      (["--baselines", "topk", "gated"], "--baselines gated: allowed are topk, batchtopk, "
       "matryoshka, jumprelu"),
      (["--baselines", "matryoshka"], "--baselines matryoshka needs --matryoshka-groups (the "
       "groups' fractions of --dict-size)")):
    args = [*ARGS[:ARGS.index("--ls")], *flags, "--l", "3", "--no-progress", "--out",
            str(tmp_path / "s")]
    assert sweep_script.main(args) == 2
    out, err = capsys.readouterr()
    assert out.startswith("note: --l 3.0 does nothing in a sweep: --ls and --scores set each")
    assert err.strip() == f"error: {said}"
  assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_sweep_with_matryoshka_variants(tmp_path):
  """--matryoshka-groups: Matryoshka BatchTopK and Matryoshka-Sampled beside
  the plain variants, which keep the plain loss, and JumpReLU, in one pass
  (which equals the sequential sweep whatever the variants: the tests above)."""
  args = [*ARGS[:ARGS.index("--ls")], "--ls", "2", "--scores", "l2", "--baselines", "batchtopk",
          "matryoshka", "jumprelu", "--matryoshka-groups", "0.5", "0.5", "--inference",
          "per-latent", "--no-progress"]
  one = tmp_path / "one"
  assert sweep_script.main([*args, "--one-pass", "--out", str(one)]) == 0
  names = ["batchtopk", "matryoshka", "jumprelu", "sampled-l2-l2", "matryoshka-sampled-l2-l2"]
  rows = read_rows(one)
  assert [r["variant"] for r in rows] == names
  assert [r["groups"] for r in rows] == ["", "32/32", "", "", "32/32"]
  for name in names:
    groups = outputs(one / name)["config"].train.matryoshka_groups
    assert groups == ((0.5, 0.5) if name.startswith("matryoshka") else None), name
  assert rows[0]["fvu"] != rows[1]["fvu"] and rows[3]["fvu"] != rows[4]["fvu"]
  # JumpReLU, with its learned thresholds, ends as when trained alone.
  jump = outputs(one / "jumprelu")  # its own rule; the others per-latent, as asked
  assert jump["config"].train.target_l0 == 4.0 and jump["summary"]["inference"] == "learned"
  assert outputs(one / "batchtopk")["summary"]["inference"] == "per-latent"
  assert (jump["config"].train.b1, outputs(one / "batchtopk")["config"].train.b1) == (0.0, 0.9)
  alone = tmp_path / "alone"
  flags = [a for a in args[:args.index("--ls")] if a != "--no-progress"]
  assert cli(*flags, "--selection", "jumprelu", "--out", alone) == 0
  assert outputs(alone)["bytes"] == jump["bytes"]
  assert (one / "plot_fvu.png").read_bytes()[:4] == b"\x89PNG"
  # Run again, the finished sweep is finished: nothing is refused or trained.
  stamps = {p: p.stat().st_mtime_ns for p in one.glob("*/summary.json")}
  assert sweep_script.main([*args, "--one-pass", "--out", str(one)]) == 0
  assert {p: p.stat().st_mtime_ns for p in one.glob("*/summary.json")} == stamps


def test_each_variant_takes_its_own_rules_default_b1():
  """Adam's b1 is each rule's own default (JumpReLU's is 0), whatever
  --selection the sweep's flags name, unless it was given."""
  for selection, b1, want in (("sampled", None, {"topk": 0.9, "jumprelu": 0.0}),
                              ("jumprelu", None, {"topk": 0.9, "jumprelu": 0.0}),
                              ("sampled", 0.5, {"topk": 0.5, "jumprelu": 0.5})):
    base = RunConfig(TrainConfig(SAEConfig(64, 16, k=2, selection=selection), steps=10, b1=b1),
                     out="sweep", data="synthetic")
    runs = sweep_lib.variant_configs(base, [2], ["l2"], ["topk", "jumprelu"])
    got = {name: config.train.b1 for name, *_, config in runs}
    assert got == {**want, "sampled-l2-l2": want["topk"]}, (selection, b1)


def test_a_sweep_and_a_single_run_keep_out_of_each_others_folders(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  for mode in ("--one-pass", "--sequential"):
    assert sweep_script.main([*ARGS, mode, "--out", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {run} holds a single run (its config.json): a sweep needs a folder of "
        f"its own; use another --out")
  assert sorted(p.name for p in run.iterdir()) == ["config.json"]
  sweep = tmp_path / "sweep"
  sweep.mkdir()
  (sweep / "sweep.json").write_text('{"runs": ["topk"]}')
  assert cli("--data", "synthetic", "--steps", "20", "--out", sweep) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: --out {sweep} holds a sweep (its sweep.json): resume it with "
      f"experiments/sweep_l.py, or use another --out")


def test_a_sweep_that_cannot_fit_in_one_pass_is_refused(tmp_path, capsys):
  """14 variants of 2M latents: each fits alone on a device (1.3 GB), all
  together do not; refused before anything is allocated or written."""
  args = [*ARGS[:ARGS.index("--dict-size")], "--dict-size", "2000000", "--k", "4",
          "--batch-size", "64", "--steps", "30", "--no-progress"]
  out = tmp_path / "sweep"
  assert sweep_script.main([*args, "--out", str(out)]) == 2
  error = capsys.readouterr().err.strip()
  assert error.startswith("error: the 14 SAEs trained in one pass need at least")
  assert "of parameters, Adam moments and gradients of 14 SAEs" in error
  assert "devices has" in error and len(error.splitlines()) == 1 and not out.exists()


def test_a_sweep_locks_its_variant_folders(tmp_path, capsys):
  """A sweep holds each variant's folder as a run holds its --out, so that
  train.py cannot write into a live sweep's topk/ (nor the sweep into a
  folder a run holds)."""
  out = tmp_path / "sweep"
  release = outdir.claim(out / "topk")  # as a train.py --out sweep/topk would
  try:
    assert sweep_script.main([*ARGS, "--out", str(out)]) == 2
  finally:
    release()
  assert capsys.readouterr().err.strip() == (
      f"error: --out {out / 'topk'} is in use by another run (pid {os.getpid()}): wait for it "
      f"to end, or use another --out")
  assert not (out / "checkpoints").exists()
