"""Per-device memory and step time with the latents split over M devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/latent_shards.py
    python benchmarks/latent_shards.py --latents 65536 --batch 4096     # on 4+ accelerators

For each rule (TopK, BatchTopK, Sampled l=8) and each M dividing the device
count (1, 2, 4, ...), on a (devices / M) x M mesh: the bytes of the state
(parameters, Adam moments, counters) that device 0 holds, measured on the
placed arrays; `memory.memory_per_device`'s floor for a device (state,
gradient and encoder activations); and the median step time of
`latent_step.p_train_step`, with the ratio to M = 1 on the same mesh size.
The replicated fast step (`train.p_train_step_all_alive`, the default at
M = 1) is printed beside it. Every step has some latents dead (AuxK runs).
Fake CPU devices share the host's cores: there the times show the
overhead of the split, not a speed-up. Runs unchanged on GPU and TPU.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import latent_step
from sae_jax import memory
from sae_jax import mesh as mesh_lib
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from timing import median_seconds

RULES = {"TopK": dict(selection="topk"), "BatchTopK": dict(selection="batchtopk"),
         "Sampled l=8": dict(selection="sampled", l=8.0)}


def device0_bytes(state) -> int:
  """Bytes of the state's arrays on the first device."""
  first = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == first)


def mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--latents", type=int, default=16384)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--dead", type=float, default=0.25, help="fraction of latents dead")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  n = jax.device_count()
  shards = [m for m in (1, 2, 4, 8, 16) if n % m == 0 and args.latents % m == 0]
  rng = np.random.default_rng(0)
  x_BxD = (rng.standard_normal((args.batch, args.dim)) * rng.uniform(0.5, 2, args.dim)
           ).astype(np.float32)
  print(f"{n} x {jax.devices()[0].platform}; B={args.batch}, D={args.dim}, F={args.latents}, "
        f"k={args.k}, {args.dead:.0%} of the latents dead\n")
  print("| rule | mesh (data x latent) | state on device 0, MiB | floor a device, MiB | "
        "step ms | tokens/s | vs M=1 |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name, rule in RULES.items():
    config = TrainConfig(SAEConfig(args.dim, args.latents, k=args.k, **rule),
                         batch_size=args.batch, steps=1000, warmup_steps=10, threshold_start=0)
    state = train.create_train_state(config, x_BxD[:256])
    silent_F = jnp.where(jnp.arange(args.latents) < args.dead * args.latents,
                         config.dead_steps, 0).astype(jnp.int32)
    state = state.replace(steps_since_fired_F=silent_F)

    def timed(step_fn, placed, n_data):
      holder, batch = {"state": placed}, train.shard_batch(x_BxD, n_data)

      def one():
        holder["state"], metrics = step_fn(holder["state"], batch)
        return metrics["loss"]

      return median_seconds(one, repeats=args.repeats)

    replicated = train.replicate(state)
    held = device0_bytes(replicated)  # before the steps donate it
    seconds = timed(train.p_train_step, replicated, n)
    floor = memory.memory_per_device([config], n)
    print(f"| {name} | {n} x 1, replicated fast step | {mib(held)} | "
          f"{mib(floor['state'] + floor['activations'])} | {1e3 * seconds:.1f} | "
          f"{args.batch / seconds:,.0f} | |")
    base = None
    for m in shards:
      grid = np.array(jax.devices()).reshape(-1, m)
      mesh = jax.sharding.Mesh(grid, (mesh_lib.DATA, mesh_lib.LATENT))
      placed = mesh_lib.place(state, mesh)
      held = device0_bytes(placed)
      seconds = timed(latent_step.p_train_step, placed, n // m)
      base = base or seconds
      floor = memory.memory_per_device([config], n, latent_shards=m)
      print(f"| {name} | {n // m} x {m} | {mib(held)} | "
            f"{mib(floor['state'] + floor['activations'])} | {1e3 * seconds:.1f} | "
            f"{args.batch / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
  main()
