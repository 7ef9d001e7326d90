"""The inference-threshold calibration in two passes against the bisection it
replaced (the count, then 32 passes), side by side on the same SAE and tokens.

    python benchmarks/calibration.py                          # D=768, F=24576, k=64, 8 batches
    python benchmarks/calibration.py --d-model 384 --latents 4096 --k 32 --batch 256 --batches 32

The SAE is freshly initialised on synthetic activations (BatchTopK, or
--selection sampled); the tokens are --batches batches of --batch. Checks
that both give the same thresholds, bit for bit, then prints a Markdown
table: the time of each (after one call that compiles it) and their ratio.
Runs unchanged on CPU, GPU and TPU.
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sae_jax import model  # noqa: E402
from sae_jax import synthetic  # noqa: E402
from sae_jax import thresholds  # noqa: E402
from sae_jax.config import SAEConfig  # noqa: E402
from tests import reference  # noqa: E402


def seconds(fn) -> tuple:
  """(result, wall seconds) of fn(), its JAX results waited for."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return result, time.perf_counter() - start


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d-model", type=int, default=768)
  p.add_argument("--latents", type=int, default=24576)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--selection", choices=("batchtopk", "sampled"), default="batchtopk")
  args = p.parse_args(argv)
  config = SAEConfig(args.d_model, args.latents, k=args.k, selection=args.selection)
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(
      d_model=args.d_model, n_features=2 * args.d_model, active=32))
  x = source.sample(0, args.batch * args.batches)
  sae = model.SAE(config)
  params = model.init_params(jax.random.key(0), sae, jnp.asarray(x[:4096]))["params"]
  x_NxBxD = jnp.asarray(thresholds.batches(x, args.batch))

  calibrate = lambda: thresholds.calibrate(params, x, sae, batch_size=args.batch).threshold_F
  count = lambda: thresholds.calibrate(params, x, sae, batch_size=args.batch,
                                      per_latent=False).counts_F
  bisect = lambda: reference.bisected_thresholds(params, x_NxBxD, sae, count())
  counts_F = count()
  rows = []
  for name, fn in (("two passes (count, then each batch's few largest per latent)", calibrate),
                   ("bisection on the float bits (count, then 32 passes)", bisect)):
    _, first = seconds(fn)
    theta_F, again = seconds(fn)
    rows.append((name, first, again, theta_F))
  same = np.array_equal(rows[0][3].view(np.int32), rows[1][3].view(np.int32))
  if not same:
    print("the two calibrations differ", file=sys.stderr)
    return 1
  print(f"{jax.devices()[0].device_kind}, D={args.d_model}, F={args.latents}, k={args.k}, "
        f"{args.selection}, {args.batches} batches of {args.batch} tokens; "
        f"thresholds equal bit for bit ({int(np.sum(counts_F > 0))} latents selected)\n")
  print("| calibration | first call (compiles) | second call | second call / two passes' |")
  print("|---|---:|---:|---:|")
  for name, first, again, _ in rows:
    print(f"| {name} | {first:.2f} s | {again:.2f} s | {again / rows[0][2]:.1f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
