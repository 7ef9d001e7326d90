"""The end of a run (calibration and evaluation) whole on one device, and
split over M latent groups, as a run too wide for one device does it.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/latent_end.py
    python benchmarks/latent_end.py --latents 65536 --batch 4096     # on 4+ accelerators

For each rule (TopK, BatchTopK, Sampled l=8) and each M dividing the device
count: the calibration (`thresholds.calibrate` whole, on the first device;
`latent_calibration.calibrate` over a (devices / M) x M mesh), with the
errors `--inference auto` chooses by, and the evaluation's one encoding of
the held-out rows (`evaluate.both_modes`, `latent_evaluate.both_modes`);
the floor a device needs for it (the parameters and one batch's [B, F]
activations that it holds of them), its median time and the ratio to
whole, and the share of latents whose θ differs from whole's (a D-term
sum rounds per shard; `docs/meshes.md`). Fake CPU devices share the host's
cores: there the times show the overhead of the split, not a speed-up.
Runs unchanged on GPU and TPU.
"""

import argparse

import jax
import numpy as np

from sae_jax import evaluate
from sae_jax import latent_calibration
from sae_jax import latent_evaluate
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import thresholds
from sae_jax.config import SAEConfig
from latent_shards import RULES
from latent_shards import mib
from timing import median_seconds

def floor_bytes(d: int, f: int, batch: int, data_shards: int, latent_shards: int) -> int:
  """What one device holds of the end: its share of the float32 parameters
  and of one batch's [B, F] activations."""
  params = 4 * (2 * d * f // latent_shards + f // latent_shards + d)
  return params + 4 * (batch // data_shards) * (f // latent_shards)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--latents", type=int, default=16384)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--calibration-batches", type=int, default=8)
  p.add_argument("--eval-batches", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  n = jax.device_count()
  shards = [m for m in (2, 4, 8, 16) if n % m == 0 and args.latents % m == 0
            and args.batch % (n // m) == 0]
  rng = np.random.default_rng(0)
  rows = args.batch * (args.calibration_batches + args.eval_batches)
  x_NxD = (rng.standard_normal((rows, args.dim)) * rng.uniform(0.5, 2, args.dim)
           ).astype(np.float32)
  calibration_rows, held_out = np.split(x_NxD, [args.batch * args.calibration_batches])
  print(f"{n} x {jax.devices()[0].platform}; B={args.batch}, D={args.dim}, F={args.latents}, "
        f"k={args.k}; {len(calibration_rows)} calibration and {len(held_out)} held-out rows\n")
  print("| rule | mesh (data x latent) | floor a device, MiB | calibration s | vs whole | "
        "evaluation s | vs whole | θ not whole's |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name, rule in RULES.items():
    sae = model.SAE(SAEConfig(args.dim, args.latents, k=args.k, **rule))
    params = model.init_params(jax.random.key(0), sae, calibration_rows[:256])["params"]
    ends = {1: (lambda: thresholds.calibrate(
                    params, calibration_rows, sae, batch_size=args.batch, rule_errors=True),
                lambda: evaluate.both_modes(params, 0.0, 1.0, held_out, sae, sae, args.batch))}
    for m in shards:
      mesh = mesh_lib.make_mesh(n, m)
      ends[m] = (lambda mesh=mesh: latent_calibration.calibrate(
                     params, calibration_rows, sae, batch_size=args.batch, mesh=mesh,
                     rule_errors=True),
                 lambda mesh=mesh: latent_evaluate.both_modes(
                     params, 0.0, 1.0, held_out, sae, sae, batch_size=args.batch, mesh=mesh))
    whole_theta, base = None, None
    for m, (calibrate, both) in ends.items():
      theta = calibrate().threshold_F
      whole_theta = theta if whole_theta is None else whole_theta
      seconds = (median_seconds(calibrate, repeats=args.repeats),
                 median_seconds(both, repeats=args.repeats))
      base = base or seconds
      data_shards = 1 if m == 1 else n // m
      mesh_name = "1 device, whole" if m == 1 else f"{data_shards} x {m}"
      print(f"| {name} | {mesh_name} | "
            f"{mib(floor_bytes(args.dim, args.latents, args.batch, data_shards, m))} | "
            f"{seconds[0]:.2f} | {base[0] / seconds[0]:.2f}x | {seconds[1]:.2f} | "
            f"{base[1] / seconds[1]:.2f}x | {np.mean(theta != whole_theta):.2%} |")


if __name__ == "__main__":
  main()
