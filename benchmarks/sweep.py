"""The l-sweep in one pass against one variant after another, side by side.

    python benchmarks/sweep.py             # docs/l-spectrum.md's 14-variant sweep, and --stream
    python benchmarks/sweep.py --quick     # 200 steps, and 60 --stream steps

Each sweep runs `experiments/sweep_l.py` in a fresh process (startup and
compiles included, as a user pays them), once with `--one-pass` and once
with `--sequential`, into a temporary folder, and prints the wall times and
their ratio, and the training time alone (from each variant's summary.json:
tokens / tokens_per_second; a one-pass variant's rate is the pass's).

1. The synthetic sweep of docs/l-spectrum.md (TopK, BatchTopK, l2 and entropy
   at l = 1, 2, 4, 8, 16, 32: 14 variants; 2000 steps of 256 tokens).
2. `--stream` on a GPT-NeoX built here from a transformers config (random
   weights, --lm-layers blocks of width --lm-width, a word-level tokenizer)
   on text written here: TopK, BatchTopK and l2 at l = 2 and 8 (4 variants).
   One pass runs the model once per batch for all variants; sequentially
   each variant runs it again. Runs unchanged on an accelerator.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import tiny_lm  # noqa: E402  (the test's model builder, at any size)

DOCS_SWEEP = ["--data", "synthetic", "--synthetic-d-model", "32", "--synthetic-features", "128",
                "--rare-fraction", "0.1", "--dict-size", "256", "--k", "4", "--batch-size", "256",
                "--warmup-steps", "100", "--threshold-start", "1000", "--dead-tokens", "51200",
                "--eval-tokens", "8192"]


def sweep_seconds(args: list, out: pathlib.Path) -> tuple:
  """(wall seconds, training seconds summed over the variants' runs, variants)."""
  began = time.perf_counter()
  done = subprocess.run([sys.executable, str(ROOT / "experiments" / "sweep_l.py"), *args,
                         "--no-progress", "--out", str(out)], capture_output=True, text=True,
                        env=dict(os.environ))
  wall = time.perf_counter() - began
  if done.returncode:
    sys.exit(f"sweep_l.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
  summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
  training = [s["tokens"] / s["tokens_per_second"] for s in summaries]
  # One pass: every variant reports the pass's rate, so the pass took one of them.
  one_pass = "--one-pass" in args
  return wall, (max(training) if one_pass else sum(training)), len(summaries)


def compare(name: str, args: list, root: pathlib.Path) -> list:
  one = sweep_seconds([*args, "--one-pass"], root / f"{name}-one")
  each = sweep_seconds([*args, "--sequential"], root / f"{name}-each")
  return [name, one[2], one[0], each[0], each[0] / one[0], one[1], each[1], each[1] / one[1]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000, help="of the synthetic sweep")
  parser.add_argument("--stream-steps", type=int, default=300)
  parser.add_argument("--lm-width", type=int, default=256)
  parser.add_argument("--lm-layers", type=int, default=4)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--quick", action="store_true", help="200 steps, 60 --stream steps")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.stream_steps = min(args.steps, 200), min(args.stream_steps, 60)

  import jax  # noqa: PLC0415 (after the flags: --help needs no JAX)
  device = jax.devices()[0]
  print(f"platform {device.platform}, device {device.device_kind}, {jax.device_count()} devices",
        flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    steps = ["--steps", str(args.steps)]
    if args.steps < 2000:  # docs/l-spectrum.md's schedule, scaled to the steps (last flag wins)
      steps += ["--warmup-steps", str(args.steps // 20), "--threshold-start",
                str(args.steps // 2)]
    rows.append(compare("synthetic, docs/l-spectrum.md (D=32, F=256)", [*DOCS_SWEEP, *steps], root))

    model = tiny_lm.build(root / "model", layers=args.lm_layers, hidden=args.lm_width)
    rng = np.random.default_rng(0)
    words = args.stream_steps * 256 * 2 + 16 * args.context * 4  # twice the tokens needed
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(tiny_lm.WORDS, size=40))
                              for _ in range(words // 40 + 1)) + "\n")
    rows.append(compare(
        f"--stream, GPT-NeoX {args.lm_layers}x{args.lm_width}",
        ["--data", "pythia", "--stream", "--model", str(model), "--dataset", str(text),
         "--hook", f"blocks.{args.lm_layers - 1}.hook_resid_post", "--context-length",
         str(args.context), "--stream-contexts", "64", "--dict-size", str(4 * args.lm_width),
         "--k", "16", "--batch-size", "256", "--steps", str(args.stream_steps),
         "--eval-tokens", "1024", "--calibration-tokens", "2048", "--downstream-contexts", "4",
         "--ls", "2", "8", "--scores", "l2", "--cache-dir", str(root / "cache")], root))

  print("| sweep | variants | one pass s | sequential s | wall ratio | one pass training s "
        "| sequential training s | training ratio |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, n, one, each, ratio, t_one, t_each, t_ratio in rows:
    print(f"| {name} | {n} | {one:.1f} | {each:.1f} | {ratio:.2f}x | {t_one:.1f} | {t_each:.1f} "
          f"| {t_ratio:.2f}x |")


if __name__ == "__main__":
  main()
