"""A feature browser for a trained SAE: a static site that opens from file://.

The rows are the last `tokens` rows of the run's data (the held-out rows
first among them; for a --stream run, the text's first rows, made by the
JAX model as the stream made them), read here; what is shown of each latent
is computed from them in passes (`features.py`). Each context is the token
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

import importlib.resources
import io
import itertools
import json
import pathlib
import time
import typing

import numpy as np
import tqdm

from sae_jax import contexts as contexts_lib
from sae_jax import data as data_lib
from sae_jax import export as export_lib
from sae_jax import features
from sae_jax import hf
from sae_jax import hooks
from sae_jax import model
from sae_jax import lm
from sae_jax import saelens
from sae_jax import sources
from sae_jax import storage
from sae_jax import stream as stream_lib
from sae_jax import synthetic
from sae_jax import validation
from sae_jax.config import TrainConfig

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

  # A transcoder's features fire on its input: the first half of a pair.
  rows = lambda a, b: read(acts.read, a, b)[:, :acts.d_model]
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
  lm_config, params = lm.load(e.model, e.revision)
  hooks.check_decoder(e.hook, e.model, lm_config.n_layers)
  excluded = np.asarray(e.exclude_token_ids, np.int32)
  located = contexts_lib.located_contexts(e, tokenizer)
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
      out = np.asarray(lm.hook_at(params, lm_config, ids_CxL, e.hook), np.float32)
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

  scanned = features.scan(weights, cfg, source.rows, source.n, source.held, contexts=contexts,
                 samples=max(samples, 1), progress=progress)
  lap(f"the pass over {source.n} tokens")
  train = config["train"]
  pools = None
  if train["sae"]["selection"] == "sampled" and "input_scale" in summary:
    sae = model.SAE(TrainConfig.from_dict(train).sae)
    pools = features.pool_share(weights, summary["input_scale"], sae, source.rows, source.n,
                       train["batch_size"], progress=progress)
    lap(f"the pools of {pools[1]} batches of {train['batch_size']}" +
        ("" if pools[1] else " (fewer rows than a batch: no pool column)"))
  near, near_cos = features.neighbours(weights["W_dec"])
  vocab = lens = None
  if source.model is not None:
    vocab, W_U = _vocabulary(source.model)
    if W_U is not None:
      lens = features.logit_lens(weights["W_dec"], W_U)
  truth = None
  if source.truth is not None:
    cos = features.unit(weights["W_dec"]) @ features.unit(source.truth).T
    truth = (cos.argmax(1), cos.max(1))
  lap("decoder neighbours and the logit lens")

  held = max(scanned.held_out, 1)
  index = {
      "run": run_dir.name, "n_latents": F, "chunk": chunk, "rows": scanned.rows,
      "held_out_rows": scanned.held_out, "eval_rows": summary.get("eval_rows"),
      "architecture": cfg["architecture"],
      "selection": config["train"]["sae"]["selection"], "text": vocab is not None,
      "summary": {k: summary[k] for k in ("fvu", "explained_variance", "l0", "eval_dead_fraction",
                                          "tokens", "steps") if k in summary},
      "density": [_round(c / held) for c in scanned.count_F],
      "mean": [_round(t / f) if f else 0.0 for t, f in zip(scanned.total_F, scanned.fired_F)],
      "neighbours": near[:, :3].tolist(),
      "edges": [_round(e) for e in features.EDGES],  # of every latent's histogram
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
    acts = features.activation(weights, cfg, j, x_cache[span], kth)
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
    _, params = lm.load(str(directory))
    W_U = np.asarray(params["unembed"], np.float32)
    vocab += [f"<{i}>" for i in range(len(vocab), W_U.shape[1])]  # padded vocabulary
  except (ValueError, KeyError, OSError) as error:
    print(f"no logit lens: {model} is not a model sae_jax loads in JAX ({error})",
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
