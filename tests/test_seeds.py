"""experiments/seeds.py (sae_jax/seeds.py): the mean and spread over seeds of
sweeps' results, against NumPy, and its refusals of sweeps that are not the
same command at other seeds."""

import json
import math

import numpy as np

from sae_jax import sweep as sweep_lib
from sae_jax.config import SAEConfig
from sae_jax.config import SyntheticConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig
from tests import scripts

seeds = scripts.load("seeds")
VARIANTS = ("topk", "sampled-l2-l4")


def fake_sweep(root, seed, values, *, k=4, variants=VARIANTS, data="pythia"):
  """A sweep folder as sweep_l.py leaves it: results.csv (the sweep's own
  writer) and each variant's config.json, with the records a run adds (its
  devices differ from seed to seed here)."""
  out = root / f"s{seed}"
  out.mkdir()
  rows = []
  for i, name in enumerate(variants):
    config = RunConfig(train=TrainConfig(sae=SAEConfig(d_model=8, n_latents=32, k=k),
                                         seed=seed), out=str(out / name), data=data,
                       synthetic=SyntheticConfig(d_model=8, seed=seed))
    recorded = config.to_dict() | {"numerics": {"x64": False, "devices": 1 + seed},
                                   "data_fingerprint": {"kind": data, "seed": seed}}
    (out / name).mkdir()
    (out / name / "config.json").write_text(json.dumps(recorded))
    rows.append({"variant": name, "selection": "topk", "score": "", "l": math.nan,
                 "groups": "", **{m: math.nan for m in sweep_lib.METRICS},
                 **{m: v[i] for m, v in values.items()}})
  sweep_lib.write_tables(rows, out)
  return out


def test_mean_and_sample_std_equal_numpy(tmp_path, capsys):
  rng = np.random.default_rng(0)
  fvu = rng.random((3, 2))
  absorption = np.array([[0.1, math.nan], [0.3, math.nan], [math.nan, math.nan]])
  sweeps = [fake_sweep(tmp_path, s, {"fvu": fvu[s], "absorption": absorption[s]})
            for s in range(3)]
  assert seeds.main([str(s) for s in sweeps] + ["--metrics", "fvu", "absorption",
                                                "--csv", str(tmp_path / "t.csv")]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("seeds 0, 1, 2:")
  rows = {line.split(" | ")[0][2:]: line for line in printed.splitlines() if line[2:4] in
          ("to", "sa")}
  for i, name in enumerate(VARIANTS):
    assert f"{fvu[:, i].mean():.3f} ±{fvu[:, i].std(ddof=1):.3f}" in rows[name]
  assert f"0.200 ±{np.std([0.1, 0.3], ddof=1):.3f} (2 of 3 seeds)" in rows["topk"]
  assert rows["sampled-l2-l4"].endswith("| — |")
  csv_rows = [line.split(",") for line in (tmp_path / "t.csv").read_text().splitlines()[1:]]
  fvu_row = next(r for r in csv_rows if r[:2] == ["topk", "fvu"])
  np.testing.assert_allclose([float(fvu_row[2]), float(fvu_row[3])],
                             [fvu[:, 0].mean(), fvu[:, 0].std(ddof=1)], rtol=1e-12)
  assert fvu_row[4] == "3"


def test_refuses_what_is_not_one_command_at_other_seeds(tmp_path, capsys):
  one = {"fvu": [0.1, 0.2]}
  a, b = fake_sweep(tmp_path, 0, one), fake_sweep(tmp_path, 1, one)

  def refused(args, *words):
    assert seeds.main([str(x) for x in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
      assert word in err, err

  refused([a], "2 or more")
  refused([a, tmp_path], "no results.csv")
  refused([a, b, "--metrics", "fvu", "nonsense"], "--metrics nonsense", "allowed are", "fvu")
  refused([a, a], "seeds are 0, 0")
  (tmp_path / "k").mkdir()
  refused([a, fake_sweep(tmp_path / "k", 1, one, k=8)], "topk:", "train.sae.k 4 against 8",
          "only --seed")
  (tmp_path / "v").mkdir()
  refused([a, fake_sweep(tmp_path / "v", 2, {"fvu": [0.1]}, variants=("topk",))],
          "different variants", "sampled-l2-l4")
  (tmp_path / "c").mkdir()
  short = fake_sweep(tmp_path / "c", 3, one)
  (short / "results.csv").write_text("variant,fvu\ntopk,0.1\nsampled-l2-l4,0.2\n")
  refused([a, short, "--metrics", "fvu", "l0"], "--metrics l0: not in", str(short))
  (b / "topk" / "config.json").write_text("{")
  refused([a, b], "config.json: not JSON")
  assert seeds.main([str(a), str(fake_sweep(tmp_path / "c", 4, one))]) == 0


def test_synthetic_sweeps_at_several_seeds_are_one_command(tmp_path, capsys):
  """--seed also draws the synthetic data (its section's seed), and the
  records beside the flags differ from run to run: neither is a flag."""
  one = {"fvu": [0.1, 0.2]}
  sweeps = [str(fake_sweep(tmp_path, s, one, data="synthetic")) for s in (0, 1)]
  assert seeds.main(sweeps) == 0
  assert "seeds 0, 1" in capsys.readouterr().out
