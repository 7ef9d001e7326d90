"""--latent-shards end to end: one pass of TopK, BatchTopK and Sampled-SAE
(scores l2 and leverage), latents dying all along, on 4 devices as 4 x 1,
2 x 2 and 1 x 4 and on one device alone, ends with the same saved SAEs up to
rounding; a run checkpointed at M = 2 resumes at M = 1."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import xla
from tests.helpers import SMALL
from tests.helpers import TRAIN
from tests.helpers import cli
from tests.helpers import outputs
from tests.helpers import subprocess_run
from tests.helpers import sweep_script
from tests.helpers import wait_for_step

STEPS = 40
# Latents silent for 2 batches are dead: AuxK runs on most steps.
RECIPE = ["--data", "synthetic", "--steps", STEPS, "--dead-tokens", 128, "--log-every", 1]
SWEEP = [*SMALL, *map(str, RECIPE), "--baselines", "topk", "batchtopk", "--ls", "4",
         "--scores", "l2", "leverage"]
NAMES = ["topk", "batchtopk", "sampled-l2-l4", "sampled-leverage-l4"]
# After 40 steps the sums over latents, added in another order, leave the
# weights this close (measured: ~1e-6 relative at most).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  root = tmp_path_factory.mktemp("latent")
  out = {}
  for m in (1, 2, 4):
    out[m] = root / f"m{m}"
    assert sweep_script.main([*SWEEP, "--latent-shards", str(m), "--out", str(out[m])]) == 0
  out["one device"] = root / "alone"
  alone = subprocess.run([sys.executable, str(TRAIN.parent / "sweep_l.py"), *SWEEP,
                          "--out", str(out["one device"])], env=xla.env(1),
                         capture_output=True, text=True, timeout=600)
  assert alone.returncode == 0, alone.stderr[-3000:]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_latent_shards_end_as_one_device(sweeps, name):
  runs = {m: outputs(out / name) for m, out in sweeps.items()}
  want = runs[1]
  assert max(m["auxk_loss"] for m in want["metrics"]) > 0  # latents died, AuxK ran
  assert max(m["dead_fraction"] for m in want["metrics"]) > 0
  for m, got in runs.items():
    # The same selections on every step: L0 and the dead latents.
    for a, b in zip(got["metrics"], want["metrics"]):
      assert (a["l0"], a["dead_fraction"]) == (b["l0"], b["dead_fraction"]), (m, a["step"])
      assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
    for key, w in want["weights"].items():
      np.testing.assert_allclose(got["weights"][key], w, rtol=RTOL, atol=ATOL,
                                 err_msg=f"{m}: {key}")
    assert got["cfg"] == want["cfg"]
    assert got["summary"]["fvu"] == pytest.approx(want["summary"]["fvu"], rel=RTOL)
    assert got["summary"]["l0"] == pytest.approx(want["summary"]["l0"], rel=1e-3)


@pytest.mark.slow
def test_a_run_checkpointed_at_two_latent_shards_resumes_at_one(tmp_path, capsys):
  """SIGTERM at M = 2, then the same command at M = 1: the checkpoint, saved
  whole, is split anew; the run ends as one never stopped, up to rounding."""
  args = ["--selection", "batchtopk", "--steps", 60, "--dead-tokens", 128, "--log-every", 1]
  straight = tmp_path / "straight"
  assert cli("--data", "synthetic", *args, "--out", straight) == 0
  resumed = tmp_path / "resumed"
  process = subprocess_run(resumed, 60, ["--selection", "batchtopk", "--dead-tokens", "128",
                                         "--ckpt-every", "10", "--latent-shards", "2"])
  wait_for_step(resumed, 25, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0 and "stopped by SIGTERM" in stdout, stderr[-3000:]
  config = json.loads((resumed / "config.json").read_text())
  assert config["latent_shards"] == 2 and config["numerics"]["latent_shards"] == 2

  capsys.readouterr()
  assert cli("--data", "synthetic", *args, "--latent-shards", 1, "--out", resumed) == 0
  said = capsys.readouterr().out
  assert "resuming with --latent-shards 1 a run checkpointed with 2" in said
  a, b = outputs(straight), outputs(resumed)
  assert [m["step"] for m in b["metrics"]] == list(range(1, 61))
  for key, w in a["weights"].items():
    np.testing.assert_allclose(b["weights"][key], w, rtol=RTOL, atol=ATOL, err_msg=key)
  assert [m["l0"] for m in a["metrics"]] == [m["l0"] for m in b["metrics"]]


@pytest.mark.slow
def test_an_end_of_run_too_big_for_one_device_runs_split(tmp_path, monkeypatch):
  """Where the whole SAE's end of run cannot fit on one device
  (`memory.splits_end`, here a device made small), a --latent-shards run
  calibrates and evaluates over the latent groups, and saves the SAE the
  whole end saves: the same parameters, θ and metrics up to the rounding of
  the encoder's sums per shard."""
  from sae_jax import inference  # noqa: PLC0415
  from sae_jax import latent_calibration  # noqa: PLC0415
  from sae_jax import latent_evaluate  # noqa: PLC0415
  from sae_jax import memory  # noqa: PLC0415

  args = ["--data", "synthetic", "--selection", "batchtopk", "--steps", 20, "--batch-size", 256,
          "--latent-shards", 2]
  assert cli(*args, "--out", tmp_path / "whole") == 0
  assert cli(*args, "--inference", "global", "--out", tmp_path / "whole-global") == 0
  used = []
  for module, name in ((latent_calibration, "calibrate"), (latent_evaluate, "both_modes")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: (
        used.append(name), real(*a, **k))[1])
  # Training needs about 49 KiB a device here; the whole end 72 KiB.
  monkeypatch.setattr(memory, "device_memory", lambda: 60 * 2**10)
  def whole_sae_pass(*args):
    raise AssertionError("the choice of rule ran a pass over the whole SAE")
  monkeypatch.setattr(inference, "_errors", whole_sae_pass)
  assert cli(*args, "--out", tmp_path / "split") == 0
  assert used == ["calibrate", "both_modes"]
  used.clear()
  whole, split = outputs(tmp_path / "whole"), outputs(tmp_path / "split")
  for key, w in whole["weights"].items():
    np.testing.assert_allclose(split["weights"][key], w, rtol=1e-5, err_msg=key)
  assert split["cfg"] == whole["cfg"]
  for key in ("fvu", "batch_fvu", "calibration_fvu_per_latent", "calibration_fvu_training_rule"):
    assert split["summary"][key] == pytest.approx(whole["summary"][key], rel=1e-5), key
  assert split["summary"]["l0"] == pytest.approx(whole["summary"]["l0"], rel=1e-3)
  # --inference global: the EMA threshold judged over the mesh too.
  assert cli(*args, "--inference", "global", "--out", tmp_path / "split-global") == 0
  read = lambda name: json.loads((tmp_path / name / "summary.json").read_text())
  got, want = read("split-global"), read("whole-global")
  assert used == ["calibrate", "both_modes"]  # split again
  assert got["inference"] == want["inference"] == "global"
  for key in ("fvu", "calibration_fvu_global", "calibration_fvu_topk"):
    assert got[key] == pytest.approx(want[key], rel=1e-5), key
  # 515 held-out rows: the last batch's odd row does not split over 2 data shards.
  assert cli(*args, "--eval-tokens", 515, "--out", tmp_path / "odd") == 0
  odd = json.loads((tmp_path / "odd" / "summary.json").read_text())
  assert odd["eval_rows"] == 514 and odd["fvu"] == pytest.approx(split["summary"]["fvu"], rel=0.2)
