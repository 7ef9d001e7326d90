"""Selection cost next to the encoder matmul, and next to naive BatchTopK.

    python benchmarks/selection.py                 # B=1024, F=24576, k=64
    python benchmarks/selection.py --batch 256 --latents 4096 --repeats 3

Prints a Markdown table: median time, ratio to the naive flattened-top_k
BatchTopK (the reference) and to the encoder matmul, all measured in this run.
Every output is checked against the reference before it is timed. The
`axis_name` rows split the batch over 4 devices: the accelerators when there
are several, else 4 fake CPU devices. Runs unchanged on CPU, GPU and TPU.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import sae_jax  # noqa: E402
from sae_jax import hostmem  # noqa: E402
from sae_jax import scoring as sae_jax_scoring  # noqa: E402
from timing import median_seconds  # noqa: E402

AXIS = "batch"
SKETCH = 256  # rows of the leverage score's CountSketch


@jax.jit
def naive_batch_topk(a_BxF, k_B):
  """BatchTopK by one flattened top_k over all B·F entries: the reference."""
  flat = jnp.maximum(a_BxF, 0).reshape(-1)
  values, index = lax.top_k(flat, k_B.shape[0])
  keep = jnp.zeros(flat.shape, bool).at[index].set(values > 0)
  return jnp.where(keep, a_BxF.reshape(-1), 0).reshape(a_BxF.shape)


def naive_in_pool(a_BxF, k, pool):
  in_pool = np.zeros(a_BxF.shape[1], bool)
  in_pool[np.asarray(pool)] = True
  return naive_batch_topk(jnp.where(jnp.asarray(in_pool)[None, :], a_BxF, 0), jnp.zeros(a_BxF.shape[0] * k))


def reference_leverage(r_MxF):
  """Ridge leverage scores of r's columns in float64 NumPy (λ = 0.01)."""
  r = np.asarray(r_MxF, np.float64)
  return np.sum(r * np.linalg.solve(r @ r.T + 0.01 * np.eye(len(r)), r), axis=0)


def sharding_devices():
  devices = jax.devices()
  return devices[:4] if len(devices) >= 4 else jax.devices("cpu")[:4]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--latents", type=int, default=24576)
  parser.add_argument("--k", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats; l2 at l=1, 8 and leverage sketch m=256 only, the leverage "
                           "scores unchecked by NumPy, no sharded rows")
  args = parser.parse_args()
  if args.quick:
    args.repeats = min(args.repeats, 3)
  B, D, F, k = args.batch, args.width, args.latents, args.k

  keys = jax.random.split(jax.random.key(0), 2)
  x_BxD = jax.random.normal(keys[0], (B, D))
  W_DxF = jax.random.normal(keys[1], (D, F)) / np.sqrt(D)
  encode = jax.jit(lambda x, w: x @ w - 0.5)  # about 30% of entries positive
  a_BxF = jax.block_until_ready(encode(x_BxD, W_DxF))
  budget = jnp.zeros(B * k)  # its length carries N = B·k into the jitted reference
  reference = np.asarray(naive_batch_topk(a_BxF, budget))

  rows = []  # (name, seconds)
  rows.append(("encoder matmul [B,D]@[D,F]",
               median_seconds(encode, x_BxD, W_DxF, repeats=args.repeats)))
  rows.append(("naive BatchTopK (flattened top_k)",
               median_seconds(naive_batch_topk, a_BxF, budget, repeats=args.repeats)))
  assert np.array_equal(np.asarray(sae_jax.batch_topk(a_BxF, k)), reference)
  rows.append(("batch_topk", median_seconds(lambda a: sae_jax.batch_topk(a, k), a_BxF,
                                            repeats=args.repeats)))
  for score in ("l2",) if args.quick else ("l2", "entropy"):
    for l in (1, 8) if args.quick else (1, 8, 64):
      select = lambda a, l=l, score=score: sae_jax.sampled_select(a, k, l, score=score)
      pool = sae_jax.sampled_select_pooled(a_BxF, k, l, score=score).pool
      assert np.array_equal(np.asarray(select(a_BxF)), np.asarray(naive_in_pool(a_BxF, k, pool)))
      rows.append((f"sampled_select l={l} {score}",
                   median_seconds(select, a_BxF, repeats=args.repeats)))
  # The authors' default score: exact ridge leverage through the B×B side,
  # and its CountSketch estimate (one exact pass over a, then m×m).
  if not args.quick:
    exact = np.asarray(sae_jax.column_scores(a_BxF, "leverage"))
    want = reference_leverage(np.maximum(np.asarray(a_BxF), 0))
    assert np.allclose(exact, want, rtol=1e-4, atol=1e-5 * want.max()), "leverage"
    rows.append(("column_scores leverage (exact, B×B Cholesky)",
                 median_seconds(lambda a: sae_jax.column_scores(a, "leverage"), a_BxF,
                                repeats=args.repeats)))
    for m in (SKETCH, 4 * SKETCH):
      sketched = np.asarray(sae_jax.column_scores(a_BxF, "leverage", sketch=m))
      want = reference_leverage(np.asarray(sae_jax_scoring.count_sketch(
          jnp.maximum(a_BxF, 0), m, jax.random.key(0))))
      assert np.allclose(sketched, want, rtol=1e-4, atol=1e-5 * want.max()), m
      rows.append((f"column_scores leverage, sketch m={m}",
                   median_seconds(lambda a, m=m: sae_jax.column_scores(a, "leverage", sketch=m),
                                  a_BxF, repeats=args.repeats)))
  select = lambda a: sae_jax.sampled_select(a, k, 8, score="leverage", sketch=SKETCH)
  pool = sae_jax.sampled_select_pooled(a_BxF, k, 8, score="leverage", sketch=SKETCH).pool
  assert np.array_equal(np.asarray(select(a_BxF)), np.asarray(naive_in_pool(a_BxF, k, pool)))
  rows.append((f"sampled_select l=8 leverage, sketch m={SKETCH}",
               median_seconds(select, a_BxF, repeats=args.repeats)))
  # The compact form a training step uses: no [B, F] output to write.
  for l in (1, 8):
    pooled = lambda a, l=l: sae_jax.sampled_select_pooled(a, k, l)
    sel = pooled(a_BxF)
    want = np.asarray(naive_in_pool(a_BxF, k, sel.pool))[:, np.asarray(sel.pool)]
    assert np.array_equal(np.asarray(sel.values), want)
    rows.append((f"sampled_select_pooled l={l} l2 (compact [B,P] output)",
                 median_seconds(pooled, a_BxF, repeats=args.repeats)))

  if not args.quick:
    sharded_rows(args, a_BxF, reference, rows)
  report(args, rows)


def sharded_rows(args, a_BxF, reference, rows):
  """The selections with axis_name over 4 devices (fake CPU ones where fewer)."""
  (B, F), k = a_BxF.shape, args.k
  devices = sharding_devices()
  n_dev = len(devices)
  shards = jax.pmap(lambda s: s, devices=devices)(np.asarray(a_BxF).reshape(n_dev, B // n_dev, F))
  where = f"{n_dev} {devices[0].platform} devices"
  sharded = [("batch_topk", lambda a: sae_jax.batch_topk(a, k, axis_name=AXIS), reference)]
  for l in (1, 8):
    pool = sae_jax.sampled_select_pooled(a_BxF, k, l).pool
    sharded.append((f"sampled_select l={l} l2",
                    lambda a, l=l: sae_jax.sampled_select(a, k, l, axis_name=AXIS),
                    np.asarray(naive_in_pool(a_BxF, k, pool))))
  pool = sae_jax.sampled_select_pooled(a_BxF, k, 8, score="leverage", sketch=SKETCH).pool
  sharded.append((f"sampled_select l=8 leverage sketch m={SKETCH}",
                  lambda a: sae_jax.sampled_select(a, k, 8, score="leverage", sketch=SKETCH,
                                                   axis_name=AXIS),
                  np.asarray(naive_in_pool(a_BxF, k, pool))))
  for name, fn, want in sharded:
    mapped = jax.pmap(fn, axis_name=AXIS, devices=devices)
    assert np.array_equal(np.asarray(mapped(shards)).reshape(B, F), want), name
    rows.append((f"{name}, axis_name over {where}",
                 median_seconds(mapped, shards, repeats=args.repeats)))



def report(args, rows):
  B, D, F, k = args.batch, args.width, args.latents, args.k
  matmul, naive = rows[0][1], rows[1][1]
  print(f"\nB={B} D={D} F={F} k={k}, float32, on {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}) "
        f"(jax {jax.__version__}), median of {args.repeats}; all outputs equal the reference"
        f"{' (the leverage scores unchecked: --quick)' if args.quick else ''}\n")
  print("| operation | median ms | vs naive BatchTopK | vs encoder matmul |")
  print("|---|---:|---:|---:|")
  for name, seconds in rows:
    print(f"| {name} | {seconds * 1e3:.1f} | {seconds / naive:.3f}x | {seconds / matmul:.2f}x |")


if __name__ == "__main__":
  hostmem.use_tcmalloc()  # XLA:CPU's buffers reused, not faulted in every step
  main()
