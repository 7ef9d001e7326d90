"""A feature browser for a trained SAE: a static site that opens from file://.

One pass over the last `tokens` rows of the run's data (the held-out rows
first among them) encodes them with the saved SAE (`saelens/`, SAELens'
formulas) on the default JAX device and keeps, per latent: how often it
fires, its mean activation when it fires, a histogram of its activations,
its `contexts` largest activations and `samples` firings drawn uniformly
(the bulk of its distribution, not only the top). Each context is the token
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
import json
import pathlib
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sae_jax import data as data_lib
from sae_jax import export as export_lib
from sae_jax import saelens
from sae_jax import storage

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
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x7FEB352D)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)


def _bins(z):
  """Each activation's histogram bin: 0 below EDGES[0], i + 1 in [EDGES[i],
  EDGES[i + 1]), len(EDGES) from EDGES[-1] on."""
  b = jnp.floor(4 * jnp.log10(jnp.maximum(z, 1e-30)) + 12) + 1
  return jnp.clip(b, 0, len(EDGES)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k_arch", "contexts", "samples"))
def _chunk(weights, x_nD, row_n, valid_n, held_n, seed, *, k_arch, contexts, samples):
  """The stats of one chunk of rows (global indices row_n; invalid rows padded)."""
  h = _encode_h(weights, x_nD)
  if k_arch:
    kth = jax.lax.top_k(h, k_arch)[0][:, -1]
    z = jnp.where(h >= kth[:, None], jnp.maximum(h, 0), 0)
  else:
    kth = jnp.zeros(h.shape[0], h.dtype)
    z = jnp.where(h > weights["threshold"][None], jnp.maximum(h, 0), 0)
  z = jnp.where(valid_n[:, None], z, 0)
  fired = z > 0
  F = z.shape[1]
  latent = jnp.arange(F, dtype=jnp.uint32)
  hist = jnp.bincount((_bins(z) + (len(EDGES) + 1) * latent[None].astype(jnp.int32)).ravel(),
                      weights=fired.ravel().astype(jnp.int32), length=(len(EDGES) + 1) * F)
  top_v, top_i = jax.lax.top_k(z.T, contexts)
  # Firings drawn uniformly: those of the largest hashed (row, latent, seed).
  bits = _mix(_mix(row_n.astype(jnp.uint32) ^ seed)[:, None] + latent[None] * jnp.uint32(0x9E3779B1))
  priority = jnp.where(fired, (bits >> 8).astype(jnp.float32), -1.0)
  s_p, s_i = jax.lax.top_k(priority.T, samples)
  return (jnp.where(held_n[:, None], fired, False).sum(0), fired.sum(0), z.sum(0),
          hist.reshape(F, len(EDGES) + 1), top_v, top_i, s_p, s_i, kth)


def _merge(values, index, more_values, more_index, k):
  v = np.concatenate([values, more_values], axis=1)
  i = np.concatenate([index, more_index], axis=1)
  order = np.argsort(-v, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


def scan(weights: dict, cfg: dict, rows: typing.Callable[[int, int], np.ndarray], n: int,
         held_from: int, *, contexts: int = 20, samples: int = 5,
         chunk_rows: typing.Optional[int] = None, seed: int = 0, progress: bool = True) -> Pass:
  """One pass over rows [0, n) (`rows(start, stop)` gives them, raw, float32);
  rows from `held_from` on are the held-out ones. A chunk's codes [rows, F]
  are 2^25 entries by default (512 rows of F = 65536)."""
  F = weights["W_enc"].shape[1]
  chunk_rows = chunk_rows or int(np.clip(2**25 // F, 64, 4096))
  k_arch = cfg["k"] if cfg["architecture"] == "topk" else 0
  device = {name: jnp.asarray(v) for name, v in weights.items() if name != "W_dec"}
  count, fired, total = np.zeros(F, np.int64), np.zeros(F, np.int64), np.zeros(F, np.float64)
  hist = np.zeros((F, len(EDGES) + 1), np.int64)
  top_v, top_i = np.full((F, contexts), -np.inf, np.float32), np.full((F, contexts), -1)
  s_p, s_i = np.full((F, samples), -np.inf, np.float32), np.full((F, samples), -1)
  kth_all = np.zeros(n, np.float32) if k_arch else None
  bar = tqdm.tqdm(total=n, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True, desc="encoding")
  with bar:
    for start in range(0, n, chunk_rows):
      stop = min(start + chunk_rows, n)
      x = np.zeros((chunk_rows, weights["W_enc"].shape[0]), np.float32)
      x[:stop - start] = rows(start, stop)
      index = np.arange(start, start + chunk_rows, dtype=np.int64)
      out = jax.device_get(_chunk(device, x, index, index < stop, index >= held_from,
                                  np.uint32(seed), k_arch=k_arch,
                                  contexts=min(contexts, chunk_rows),
                                  samples=min(samples, chunk_rows)))
      c, f, t, hh, tv, ti, sp, si, kth = out
      count += c
      fired += f
      total += t
      hist += hh
      ti = np.where(tv > 0, ti + start, -1)
      top_v, top_i = _merge(top_v, top_i, np.where(tv > 0, tv, -np.inf), ti, contexts)
      si = np.where(sp >= 0, si + start, -1)
      s_p, s_i = _merge(s_p, s_i, np.where(sp >= 0, sp, -np.inf), si, samples)
      if k_arch:
        kth_all[start:stop] = kth[:stop - start]
      bar.update(stop - start)
  top_i = np.where(np.isfinite(top_v), top_i, -1)
  return Pass(n, n - held_from, count, fired, total, hist, top_i,
              np.where(np.isfinite(top_v), top_v, 0).astype(np.float32),
              np.where(np.isfinite(s_p), s_i, -1), kth_all)


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
  held_from: int
  tokens: typing.Optional[np.ndarray]  # [n] token ids
  positions: typing.Optional[np.ndarray]  # [n]
  model: typing.Optional[str]  # the model's name or directory
  truth: typing.Optional[np.ndarray] = None  # synthetic: the true directions [M, D]


def _source(run_dir: pathlib.Path, config: dict, cfg: dict, tokens: int,
            cache: typing.Optional[str]) -> _Source:
  from sae_jax import run as run_lib  # noqa: PLC0415
  from sae_jax import synthetic  # noqa: PLC0415
  what = config.get("data")
  if what == "synthetic" and cache is None:
    source = synthetic.SyntheticSource(synthetic.SyntheticConfig(**config["synthetic"]))
    held = source.sample(run_lib.SYNTHETIC_EVAL_STEP, tokens)
    return _Source(lambda a, b: held[a:b], len(held), 0, None, None, None, source.dictionary)
  if cache is None and config.get("stream"):
    raise ValueError(f"{run_dir} was trained with --stream: there is no cache to take "
                     f"contexts from; export one with experiments/export_activations.py (the "
                     f"same --model and --hook) and pass it with --cache")
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
  eval_rows = run_lib.held_out_rows(config.get("eval_tokens", 0), acts.n_rows)
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
    return _Source(rows, n, held_from, None, None, None)
  ids = lambda kind: read(lambda i, a, b: np.asarray(data_lib.open_npy(
      acts.path / manifest["shards"][i]["files"][kind])[a:b]), 0, n)
  return _Source(rows, n, held_from, ids("tokens"), ids("positions"), manifest["model"])


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
    tokens: rows read (the last of the data; held-out rows first).
    contexts: top-activating contexts kept per latent.
    samples: firings drawn uniformly per latent.
    window: tokens shown either side of a context's token.
    chunk: latents per data file.
    cache: an activation cache to read instead of the run's data (of the
      same model and hook; for a --stream run).
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
  source = _source(run_dir, config, cfg, tokens, cache)
  weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
  F = weights["W_enc"].shape[1]
  clock = [time.perf_counter()]

  def lap(what):
    if progress:
      print(f"{what}: {time.perf_counter() - clock[0]:.1f} s", flush=True)
    clock[0] = time.perf_counter()

  scanned = scan(weights, cfg, source.rows, source.n, source.held_from, contexts=contexts,
                 samples=max(samples, 1), progress=progress)
  lap(f"the pass over {source.n} tokens")
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
  from sae_jax import run as run_lib  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  directory = run_lib.reachable_model(model)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
  W_U = None
  try:
    from sae_jax import neox  # noqa: PLC0415
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
