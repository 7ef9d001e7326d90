"""Several seeds of one sweep as one table: each variant's mean and sample
standard deviation per metric, from `sweep_l.py --out` folders that differ
only in --seed (`experiments/seeds.py`)."""

import csv
import json
import math

from sae_jax.runconfig import RECORDS

METRICS = ("fvu", "batch_fvu", "l0", "probe_f1_k1", "probe_f1_k2", "probe_f1_k5",
           "absorption", "absorption_fraction", "pool_jaccard", "top_share",
           "eval_dead_fraction")
_DESCRIBING = ("variant", "selection", "score", "l", "groups")


def _read(path, what: str):
  """A file's text, or one line naming it."""
  try:
    return path.read_text()
  except OSError as error:
    raise ValueError(f"{path}: cannot read {what} ({error.strerror or error})") from None


def _rows(sweep) -> dict:
  """variant -> {column: text}, from the sweep's results.csv."""
  table = sweep / "results.csv"
  if not table.exists():
    raise ValueError(f"{sweep}: holds no results.csv (not a finished sweep_l.py --out)")
  return {row["variant"]: row for row in csv.DictReader(_read(table, "results").splitlines())}


def _config(sweep, variant: str) -> tuple:
  """(the variant's flags but its seeds and output folder, its seed). The
  records beside the flags (the data's fingerprint, the devices) are left
  out: they describe a run, not what it was asked to do."""
  path = sweep / variant / "config.json"
  if not path.exists():
    raise ValueError(f"{path}: missing, so its flags cannot be compared with the other seeds'")
  try:
    config = json.loads(_read(path, "the run's config"))
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
  for key in ("out", *RECORDS):
    config.pop(key, None)
  seed = config.get("train", {}).pop("seed", None)
  config.get("synthetic", {}).pop("seed", None)  # --seed draws the synthetic data too
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
  """The sweeps' metrics side by side, after checking that they are one
  command at several seeds.

  Args:
    sweeps: `sweep_l.py --out` folders (paths).
    metrics: results.csv columns.

  Returns:
    (variants, seeds, {variant: {metric: [float per sweep, NaN where empty]}}).
  """
  if len(sweeps) < 2:
    raise ValueError(f"SWEEP: {len(sweeps)} given; a spread needs 2 or more, one per --seed")
  tables = [_rows(s) for s in sweeps]
  variants = list(tables[0])
  if not variants:
    raise ValueError(f"{sweeps[0]}/results.csv holds no variant")
  for sweep, table in zip(sweeps, tables):
    if set(table) != set(variants):
      only = sorted(set(table) ^ set(variants))
      raise ValueError(f"{sweep} and {sweeps[0]} hold different variants ({', '.join(only)} "
                       f"in only one); give sweeps of the same command at several --seed")
    columns = table[variants[0]]
    unknown = [m for m in metrics if m not in columns]
    if unknown:
      allowed = [c for c in columns if c not in _DESCRIBING]
      raise ValueError(f"--metrics {' '.join(unknown)}: not in {sweep}'s results; "
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
  number = lambda text: float(text) if text not in ("", None) else math.nan
  values = {v: {m: [number(t[v][m]) for t in tables] for m in metrics} for v in variants}
  return variants, seeds, values


def spread(values: list) -> tuple:
  """(mean, sample standard deviation, n) over the finite values.

  >>> spread([1.0, 3.0, float("nan")])
  (2.0, 1.4142135623730951, 2)
  """
  xs = [x for x in values if math.isfinite(x)]
  n = len(xs)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(xs) / n
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
  return mean, std, n


def cell(values: list) -> str:
  """"mean ±std", over how many seeds where some have no value, "—" where none has.

  >>> cell([1.0, 3.0, float("nan")])
  '2.000 ±1.414 (2 of 3 seeds)'
  """
  mean, std, n = spread(values)
  if n == 0:
    return "—"
  text = f"{mean:.3f}" + (f" ±{std:.3f}" if n > 1 else "")
  return text if n == len(values) else f"{text} ({n} of {len(values)} seeds)"


def table(variants: list, metrics: list, values: dict) -> str:
  """A Markdown table of `cell`s: a row per variant, a column per metric."""
  lines = ["| variant | " + " | ".join(metrics) + " |",
           "|---|" + "---:|" * len(metrics)]
  lines += [f"| {v} | " + " | ".join(cell(values[v][m]) for m in metrics) + " |"
            for v in variants]
  return "\n".join(lines) + "\n"


def csv_text(variants: list, metrics: list, values: dict) -> str:
  """variant, metric, mean, std, seeds: a row per variant and metric."""
  rows = [[v, m, *spread(values[v][m])] for v in variants for m in metrics]
  return "variant,metric,mean,std,seeds\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
