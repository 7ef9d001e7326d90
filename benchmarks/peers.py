"""Our TopK, BatchTopK, Matryoshka BatchTopK and JumpReLU next to
dictionary_learning's trainers, on the same data.

    python benchmarks/peers.py                  # the activation-lottery regime, seeds 0 1 2
    python benchmarks/peers.py --data acts.npy --dict-size 2048 --k 32 --batch-size 512 \\
        --steps 3000 --seeds 0

Both sides get the same batches in the same order, scaled by the same
constant (E||x||² = D), and the same recipe: lr, warm-up, decay over the last
20%, threshold start, dead-latent window, AuxK (D/2 latents, weight 1/32),
clip 1.0; JumpReLU: Adam's b1 = 0 (our default for it, and fixed by
dictionary_learning), target L0
k, its sparsity warm-up over the first 20% of the steps. Each side keeps its
own initialisation (ours: b_dec from a 4096-row sample; theirs: from the
first batch; JumpReLU's b_dec is 0 on both). By default the data are
synthetic with a known dictionary (D=32, 128 directions, 13 rare ones firing
20x less often with 8x the magnitude); `--data` takes any [N, D] .npy, whose
last --eval-tokens rows are held out and the rest drawn in a seeded order.

Prints a Markdown table per seed and the mean over seeds: held-out FVU and
L0 in inference mode (BatchTopK by the global EMA threshold on both sides,
dictionary_learning's rule, not train.py's per-latent one; TopK per token;
JumpReLU by its learned thresholds), recovered
true directions (best decoder cosine >= 0.9; overall, frequent, rare) where
the dictionary is known, and steady-state tokens/s (the median over the
second half of each run's windows of 50 steps, or of a tenth of a shorter
run, so that neither compilation nor warm-up counts). Needs `pip install --no-deps
dictionary-learning==0.1.0 einops`. Runs unchanged on an accelerator (ours
on JAX's default device; theirs on torch's CUDA device if there is one).
"""

import argparse
import statistics
import time

import jax
import numpy as np
import torch

import dl_reference
from sae_jax import evaluate
from sae_jax import hostmem
from sae_jax import model
from sae_jax import synthetic
from sae_jax import loop
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig

EVAL_STEP = 2**31 - 2  # the synthetic batch index of the held-out rows


def window(steps: int) -> int:
  """Steps per timing window: 50, or a tenth of a short run, so that the
  second half of the windows holds no compilation (ours) or warm-up (theirs)."""
  return max(1, min(50, steps // 10))


def steady_rate(rates: list, steps: int) -> float:
  """The median tokens/s over the second half of the whole windows."""
  whole = rates[:steps // window(steps)]  # a short last window left out
  return statistics.median(whole[len(whole) // 2:])


class Data:
  """Training batches by step and held-out rows, the same for both sides."""

  def __init__(self, args, seed: int):
    self.batch_size = args.batch_size
    if args.data == "synthetic":
      self.source = synthetic.SyntheticSource(synthetic.SyntheticConfig(
          d_model=32, n_features=128, rare_fraction=0.1, seed=seed))
      self.held_out = self.source.sample(EVAL_STEP, args.eval_tokens)
      self.dictionary, self.classes = self.source.dictionary, self.source.config.feature_class()
    else:
      rows = np.load(args.data, mmap_mode="r")
      if rows.ndim != 2 or len(rows) < args.eval_tokens + args.batch_size:
        raise SystemExit(f"--data {args.data}: need [N, D] rows, more than --eval-tokens "
                         f"{args.eval_tokens} plus one batch; got shape {rows.shape}")
      self.source, self.dictionary = None, None
      self.rows, self.held_out = rows[:-args.eval_tokens], np.asarray(rows[-args.eval_tokens:])
      self.order = np.random.default_rng(seed).permutation(len(self.rows))
    self.d_model = self.held_out.shape[1]

  def batch(self, step: int) -> np.ndarray:
    if self.source is not None:
      return self.source.sample(step, self.batch_size)
    n = len(self.order) // self.batch_size
    i = (step % n) * self.batch_size
    return np.asarray(self.rows[np.sort(self.order[i:i + self.batch_size])], np.float32)


def summary(data: Data, W_dec_FxD, z, xhat, rates: list, steps: int) -> dict:
  row = {k: evaluate.reconstruction_metrics(data.held_out, xhat, z)[k] for k in ("fvu", "l0")}
  if data.dictionary is not None:
    gt = evaluate.ground_truth_metrics(W_dec_FxD, data.dictionary, data.classes)
    row.update(recovered=gt["gt_recovered"], frequent=gt["gt_recovered_frequent"],
               rare=gt["gt_recovered_rare"])
  row["tokens_per_second"] = steady_rate(rates, steps)
  return row


def run_ours(config: TrainConfig, data: Data) -> dict:
  state = train.create_train_state(config, sample(data))
  rates = []
  state = loop.train_loop(
      train.replicate(state, 1), (data.batch(s)[None] for s in range(config.total_steps)),
      log_every=window(config.total_steps), progress=False,
      on_log=lambda step, m: rates.append(m["tokens_per_second"]))
  state = train.unreplicate(state)
  theta = state.params.get("threshold", state.threshold)  # JumpReLU's are learned
  z, xhat = evaluate.reconstruct(state.params, theta, state.input_scale,
                                 data.held_out, model.SAE(config.sae))
  return summary(data, state.params["W_dec"], z, xhat, rates, config.total_steps)


def sample(data: Data) -> np.ndarray:
  """Ours: the initialisation sample (input scale, b_dec), 4096 training rows."""
  n = -(-4096 // data.batch_size)
  return np.concatenate([data.batch(s) for s in range(n)])[:4096]


def run_theirs(config: TrainConfig, data: Data, scale: np.float32) -> dict:
  torch.manual_seed(config.seed)
  trainer = dl_reference.make_trainer(config)
  rates, start, every = [], time.perf_counter(), window(config.total_steps)
  for step in range(config.total_steps):
    dl_reference.update(trainer, step, data.batch(step) * scale)
    if (step + 1) % every == 0:
      if torch.cuda.is_available():
        torch.cuda.synchronize()
      now = time.perf_counter()
      rates.append(every * config.batch_size / (now - start))
      start = now
  z = dl_reference.encode(trainer, data.held_out * scale)
  xhat = dl_reference.decode(trainer, z) / scale
  return summary(data, dl_reference.get_params(trainer)["W_dec"], z / scale, xhat, rates,
                 config.total_steps)


def table(rows: list, columns: list) -> str:
  cell = lambda v: f"{v:,.0f}" if isinstance(v, float) and v > 100 else (
      f"{v:.3f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="synthetic", help="synthetic, or an [N, D] .npy")
  parser.add_argument("--dict-size", type=int, default=256)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(F / 2^14)")
  parser.add_argument("--warmup-steps", type=int, default=200)
  parser.add_argument("--threshold-start", type=int, default=200)
  parser.add_argument("--dead-tokens", type=int, default=51200)
  parser.add_argument("--eval-tokens", type=int, default=8192)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--rules", nargs="+",
                      choices=("topk", "batchtopk", "matryoshka", "jumprelu"),
                      default=["batchtopk", "topk", "matryoshka", "jumprelu"])
  parser.add_argument("--matryoshka-groups", type=float, nargs="+", default=[0.25, 0.25, 0.5],
                      help="the matryoshka rule's groups (fractions of --dict-size)")
  parser.add_argument("--bandwidth", type=float, default=TrainConfig.bandwidth,
                      help="the jumprelu rule's (dictionary_learning's default)")
  parser.add_argument("--sparsity-penalty", type=float, default=TrainConfig.sparsity_penalty,
                      help="the jumprelu rule's (dictionary_learning's default)")
  args = parser.parse_args()

  results = []
  for seed in args.seeds:
    data = Data(args, seed)
    scale = np.float32(train.estimate_input_scale(sample(data)))  # ours computes the same
    for rule in args.rules:
      nested = rule == "matryoshka"
      config = TrainConfig(
          SAEConfig(data.d_model, args.dict_size, k=args.k,
                    selection="batchtopk" if nested else rule),
          batch_size=args.batch_size, steps=args.steps, lr=args.lr,
          warmup_steps=args.warmup_steps, threshold_start=args.threshold_start,
          dead_tokens=args.dead_tokens, seed=seed,
          matryoshka_groups=tuple(args.matryoshka_groups) if nested else None,
          bandwidth=args.bandwidth, sparsity_penalty=args.sparsity_penalty)
      for side, fn in (("dictionary_learning", lambda: run_theirs(config, data, scale)),
                       ("sae_jax", lambda: run_ours(config, data))):
        row = dict(fn(), rule=rule, trainer=side, seed=seed)
        results.append(row)
        print(f"seed {seed} {rule} {side}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)

  columns = ["rule", "trainer", "seed", "fvu", "l0", "recovered", "frequent", "rare",
             "tokens_per_second"]
  columns = [c for c in columns if any(c in r for r in results)]
  jump = (f", jumprelu bandwidth {args.bandwidth:g}, sparsity penalty {args.sparsity_penalty:g}"
          if "jumprelu" in args.rules else "")
  print(f"\n{jax.devices()[0].platform}, D={data.d_model}, F={args.dict_size}, "
        f"k={args.k}, batch {args.batch_size}, {args.steps} steps, seeds {args.seeds}{jump}\n")
  print(table(results, columns))
  means = []
  for rule in args.rules:
    for side in ("dictionary_learning", "sae_jax"):
      rows = [r for r in results if r["rule"] == rule and r["trainer"] == side]
      means.append({"rule": rule, "trainer": side, "seed": "mean",
                    **{c: float(np.mean([r[c] for r in rows])) for c in columns[3:]}})
    ref, ours = means[-2], means[-1]
    ours["fvu vs reference"] = ours["fvu"] / ref["fvu"]
    ours["speed vs reference"] = ours["tokens_per_second"] / ref["tokens_per_second"]
  print("\nMean over seeds:\n")
  print(table(means, columns + ["fvu vs reference", "speed vs reference"]))


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
