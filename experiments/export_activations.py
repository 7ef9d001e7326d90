"""Export a language model's activations at a hook (a block's input, attention
output, MLP output or output; docs/activations.md) to an activation cache.

    python experiments/export_activations.py --out cache/pythia-160m-l6
    python experiments/export_activations.py --model path/to/model --dataset a.txt b.txt \
        --hook blocks.2.hook_resid_post --tokens 1000000 --dtype bfloat16 --out cache/mine

Re-running the same command resumes an interrupted export. Defaults follow
SPEC.md: Pythia-160M, block 6, the Pile (streamed), context 1024.
"""

import argparse
import dataclasses
import os
import sys

from sae_jax import cli
from sae_jax import export


def parse(argv=None) -> tuple[export.ExportConfig, str]:
  d = export.ExportConfig.__dataclass_fields__
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=d["model"].default, help="hub id or local directory")
  p.add_argument("--revision", default=None, help="hub revision: branch, tag or commit")
  p.add_argument("--hook", default=d["hook"].default,
                 help="blocks.N.hook_resid_pre, blocks.N.hook_attn_out, blocks.N.hook_mlp_out, "
                      "blocks.N.hook_resid_post or blocks.N.ln2.hook_normalized (an encoder's: "
                      "blocks.N.hook_normalized_resid_post)")
  p.add_argument("--target-hook", default=None,
                 help="a transcoder's target: each row holds --hook's and this later hook's "
                      "activations, [rows, 2, D] (docs/transcoders.md)")
  p.add_argument("--dataset", nargs="+", default=[d["dataset"].default],
                 help="a hub dataset name, or local .txt / .jsonl files")
  p.add_argument("--split", default=d["split"].default)
  p.add_argument("--text-field", default=d["text_field"].default)
  p.add_argument("--context-length", type=int, default=d["context_length"].default)
  p.add_argument("--tokens", type=int, default=d["tokens"].default, help="rows to export")
  p.add_argument("--dtype", choices=export.DTYPES, default=d["dtype"].default)
  p.add_argument("--shard-rows", type=int, default=d["shard_rows"].default)
  p.add_argument("--batch-contexts", type=int, default=d["batch_contexts"].default)
  p.add_argument("--exclude-token-ids", type=int, nargs="*", default=[],
                 help="token ids whose rows are left out (Pythia's <|endoftext|> is 0)")
  p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
  p.add_argument("--backend", choices=export.BACKENDS, default=None,
                 help="run the model in jax or torch (default: jax where JAX sees an "
                      "accelerator, else torch)")
  p.add_argument("--out", required=True, help="the cache directory")
  for flag in ("--distributed", "--coordinator", "--num-processes", "--process-id"):
    p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  several = [f"--{k.replace('_', '-')}" for k in ("distributed", "coordinator", "num_processes",
                                                  "process_id") if getattr(args, k) is not None]
  if several:
    raise ValueError(f"{several[0]}: the export runs as one process (its shards are written "
                     f"in order, by one writer); run it once, on one host, into storage every "
                     f"host reads, then train there with --distributed")
  local = all(os.path.isfile(x) or x.endswith((".txt", ".jsonl")) for x in args.dataset)
  if len(args.dataset) > 1 and not local:
    p.error("--dataset takes one hub dataset name, or local .txt/.jsonl files")
  fields = {f.name for f in dataclasses.fields(export.ExportConfig)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  values["dataset"] = tuple(args.dataset) if local else args.dataset[0]
  values["exclude_token_ids"] = tuple(args.exclude_token_ids)
  return export.ExportConfig(**values), args.out


def main(argv=None) -> int:
  def work():
    config, out = parse(argv)
    manifest = export.export_activations(config, out)
    print(f"{out}: {manifest['total_tokens']} rows of {config.hook} "
          f"(D={manifest['d_model']}, {config.dtype}) in {len(manifest['shards'])} shards")

  return cli.guarded(work)


if __name__ == "__main__":
  sys.exit(main())
