"""Everything the project times, on one accelerator, in one script: at most
5 minutes on one GPU.

    PYTHONPATH=. python benchmarks/accelerator.py            # paper scale: D=768, F=65536, B=4096, k=64
    PYTHONPATH=. python benchmarks/accelerator.py --quick    # small shapes: the suite's smoke test

Prints Markdown tables, measured side by side in this one run:

- the device;
- per compute dtype (float32, bfloat16): the floor, the encoder matmul
  x @ W_enc; each rule's training step and its ratio to the floor: TopK,
  BatchTopK, Sampled-SAE l = 8 and l = 2 (no latent dead, as in most of
  training), and the Sampled l = 8 step with every latent dead (AuxK on all
  F); the per-latent calibration of the inference thresholds (BatchTopK, on
  `--calibration-batches` batches) and its ratio to that rule's step;
- dictionary_learning 0.1.0's BatchTopK and TopK trainers on the same device
  (torch, on CUDA when there is one; bfloat16 under autocast), tokens/s
  beside ours (the step rows above); skipped, with the reason, where it is
  not installed;
- the Pythia-160M-shaped JAX forward to blocks.6.hook_resid_post (GPT-NeoX,
  12 blocks, D = 768, random weights) beside transformers', and a --stream
  round on it (`lm_forward.py`).

Needs nothing beyond the checkout, JAX, flax, optax, torch and transformers
(no network, no pip install): run it from the checkout with PYTHONPATH=.,
dictionary_learning from its wheel (`pip install --no-deps
dictionary_learning-0.1.0-*.whl einops`) if the machine has pip, or with its
unpacked wheel on PYTHONPATH.
"""

import argparse
import contextlib
import pathlib
import sys
import time
import types

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import lm_forward  # noqa: E402
import train_step  # noqa: E402
from sae_jax import hostmem  # noqa: E402
from sae_jax import model  # noqa: E402
from sae_jax import thresholds  # noqa: E402
from sae_jax.config import SAEConfig  # noqa: E402
from sae_jax.config import TrainConfig  # noqa: E402
from timing import median_seconds  # noqa: E402

PAPER = dict(batch=4096, width=768, latents=65536, k=64)
QUICK = dict(batch=256, width=64, latents=1024, k=8)
# The steps timed, by name: (selection, l, fraction of latents dead or None).
STEPS = (("TopK", "topk", None, None), ("BatchTopK", "batchtopk", None, None),
         ("Sampled l=8", "sampled", 8.0, None), ("Sampled l=2", "sampled", 2.0, None),
         ("Sampled l=8, every latent dead (AuxK on all F)", "sampled", 8.0, 1.0))


def config(args, selection: str, compute_dtype: str, l=None) -> TrainConfig:
  sae = SAEConfig(args.width, args.latents, k=args.k, selection=selection, l=l or 8.0,
                  compute_dtype=compute_dtype)
  return TrainConfig(sae, batch_size=args.batch, steps=10**6, warmup_steps=10, threshold_start=1)


def sae_rows(args, compute_dtype: str, x_1xBxD) -> list:
  """[(name, seconds, x floor, tokens/s)] of the floor, each step and the calibration."""
  import jax.numpy as jnp  # noqa: PLC0415
  dtype = jnp.dtype(compute_dtype)
  W_DxF = jax.random.normal(jax.random.key(1), (args.width, args.latents)) / np.sqrt(args.width)
  encode = jax.jit(lambda x, w: jnp.matmul(x.astype(dtype), w.astype(dtype),
                                           preferred_element_type=jnp.float32))
  floor = median_seconds(encode, x_1xBxD[0], W_DxF, repeats=args.repeats)
  rows = [("floor: the encoder matmul x @ W_enc", floor)]
  for name, selection, l, dead in STEPS:
    seconds = train_step.step_seconds(config(args, selection, compute_dtype, l), x_1xBxD,
                                      args.repeats, dead)
    rows.append((f"step, {name}", seconds))
  sae = model.SAE(config(args, "batchtopk", compute_dtype).sae)
  x_NxD = np.asarray(jax.random.normal(jax.random.key(2), (
      args.calibration_batches * args.batch, args.width)))
  params = model.init_params(jax.random.key(0), sae, jnp.asarray(x_NxD[:4096]))["params"]
  calibrate = lambda: thresholds.calibrate(params, x_NxD, sae, batch_size=args.batch)
  step = dict(rows)["step, BatchTopK"]
  rows.append((f"calibration, BatchTopK, {args.calibration_batches} batches (x: its step)",
               median_seconds(lambda: calibrate().threshold_F, repeats=1), step))
  return rows


def theirs(args, compute_dtype: str, x_BxD: np.ndarray) -> dict:
  """dictionary_learning's tokens/s per rule ("BatchTopK", "TopK"), or the
  reason it did not run."""
  import torch  # noqa: PLC0415 (the reference only)
  try:
    import dl_reference  # noqa: PLC0415
    dl_reference.trainer_classes()
  except ImportError as error:
    return {"skipped": str(error)}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  out = {}
  for name, selection in (("BatchTopK", "batchtopk"), ("TopK", "topk")):
    torch.manual_seed(0)
    trainer = dl_reference.make_trainer(config(args, selection, "float32"))
    x = torch.tensor(x_BxD, device=device)  # a copy: the array is read-only
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with (torch.autocast(device, dtype=torch.bfloat16) if compute_dtype == "bfloat16"
          else contextlib.nullcontext()):
      for step in range(2):  # its geometric-median initialisation and warm-up
        trainer.update(step, x)
      sync()
      start = time.perf_counter()
      for step in range(2, 2 + args.reference_steps):
        trainer.update(step, x)
      sync()
    out[name] = args.reference_steps * args.batch / (time.perf_counter() - start)
  return out


def forward_rows(args) -> list:
  """The Pythia-160M-shaped forward and its --stream round (`lm_forward.measure`)."""
  shape = types.SimpleNamespace(
      layers=2 if args.quick else 12, width=args.lm_width, heads=4 if args.quick else 12,
      hook="blocks.1.hook_resid_post" if args.quick else "blocks.6.hook_resid_post",
      context=64 if args.quick else 1024, contexts=2 if args.quick else 4,
      repeats=args.repeats, batch=64 if args.quick else 1024)
  tokens = np.random.default_rng(0).integers(0, lm_forward.VOCAB, (shape.contexts, shape.context))
  rows, error = lm_forward.measure("gpt_neox", shape, tokens, stream_too=True)
  return [(name, seconds, tokens.size / seconds, rows[0][1] / seconds)
          for name, seconds in rows], error, shape


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (a smoke test)")
  p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                 default=["float32", "bfloat16"])
  args = p.parse_args(argv)
  for name, value in (QUICK if args.quick else PAPER).items():
    setattr(args, name, value)
  args.repeats = 2 if args.quick else 5
  args.calibration_batches = 2 if args.quick else 8
  args.reference_steps = 2 if args.quick else 10
  args.lm_width = 64 if args.quick else 768
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s); "
        f"JAX {jax.__version__}", flush=True)
  x_1xBxD = jax.device_put(jax.random.normal(jax.random.key(0), (1, args.batch, args.width)),
                           jax.local_devices()[0])
  for compute_dtype in args.dtypes:
    rows = sae_rows(args, compute_dtype, x_1xBxD)
    floor = rows[0][1]
    print(f"\nB={args.batch} D={args.width} F={args.latents} k={args.k}, compute dtype "
          f"{compute_dtype}, median of {args.repeats}\n")
    print("| what | median ms | tokens/s | x floor (calibration: x its step) |")
    print("|---|---:|---:|---:|")
    for name, seconds, *per in rows:
      ratio = seconds / (per[0] if per else floor)
      print(f"| {name} | {seconds * 1e3:.1f} | {args.batch / seconds:,.0f} | {ratio:.2f} |")
    reference = theirs(args, compute_dtype, np.asarray(x_1xBxD[0]))
    if "skipped" in reference:
      print(f"\ndictionary_learning skipped: {reference['skipped']}")
      continue
    print(f"\nagainst dictionary_learning 0.1.0 ({compute_dtype}"
          f"{', autocast' if compute_dtype == 'bfloat16' else ''}), tokens/s\n")
    print("| rule | sae_jax | dictionary_learning | ours / theirs |")
    print("|---|---:|---:|---:|")
    ours = dict((name, seconds) for name, seconds, *_ in rows)
    for name, rate in reference.items():
      mine = args.batch / ours[f"step, {name}"]
      print(f"| {name} | {mine:,.0f} | {rate:,.0f} | {mine / rate:.2f}x |")
  rows, error, shape = forward_rows(args)
  print(f"\n{shape.hook} of a {shape.layers}-block D={shape.width} GPT-NeoX, {shape.contexts} x "
        f"{shape.context} tokens (float32 max difference {error:.1e}), median of "
        f"{args.repeats}\n")
  print("| forward | median s | tokens/s | vs torch |")
  print("|---|---:|---:|---:|")
  for name, seconds, rate, vs in rows:
    print(f"| {name} | {seconds:.3f} | {rate:,.0f} | {vs:.2f}x |")
  return 0


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  sys.exit(main())
