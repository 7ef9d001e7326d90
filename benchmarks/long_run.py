"""Tokens/s before and after latents die, per rule, over a long run.

    python benchmarks/long_run.py                      # D=64, F=2048, k=8, batch 512, 3000 steps
    python benchmarks/long_run.py --width 384 --latents 2048 --k 32 --steps 3000

Trains each rule with `train_loop` on synthetic data with fewer true
features than latents (--features, default F/8), so that many latents stop
firing and, after --dead-tokens, count as dead and turn AuxK on. Logs every
--window steps; a window is "alive" while no latent can be dead (the loop
runs the step compiled without AuxK) and "dead" once the dead fraction is
above zero. Prints a Markdown table: the median tokens/s of each kind of
window (the first window, which compiles, left out), the dead fraction at
the end, and their ratio. Runs unchanged on an accelerator.
"""

import argparse
import statistics

import jax

from sae_jax import hostmem
from sae_jax import synthetic
from sae_jax import loop
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig


def run(rule: str, l: float, args) -> dict:
  source = synthetic.SyntheticSource(synthetic.SyntheticConfig(
      d_model=args.width, n_features=args.features or args.latents // 8, seed=0))
  config = TrainConfig(SAEConfig(args.width, args.latents, k=args.k, selection=rule, l=l),
                       batch_size=args.batch, steps=args.steps, warmup_steps=100,
                       threshold_start=args.steps // 2, dead_tokens=args.dead_tokens)
  state = train.replicate(train.create_train_state(config, source.sample(10**6, 4096)), 1)
  logs = []
  loop.train_loop(state, source.batches(args.batch), log_every=args.window, progress=False,
                   on_log=lambda step, m: logs.append(m))
  alive = [m["tokens_per_second"] for m in logs[1:] if m["dead_fraction"] == 0]
  dead = [m["tokens_per_second"] for m in logs[1:] if m["dead_fraction"] > 0]
  median = lambda xs: statistics.median(xs) if xs else float("nan")
  return {"alive": median(alive), "dead": median(dead), "dead_windows": len(dead),
          "windows": len(logs) - 1, "dead_fraction": logs[-1]["dead_fraction"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--latents", type=int, default=2048)
  parser.add_argument("--features", type=int, default=None, help="default latents / 8")
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--window", type=int, default=100)
  parser.add_argument("--dead-tokens", type=int, default=500 * 512)
  parser.add_argument("--rules", nargs="+", default=["topk", "batchtopk", "sampled:8", "sampled:2"])
  args = parser.parse_args()
  rows = []
  for spec in args.rules:
    rule, _, l = spec.partition(":")
    rows.append((spec, run(rule, float(l or 8), args)))
    print(spec, rows[-1][1], flush=True)
  print(f"\nD={args.width} F={args.latents} k={args.k} batch {args.batch}, {args.steps} steps, "
        f"dead after {args.dead_tokens} tokens, {jax.default_backend()} "
        f"({jax.local_devices()[0].device_kind})\n")
  print("| rule | tokens/s, no latent dead | tokens/s, latents dead | dead / alive | "
        "windows with dead latents | dead fraction at the end |")
  print("|---|---:|---:|---:|---:|---:|")
  for spec, r in rows:
    print(f"| {spec} | {r['alive']:,.0f} | {r['dead']:,.0f} | {r['dead'] / r['alive']:.2f} | "
          f"{r['dead_windows']}/{r['windows']} | {r['dead_fraction']:.3f} |")


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
