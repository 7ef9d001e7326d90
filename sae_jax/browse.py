"""A feature browser for a trained SAE: a static site that opens from file://.

One pass over the last `tokens` rows of the run's data (the held-out rows
first among them; for a --stream run, the text's first rows, made by the
JAX model as the stream made them) encodes them with the saved SAE
(`saelens/`, SAELens' formulas) on the default JAX device and keeps, per
latent: how often it fires, its mean activation when it fires, a histogram
of its activations, its `contexts` largest activations and `samples`
firings drawn uniformly (the bulk of its distribution, not only the top).
For Sampled-SAE a second pass cuts the rows into training batches and
counts how often each latent makes the batch's pool. Each context is the token
with `window` tokens either side in the same document, every token with the
latent's activation. For a language model's cache the tokens are decoded
with the model's tokenizer and the logit lens (W_dec[j] @ W_U) names the
tokens the latent promotes and suppresses; on synthetic data each latent is
matched with its closest true direction instead.

The site: `index.html` (the latent table, sortable and filterable, a search
by id, the density histogram and the run's summary) and the latent view it
opens, which loads one chunk of `chunk` latents (`data/latents-<n>.js`, a
script, since a page from file:// may not fetch JSON). No server, no
network: every script and style is in the folder.
"""

import dataclasses
import functools
import importlib.resources
import io
import itertools
import json
import pathlib
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sae_jax import data as data_lib
from sae_jax import evaluate
from sae_jax import export as export_lib
from sae_jax import hf
from sae_jax import neox
from sae_jax import saelens
from sae_jax import sources
from sae_jax import storage
from sae_jax import stream as stream_lib
from sae_jax import synthetic
from sae_jax import validation
from sae_jax.config import TrainConfig

# Histogram edges of a latent's activations: 4 per decade from 1e-3 to 1e3.
EDGES = 10.0 ** np.arange(-3, 3.01, 0.25)


@dataclasses.dataclass
class Pass:
  """What one pass over the rows keeps (host arrays)."""
  rows: int  # rows read
  held_out: int  # of them, held out in training
  count_F: np.ndarray  # firings on the held-out rows
  fired_F: np.ndarray  # firings on all rows
  total_F: np.ndarray  # summed activation, all rows
  hist_FB: np.ndarray  # firings per bin: below EDGES[0], between edges, above the last
  top_Fk: np.ndarray  # row indices of the largest activations (descending)
  top_value_Fk: np.ndarray
  sample_Fs: np.ndarray  # row indices of firings drawn uniformly (-1: fewer firings)
  kth_N: typing.Optional[np.ndarray]  # each row's k-th largest pre-activation (topk)


def _encode_h(weights, x_nD):
  return (x_nD - weights["b_dec"][None]) @ weights["W_enc"] + weights["b_enc"][None]


def _mix(v):
  """A 32-bit integer hash (murmur3's finaliser): cheap pseudo-random bits."""
  v = v ^ (v >> np.uint32(16))
  v = v * np.uint32(0x7FEB352D)
  v = v ^ (v >> np.uint32(15))
  v = v * np.uint32(0x846CA68B)
  return v ^ (v >> np.uint32(16))


def _bins(z):
  """Each activation's histogram bin: 0 below EDGES[0], i + 1 in [EDGES[i],
  EDGES[i + 1]), len(EDGES) from EDGES[-1] on."""
  b = np.floor(4 * np.log10(np.maximum(z, 1e-30)) + 12) + 1
  return np.clip(b, 0, len(EDGES)).astype(np.int64)


@functools.partial(jax.jit, static_argnames=("k_arch",))
def _codes(weights, x_nD, valid_n, *, k_arch):
  """A chunk's codes [n, F] (SAELens' rule; zero on padding rows), its fired
  entries as bits packed along F, and each row's k-th pre-activation (topk)."""
  h = _encode_h(weights, x_nD)
  if k_arch:
    kth = jax.lax.top_k(h, k_arch)[0][:, -1]
    z = jnp.where(h >= kth[:, None], jnp.maximum(h, 0), 0)
  else:
    kth = jnp.zeros(h.shape[0], h.dtype)
    z = jnp.where(h > weights["threshold"][None], jnp.maximum(h, 0), 0)
  z = jnp.where(valid_n[:, None], z, 0)
  return z, jnp.packbits(z > 0, axis=1), kth


def _fired(z_nF: np.ndarray, bits: np.ndarray) -> tuple:
  """(rows, latents, values) of the positive entries, in row-major order,
  found from the packed bits (scanning F/8 bytes a row, not F floats)."""
  nonzero = np.flatnonzero(bits)
  rows, byte = np.divmod(nonzero, bits.shape[1])
  at, bit = np.nonzero(np.unpackbits(bits.ravel()[nonzero][:, None], axis=1))
  rows, latents = rows[at], byte[at] * 8 + bit
  return rows, latents, z_nF[rows, latents]


class _Best:
  """Per latent, the k largest keys seen so far, each with its row; on equal
  keys the earlier row (rows come in increasing order). Entries that may
  enter wait in a buffer, merged once it holds as many as the table."""

  def __init__(self, n_latents: int, k: int):
    self.key = np.full((n_latents, k), -np.inf, np.float32)
    self.row = np.full((n_latents, k), -1, np.int64)
    self.pending: list = []
    self.waiting = 0

  def add(self, rows, latents, keys) -> None:
    better = keys > self.key[latents, -1]  # no other entry can enter
    self.pending.append((rows[better], latents[better], keys[better]))
    self.waiting += int(better.sum())
    if self.waiting >= self.key.size:
      self.merge()

  def merge(self) -> None:
    if not self.waiting:
      return
    rows, latents, keys = (np.concatenate(part) for part in zip(*self.pending))
    self.pending, self.waiting = [], 0
    k = self.key.shape[1]
    touched = np.unique(latents)
    latent = np.concatenate([np.repeat(touched, k), latents])
    key = np.concatenate([self.key[touched].ravel(), keys])
    row = np.concatenate([self.row[touched].ravel(), rows])
    order = np.lexsort((row, -key, latent))  # by latent, key descending, row
    latent, key, row = latent[order], key[order], row[order]
    rank = np.arange(len(latent)) - np.searchsorted(latent, latent)  # within its latent
    keep = rank < k
    self.key[latent[keep], rank[keep]] = key[keep]
    self.row[latent[keep], rank[keep]] = row[keep]


def scan(weights: dict, cfg: dict, rows: typing.Callable[[int, int], np.ndarray], n: int,
         held: tuple, *, contexts: int = 20, samples: int = 5,
         chunk_rows: typing.Optional[int] = None, seed: int = 0, progress: bool = True) -> Pass:
  """One pass over rows [0, n) (`rows(start, stop)` gives them, raw, float32);
  rows [held[0], held[1]) are the held-out ones. A chunk's codes [rows, F]
  are 2^25 entries by default (512 rows of F = 65536): the device encodes
  them, and the host keeps the statistics from their positive entries."""
  F = weights["W_enc"].shape[1]
  chunk_rows = chunk_rows or int(np.clip(2**25 // F, 64, 4096))
  k_arch = cfg["k"] if cfg["architecture"] == "topk" else 0
  device = {name: jnp.asarray(v) for name, v in weights.items() if name != "W_dec"}
  count, fired, total = np.zeros(F, np.int64), np.zeros(F, np.int64), np.zeros(F, np.float64)
  hist = np.zeros(F * (len(EDGES) + 1), np.int64)
  top, drawn = _Best(F, contexts), _Best(F, samples)
  kth_all = np.zeros(n, np.float32) if k_arch else None
  bar = tqdm.tqdm(total=n, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True, desc="encoding")
  with bar:
    for start in range(0, n, chunk_rows):
      stop = min(start + chunk_rows, n)
      x = np.zeros((chunk_rows, weights["W_enc"].shape[0]), np.float32)
      x[:stop - start] = rows(start, stop)
      z, bits, kth = jax.device_get(_codes(device, x, np.arange(chunk_rows) < stop - start,
                                           k_arch=k_arch))
      r, j, v = _fired(z, bits)
      r = r + start
      held_out = (r >= held[0]) & (r < held[1])
      fired += np.bincount(j, minlength=F)
      count += np.bincount(j[held_out], minlength=F)
      total += np.bincount(j, weights=v, minlength=F)
      hist += np.bincount(_bins(v) + (len(EDGES) + 1) * j, minlength=len(hist))
      top.add(r, j, v)
      # Firings drawn uniformly: those of the largest hashed (row, latent, seed).
      hashed = _mix(_mix(r.astype(np.uint32) ^ np.uint32(seed))
                    + j.astype(np.uint32) * np.uint32(0x9E3779B1))
      drawn.add(r, j, (hashed >> np.uint32(8)).astype(np.float32))
      if k_arch:
        kth_all[start:stop] = kth[:stop - start]
      bar.update(stop - start)
  top.merge()
  drawn.merge()
  return Pass(n, held[1] - held[0], count, fired, total, hist.reshape(F, -1), top.row,
              np.where(top.row >= 0, top.key, 0).astype(np.float32), drawn.row, kth_all)


def pool_share(weights: dict, input_scale: float, sae, rows: typing.Callable[[int, int], np.ndarray],
               n: int, batch_size: int, *, block: int = 16, seed: int = 0,
               progress: bool = True) -> tuple:
  """How often each latent makes a Sampled-SAE pool: (pools that held it [F],
  pools chosen).

  The rows [0, n) are read `block` batches at a time, shuffled within that
  block (as the stream shuffles a round), and cut into batches of
  `batch_size` rows; the rows of an unfinished batch are left out. Each
  batch's pool is the one training would choose there (`evaluate.pool`, a
  drawn pool for `sample_pool` with a key per batch), from the saved
  SAE in training units (its biases times the input scale).
  """
  c = np.float32(input_scale)
  params = {"W_enc": jnp.asarray(weights["W_enc"]), "W_dec": jnp.asarray(weights["W_dec"]),
            "b_enc": jnp.asarray(weights["b_enc"] * c), "b_dec": jnp.asarray(weights["b_dec"] * c)}
  key = jax.random.key(evaluate.BATCH_MODE_KEY)
  held_F = np.zeros(weights["W_enc"].shape[1], np.int64)
  n_batches = n // batch_size
  rng = np.random.default_rng(seed)
  bar = tqdm.tqdm(total=n_batches * batch_size, unit="tok", unit_scale=True,
                  disable=not progress, dynamic_ncols=True, desc="pools")
  with bar:
    for start in range(0, n_batches * batch_size, block * batch_size):
      x = rows(start, min(start + block * batch_size, n_batches * batch_size))
      x = x[rng.permutation(len(x))]
      for i in range(0, len(x), batch_size):
        pool_P = evaluate.pool(params, c, jnp.asarray(x[i:i + batch_size], jnp.float32),
                                jax.random.fold_in(key, (start + i) // batch_size), sae)
        held_F[np.asarray(pool_P)] += 1
        bar.update(batch_size)
  return held_F, n_batches


def activation(weights: dict, cfg: dict, latent: int, x_mD: np.ndarray,
               kth_m: typing.Optional[np.ndarray]) -> np.ndarray:
  """Latent `latent`'s activation on rows x (SAELens' rule: its threshold, or
  the row's k-th largest pre-activation `kth_m` for topk, which the pass
  computed on the device: a relative 1e-5 absorbs the last bits by which the
  two matmuls may round that same number differently)."""
  h = (x_mD - weights["b_dec"]) @ weights["W_enc"][:, latent] + weights["b_enc"][latent]
  if cfg["architecture"] == "topk":
    fires = h >= kth_m - 1e-5 * np.maximum(np.abs(kth_m), 1e-6)
  else:
    fires = h > weights["threshold"][latent]
  return np.where(fires, np.maximum(h, 0), 0).astype(np.float32)


def _unit(m: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length."""
  return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def neighbours(W_dec: np.ndarray, n: int = 5, block: int = 1024) -> tuple:
  """Each latent's `n` nearest other latents by decoder cosine: (ids, cosines)."""
  unit = jnp.asarray(_unit(W_dec))
  n = min(n, len(W_dec) - 1)

  @jax.jit
  def nearest(first, rows):
    cos = rows @ unit.T
    cos = cos.at[jnp.arange(rows.shape[0]), first + jnp.arange(rows.shape[0])].set(-jnp.inf)
    return jax.lax.top_k(cos, n)

  ids, cosines = [], []
  for first in range(0, len(W_dec), block):
    rows = unit[first:first + block]
    if rows.shape[0] < block:
      rows = jnp.pad(rows, ((0, block - rows.shape[0]), (0, 0)))
    c, i = jax.device_get(nearest(first, rows))
    take = min(block, len(W_dec) - first)
    ids.append(i[:take])
    cosines.append(c[:take])
  return np.concatenate(ids), np.concatenate(cosines)


def logit_lens(W_dec: np.ndarray, W_U: np.ndarray, n: int = 10, block: int = 1024) -> tuple:
  """(top ids, top values, bottom ids, bottom values) of W_dec[j] @ W_U."""
  unembed = jnp.asarray(W_U)

  @jax.jit
  def ends(rows):
    logits = rows @ unembed
    top = jax.lax.top_k(logits, n)
    bottom = jax.lax.top_k(-logits, n)
    return top[1], top[0], bottom[1], -bottom[0]

  parts = [jax.device_get(ends(jnp.asarray(W_dec[f:f + block])))
           for f in range(0, len(W_dec), block)]
  return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


# --- The run's data -------------------------------------------------------------

class _Source(typing.NamedTuple):
  rows: typing.Callable[[int, int], np.ndarray]  # rows [start, stop) of the pass
  n: int
  held: tuple  # the held-out rows: [held[0], held[1])
  tokens: typing.Optional[np.ndarray]  # [n] token ids
  positions: typing.Optional[np.ndarray]  # [n]
  model: typing.Optional[str]  # the model's name or directory
  truth: typing.Optional[np.ndarray] = None  # synthetic: the true directions [M, D]


def _source(run_dir: pathlib.Path, config: dict, cfg: dict, tokens: int,
            cache: typing.Optional[str], progress: bool) -> _Source:
  what = config.get("data")
  if what == "synthetic" and cache is None:
    source = synthetic.SyntheticSource(synthetic.SyntheticConfig(**config["synthetic"]))
    held = source.sample(sources.SYNTHETIC_EVAL_STEP, tokens)
    return _Source(lambda a, b: held[a:b], len(held), (0, len(held)), None, None, None,
                   source.dictionary)
  if cache is None and config.get("stream"):
    return _stream_source(config, tokens, progress)
  path = cache or (config["cache_dir"] if what == "pythia" else what)
  acts = data_lib.Activations(path)
  manifest = acts.manifest
  where = f"--cache {path}" if cache else f"the run's data {path}"
  if acts.d_model != cfg["d_in"]:
    raise ValueError(f"{where} holds activations of width {acts.d_model}; the SAE in "
                     f"{run_dir}/saelens reads {cfg['d_in']}")
  meta = cfg.get("metadata", {})
  if manifest is not None and meta.get("model_name") not in (None, "unknown") and (
      manifest["model"], manifest["hook"]) != (meta["model_name"], meta["hook_name"]):
    raise ValueError(f"{where} holds {manifest['hook']} of {manifest['model']}; the SAE in "
                     f"{run_dir}/saelens was trained on {meta['hook_name']} of "
                     f"{meta['model_name']}")
  n = min(tokens, acts.n_rows)
  first = acts.n_rows - n  # the last rows: the held-out ones, then training rows before them
  eval_rows = sources.held_out_rows(config.get("eval_tokens", 0), acts.n_rows)
  held_from = max(acts.n_rows - eval_rows - first, 0)
  bounds = np.cumsum([0] + [rows for _, _, rows in acts._files])

  def read(kind_open, start, stop):
    """Rows [first + start, first + stop) of each file, joined."""
    parts = []
    for index in range(len(bounds) - 1):
      lo, hi = max(first + start, bounds[index]), min(first + stop, bounds[index + 1])
      if lo < hi:
        parts.append(kind_open(index, lo - bounds[index], hi - bounds[index]))
    return np.concatenate(parts)

  rows = lambda a, b: read(acts.read, a, b)
  if manifest is None:
    return _Source(rows, n, (held_from, n), None, None, None)
  ids = lambda kind: read(lambda i, a, b: np.asarray(data_lib.open_npy(
      acts.path / manifest["shards"][i]["files"][kind])[a:b]), 0, n)
  return _Source(rows, n, (held_from, n), ids("tokens"), ids("positions"), manifest["model"])


def _stream_source(config: dict, tokens: int, progress: bool) -> _Source:
  """A --stream run's rows, made here as its stream made them: the JAX model
  over the text's contexts, in order, keeping the drawable rows (not position
  0, no excluded token). The first `eval_tokens` of them are the run's
  held-out rows; the pass reads them and the `tokens` - eval_tokens rows
  after them. They are kept in memory (tokens × d_model float32)."""
  e = export_lib.ExportConfig(**config["export"])
  tokenizer = hf.tokenizer(e.model, e.revision)
  lm_config, params = neox.load(e.model, e.revision)
  layer = export_lib.model_layer(e.hook, e.model, lm_config.n_layers)
  excluded = np.asarray(e.exclude_token_ids, np.int32)
  located = export_lib.located_contexts(e, tokenizer)
  acts, ids, positions, got = [], [], [], 0
  bar = tqdm.tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True, desc="running the model")
  with bar:
    while got < tokens:
      batch = [context for context, _ in itertools.islice(located, e.batch_contexts)]
      if not batch:
        break  # the text ran out: the pass reads what there is
      ids_CxL = np.stack(batch + batch[-1:] * (e.batch_contexts - len(batch)))  # one shape
      valid_CxL = stream_lib.valid_rows(ids_CxL, excluded)[:len(batch)]
      out = np.asarray(neox.resid_at(params, lm_config, ids_CxL, layer), np.float32)
      acts.append(out[:len(batch)][valid_CxL])
      ids.append(ids_CxL[:len(batch)][valid_CxL])
      positions.append(np.broadcast_to(np.arange(ids_CxL.shape[1], dtype=np.int32),
                                       valid_CxL.shape)[valid_CxL])
      bar.update(min(int(valid_CxL.sum()), tokens - got))
      got += int(valid_CxL.sum())
  if not got:
    raise ValueError(f"the text {e.dataset} holds no context of {e.context_length} tokens")
  x = np.concatenate(acts)[:tokens]
  n = len(x)
  return _Source(lambda a, b: x[a:b], n, (0, min(config.get("eval_tokens", 0), n)),
                 np.concatenate(ids)[:n], np.concatenate(positions)[:n], e.model)


def _windows(rows_r: np.ndarray, positions: typing.Optional[np.ndarray], n: int,
             window: int) -> list:
  """For each row, the rows of its context window: the rows either side whose
  position is consecutive with it (the same document, no excluded token)."""
  out = []
  for r in rows_r:
    if r < 0:
      out.append(None)
      continue
    lo = hi = int(r)
    if positions is not None:
      while lo > 0 and r - lo < window and positions[lo - 1] == positions[lo] - 1:
        lo -= 1
      while hi + 1 < n and hi - r < window and positions[hi + 1] == positions[hi] + 1:
        hi += 1
    out.append((lo, hi + 1))
  return out


# --- The site ---------------------------------------------------------------------

def _script(path: pathlib.Path, call: str, value) -> None:
  path.write_text(f"{call}({json.dumps(value, separators=(',', ':'))});\n")


def _round(v, digits=4):
  return float(f"{float(v):.{digits}g}")


def build(run_dir, *, tokens: int = 1_000_000, contexts: int = 20, samples: int = 5,
          window: int = 8, chunk: int = 256, cache: typing.Optional[str] = None,
          progress: bool = True) -> pathlib.Path:
  """Writes `run_dir`/browser/ and returns its index.html.

  Args:
    run_dir: a finished run (its saelens/ and config.json).
    tokens: rows read (the last of the data, held-out rows first; for a
      --stream run, the first of its text, held-out rows first).
    contexts: top-activating contexts kept per latent.
    samples: firings drawn uniformly per latent.
    window: tokens shown either side of a context's token.
    chunk: latents per data file.
    cache: an activation cache to read instead of the run's data (of the
      same model and hook; a --stream run then skips the model).
  """
  run_dir = pathlib.Path(run_dir)
  for name, value, low in (("tokens", tokens, 1), ("contexts", contexts, 1),
                           ("samples", samples, 0), ("window", window, 0), ("chunk", chunk, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"--{name} must be an integer >= {low}; got {value!r}")
  if not (run_dir / "config.json").is_file():
    raise ValueError(f"{run_dir} holds no config.json: not a training run's directory")
  weights, cfg = saelens.load(run_dir / "saelens")
  config = json.loads((run_dir / "config.json").read_text())
  summary_path = run_dir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
  source = _source(run_dir, config, cfg, tokens, cache, progress)
  weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
  F = weights["W_enc"].shape[1]
  clock = [time.perf_counter()]

  def lap(what):
    if progress:
      print(f"{what}: {time.perf_counter() - clock[0]:.1f} s", flush=True)
    clock[0] = time.perf_counter()

  scanned = scan(weights, cfg, source.rows, source.n, source.held, contexts=contexts,
                 samples=max(samples, 1), progress=progress)
  lap(f"the pass over {source.n} tokens")
  train = config["train"]
  pools = None
  if train["sae"]["selection"] == "sampled" and "input_scale" in summary:
    sae = TrainConfig.from_dict(train).sae
    pools = pool_share(weights, summary["input_scale"], sae, source.rows, source.n,
                       train["batch_size"], progress=progress)
    lap(f"the pools of {pools[1]} batches of {train['batch_size']}" +
        ("" if pools[1] else " (fewer rows than a batch: no pool column)"))
  near, near_cos = neighbours(weights["W_dec"])
  vocab = lens = None
  if source.model is not None:
    vocab, W_U = _vocabulary(source.model)
    if W_U is not None:
      lens = logit_lens(weights["W_dec"], W_U)
  truth = None
  if source.truth is not None:
    cos = _unit(weights["W_dec"]) @ _unit(source.truth).T
    truth = (cos.argmax(1), cos.max(1))
  lap("decoder neighbours and the logit lens")

  held = max(scanned.held_out, 1)
  index = {
      "run": run_dir.name, "n_latents": F, "chunk": chunk, "rows": scanned.rows,
      "held_out_rows": scanned.held_out, "architecture": cfg["architecture"],
      "selection": config["train"]["sae"]["selection"], "text": vocab is not None,
      "summary": {k: summary[k] for k in ("fvu", "explained_variance", "l0", "eval_dead_fraction",
                                          "tokens", "steps") if k in summary},
      "density": [_round(c / held) for c in scanned.count_F],
      "mean": [_round(t / f) if f else 0.0 for t, f in zip(scanned.total_F, scanned.fired_F)],
      "neighbours": near[:, :3].tolist(),
      "edges": [_round(e) for e in EDGES],  # of every latent's histogram
  }
  if truth is not None:
    index["truth"], index["truth_cos"] = truth[0].tolist(), [_round(c) for c in truth[1]]
  if pools is not None and pools[1]:  # Sampled-SAE: the share of batches whose pool held it
    held_F, n_batches = pools
    index["pool"] = [_round(h / n_batches) for h in held_F]
    index["pool_batches"] = n_batches
    index["pool_size"] = validation.pool_size(train["sae"]["k"], train["sae"]["l"], F)

  def fill(site):
    (site / "data").mkdir()
    assets = importlib.resources.files("sae_jax") / "browser"
    for name in ("index.html", "app.js", "style.css"):
      (site / name).write_bytes((assets / name).read_bytes())
    _script(site / "data" / "index.js", "SAE.index", index)
    _density_png(np.asarray(index["density"]), site / "density.png")
    x_cache: dict = {}
    for first in range(0, F, chunk):
      latents = []
      for j in range(first, min(first + chunk, F)):
        entry = {"id": j, "density": index["density"][j], "mean": index["mean"][j],
                 "hist": scanned.hist_FB[j].tolist(),
                 "neighbours": [[int(i), _round(c)] for i, c in zip(near[j], near_cos[j])]}
        if source.tokens is not None:
          entry["top"] = _contexts(weights, cfg, j, scanned.top_Fk[j], source, scanned, window,
                                   vocab, x_cache)
          entry["samples"] = _contexts(weights, cfg, j, scanned.sample_Fs[j][:samples], source,
                                       scanned, window, vocab, x_cache)
        else:
          entry["top_values"] = [_round(v) for v in scanned.top_value_Fk[j] if v > 0]
        if lens is not None:
          entry["promotes"] = [[vocab[i], _round(v)] for i, v in zip(lens[0][j], lens[1][j])]
          entry["suppresses"] = [[vocab[i], _round(v)] for i, v in zip(lens[2][j], lens[3][j])]
        if truth is not None:
          entry["truth"], entry["truth_cos"] = int(truth[0][j]), _round(truth[1][j])
        if "pool" in index:
          entry["pool"] = index["pool"][j]
        latents.append(entry)
      _script(site / "data" / f"latents-{first // chunk}.js", "SAE.chunk", latents)

  out = run_dir / "browser"
  storage.write_folder(out, fill)  # a browser built before stays until this one is whole
  lap(f"contexts and pages of {F} latents")
  return out / "index.html"


def _contexts(weights, cfg, j, rows_r, source, scanned, window, vocab, x_cache) -> list:
  """The contexts around `rows_r` (-1: none), each token with latent j's activation."""
  out = []
  for r, span in zip(rows_r, _windows(rows_r, source.positions, source.n, window)):
    if span is None:
      continue
    lo, hi = span
    if span not in x_cache:
      if len(x_cache) > 65536:  # bounded memory: contexts repeat within a chunk, if at all
        x_cache.clear()
      x_cache[span] = source.rows(lo, hi)
    kth = scanned.kth_N[lo:hi] if scanned.kth_N is not None else None
    acts = activation(weights, cfg, j, x_cache[span], kth)
    out.append({"tokens": [vocab[t] for t in source.tokens[lo:hi]],
                "acts": [_round(a, 3) for a in acts], "peak": int(r) - lo, "row": int(r)})
  return out


def _vocabulary(model: str) -> tuple:
  """(each token id's text, W_U [D, V] or None) of `model`."""
  directory = hf.reachable_model(model)
  tokenizer = hf.tokenizer(directory)
  vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
  W_U = None
  try:
    _, params = neox.load(str(directory))
    W_U = np.asarray(params["unembed"], np.float32)
    vocab += [f"<{i}>" for i in range(len(vocab), W_U.shape[1])]  # padded vocabulary
  except (ValueError, KeyError, OSError) as error:
    print(f"no logit lens: {model} is not a GPT-NeoX model sae_jax loads ({error})",
          flush=True)
  return vocab, W_U


def _density_png(density: np.ndarray, path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(5, 2.6))
  fired = density[density > 0]
  if len(fired):
    ax.hist(np.log10(fired), bins=40, color="#4a6fa5")
  ax.set_xlabel("log10 firing density (held out)")
  ax.set_ylabel("latents")
  ax.set_title(f"{int((density == 0).sum())} of {len(density)} never fired", fontsize=9)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  path.write_bytes(png.getvalue())
