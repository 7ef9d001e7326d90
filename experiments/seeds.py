"""One table of several seeds: the mean and standard deviation over seeds of
each variant's metrics, from sweeps that differ only in --seed.

    python experiments/seeds.py runs/sweep-s0 runs/sweep-s1 runs/sweep-s2
    python experiments/seeds.py runs/sweep-s* --metrics fvu probe_f1_k1 --csv seeds.csv

Each SWEEP is an `experiments/sweep_l.py --out` folder with its results.csv.
Every variant must be in every sweep, trained with the same flags but
--seed (each variant's config.json is compared; the seeds must differ).
Prints a markdown table of "mean ±std" per variant and metric, the standard
deviation the sample's (n − 1); a seed whose value is missing (NaN, as
absorption with nothing to absorb) is left out of its cell and the cell says
over how many seeds it is, "—" where none has one. --csv writes the same
numbers, one row per variant and metric (`sae_jax/seeds.py`).
"""

import argparse
import sys

from sae_jax import seeds
from sae_jax import storage


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweeps", nargs="+", metavar="SWEEP")
  p.add_argument("--metrics", nargs="+", default=list(seeds.METRICS),
                 help=f"results.csv columns (default: {' '.join(seeds.METRICS)})")
  p.add_argument("--csv", help="also write variant, metric, mean, std, seeds to this file")
  args = p.parse_args(argv)
  try:
    variants, seed_list, values = seeds.gather([storage.path(s) for s in args.sweeps],
                                               args.metrics)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"seeds {', '.join(map(str, seed_list))}: mean ±standard deviation (n − 1)\n")
  print(seeds.table(variants, args.metrics, values), end="")
  if args.csv:
    text = seeds.csv_text(variants, args.metrics, values)
    try:
      storage.atomic_write(storage.path(args.csv), lambda f: f.write(text.encode()))
    except OSError as error:
      print(f"error: --csv {args.csv}: {error.strerror or error}", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
