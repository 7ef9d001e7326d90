"""The l-spectrum: TopK, BatchTopK and Sampled-SAE at several l and scores, on
the same data, seed and token budget.

    python experiments/sweep_l.py --data synthetic --rare-fraction 0.1 --out runs/sweep
    python experiments/sweep_l.py --data acts.npy --ls 1 4 16 --scores l2 --out runs/sweep-npy

Takes every flag of train.py. Writes <out>/<variant>/ (a full run each),
results.csv, results.md and plot_<metric>.png. Re-running skips finished runs
and resumes the rest; SIGTERM or Ctrl-C stops the sweep after a checkpoint.
"""

import pathlib
import sys

from sae_jax import cli
from sae_jax import sweep


def main(argv=None) -> int:
  p = cli.parser(__doc__)
  p.add_argument("--ls", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
  p.add_argument("--scores", nargs="+", default=["l2", "entropy"])
  args = p.parse_args(argv)
  if args.out is None:
    args.out = "runs/sweep"

  def work():
    base = cli.config_from(args)
    for score in args.scores:
      cli.check_sampled(base, args.ls, score)
    if sweep.sweep(base, args.ls, args.scores, progress=not args.no_progress,
                   verify=args.verify) is not None:
      print((pathlib.Path(args.out) / "results.md").read_text())

  return cli.guarded(work, distributed=args.distributed)


if __name__ == "__main__":
  sys.exit(main())
