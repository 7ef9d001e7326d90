"""The l-spectrum: TopK, BatchTopK and Sampled-SAE at several l and scores, on
the same data, seed and token budget.

    python experiments/sweep_l.py --data synthetic --rare-fraction 0.1 --out runs/sweep
    python experiments/sweep_l.py --data acts.npy --ls 1 4 16 --scores l2 --out runs/sweep-npy
    python experiments/sweep_l.py --data synthetic --parents 8 --baselines topk batchtopk matryoshka --matryoshka-groups 0.25 0.25 0.5 --out runs/sweep-matryoshka

Takes every flag of train.py. All variants train in one pass over the data
(`--one-pass`, the default: each batch is read, or made by the model, once
and given to every variant's step), with one checkpoint of the whole sweep in
<out>/checkpoints; `--sequential` trains them one after another.
`--matryoshka-groups` adds a Matryoshka-Sampled variant per score and l, and
`--baselines ... matryoshka` Matryoshka BatchTopK; the other variants keep
the plain loss. `--baselines ... jumprelu` adds JumpReLU (its target L0
--target-l0, default --k). Writes
<out>/<variant>/ (a full run each, but its checkpoints), results.csv,
results.md and plot_<metric>.png. Re-running resumes; SIGTERM or Ctrl-C stops
the sweep after a checkpoint.
"""

import os
import signal
import sys

STOPPED = b"\nCtrl-C: stopped at once (no file is left half-written); re-run to go on\n"
if __name__ == "__main__":  # as in train.py: until training begins, Ctrl-C exits at once
  signal.signal(signal.SIGINT, lambda *_: (os.write(2, STOPPED), os._exit(130)))

from sae_jax import hostmem  # noqa: E402  (light: JAX is not imported yet)

if __name__ == "__main__":
  hostmem.use_tcmalloc()  # as in train.py, before JAX's import

from sae_jax import cli  # noqa: E402
from sae_jax import storage  # noqa: E402
from sae_jax import sweep  # noqa: E402


def main(argv=None) -> int:
  p = cli.parser(__doc__)
  p.add_argument("--ls", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
  p.add_argument("--scores", nargs="+", default=["l2", "entropy"])
  p.add_argument("--baselines", nargs="+", default=["topk", "batchtopk"],
                 help=f"variants beside Sampled-SAE, of {', '.join(sweep.BASELINES)}; "
                      f"matryoshka needs --matryoshka-groups, which also add a "
                      f"Matryoshka-Sampled variant per score and l")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--one-pass", dest="one_pass", action="store_true", default=True,
                    help="train every variant together on one pass over the data (default)")
  mode.add_argument("--sequential", dest="one_pass", action="store_false",
                    help="train the variants one after another, each re-reading the data")
  args = p.parse_args(argv)
  ignored = [f"--{dest} {getattr(args, dest)}" for dest in ("l", "score")
             if getattr(args, dest) != p.get_default(dest)]
  if ignored:
    print(f"note: {' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing in a "
          f"sweep: --ls and --scores set each Sampled-SAE variant's", flush=True)
  if args.out is None:
    args.out = "runs/sweep"

  def work():
    base = cli.config_from(args)
    for score in args.scores:
      cli.check_sampled(base, args.ls, score)
    if sweep.sweep(base, args.ls, args.scores, baselines=args.baselines,
                   progress=not args.no_progress,
                   verify=args.verify, one_pass=args.one_pass) is not None:
      print((storage.path(args.out) / "results.md").read_text())

  return cli.guarded(work, flags=args)


if __name__ == "__main__":
  sys.exit(main())
