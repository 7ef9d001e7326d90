"""First-letter feature absorption and sparse probing of a trained SAE, as
SAEBench measures them, on the language model it was trained on.

    python experiments/absorption.py runs/sampled-l8-k64
    python experiments/absorption.py runs/sweep/batchtopk --words 2000 --model DIR

For words of the model's vocabulary (--words drawn at random), SAEBench's
prompt "{word} has the first letter:" after ten in-context examples runs
through the model in JAX; the saved SAE (RUN/saelens) encodes the
activation at the word. Writes RUN/absorption.json and prints the summary:
the mean full-absorption rate and absorption fraction over the letters whose
probe is good enough, the number of main ("split") latents, and k-sparse
probing of the 26 letters (k = 1, 2, 5) beside a dense probe.
"""

import argparse
import sys

from sae_jax import cli
from sae_jax import spelling


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", help="a finished run's --out (it holds config.json and saelens/)")
  p.add_argument("--words", type=int, default=8000,
                 help="vocabulary words drawn at random; 0 for every word")
  p.add_argument("--model", default=None, help="the model's directory, if not where the run "
                                               "found it")
  p.add_argument("--batch", type=int, default=32, help="prompts per forward pass")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  def work():
    if args.words < 0 or args.batch < 1:
      raise ValueError(f"--words must be >= 0 and --batch >= 1; got {args.words} and "
                       f"{args.batch}")
    result = spelling.evaluate_run(args.run, n_words=args.words or None, seed=args.seed,
                                   batch=args.batch, model=args.model,
                                   progress=not args.no_progress)
    for name, value in result.items():
      if name != "per_letter":
        print(f"{name}: {value}")

  return cli.guarded(work)


if __name__ == "__main__":
  sys.exit(main())
