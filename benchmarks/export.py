"""Export speed: our hooked export vs a plain loop of full forward passes that
read `hidden_states`, on a tiny model and a Pythia-160M-shaped random model.

    python benchmarks/export.py

Both sides run the same contexts through the same weights on the CPU (torch).
Ours stops at the hooked block and writes float32 shards (sha256 included);
the reference computes every block and the LM head and keeps the array. The
table reports tokens/s and the ratio, measured side by side in this run.
"""

import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from sae_jax import contexts as contexts_lib  # noqa: E402
from sae_jax import export  # noqa: E402
from sae_jax import hooks  # noqa: E402
from tests import tiny_lm  # noqa: E402

REPEATS = 3


def texts(path: pathlib.Path, n_docs: int) -> tuple:
  rng = np.random.default_rng(0)
  path.write_text("\n".join(" ".join(rng.choice(tiny_lm.WORDS, size=200)) for _ in range(n_docs)))
  return (str(path),)


def reference(config: export.ExportConfig, n_rows: int) -> None:
  """A plain loop: full model, output_hidden_states, then the rows at the hook."""
  tok = transformers.AutoTokenizer.from_pretrained(config.model)
  model = transformers.AutoModelForCausalLM.from_pretrained(config.model).eval()
  index = hooks.hidden_states_index(config.hook)
  batch, rows = [], 0
  contexts = contexts_lib.contexts(config, tok)
  with torch.inference_mode():
    while rows < n_rows:
      batch = np.stack([next(contexts) for _ in range(config.batch_contexts)])
      hidden = model(torch.as_tensor(batch), output_hidden_states=True).hidden_states[index]
      rows += hidden[:, 1:].reshape(-1, hidden.shape[-1]).numpy().shape[0]


def timed(fn) -> float:
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  torch.manual_seed(0)
  shapes = [("tiny (3 blocks, D=16), block 1, L=128", dict(layers=3, hidden=16), 1, 128, 32),
            ("Pythia-160M-shaped (12 blocks, D=768), block 6, L=1024",
             dict(layers=12, hidden=768), 6, 1024, 2)]
  print("| model | tokens | ours tok/s | full forward tok/s | speed-up |")
  print("|---|---:|---:|---:|---:|")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for name, shape, layer, length, batch in shapes:
      model_dir = tiny_lm.build(tmp / name.split()[0], **shape)
      if shape["hidden"] == 768:  # Pythia's vocabulary, so the LM head costs what it does
        cfg = transformers.GPTNeoXConfig.from_pretrained(model_dir)
        cfg.vocab_size, cfg.num_attention_heads, cfg.intermediate_size = 50304, 12, 3072
        transformers.GPTNeoXForCausalLM(cfg).save_pretrained(model_dir)
      n_rows = 4 * batch * (length - 1)  # four forward batches
      config = export.ExportConfig(model=str(model_dir), hook=f"blocks.{layer}.hook_resid_post",
                                   dataset=texts(tmp / f"{name.split()[0]}.txt", 400),
                                   context_length=length, tokens=n_rows, shard_rows=4096,
                                   batch_contexts=batch)

      def ours():
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        export.export_activations(config, tmp / "cache", progress=False)

      t_ours, t_ref = timed(ours), timed(lambda: reference(config, n_rows))
      print(f"| {name} | {n_rows} | {n_rows / t_ours:,.0f} | {n_rows / t_ref:,.0f} | "
            f"{t_ref / t_ours:.2f}x |")


if __name__ == "__main__":
  main()
