"""Language-model forward speed: the JAX GPT-NeoX up to a block vs transformers.

    python benchmarks/lm_forward.py                 # Pythia-160M-shaped, block 6, 4 x 1024 tokens
    python benchmarks/lm_forward.py --contexts 2 --context 256 --repeats 2
    python benchmarks/lm_forward.py --quick         # 2 contexts, 2 repeats

A randomly initialised Pythia-160M-shaped model (12 blocks, D=768, 12 heads,
vocab 50304, rotary 0.25, parallel residual) is saved as safetensors; the
JAX side loads it with `sae_jax.neox.load` and runs `resid_at`, the torch
side runs transformers' model until the block's forward hook stops it (as
the torch export does). Both see the same tokens; the outputs are checked
equal before timing. The last row is a round of `train.py --stream` on the
same contexts (one device): the forward pass into the on-device buffer, its
shuffle, and every batch of --batch rows taken from it. Prints tokens/s and
the ratio, measured side by side. Runs unchanged on CPU, GPU (torch on CUDA)
and TPU (torch on the host CPU).
"""

import argparse
import pathlib
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from sae_jax import hostmem  # noqa: E402
from sae_jax import neox  # noqa: E402
from sae_jax import stream  # noqa: E402
from sae_jax import train  # noqa: E402
from timing import median_seconds  # noqa: E402


class _Stop(Exception):
  pass


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--layer", type=int, default=6, help="blocks.N.hook_resid_post")
  parser.add_argument("--context", type=int, default=1024)
  parser.add_argument("--contexts", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=1024, help="--stream: rows per training step")
  parser.add_argument("--quick", action="store_true", help="2 contexts, 2 repeats")
  args = parser.parse_args()
  if args.quick:
    args.contexts, args.repeats = min(args.contexts, 2), min(args.repeats, 2)

  import torch  # noqa: PLC0415 (the reference only)
  import transformers  # noqa: PLC0415
  hf_config = transformers.GPTNeoXConfig(
      vocab_size=50304, hidden_size=args.width, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, intermediate_size=4 * args.width, rotary_pct=0.25,
      max_position_embeddings=max(2048, args.context), use_parallel_residual=True)
  torch.manual_seed(0)
  model = transformers.GPTNeoXForCausalLM(hf_config).eval()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tokens = np.random.default_rng(0).integers(0, 50304, (args.contexts, args.context))
  n_tokens = tokens.size

  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    config, params = neox.load(tmp)
  params = jax.device_put(params)
  model = model.to(device)
  captured = {}

  def stop(module, inputs, output):
    captured["out"] = output[0] if isinstance(output, tuple) else output
    raise _Stop

  model.gpt_neox.layers[args.layer].register_forward_hook(stop)
  ids = torch.as_tensor(tokens, device=device)

  def torch_forward():
    with torch.inference_mode():
      try:
        model(input_ids=ids)
      except _Stop:
        pass
    return captured["out"].float().cpu().numpy()

  def jax_forward(dtype):
    return lambda: np.asarray(jax.block_until_ready(
        neox.resid_at(params, config, tokens, args.layer, dtype=dtype)))

  mesh = train.make_mesh(1)
  fill, take = stream.device_functions(
      mesh, config, args.layer, contexts_per_device=args.contexts, context_length=args.context,
      batch_contexts=args.contexts, excluded=np.zeros(0, np.int32), rows_per_step=args.batch)
  stream_params = jax.device_put(params, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  key = jax.random.key_data(jax.random.key(0))
  steps = args.contexts * (args.context - 1) // args.batch

  def stream_round():
    acts, order = fill(stream_params, tokens[None].astype(np.int32), key, np.int32(0))
    return [take(acts, order, np.int32(j)) for j in range(steps)]

  want = torch_forward()
  got = jax_forward("float32")()
  error = float(np.abs(got - want).max() / np.abs(want).max())
  if error > 1e-3:
    raise SystemExit(f"JAX and torch disagree: max error {error:.2e} of the largest value")
  served = np.concatenate([np.asarray(batch)[0] for batch in stream_round()])
  acts, order = fill(stream_params, tokens[None].astype(np.int32), key, np.int32(0))
  rows = np.asarray(order)[0, :len(served)]
  if np.any(rows % args.context == 0) or len(set(rows.tolist())) < len(rows) or not np.allclose(
      served, got.reshape(-1, got.shape[-1])[rows], rtol=1e-4, atol=1e-4 * np.abs(got).max()):
    raise SystemExit("the --stream round did not serve the forward pass's rows once each")

  rows = [(f"transformers (torch, {device})", median_seconds(torch_forward, repeats=args.repeats)),
          (f"sae_jax.neox float32 ({jax.default_backend()})",
           median_seconds(jax_forward("float32"), repeats=args.repeats)),
          (f"sae_jax.neox bfloat16 ({jax.default_backend()})",
           median_seconds(jax_forward("bfloat16"), repeats=args.repeats)),
          (f"--stream round, float32 ({jax.default_backend()}): forward, shuffle, "
           f"{steps} batches of {args.batch}", median_seconds(stream_round, repeats=args.repeats))]
  print(f"\nblocks 0..{args.layer} of a {args.layers}-block D={args.width} GPT-NeoX, "
        f"{args.contexts} x {args.context} tokens, on {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}), median of {args.repeats}; "
        f"float32 max difference {error:.1e} of the largest value\n")
  print("| forward | median s | tokens/s | vs torch |")
  print("|---|---:|---:|---:|")
  for name, seconds in rows:
    print(f"| {name} | {seconds:.2f} | {n_tokens / seconds:,.0f} | {rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
