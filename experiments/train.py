"""Train a Sampled-SAE (or BatchTopK / TopK) on language-model activations.

    python experiments/train.py --l 8 --k 64
        Pythia-160M block 6 on the Pile: the activation cache is exported to
        --cache-dir first if it is missing (needs hub access).
    python experiments/train.py --l 8 --k 64 --stream
        The same with no cache: the JAX model makes the activations on the
        training devices as it trains (for TPU VMs and GPUs).
    python experiments/train.py --data synthetic --l 8 --k 64 --dict-size 4096 --steps 2000
        Offline, on synthetic activations with a known dictionary.
    python experiments/train.py --data acts.npy --l 8 --k 64
        Any [N, D] .npy file, or a cache directory from export_activations.py.

Outputs in --out (default runs/<selection>-l<l>-k<k>): config.json, metrics.jsonl,
checkpoints/, summary.json and saelens/ (cfg.json + sae_weights.safetensors).
Re-running the same command resumes. SIGTERM, or Ctrl-C, saves a checkpoint
and exits; a second Ctrl-C exits at once. On several hosts, add --distributed
(a TPU pod), or --coordinator HOST:PORT --num-processes N --process-id I.
"""

import os
import signal
import sys

# Until training begins, Ctrl-C exits at once. Starting takes seconds (the
# script re-executes itself under tcmalloc; JAX starts once the flags parse), and a
# KeyboardInterrupt there was swallowed (the run trained to the end, exit 0)
# or crashed the interpreter at exit. While the run trains, its own handler
# (sae_jax.run.Stopper) finishes the step and saves a checkpoint; outside
# training every write is atomic, so stopping at once loses nothing.
STOPPED = b"\nCtrl-C: stopped at once (no file is left half-written); re-run to go on\n"
if __name__ == "__main__":
  signal.signal(signal.SIGINT, lambda *_: (os.write(2, STOPPED), os._exit(130)))

from sae_jax import hostmem  # noqa: E402  (light: JAX is not imported yet)

if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused; re-executes before JAX's 1.6 s import

from sae_jax import cli  # noqa: E402  (light too: --help and a bad flag answer at once)


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  args = parser.parse_args(argv)
  ignored = cli.ignored_flags(parser, args)
  if ignored:
    rule = f"--score {args.score}" if args.selection == "sampled" else f"--selection {args.selection}"
    print(f"note: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing with "
          f"{rule}", flush=True)

  def work() -> None:
    from sae_jax import run  # noqa: PLC0415 (JAX starts once the flags are checked)
    run.run(cli.config_from(args), progress=not args.no_progress, verify=args.verify)

  return cli.guarded(work, flags=args, check=lambda: cli.check_flags(args))


if __name__ == "__main__":
  sys.exit(main())
