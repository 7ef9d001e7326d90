"""A small l-sweep on synthetic data, end to end, and its resume."""

import csv
import shutil

import numpy as np

from tests import scripts

sweep_script = scripts.load("sweep_l")

ARGS = ["--data", "synthetic", "--synthetic-d-model", "16", "--synthetic-features", "32",
        "--rare-fraction", "0.1", "--parents", "2", "--children", "3", "--dict-size", "64",
        "--k", "4", "--batch-size", "64", "--steps", "30", "--warmup-steps", "5",
        "--threshold-start", "10", "--eval-tokens", "512", "--calibration-tokens", "1024",
        "--ls", "1", "16", "--scores", "l2", "leverage", "--sketch", "16", "--no-progress"]


def read_rows(out):
  with open(out / "results.csv") as f:
    return list(csv.DictReader(f))


def test_sweep_end_to_end_and_resume(tmp_path, capsys):
  out = tmp_path / "sweep"
  assert sweep_script.main([*ARGS, "--out", str(out)]) == 0
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
  assert "| absorption |" in table and "sampled-leverage-l16" in capsys.readouterr().out
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
