"""Build the feature browser of a trained run: RUN_DIR/browser/, a static site.

    python experiments/browse.py runs/sampled-l8-k64
    python experiments/browse.py runs/sampled-l8-k64 --tokens 200000 --contexts 20

Open RUN_DIR/browser/index.html in a browser (file://; no server, no
network). The contexts come from the run's activation cache (or --cache, of
the same model and hook), or for a --stream run from its text through the
JAX model, decoded with the model's tokenizer.
"""

import argparse
import sys

from sae_jax import browse
from sae_jax import cli


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run_dir", help="a finished run's directory (with saelens/)")
  p.add_argument("--tokens", type=int, default=1_000_000,
                 help="rows read: the last of the data, the held-out rows first (a --stream "
                      "run: the first of its text)")
  p.add_argument("--contexts", type=int, default=20, help="top contexts per latent")
  p.add_argument("--samples", type=int, default=5, help="firings drawn at random per latent")
  p.add_argument("--window", type=int, default=8, help="tokens shown either side")
  p.add_argument("--chunk", type=int, default=256, help="latents per data file")
  p.add_argument("--cache", default=None,
                 help="an activation cache to read instead of the run's data")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  def work():
    index = browse.build(args.run_dir, tokens=args.tokens, contexts=args.contexts,
                         samples=args.samples, window=args.window, chunk=args.chunk,
                         cache=args.cache, progress=not args.no_progress)
    print(f"open {index.resolve().as_uri()}")

  return cli.guarded(work)


if __name__ == "__main__":
  sys.exit(main())
