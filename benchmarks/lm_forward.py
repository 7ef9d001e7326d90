"""Language-model forward speed: the JAX models up to a hook vs transformers.

    python benchmarks/lm_forward.py                 # 160M-shaped, blocks.6.hook_resid_post, 4 x 1024 tokens
    python benchmarks/lm_forward.py --families gpt_neox llama --hook blocks.6.hook_mlp_out
    python benchmarks/lm_forward.py --quick         # 2 contexts, 2 repeats

For each family (GPT-NeoX, GPT-2, Llama, Qwen2, Mistral, Gemma-2) a randomly
initialised model of Pythia-160M's shape (12 blocks, D=768, 12 heads; Llama,
Qwen2, Mistral and Gemma-2 with 4 key-value heads and an MLP of 2048;
vocabulary 50304 for all, so that only the blocks differ) is saved as safetensors; the
JAX side loads it with `sae_jax.lm.load` and runs `hook_at`, the torch side
runs transformers' model until the hook stops it (`hook_points.capture`, as
the torch export does). Both see the same tokens; the outputs are checked
equal before timing. The last row is a round of `train.py --stream` on the
first family, on the same contexts (one device): the forward pass into the
on-device buffer, its shuffle, and every batch of --batch rows taken from
it. Prints tokens/s and the ratio to torch, measured side by side. Runs
unchanged on CPU, GPU (torch on CUDA) and TPU (torch on the host CPU).
"""

import argparse
import pathlib
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from sae_jax import hostmem  # noqa: E402
from sae_jax import hook_points  # noqa: E402
from sae_jax import hooks  # noqa: E402
from sae_jax import lm  # noqa: E402
from sae_jax import stream  # noqa: E402
from sae_jax import train  # noqa: E402
from timing import median_seconds  # noqa: E402


FAMILIES = ("gpt_neox", "gpt2", "llama", "qwen2", "mistral", "gemma2")
VOCAB = 50304


def hf_config(family: str, args):
  """transformers' config of a 160M-shaped model of `family`."""
  import transformers  # noqa: PLC0415 (the reference only)
  positions = max(2048, args.context)
  if family == "gpt_neox":
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=args.width, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.width, rotary_pct=0.25,
        max_position_embeddings=positions, use_parallel_residual=True)
  if family == "gpt2":
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=args.width, n_layer=args.layers,
                                   n_head=args.heads, n_positions=positions)
  kind = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
          "mistral": transformers.MistralConfig, "gemma2": transformers.Gemma2Config}[family]
  head = args.width // args.heads
  gemma = dict(head_dim=head, query_pre_attn_scalar=head) if family == "gemma2" else {}
  return kind(vocab_size=VOCAB, hidden_size=args.width, num_hidden_layers=args.layers,
              num_attention_heads=args.heads, num_key_value_heads=args.heads // 3,
              intermediate_size=8 * args.width // 3, max_position_embeddings=positions,
              **gemma)


def measure(family: str, args, tokens: np.ndarray, stream_too: bool) -> tuple:
  """(rows of (name, median seconds), float32 max difference) for one family."""
  import torch  # noqa: PLC0415 (the reference only)
  import transformers  # noqa: PLC0415
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family, args)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    config, params = lm.load(tmp)
  params = jax.device_put(params)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.to(device)
  captured = {}
  hook_points.capture(model, args.hook, lambda value: captured.update(out=value), family)
  ids = torch.as_tensor(tokens, device=device)

  def torch_forward():
    with torch.inference_mode():
      try:
        model(input_ids=ids)
      except hook_points.Stop:
        pass
    return captured["out"].float().cpu().numpy()

  def jax_forward(dtype):
    return lambda: np.asarray(jax.block_until_ready(
        lm.hook_at(params, config, tokens, args.hook, dtype=dtype)))

  want = torch_forward()
  got = jax_forward("float32")()
  error = float(np.abs(got - want).max() / np.abs(want).max())
  if error > 1e-3:
    raise SystemExit(f"{family}: JAX and torch disagree: max error {error:.2e} of the "
                     f"largest value")
  backend = jax.default_backend()
  rows = [(f"{family}: transformers (torch, {device})",
           median_seconds(torch_forward, repeats=args.repeats)),
          (f"{family}: sae_jax.lm float32 ({backend})",
           median_seconds(jax_forward("float32"), repeats=args.repeats)),
          (f"{family}: sae_jax.lm bfloat16 ({backend})",
           median_seconds(jax_forward("bfloat16"), repeats=args.repeats))]
  if stream_too:
    rows.append(stream_row(family, args, config, params, tokens, got))
  return rows, error


def stream_row(family, args, config, params, tokens, got) -> tuple:
  """A --stream round on the same contexts, checked to serve the forward's rows."""
  mesh = train.make_mesh(1)
  fill, take = stream.device_functions(
      mesh, config, (args.hook,), contexts_per_device=args.contexts, context_length=args.context,
      batch_contexts=args.contexts, excluded=np.zeros(0, np.int32), rows_per_step=args.batch)
  stream_params = jax.device_put(params, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  key = jax.random.key_data(jax.random.key(0))
  steps = args.contexts * (args.context - 1) // args.batch

  def stream_round():
    acts, order = fill(stream_params, tokens[None].astype(np.int32), key, np.int32(0))
    return [take(acts, order, np.int32(j)) for j in range(steps)]

  served = np.concatenate([np.asarray(batch)[0] for batch in stream_round()])
  acts, order = fill(stream_params, tokens[None].astype(np.int32), key, np.int32(0))
  rows = np.asarray(order)[0, :len(served)]
  if np.any(rows % args.context == 0) or len(set(rows.tolist())) < len(rows) or not np.allclose(
      served, got.reshape(-1, got.shape[-1])[rows], rtol=1e-4, atol=1e-4 * np.abs(got).max()):
    raise SystemExit("the --stream round did not serve the forward pass's rows once each")
  return (f"{family}: --stream round, float32 ({jax.default_backend()}): forward, shuffle, "
          f"{steps} batches of {args.batch}", median_seconds(stream_round, repeats=args.repeats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--hook", default="blocks.6.hook_resid_post")
  parser.add_argument("--context", type=int, default=1024)
  parser.add_argument("--contexts", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=1024, help="--stream: rows per training step")
  parser.add_argument("--quick", action="store_true", help="2 contexts, 2 repeats")
  args = parser.parse_args()
  if args.quick:
    args.contexts, args.repeats = min(args.contexts, 2), min(args.repeats, 2)
  hooks.model_layer(args.hook, "--layers", args.layers)
  if args.contexts * (args.context - 1) < args.batch:
    raise SystemExit(f"--batch {args.batch}: a round of {args.contexts} contexts of "
                     f"{args.context} tokens has {args.contexts * (args.context - 1)} rows; "
                     f"use at most that")
  tokens = np.random.default_rng(0).integers(0, VOCAB, (args.contexts, args.context))
  n_tokens = tokens.size

  results = []
  for i, family in enumerate(args.families):
    rows, error = measure(family, args, tokens, stream_too=i == 0)
    results.append((rows, error))
    print(f"{family}: float32 max difference {error:.1e} of the largest value", flush=True)
  print(f"\n{args.hook} of {args.layers}-block D={args.width} models, {args.contexts} x "
        f"{args.context} tokens, on {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}), median of {args.repeats}\n")
  print("| forward | median s | tokens/s | vs torch |")
  print("|---|---:|---:|---:|")
  for rows, _ in results:
    for name, seconds in rows:
      print(f"| {name} | {seconds:.2f} | {n_tokens / seconds:,.0f} | "
            f"{rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
