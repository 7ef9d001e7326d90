"""Training-step time next to its floor, the encoder forward matmul.

    python benchmarks/train_step.py                       # B=1024, D=768, F=24576, K=64
    python benchmarks/train_step.py --latents 65536
    python benchmarks/train_step.py --batch 256 --latents 4096 --repeats 3

Prints a Markdown table: median step time, tokens/s, ratio to the encoder
forward matmul x @ W_enc (the floor: the one B·D·F matmul a step cannot
skip; measured before every row, median over the run), and speed-up over the
dense autodiff step of the same rule. Steps run on one device, state donated, as `train_loop` runs
them: with no latent dead, through `p_train_step_all_alive` (no AuxK, as in
most of training); the Sampled l=8 rows with a fraction of the latents dead
(`--dead`) run the form `train_loop` picks for that many
(`p_train_step_packed` at the smallest capacity that holds them, or F),
and their last column is the ratio to the all-alive step;
two more rows give the packed step with none dead and the general step with
the smallest fraction dead. The `+auxk` rows have every latent dead.
TopK, BatchTopK and AuxK run once per layout of their entries' gradients
(`TrainConfig.layout`: entries, codes). The Matryoshka rows train BatchTopK
and Sampled l=8 with `--matryoshka-groups` (nested prefixes: each group's
share decoded apart); their last column is the ratio to the same rule's
step without groups. The JumpReLU row is its autodiff step, against the
dense BatchTopK step in the speed-up column. `--quick` measures
only the fast steps, 3 repeats; `--compute-dtype both` prints a table for
float32 and one for bfloat16.
Runs unchanged on CPU, GPU and TPU.
"""

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import hostmem
from sae_jax import loop
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from timing import median_seconds


def step_seconds(config: TrainConfig, x_1xBxD, repeats: int, dead=None, step_fn=None) -> float:
  """Median step time: with dead=None of `p_train_step_all_alive`; else
  with the first `dead` fraction of the latents silent for dead_steps
  (those the step's batch does not select are dead), of `step_fn`, by
  default the form `train_loop` picks for that many."""
  state = train.create_train_state(config, x_1xBxD[0][:256])
  n_dead = 0 if dead is None else round(dead * config.sae.n_latents)
  if dead is not None:
    silent_F = jnp.where(jnp.arange(config.sae.n_latents) < n_dead, config.dead_steps, 0)
    state = state.replace(steps_since_fired_F=silent_F.astype(jnp.int32))
  holder = {"state": train.replicate(state, 1)}
  if step_fn is None:
    step_fn = train.p_train_step_all_alive if dead is None else loop._step_for(config, n_dead)

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], x_1xBxD)
    jax.block_until_ready((holder["state"], metrics))

  return median_seconds(one_step, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--latents", type=int, default=24576)
  parser.add_argument("--k", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="fast steps only, 3 repeats")
  parser.add_argument("--dead", type=float, nargs="*",
                      default=[1 / 64, 1 / 16, 1 / 4, 1 / 2, 3 / 4],
                      help="fractions of dead latents for the Sampled l=8 rows")
  parser.add_argument("--compute-dtype", choices=("float32", "bfloat16", "both"),
                      default="float32")
  parser.add_argument("--matryoshka-groups", type=float, nargs="+",
                      default=[0.125, 0.125, 0.25, 0.5],
                      help="the Matryoshka rows' groups (fractions of --latents)")
  args = parser.parse_args()
  if args.quick:
    args.repeats = min(args.repeats, 3)
  B, D, F = args.batch, args.width, args.latents
  keys = jax.random.split(jax.random.key(0), 2)
  x_1xBxD = jax.device_put(jax.random.normal(keys[0], (1, B, D)), jax.local_devices()[0])
  W_DxF = jax.random.normal(keys[1], (D, F)) / np.sqrt(D)
  dtypes = ("float32", "bfloat16") if args.compute_dtype == "both" else (args.compute_dtype,)
  for compute_dtype in dtypes:
    table(args, compute_dtype, x_1xBxD, W_DxF)


def table(args, compute_dtype: str, x_1xBxD, W_DxF):
  """Measures and prints the table for one compute dtype."""
  B, D, F, k = args.batch, args.width, args.latents, args.k
  dtype = jnp.dtype(compute_dtype)
  encode = jax.jit(lambda x, w: jnp.matmul(x.astype(dtype), w.astype(dtype),
                                           preferred_element_type=jnp.float32))
  # The machine's speed drifts over a run: the floor is measured before every
  # row, and the ratios use the median of those measurements.
  floor_now = lambda: median_seconds(encode, x_1xBxD[0], W_DxF, repeats=args.repeats)

  base = TrainConfig(SAEConfig(D, F, k=k, compute_dtype=compute_dtype), batch_size=B,
                     steps=10**6, warmup_steps=10, threshold_start=1)
  variants = [("topk", None), ("batchtopk", None), ("sampled", 1.0), ("sampled", 8.0),
              ("sampled", 64.0)]
  rows = []  # (name, seconds, selection, floor seconds, seconds of the all-alive step)
  dense = {}

  def measure(name, selection, config, dead=None, step_fn=None, alive=None):
    floor = floor_now()
    rows.append((name, step_seconds(config, x_1xBxD, args.repeats, dead, step_fn), selection,
                 floor, alive))
    return rows[-1][1]

  for selection, l in variants:
    sae = dataclasses.replace(base.sae, selection=selection, l=l or base.sae.l)
    name = selection if l is None else f"{selection} l={l:g}"
    if args.quick and l not in (None, 8.0):
      continue
    if l in (None, 8.0) and not args.quick:  # the dense reference, per rule
      dense[selection] = measure(f"dense step, {name}", selection,
                                 dataclasses.replace(base, sae=sae, step="dense"))
    config = dataclasses.replace(base, sae=sae, step="fast")
    # TopK's and BatchTopK's entries, and AuxK's, in each layout.
    for layout in ("entries", "codes"):
      if l is None:
        measure(f"fast step, {name}, by {layout}", selection,
                dataclasses.replace(config, layout=layout))
      elif l == 8.0:
        measure(f"fast step, {name}, +auxk by {layout} (all dead)", selection,
                dataclasses.replace(config, layout=layout), dead=1.0)
    if l is not None:
      alive = measure(f"fast step, {name}", selection, config)
    if l == 8.0 and args.dead:  # the forms train_loop picks while latents are dead
      config = dataclasses.replace(config, seed=10)
      capacities = train.packed_capacities(config)
      for dead in args.dead:
        step_fn = loop._step_for(config, round(dead * F))  # the loop's choice
        capacity = getattr(step_fn, "keywords", {}).get("capacity")
        form = ("all alive" if capacity is None else "dense gradients, no branch"
                if capacity == F else f"packed into {capacity}")
        measure(f"fast step, {name}, {dead:g} of latents dead ({form})", selection, config,
                dead=dead, step_fn=step_fn, alive=alive)
      if capacities:
        measure(f"fast step, {name}, none dead (packed into {capacities[0]})", selection, config,
                dead=0.0, step_fn=train.p_train_step_packed, alive=alive)
      measure(f"fast step, {name}, {args.dead[0]:g} of latents dead (general, as before)",
              selection, config, dead=args.dead[0], step_fn=train.p_train_step, alive=alive)
  # Matryoshka: the same rules with nested groups, against each without.
  plain = {row[0]: row[1] for row in rows}
  groups = tuple(args.matryoshka_groups)
  for selection, l in (("batchtopk", None), ("sampled", 8.0)):
    sae = dataclasses.replace(base.sae, selection=selection, l=l or base.sae.l)
    name = selection if l is None else f"{selection} l={l:g}"
    config = dataclasses.replace(base, sae=sae, step="fast", matryoshka_groups=groups)
    if not args.quick:
      dense[f"matryoshka {selection}"] = measure(
          f"dense step, Matryoshka {name}", f"matryoshka {selection}",
          dataclasses.replace(config, step="dense"))
    for layout in ("entries", "codes") if l is None else ("auto",):
      label = f", by {layout}" if l is None else ""
      measure(f"fast step, Matryoshka {name}{label} ({len(groups)} groups)",
              f"matryoshka {selection}", dataclasses.replace(config, layout=layout),
              alive=plain[f"fast step, {name}{label}"])
  # JumpReLU: its codes are not a selection of k entries, so its one step is
  # the autodiff one (dense decoder forward and backward); against BatchTopK's.
  dense["jumprelu"] = dense.get("batchtopk")
  measure("step, JumpReLU (autodiff; x: the dense BatchTopK step)", "jumprelu",
          dataclasses.replace(base, sae=dataclasses.replace(base.sae, selection="jumprelu")))
  floor = statistics.median(row[3] for row in rows)
  rows.insert(0, ("encoder matmul x @ W_enc (floor, median over the run)", floor, None, floor,
                  None))

  print(f"\nB={B} D={D} F={F} k={k} compute_dtype={compute_dtype} "
        f"backend={jax.default_backend()} ({jax.local_devices()[0].device_kind}), "
        f"median of {args.repeats}\n")
  print("| step | median ms | tokens/s | x floor | speed-up over dense | x all-alive "
        "(Matryoshka: x without groups) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, seconds, selection, _, alive in rows:
    speedup = f"{dense[selection] / seconds:.2f}x" if dense.get(selection) else ""
    vs_alive = f"{seconds / alive:.2f}" if alive else ""
    print(f"| {name} | {seconds * 1e3:.1f} | {B / seconds:,.0f} | {seconds / floor:.2f} | "
          f"{speedup} | {vs_alive} |")


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
