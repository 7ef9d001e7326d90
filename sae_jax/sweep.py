"""The l-spectrum: TopK, BatchTopK and Sampled-SAE over l and scores (and
with Matryoshka groups, Matryoshka BatchTopK and Matryoshka-Sampled), trained
on the same data, seed and token budget, then tabulated and plotted."""

import csv
import dataclasses
import io
import json
import math
import pathlib
import typing

from sae_jax import outdir
from sae_jax import run as run_lib
from sae_jax import storage
from sae_jax import config as config_lib
from sae_jax.runconfig import RunConfig

BASELINES = ("topk", "batchtopk", "matryoshka", "jumprelu")
# Columns of results.csv, after variant, selection, score, l and groups (a
# Matryoshka variant's group sizes, else empty): fvu and l0
# are the saved SAE's (inference mode), batch_fvu and batch_l0 the training
# rule's on the same held-out tokens, fvu_ratio fvu over batch_fvu,
# inference_k the k′ of a variant saved with each token's top k′
# (`inference.py`). The probe_* and absorption* columns (`probing.py`) are of
# the true features on synthetic data (absorption of a hierarchy's parents)
# and of first letters on a cache.
METRICS = ("fvu", "batch_fvu", "fvu_ratio", "inference_k", "cosine", "norm_ratio", "l0",
           "batch_l0", "l0_std", "eval_dead_fraction", "dense_fraction", "top_share",
           "pool_jaccard", "gt_mmcs", "gt_recovered", "gt_recovered_frequent", "gt_recovered_rare",
           "gt_recovered_parent", "gt_recovered_child", "probe_acc_k1", "probe_f1_k1",
           "probe_acc_k2", "probe_f1_k2", "probe_acc_k5", "probe_f1_k5", "probe_acc_dense",
           "probe_f1_dense", "absorption", "absorption_fraction", "absorption_child",
           "absorption_parents", "absorption_letters", "split_latents")
# Plotted against l: higher is better for all but the fvus, l0_std, the dead
# fraction and absorption.
PLOTTED = ("fvu", "batch_fvu", "l0", "batch_l0", "cosine", "l0_std", "top_share",
           "pool_jaccard", "eval_dead_fraction", "gt_recovered", "gt_recovered_frequent",
           "gt_recovered_rare", "gt_recovered_parent", "gt_recovered_child", "probe_f1_k1",
           "probe_f1_k5", "absorption", "absorption_fraction")


def variants(ls: typing.Sequence[float], scores: typing.Sequence[str],
             baselines: typing.Sequence[str] = ("topk", "batchtopk"),
             nested: bool = False) -> list:
  """(name, selection, score, l, matryoshka): the baselines (TopK, BatchTopK,
  Matryoshka BatchTopK, JumpReLU), then Sampled-SAE per score and l, and with `nested`
  (Matryoshka groups given) Matryoshka-Sampled per score and l."""
  for flag, values in (("--ls", [float(l) for l in ls]), ("--scores", list(scores)),
                       ("--baselines", list(baselines))):
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
      shown = ", ".join(f"{v:g}" if isinstance(v, float) else v for v in twice)
      raise ValueError(f"{flag} gives {shown} more than once; each value is one variant")
  unknown = [b for b in baselines if b not in BASELINES]
  if unknown:
    raise ValueError(f"--baselines {' '.join(unknown)}: allowed are {', '.join(BASELINES)}")
  if "matryoshka" in baselines and not nested:
    raise ValueError("--baselines matryoshka needs --matryoshka-groups (the groups' fractions "
                     "of --dict-size)")
  out = [(b, "batchtopk" if b == "matryoshka" else b, "", math.nan, b == "matryoshka")
         for b in baselines]
  out += [(f"sampled-{score}-l{l:g}", "sampled", score, float(l), False)
          for score in scores for l in ls]
  if nested:
    out += [(f"matryoshka-sampled-{score}-l{l:g}", "sampled", score, float(l), True)
            for score in scores for l in ls]
  return out


def variant_configs(base: RunConfig, ls: typing.Sequence[float],
                    scores: typing.Sequence[str],
                    baselines: typing.Sequence[str] = ("topk", "batchtopk")) -> list:
  """(name, selection, score, l, config): each variant's run, in base.out/<name>.
  base.train's Matryoshka groups go to the Matryoshka variants only; JumpReLU
  saves its learned thresholds whatever base.inference says of the others."""
  out = []
  nested = base.train.matryoshka_groups is not None
  for name, selection, score, l, matryoshka in variants(ls, scores, baselines, nested):
    sae = dataclasses.replace(base.train.sae, selection=selection,
                              score=score or base.train.sae.score,
                              l=l if selection == "sampled" else base.train.sae.l)
    train = dataclasses.replace(base.train, sae=sae) if matryoshka else dataclasses.replace(
        base.train, sae=sae, matryoshka_groups=None, matryoshka_weights=None)
    if base.train.b1 == config_lib.default_b1(base.train.sae.selection):
      train = dataclasses.replace(train, b1=None)  # each rule's own default (JumpReLU's is 0)
    inference = "auto" if selection == "jumprelu" else base.inference
    out.append((name, selection, score, l, dataclasses.replace(
        base, out=str(storage.path(base.out) / name), train=train, inference=inference)))
  return out


def sweep(base: RunConfig, ls: typing.Sequence[float], scores: typing.Sequence[str], *,
          baselines: typing.Sequence[str] = ("topk", "batchtopk"), progress: bool = True,
          verify: bool = False, one_pass: bool = True) -> typing.Optional[list]:
  """Trains every variant into base.out/<name>, then writes results.csv,
  results.md and plots.

  One pass (the default): all variants train together on one stream of
  batches (`run.run_many`), each batch read or made once, with one
  checkpoint of every variant in base.out/checkpoints. Sequential: one
  variant after another (`run.run`), each re-reading the data. Either way
  each variant ends bit for bit as when trained alone, finished variants
  (every output written, with this config) are not redone, a variant saved
  with another config is refused, and re-running resumes.

  Args:
    baselines: the variants beside Sampled-SAE (`BASELINES`); "matryoshka"
      needs base.train's Matryoshka groups, which also add a
      Matryoshka-Sampled variant per score and l.
    verify: check every cache shard's sha256 before training.
    one_pass: train the variants together (else one after another).

  Returns:
    The result rows (dicts), or None if SIGTERM stopped the training.

  Raises:
    KeyboardInterrupt: Ctrl-C stopped it (after a checkpoint).
  """
  out = storage.path(base.out)
  runs = variant_configs(base, ls, scores, baselines)
  done = outdir.agreed(lambda: _finished(out, runs), len(runs))
  if one_pass and not all(done):
    if run_lib.run_many([config for *_, config in runs], out, progress=progress,
                        verify=verify) is None:
      print("sweep stopped by SIGTERM: re-run the same command to continue", flush=True)
      return None
  for (name, *_, config), finished in zip(runs, done):
    if not one_pass and not finished:
      print(f"--- {name}", flush=True)
      stopped = run_lib.run(config, progress=progress, verify=verify) is None
      verify = False  # the variants share the data: once is enough
      if stopped:
        print(f"sweep stopped by SIGTERM in {name}: re-run the same command to continue",
              flush=True)
        return None
  if not outdir.writes():  # the tables are process 0's, as the runs' files are
    return []
  rows = []
  for name, selection, score, l, config in runs:
    summary = json.loads((storage.path(config.out) / "summary.json").read_text())
    nested = config.train.nested
    rows.append({"variant": name, "selection": selection, "score": score, "l": l,
                 "groups": "/".join(map(str, nested.sizes)) if nested else "",
                 **{m: math.nan if summary.get(m) is None else summary[m] for m in METRICS}})
  write_tables(rows, out)
  plot(rows, out)
  return rows


def _finished(out: pathlib.PurePath, runs: list) -> list:
  """Whether each variant is finished with its config as this command gives
  it (every output written, and no end-only field changed). A variant that
  trained with another config is refused, with the differences, before
  anything is trained; so is a sweep in a single run's folder."""
  outdir.check_kind(out, sweep=True)
  done, one_pass = [], outdir.saved_a_step(out / "checkpoints")
  for *_, config in runs:
    home = storage.path(config.out)
    # A variant's checkpoints are the pass's (out/checkpoints) or, sequential, its own.
    if home.is_dir() and outdir.trained(home, one_pass or outdir.saved_a_step(
        home / "checkpoints")):
      done.append(bool(outdir.compare(home, config)) and outdir.finished(home))
    else:  # nothing trained: `run` and `run_many` check it
      done.append(False)
  return done


def write_tables(rows: list, out: pathlib.PurePath) -> None:
  """results.csv with every column; results.md with those that hold a value."""
  columns = list(rows[0])
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  (out / "results.csv").write_text(table.getvalue())
  cell = lambda v: "" if isinstance(v, float) and math.isnan(v) else (
      f"{v:.3f}" if isinstance(v, float) else str(v))
  columns = [c for c in columns if any(cell(row[c]) for row in rows)]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list, out: pathlib.PurePath) -> None:
  """plot_<metric>.png: Sampled-SAE and Matryoshka-Sampled against l (one
  line per score), the baselines as horizontal lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  for metric in PLOTTED:
    values = [r[metric] for r in rows]
    if all(isinstance(v, float) and math.isnan(v) for v in values):
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for nested, family, marker in ((False, "Sampled-SAE", "o"), (True, "Matryoshka-Sampled", "s")):
      pooled = [r for r in rows if r["selection"] == "sampled" and bool(r["groups"]) == nested]
      for score in sorted({r["score"] for r in pooled}):
        line = sorted((r["l"], r[metric]) for r in pooled if r["score"] == score)
        ax.plot(*zip(*line), marker=marker, label=f"{family} ({score})")
    for variant, style, color, label in (("batchtopk", "--", "black", "BatchTopK"),
                                         ("topk", ":", "gray", "TopK"),
                                         ("matryoshka", "-.", "tab:red", "Matryoshka BatchTopK"),
                                         ("jumprelu", (0, (5, 1)), "tab:green", "JumpReLU")):
      for r in rows:
        if r["variant"] == variant and not math.isnan(r[metric]):
          ax.axhline(r[metric], linestyle=style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("l (pool = k·l latents)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    (out / f"plot_{metric}.png").write_bytes(png.getvalue())
    plt.close(fig)
