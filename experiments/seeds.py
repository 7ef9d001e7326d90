"""One table of several seeds: the mean and standard deviation over seeds of
each variant's metrics, from sweeps that differ only in --seed.

    python experiments/seeds.py runs/sweep-s0 runs/sweep-s1 runs/sweep-s2
    python experiments/seeds.py runs/sweep-s* --metrics fvu probe_f1_k1 --csv seeds.csv

Each SWEEP is an `experiments/sweep_l.py --out` folder with its results.csv
Every variant must be in every sweep, trained with the same flags but
--seed (each variant's config.json is compared; the seeds must differ).
Prints a markdown table of "mean ±std" per variant and metric, the standard
deviation the sample's (n − 1); a seed whose value is missing (NaN, as
absorption with nothing to absorb) is left out of its cell and the cell says
over how many seeds it is, "—" where none has one. --csv writes the same
numbers, one row per variant and metric.
"""

import argparse
import csv
import json
import math
import sys

from sae_jax import storage

METRICS = ("fvu", "batch_fvu", "l0", "probe_f1_k1", "probe_f1_k2", "probe_f1_k5",
           "absorption", "absorption_fraction", "pool_jaccard", "top_share",
           "eval_dead_fraction")


def _rows(sweep) -> dict:
  """variant -> {column: text}, from the sweep's results.csv."""
  table = sweep / "results.csv"
  if not table.exists():
    raise ValueError(f"{sweep}: holds no results.csv (not a finished sweep_l.py --out)")
  with table.open() as f:
    return {row["variant"]: row for row in csv.DictReader(f)}


def _config(sweep, variant: str) -> tuple:
  """(the variant's flags but its seed and output folder, its seed)."""
  path = sweep / variant / "config.json"
  if not path.exists():
    raise ValueError(f"{path}: missing, so its flags cannot be compared with the other seeds'")
  config = json.loads(path.read_text())
  config.pop("out", None)
  seed = config.get("train", {}).pop("seed", None)
  return config, seed


def _differences(a: dict, b: dict, prefix: str = "") -> list:
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}{key}.")
    elif x != y:
      out.append(f"{prefix}{key} {x!r} against {y!r}")
  return out


def gather(sweeps: list, metrics: list) -> tuple:
  """(variants, seeds, {variant: {metric: [value per sweep]}}), after
  checking that the sweeps are the same variants and flags at distinct seeds."""
  if len(sweeps) < 2:
    raise ValueError(f"SWEEP: {len(sweeps)} given; a spread needs 2 or more, one per --seed")
  tables = [_rows(s) for s in sweeps]
  variants = list(tables[0])
  if not variants:
    raise ValueError(f"{sweeps[0]}/results.csv holds no variant")
  for sweep, table in zip(sweeps[1:], tables[1:]):
    if set(table) != set(variants):
      only = sorted(set(table) ^ set(variants))
      raise ValueError(f"{sweep} and {sweeps[0]} hold different variants ({', '.join(only)} "
                       f"in only one); give sweeps of the same command at several --seed")
  unknown = [m for m in metrics if m not in tables[0][variants[0]]]
  if unknown:
    allowed = [c for c in tables[0][variants[0]] if c not in ("variant", "selection", "score",
                                                              "l", "groups")]
    raise ValueError(f"--metrics {' '.join(unknown)}: not in {sweeps[0]}'s results; "
                     f"allowed are {', '.join(allowed)}")
  seeds = []
  for variant in variants:
    configs = [_config(s, variant) for s in sweeps]
    for sweep, (config, _) in zip(sweeps[1:], configs[1:]):
      changed = _differences(configs[0][0], config)
      if changed:
        raise ValueError(f"{variant}: {sweep} was trained with other flags than {sweeps[0]} "
                         f"({'; '.join(changed[:3])}); only --seed may differ")
    seeds = [seed for _, seed in configs]
  if len(set(seeds)) < len(seeds):
    raise ValueError(f"the sweeps' seeds are {', '.join(map(str, seeds))}: each sweep must be "
                     f"another --seed")
  values = {v: {m: [float(t[v][m]) if t[v][m] not in ("", None) else math.nan for t in tables]
                for m in metrics} for v in variants}
  return variants, seeds, values


def spread(values: list) -> tuple:
  """(mean, sample standard deviation, n) over the finite values."""
  xs = [x for x in values if math.isfinite(x)]
  n = len(xs)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(xs) / n
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
  return mean, std, n


def cell(values: list) -> str:
  mean, std, n = spread(values)
  if n == 0:
    return "—"
  text = f"{mean:.3f}" + (f" ±{std:.3f}" if n > 1 else "")
  return text if n == len(values) else f"{text} ({n} seeds)"


def table(variants: list, metrics: list, values: dict) -> str:
  lines = ["| variant | " + " | ".join(metrics) + " |",
           "|---|" + "---:|" * len(metrics)]
  lines += [f"| {v} | " + " | ".join(cell(values[v][m]) for m in metrics) + " |"
            for v in variants]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweeps", nargs="+", metavar="SWEEP")
  p.add_argument("--metrics", nargs="+", default=list(METRICS),
                 help=f"results.csv columns (default: {' '.join(METRICS)})")
  p.add_argument("--csv", help="also write variant, metric, mean, std, seeds to this file")
  args = p.parse_args(argv)
  try:
    sweeps = [storage.path(s) for s in args.sweeps]
    variants, seeds, values = gather(sweeps, args.metrics)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"seeds {', '.join(map(str, seeds))}: mean ±standard deviation (n − 1)\n")
  print(table(variants, args.metrics, values), end="")
  if args.csv:
    rows = [[v, m, *spread(values[v][m])] for v in variants for m in args.metrics]
    text = "variant,metric,mean,std,seeds\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    try:
      storage.atomic_write(storage.path(args.csv), lambda f: f.write(text.encode()))
    except OSError as error:
      print(f"error: --csv {args.csv}: {error.strerror or error}", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
