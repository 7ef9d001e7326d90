"""The end of a run: inference thresholds, the held-out evaluation, the
concept metrics (probing, absorption), the downstream loss and the SAELens
export; summary.json last, which marks the run finished."""

import contextlib
import functools
import json
import math
import pathlib
import time

import numpy as np
import safetensors

from sae_jax import downstream
from sae_jax import evaluate
from sae_jax import inference
from sae_jax import latent_calibration
from sae_jax import latent_evaluate
from sae_jax import memory
from sae_jax import mesh as mesh_lib
from sae_jax import model
from sae_jax import outdir
from sae_jax import probing
from sae_jax import saelens
from sae_jax import spelling
from sae_jax import thresholds
from sae_jax import train
from sae_jax import transcoder
from sae_jax.runconfig import RunConfig
from sae_jax.sources import DataSource
from sae_jax.sources import finite


def finish(config: RunConfig, out: pathlib.PurePath, state: train.TrainState,
           source: DataSource, tokens_per_second: float) -> dict:
  """Thresholds, evaluation and the SAELens export of a trained state; summary.json last."""
  c = config.train
  began = time.perf_counter()
  say = lambda what: print(f"  {what} ({time.perf_counter() - began:.1f} s)", flush=True)
  seconds = {}
  # Where the whole SAE's end cannot fit on one device (of any process), over
  # the latent groups.
  mesh = (mesh_lib.make_mesh(latent_shards=config.latent_shards)
          if memory.splits_end_agreed(config) else None)
  with _timed(seconds, "calibration"):
    calibration, rule, counts_F = _inference_rule(config, state, source, mesh)
  say(f"inference rule ({_described(rule)}) from {calibration.tokens} calibration tokens")
  with _timed(seconds, "evaluation"):
    summary = _evaluate(config, state, source, rule, calibration, seconds, mesh)
  for part in ("probing", "downstream"):  # timed inside the evaluation
    seconds["evaluation"] -= seconds.get(part, 0.0)
  say(f"evaluated on {summary['eval_rows']} held-out tokens")
  summary.update(tokens=int(state.step) * c.batch_size, steps=int(state.step),
                 tokens_per_second=tokens_per_second)
  summary.update(inference_gap(summary))
  if not outdir.writes():
    return dict(summary, end_seconds=_parts(seconds, began))
  metadata = dict(source.metadata)
  if c.nested is not None:  # the prefixes' ends, as SAELens' Matryoshka config names them
    metadata["matryoshka_widths"] = np.cumsum(c.nested.sizes).tolist()
  try:
    with _timed(seconds, "export"):
      saelens.export_saelens(
          out / "saelens", state.params, rule.threshold_F, train.scales(state),
          rule.sae(c.sae), metadata,
          log10_density=thresholds.log10_density(counts_F, calibration.tokens))
  except (OSError, safetensors.SafetensorError) as error:
    reason = getattr(error, "strerror", None) or str(error)
    raise ValueError(f"could not write {out / 'saelens'} ({reason}); nothing was left "
                     f"half-written, and a saelens/ written before is as it was: free space "
                     f"and re-run to finish") from None
  summary["end_seconds"] = _parts(seconds, began)
  outdir.write_json(out / "summary.json", summary)  # last: the run is finished once it exists
  say("exported to saelens/")
  print(json.dumps(outdir.strict(summary)), flush=True)
  print(f"wrote {out}: summary.json (above), saelens/ (the SAE, for SAELens), metrics.jsonl",
        flush=True)
  if "inference_warning" in summary:
    print(f"warning: {summary['inference_warning']}", flush=True)
  return summary


TIMINGS = ("tokens_per_second", "end_seconds")
"""summary.json's fields that are timings: equal runs differ only there."""


@contextlib.contextmanager
def _timed(seconds: dict, part: str):
  """Adds the block's wall time to seconds[part]."""
  began = time.perf_counter()
  try:
    yield
  finally:
    seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - began


def _parts(seconds: dict, began: float) -> dict:
  """summary.json's end_seconds: each part of the end of the run, and the
  whole (which also holds the little between them)."""
  return {**{part: round(value, 3) for part, value in seconds.items()},
          "total": round(time.perf_counter() - began, 3)}


# How much worse than its own training rule, on the same held-out tokens, a
# saved SAE may reconstruct before the run says so.
INFERENCE_GAP = 1.1
# Calibration tokens whose codes are made at once to count a top k′ rule's firings.
COUNT_CHUNK = 1024


def inference_gap(summary: dict) -> dict:
  """fvu_ratio, the saved SAE's FVU (inference mode) over the training
  rule's (batch mode) on the same held-out tokens, and past `INFERENCE_GAP`
  an inference_warning that says so. `--inference auto` chooses its rule on
  the calibration tokens; the held-out tokens can still disagree, and a rule
  asked for (per-latent, topk, global) is saved whatever it measures.

  >>> inference_gap({"fvu": 0.5, "batch_fvu": 0.25})["fvu_ratio"]
  2.0
  """
  fvu, batch_fvu = summary.get("fvu"), summary.get("batch_fvu")
  if fvu is None or not batch_fvu or not np.isfinite(fvu) or not np.isfinite(batch_fvu):
    return {}
  ratio = float(fvu / batch_fvu)
  if ratio <= INFERENCE_GAP:
    return {"fvu_ratio": ratio}
  return {"fvu_ratio": ratio, "inference_warning": (
      f"the saved SAE reconstructs worse than its training rule on the same held-out tokens: "
      f"FVU {fvu:.4f} in inference mode (what SAELens computes) against {batch_fvu:.4f} "
      f"({ratio:.2f}x); see docs/inference-thresholds.md for the rules --inference "
      f"offers")}


def _inference_rule(config: RunConfig, state: train.TrainState, source: DataSource, mesh):
  """The calibration pass over training rows (shuffled, whole batches), the
  inference rule it chooses (`inference.py`), and each latent's firing count
  under that rule on the calibration tokens (sparsity.safetensors).
  JumpReLU keeps its learned thresholds: its pass only counts. Over
  `mesh`'s latent groups where it is not None."""
  c = config.train
  rows, _ = finite(source.calibration(config.calibration_tokens), "the calibration rows")
  rows = rows[np.random.default_rng(c.seed).permutation(len(rows))]
  if c.sae.selection == "jumprelu":
    theta_F = np.asarray(state.params["threshold"], np.float32)
    counts_F = _counts(state, transcoder.sides(rows, c.sae)[0], theta_F, c.sae)
    return (thresholds.Calibration(theta_F, counts_F, len(rows), math.nan),
            inference.Rule("learned", theta_F, c.sae.k, {}), counts_F)
  scaled = transcoder.scaled(rows, c.sae, train.scales(state))
  sae = model.SAE(c.sae)
  calibrate = thresholds.calibrate
  if mesh is not None:  # over the latent groups, the SAE never whole on a device
    calibrate = functools.partial(latent_calibration.calibrate, mesh=mesh,
                                  global_threshold=float(state.threshold))
  calibration = calibrate(state.params, scaled, sae, batch_size=c.batch_size,
                          per_latent=config.inference != "global", rule_errors=True)
  if c.sae.selection == "topk" and not c.sae.transcoder:
    return calibration, inference.Rule("topk", calibration.threshold_F, c.sae.k, {}), \
        calibration.counts_F
  theta_F = calibration.threshold_F if config.inference != "global" else np.full(
      c.sae.n_latents, np.float32(state.threshold))
  # SAELens has no TopK transcoder: a transcoder keeps thresholds.
  asked = "per-latent" if c.sae.transcoder and config.inference == "auto" else config.inference
  rule = inference.choose(asked, state.params,
                          thresholds.batches(scaled, c.batch_size), sae, theta_F,
                          calibration.training_sse, calibration.errors)
  return calibration, rule, calibration.counts_F if rule.name != "topk" else rule.counts_F


def _counts(state: train.TrainState, rows, theta_F, sae_config) -> np.ndarray:
  """Each latent's firings on `rows` (raw encoder inputs) under the
  inference rule of `sae_config` with thresholds θ_F."""
  counts_F = np.zeros(sae_config.n_latents, np.int64)
  for start in range(0, len(rows), COUNT_CHUNK):  # never all [tokens, F] codes at once
    z, _ = evaluate.reconstruct(state.params, theta_F, train.scales(state),
                                rows[start:start + COUNT_CHUNK], model.SAE(sae_config),
                                chunk=COUNT_CHUNK)
    counts_F += np.sum(z > 0, axis=0)
  return counts_F


def _described(rule: inference.Rule) -> str:
  """The rule in a few words, for the run's end-phase line."""
  if rule.name == "topk":
    return f"each token's top {rule.k}"
  return f"{rule.name} thresholds"


def _evaluate(config: RunConfig, state: train.TrainState, source: DataSource,
              rule: inference.Rule, calibration: thresholds.Calibration, seconds: dict,
              mesh) -> dict:
  """summary.json: the held-out tokens in inference mode (the saved SAE) and
  in batch mode (the training rule on shuffled batches of the same tokens);
  over `mesh`'s latent groups where it is not None."""
  c = config.train
  raw = source.held_out()
  held_out, dropped = finite(raw, "the held-out rows")
  kept_N = np.isfinite(raw).all(axis=1)  # the rows of raw evaluated
  theta_F, scales = rule.threshold_F, train.scales(state)
  both, shards = evaluate.both_modes, 1
  if mesh is not None:  # over the latent groups, as the calibration
    both = functools.partial(latent_evaluate.both_modes, mesh=mesh)
    shards = mesh_lib.data_shards(mesh)
    # The last batch's rows past a whole number per data shard are left out.
    extra = len(held_out) % c.batch_size % shards
    if extra:
      held_out = held_out[:-extra]
      kept_N[np.flatnonzero(kept_N)[-extra:]] = False
  # Shuffled batches, as in training, for the batch mode; each encoded once
  # for both modes, and the inference mode's codes put back in x's order.
  order = np.random.default_rng(c.seed).permutation(len(held_out))
  x_shuffled, y_shuffled = transcoder.sides(held_out[order], c.sae)
  modes = both(state.params, theta_F, scales, x_shuffled, model.SAE(c.sae),
               model.SAE(rule.sae(c.sae)), c.batch_size)
  back = np.argsort(order)
  x, y = transcoder.sides(held_out, c.sae)  # a transcoder reads x and reconstructs y
  z, yhat = modes.z_inference[back], modes.xhat_inference[back]
  with _timed(seconds, "probing"):
    concepts = _concepts(config, state, source, x, z, kept_N)
  summary = evaluate.reconstruction_metrics(y, yhat, z)
  sparsity = evaluate.sparsity_metrics(z)
  counts, never = evaluate.density_histogram(sparsity.pop("density_F"))
  summary.update({f"eval_{k}" if k == "dead_fraction" else k: v for k, v in sparsity.items()},
                 density_histogram_log10=counts.tolist(), density_never_fired=never)
  summary.update(batch_fvu=evaluate.fvu(y_shuffled, modes.xhat_batch),
                 batch_l0=float(np.mean(modes.l0_batch)))
  if c.sae.selection == "sampled":
    pools = modes.pools
    if len(pools) < 2:  # one batch: two halves of it, as pools of its own
      size = len(held_out) // 2 // shards * shards
      pools = (evaluate.pools(state.params, state.input_scale, x_shuffled, model.SAE(c.sae),
                              size) if shards == 1 else
               both(state.params, theta_F, scales, x_shuffled[:2 * size], model.SAE(c.sae),
                    model.SAE(rule.sae(c.sae)), size).pools)
    summary["pool_jaccard"] = evaluate.pool_jaccard(pools)
  summary.update(
      dead_fraction=float(np.mean(state.steps_since_fired_F >= c.dead_steps)),
      skipped_steps=int(state.skipped_steps), input_scale=float(state.input_scale),
      calibration_tokens=calibration.tokens, eval_rows=len(held_out), eval_rows_dropped=dropped)
  if c.sae.transcoder:
    summary["target_scale"] = float(state.target_scale)
  if c.sae.selection != "jumprelu":  # the EMA θ (JumpReLU's are learned: threshold_median)
    summary["threshold"] = float(state.threshold)
  if rule.name == "topk" and c.sae.selection != "topk":
    summary.update(inference="topk", inference_k=rule.k)
  elif rule.name != "topk":
    can_fire_F = theta_F < thresholds.NEVER
    summary.update(
        inference=rule.name, never_fire_fraction=float(np.mean(~can_fire_F)),
        threshold_median=float(np.median(theta_F[can_fire_F])) if can_fire_F.any() else None)
  summary.update({f"calibration_fvu_{name.replace('-', '_')}": value
                  for name, value in rule.fvu.items()})
  if source.dictionary is not None:
    summary.update(evaluate.ground_truth_metrics(state.params["W_dec"], source.dictionary,
                                                 config.synthetic.feature_class()))
  summary.update(concepts)
  with _timed(seconds, "downstream"):
    summary.update(_downstream(config, state, rule, source))
  return summary


def _concepts(config: RunConfig, state: train.TrainState, source: DataSource, x_NxD, z_NxF,
              kept_N) -> dict:
  """Sparse probing and absorption (`probing.py`) of the held-out rows x
  (the finite ones, `kept_N`, of those the data gave) from their inference
  codes z: of every true feature, and each parent of a hierarchy, on
  synthetic data; of first letters on a cache's tokens."""
  scale = np.float32(state.input_scale)  # codes / scale: the SAE's input units, as in SAELens
  W_dec = np.asarray(state.params["W_dec"])
  drop = lambda result, key: {k: v for k, v in result.items() if k != key}
  if source.true_codes is not None:
    truth = source.true_codes()[kept_N]
    codes = z_NxF / scale
    out = drop(probing.sparse_probing(codes, truth > 0, dense_NxD=x_NxD), "per_task")
    if config.synthetic.parents:
      out |= drop(probing.ground_truth_absorption(x_NxD, codes, W_dec, truth, source.dictionary,
                                                  config.synthetic.parent_of()), "per_parent")
    return out
  found = source.letters() if source.letters is not None else None
  if found is None:
    return {}
  tokens, letter = found[0][kept_N], found[1][kept_N]
  words = letter >= 0
  codes, x_NxD, tokens, letter = z_NxF[words] / scale, x_NxD[words], tokens[words], letter[words]
  out = drop(probing.sparse_probing(
      codes, letter[:, None] == np.arange(len(spelling.LETTERS))[None, :], dense_NxD=x_NxD),
      "per_task")
  if config.train.sae.transcoder:  # its decoder rows live in the target's space, not x's
    return out | {"absorption_skipped": transcoder.NO_ABSORPTION}
  return out | drop(probing.letter_absorption(x_NxD, codes, W_dec, letter, tokens), "per_letter")


def _downstream(config: RunConfig, state: train.TrainState, rule: inference.Rule,
                source: DataSource) -> dict:
  """The spliced-loss metrics (`downstream.py`) on contexts the run did not
  train on, with the model in JAX or torch as the data were made."""
  if source.downstream_skipped is not None:
    print(f"downstream loss skipped: {source.downstream_skipped}", flush=True)
    return {"downstream_skipped": source.downstream_skipped}
  if source.downstream_ids is None:
    return {}
  ids_BxL = source.downstream_ids()
  if not len(ids_BxL):
    print("--downstream-contexts 0: downstream loss skipped" if not config.downstream_contexts
          else f"no text left after the training contexts for --downstream-contexts "
               f"{config.downstream_contexts}: downstream loss skipped", flush=True)
    return {}
  e, sae, theta_F = config.export, model.SAE(rule.sae(state.config.sae)), rule.threshold_F
  scales = np.asarray(train.scales(state), np.float32)
  # A transcoder's reconstruction replaces its target, from its input there.
  at, read = (e.target_hook, e.hook) if e.target_hook else (e.hook, None)
  if source.language_model is not None:
    lm_config, lm_params = source.language_model()
    result = downstream.downstream_loss_jax(
        lm_params, lm_config, at, ids_BxL, evaluate.splice(sae),
        (state.params, np.asarray(theta_F, np.float32), scales), read=read)
  else:
    splice = lambda h: evaluate.reconstruct(state.params, theta_F, scales, h, sae)[1]
    result = downstream.downstream_loss(e.model, at, ids_BxL, splice, revision=e.revision,
                                        device=e.device, read=read)
  return {f"downstream_{k}": v for k, v in result.items()}
