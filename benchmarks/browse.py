"""Time and size of the feature browser for a wide SAE.

    python benchmarks/browse.py                       # F=65536, 100k tokens, D=64
    python benchmarks/browse.py --tokens 1000000 --d-model 768

A tiny random GPT-NeoX (width --d-model) exports --tokens rows of random
words into a cache; a random JumpReLU SAE of --latents latents (thresholds
set so that about --active fire per token) is saved as a finished
Sampled-SAE run's saelens/ (k=64, l=8, batches of 4096); then
`browse.build` writes the site. Prints the time of each part and the
site's size on disk. The pass is linear in the tokens; what is
written per latent (its contexts, histogram, neighbours, logit lens) is not.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sae_jax import browse  # noqa: E402
from sae_jax import export  # noqa: E402
from sae_jax.config import SAEConfig  # noqa: E402
from sae_jax.config import TrainConfig  # noqa: E402
from tests import tiny_lm  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=100_000)
  p.add_argument("--latents", type=int, default=65536)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--active", type=int, default=64, help="latents firing per token, about")
  p.add_argument("--contexts", type=int, default=20)
  p.add_argument("--dir", default=None, help="work here (default: a temporary folder)")
  args = p.parse_args(argv)
  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="browse-bench-"))
  rng = np.random.default_rng(0)

  began = time.perf_counter()
  model = tiny_lm.build(root / "model", hidden=args.d_model)
  text = root / "words.txt"
  words = rng.choice(tiny_lm.WORDS, size=(args.tokens // 20 + 10, 24))
  text.write_text("\n".join(" ".join(line) for line in words) + "\n")
  cache = root / "cache"
  export.export_activations(export.ExportConfig(
      model=str(model), hook="blocks.1.hook_resid_post", dataset=(str(text),),
      context_length=64, tokens=args.tokens, shard_rows=65536, batch_contexts=64,
      backend="jax"), cache, progress=False)
  exported = time.perf_counter() - began

  from safetensors.numpy import save_file
  acts = np.load(cache / "acts-00000.npy")[:4096]
  D, F = args.d_model, args.latents
  W_enc = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
  b_dec = acts.mean(0).astype(np.float32)
  h = (acts - b_dec) @ W_enc
  threshold = np.quantile(h, 1 - args.active / F, axis=0).astype(np.float32)
  run = root / "run"
  (run / "saelens").mkdir(parents=True, exist_ok=True)
  save_file({"W_enc": W_enc, "W_dec": np.ascontiguousarray(W_enc.T), "b_enc": np.zeros(F, np.float32),
             "b_dec": b_dec, "threshold": threshold}, str(run / "saelens" / "sae_weights.safetensors"))
  manifest = json.loads((cache / "manifest.json").read_text())
  (run / "saelens" / "cfg.json").write_text(json.dumps({
      "architecture": "jumprelu", "d_in": D, "d_sae": F,
      "metadata": {"model_name": manifest["model"], "hook_name": manifest["hook"]}}))
  # A Sampled-SAE run (k=64, l=8, batches of 4096): the browser adds each
  # latent's share of the batches whose pool held it.
  train = TrainConfig(SAEConfig(D, F, k=64, l=8.0), batch_size=4096, steps=10**5)
  (run / "config.json").write_text(json.dumps({
      "data": str(cache), "eval_tokens": 65536, "stream": False, "train": train.to_dict()}))
  (run / "summary.json").write_text(json.dumps({"input_scale": 1.0}))

  began = time.perf_counter()
  index = browse.build(run, tokens=args.tokens, contexts=args.contexts, progress=True)
  built = time.perf_counter() - began
  files = [f for f in index.parent.rglob("*") if f.is_file()]
  size = sum(f.stat().st_size for f in files)
  chunks = [f for f in files if f.name.startswith("latents-")]
  print("\n| latents | D | tokens | export | build | site size | files | largest chunk |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  print(f"| {F} | {D} | {args.tokens} | {exported:.1f} s | {built:.1f} s | "
        f"{size / 2**20:.1f} MiB | {len(files)} | "
        f"{max(f.stat().st_size for f in chunks) / 2**20:.2f} MiB |")
  print(f"index.js {(index.parent / 'data' / 'index.js').stat().st_size / 2**20:.2f} MiB; "
        f"site in {index.parent}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
