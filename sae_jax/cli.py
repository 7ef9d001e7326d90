"""Command-line flags shared by experiments/train.py and experiments/sweep_l.py."""

import argparse
import dataclasses
import os
import sys
import typing

from sae_jax import export
from sae_jax import peers as peers_lib
from sae_jax import runconfig
from sae_jax import validation
from sae_jax import config as config_lib
from sae_jax.config import SAEConfig
from sae_jax.config import SyntheticConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig


JOIN_TIMEOUT = 300  # seconds, --join-timeout's default


def parser(doc: str) -> argparse.ArgumentParser:
  """Every flag of a training run; `doc` is the script's docstring."""
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sae = p.add_argument_group("SAE")
  sae.add_argument("--selection", choices=config_lib.SELECTIONS, default="sampled")
  sae.add_argument("--l", type=float, default=8.0, help="Sampled-SAE pool factor: P = ceil(k*l)")
  sae.add_argument("--k", type=int, default=64, help="latents per token (on average)")
  sae.add_argument("--score", choices=validation.SCORE_METHODS, default="l2")
  sae.add_argument("--sample-pool", action="store_true", help="draw the pool in proportion to score")
  sae.add_argument("--ridge", type=float, default=SAEConfig.ridge,
                   help="--score leverage: the ridge lambda")
  sae.add_argument("--sketch", type=int, default=None,
                   help="--score leverage: rows of a CountSketch of the batch's tokens (default: "
                        "exact scores)")
  sae.add_argument("--pool-every", type=int, default=SAEConfig.pool_every,
                   help="choose the Sampled-SAE pool every n steps and keep it in between")
  sae.add_argument("--dict-size", type=int, default=65536)
  sae.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
  rec = p.add_argument_group("recipe")
  rec.add_argument("--batch-size", type=int, default=4096, help="tokens per step, all devices")
  rec.add_argument("--tokens", type=int, default=100_000_000)
  rec.add_argument("--steps", type=int, default=None, help="overrides --tokens")
  rec.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(F / 2^14)")
  rec.add_argument("--warmup-steps", type=int, default=None,
                   help="default min(1000, 10%% of the steps)")
  rec.add_argument("--decay-fraction", type=float, default=0.2)
  rec.add_argument("--clip-norm", type=float, default=1.0,
                   help="global gradient-norm clip of the loss summed over D (as in "
                        "dictionary_learning and SAELens)")
  rec.add_argument("--dead-tokens", type=int, default=10_000_000)
  rec.add_argument("--auxk-weight", type=float, default=1 / 32)
  rec.add_argument("--threshold-start", type=int, default=None,
                   help="the threshold EMA updates on the steps after this one; "
                        "default min(1000, 10%% of the steps)")
  rec.add_argument("--threshold-beta", type=float, default=0.999)
  rec.add_argument("--seed", type=int, default=0)
  rec.add_argument("--step", choices=("fast", "dense"), default="fast",
                   help="fast: only the encoder forward is dense; dense: the autodiff reference")
  rec.add_argument("--matryoshka-groups", type=float, nargs="+", default=None, metavar="F",
                   help="Matryoshka loss: the groups' fractions of --dict-size, in order, "
                        "summing to 1 (e.g. 0.25 0.25 0.5)")
  rec.add_argument("--matryoshka-weights", type=float, nargs="+", default=None, metavar="W",
                   help="Matryoshka: each prefix's weight (default 1/G each)")
  rec.add_argument("--target-l0", type=float, default=None,
                   help="JumpReLU: the L0 its sparsity penalty aims at (default --k)")
  rec.add_argument("--bandwidth", type=float, default=TrainConfig.bandwidth,
                   help="JumpReLU: the straight-through estimators' bandwidth")
  rec.add_argument("--sparsity-penalty", type=float, default=TrainConfig.sparsity_penalty,
                   help="JumpReLU: c in c * (L0 / target - 1)^2")
  rec.add_argument("--sparsity-warmup-steps", type=int, default=None,
                   help="JumpReLU: the penalty rises from 0 over these steps; "
                        "default min(2000, 20%% of the steps)")
  dat = p.add_argument_group("data")
  dat.add_argument("--data", default="pythia", help="pythia, synthetic, a cache directory or a .npy")
  dat.add_argument("--cache-dir", default="cache/pythia-160m")
  dat.add_argument("--model", default=export.ExportConfig.model)
  dat.add_argument("--revision", default=None)
  dat.add_argument("--hook", default=export.ExportConfig.hook,
                   help="where in the model, by TransformerLens' name: blocks.N.hook_resid_pre, "
                        "blocks.N.hook_attn_out, blocks.N.hook_mlp_out or blocks.N.hook_resid_post "
                        "(an encoder's: blocks.N.hook_normalized_resid_post), or the MLP's "
                        "input, blocks.N.ln2.hook_normalized")
  dat.add_argument("--target-hook", default=None,
                   help="--data pythia: train a transcoder that reads --hook and reconstructs "
                        "this later hook (e.g. --hook blocks.N.ln2.hook_normalized "
                        "--target-hook blocks.N.hook_mlp_out); a cache or an [N, 2, D] .npy of "
                        "(input, target) pairs trains one by itself")
  dat.add_argument("--dataset", nargs="+", default=[export.ExportConfig.dataset],
                   help="hub dataset, or local .txt/.jsonl files")
  dat.add_argument("--text-field", default="text")
  dat.add_argument("--context-length", type=int, default=1024)
  dat.add_argument("--backend", choices=export.BACKENDS, default=None,
                   help="--data pythia: run the model in jax or torch (default: jax on an "
                        "accelerator, else torch)")
  dat.add_argument("--stream", action="store_true",
                   help="--data pythia: make activations on the fly with the JAX model on the "
                        "training devices (no cache)")
  dat.add_argument("--stream-contexts", type=int, default=RunConfig.stream_contexts,
                   help="--stream: contexts shuffled together on the devices")
  dat.add_argument("--eval-tokens", type=int, default=65536)
  dat.add_argument("--downstream-contexts", type=int, default=RunConfig.downstream_contexts,
                   help="--data pythia: contexts for the spliced-loss evaluation")
  inf = p.add_argument_group("inference (the saved SAE)")
  inf.add_argument("--inference", choices=runconfig.INFERENCE_RULES, default=RunConfig.inference,
                   help="BatchTopK, Sampled-SAE: a threshold per latent, calibrated to fire "
                        "each as often as training did (per-latent); each token's top k' <= k "
                        "codes, k' fitted on the calibration tokens (topk); auto: per-latent "
                        "unless it reconstructs over 1.1x worse than training, then topk; or "
                        "one global EMA threshold")
  inf.add_argument("--calibration-tokens", type=int, default=RunConfig.calibration_tokens,
                   help="training tokens the per-latent thresholds are calibrated on")
  syn = p.add_argument_group("synthetic data (--data synthetic)")
  defaults = SyntheticConfig()
  syn.add_argument("--synthetic-d-model", type=int, default=defaults.d_model)
  syn.add_argument("--synthetic-features", type=int, default=defaults.n_features)
  syn.add_argument("--synthetic-active", type=float, default=defaults.active)
  syn.add_argument("--synthetic-noise", type=float, default=defaults.noise)
  syn.add_argument("--rare-fraction", type=float, default=defaults.rare_fraction,
                   help="> 0: the activation-lottery regime")
  syn.add_argument("--rare-rate", type=float, default=defaults.rare_rate)
  syn.add_argument("--rare-magnitude", type=float, default=defaults.rare_magnitude)
  syn.add_argument("--parents", type=int, default=defaults.parents,
                   help="> 0: a hierarchy, parents with children that fire only with them "
                        "(feature absorption)")
  syn.add_argument("--children", type=int, default=defaults.children, help="children per parent")
  syn.add_argument("--child-given-parent", type=float, default=defaults.child_given_parent,
                   help="when a parent fires, the probability that one of its children does")
  syn.add_argument("--parent-rate", type=float, default=defaults.parent_rate,
                   help="a parent fires this many times as often as a frequent feature")
  run = p.add_argument_group("run")
  run.add_argument("--out", default=None)
  run.add_argument("--log-every", type=int, default=100)
  run.add_argument("--ckpt-every", type=int, default=1000)
  run.add_argument("--wandb", action="store_true")
  run.add_argument("--tensorboard", action="store_true")
  run.add_argument("--distributed", action="store_true",
                   help="several hosts: jax.distributed.initialize(), which finds its peers "
                        "on TPU pods and clusters it knows")
  run.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes started by hand: process 0's address (implies "
                        "--distributed; needs --num-processes and --process-id)")
  run.add_argument("--num-processes", type=int, default=None)
  run.add_argument("--latent-shards", type=int, default=RunConfig.latent_shards, metavar="M",
                   help="split every F-sized array (W_enc, W_dec, b_enc, Adam's moments) over "
                        "M devices of each process, for SAEs wider than one device holds; "
                        "the batch is split over the others (docs/meshes.md)")
  run.add_argument("--process-id", type=int, default=None)
  run.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which the processes give up on one that stopped "
                        "answering")
  run.add_argument("--join-timeout", type=int, default=JOIN_TIMEOUT,
                   help="seconds a process started with --coordinator waits for the others "
                        "to join before it gives up")
  run.add_argument("--no-progress", action="store_true")
  run.add_argument("--verify", action="store_true",
                   help="check every cache shard's sha256 before training (a full read)")
  _say_defaults(p)
  return p


def _say_defaults(p: argparse.ArgumentParser) -> None:
  """--help shows every flag's default (k=64, F=65536, ...) after its help."""
  for action in p._actions:
    if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
        or "%(default)" in (action.help or "")):
      continue
    action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def config_from(args) -> RunConfig:
  """The RunConfig the flags describe. Every value is checked first (so a
  typo never waits for the data or for JAX), then D is found."""
  check_flags(args)
  from sae_jax import sources  # noqa: PLC0415 (JAX and the hub's libraries: the run starts here)
  d_model = sources.d_model_of(args.data, cache_dir=args.cache_dir, model=args.model,
                               revision=args.revision, synthetic_d_model=args.synthetic_d_model,
                               stream=args.stream, hook=args.hook, target_hook=args.target_hook)
  return _run_config(args, d_model, args.backend,
                     sources.transcoder_data(args.data, args.target_hook))


def check_flags(args) -> None:
  """Checks every flag's value as config_from does, without JAX and without
  finding D: the scripts run it before JAX starts (whose devices pick the
  default export backend, and whose multi-process runtime must start first)."""
  d_model = args.synthetic_d_model if args.data == "synthetic" else 1
  _run_config(args, d_model, args.backend or ("jax" if args.stream else "torch"),
              args.target_hook is not None)


def _run_config(args, d_model: int, backend: typing.Optional[str],
                transcoder: bool) -> RunConfig:
  runconfig.check_stream(args.stream, args.data, args.backend or "jax")
  sae_config = SAEConfig(d_model=d_model, n_latents=args.dict_size, k=args.k,
                         selection=args.selection, l=args.l, score=args.score,
                         sample_pool=args.sample_pool, ridge=args.ridge, sketch=args.sketch,
                         pool_every=args.pool_every, compute_dtype=args.compute_dtype,
                         transcoder=transcoder)
  train_config = TrainConfig(
      sae_config, batch_size=args.batch_size, tokens=args.tokens,
      steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
      decay_fraction=args.decay_fraction, clip_norm=args.clip_norm, dead_tokens=args.dead_tokens,
      auxk_weight=args.auxk_weight, threshold_start=args.threshold_start,
      threshold_beta=args.threshold_beta, seed=args.seed, step=args.step,
      matryoshka_groups=args.matryoshka_groups and tuple(args.matryoshka_groups),
      matryoshka_weights=args.matryoshka_weights and tuple(args.matryoshka_weights),
      target_l0=args.target_l0, bandwidth=args.bandwidth, sparsity_penalty=args.sparsity_penalty,
      sparsity_warmup_steps=args.sparsity_warmup_steps)
  local = all(x.endswith((".txt", ".jsonl")) for x in args.dataset)
  export_config = export.ExportConfig(
      model=args.model, revision=args.revision, hook=args.hook,
      target_hook=args.target_hook if args.data == "pythia" else None,
      dataset=tuple(args.dataset) if local else args.dataset[0], text_field=args.text_field,
      context_length=args.context_length,
      backend="jax" if args.stream and backend is None else backend)
  synthetic_config = SyntheticConfig(
      d_model=args.synthetic_d_model, n_features=args.synthetic_features,
      active=args.synthetic_active, noise=args.synthetic_noise, rare_fraction=args.rare_fraction,
      rare_rate=args.rare_rate, rare_magnitude=args.rare_magnitude, parents=args.parents,
      children=args.children, child_given_parent=args.child_given_parent,
      parent_rate=args.parent_rate, seed=args.seed)
  out = args.out or f"runs/{args.selection}-l{args.l:g}-k{args.k}"
  return RunConfig(train=train_config, out=out, data=args.data, cache_dir=args.cache_dir,
                   export=export_config, synthetic=synthetic_config, eval_tokens=args.eval_tokens,
                   downstream_contexts=args.downstream_contexts, inference=args.inference,
                   calibration_tokens=args.calibration_tokens, stream=args.stream,
                   stream_contexts=args.stream_contexts, latent_shards=args.latent_shards,
                   log_every=args.log_every, ckpt_every=args.ckpt_every, wandb=args.wandb,
                   tensorboard=args.tensorboard)


def check_sampled(base: RunConfig, ls, score: str) -> None:
  """Every Sampled-SAE variant of a sweep is a valid config (checked up front)."""
  for l in ls:
    dataclasses.replace(base.train.sae, selection="sampled", l=float(l), score=score)


def ignored_flags(parser: argparse.ArgumentParser, args) -> list:
  """The flags set away from their defaults that this run's rule ignores,
  as "--flag value" (a sweep trains every rule: for train.py)."""
  unused = runconfig.unread(args.selection, args.score) + runconfig.unread_recipe(args.selection)
  return [f"--{dest.replace('_', '-')} {getattr(args, dest)}" for dest in unused
          if hasattr(args, dest) and getattr(args, dest) != parser.get_default(dest)]


def distributed(args) -> typing.Optional[dict]:
  """jax.distributed.initialize's arguments from the flags: None for one
  process, {} to let JAX find its peers (--distributed), or the explicit
  coordinator, process count and process id."""
  explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
              "--process-id": args.process_id}
  given = [flag for flag, value in explicit.items() if value is not None]
  validation.check_int_field("flags", "heartbeat_timeout", args.heartbeat_timeout)
  if args.join_timeout != JOIN_TIMEOUT and len(given) < 3:
    raise ValueError(f"--join-timeout {args.join_timeout} needs --coordinator, --num-processes "
                     f"and --process-id (with --distributed, JAX finds its peers by itself)")
  if not given:
    return {"heartbeat_timeout_seconds": args.heartbeat_timeout} if args.distributed else None
  if len(given) < 3:
    raise ValueError(f"{', '.join(given)} needs all of --coordinator HOST:PORT, "
                     f"--num-processes N and --process-id I")
  host, _, port = args.coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator must be HOST:PORT (process 0's address); got "
                     f"{args.coordinator!r}")
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"--process-id must be in [0, --num-processes) and --num-processes >= 1; "
                     f"got --process-id {args.process_id} of --num-processes "
                     f"{args.num_processes}")
  validation.check_int_field("flags", "join_timeout", args.join_timeout)
  return {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
          "process_id": args.process_id, "heartbeat_timeout_seconds": args.heartbeat_timeout,
          "initialization_timeout": args.join_timeout}


def guarded(work: typing.Callable[[], typing.Any], *, flags=None,
            check: typing.Optional[typing.Callable[[], typing.Any]] = None) -> int:
  """Runs `work` as a script's main: what stops it is one line on stderr and
  an exit status, never a traceback. Bad input (ValueError) exits 2; a
  training that cannot go on (non-finite steps) or an operating-system error
  exits 1; Ctrl-C exits 130. `flags`: the parsed flags, whose --distributed,
  --coordinator, ... start JAX's multi-process runtime first. `check`: runs
  before anything starts JAX (check_flags: a bad value is refused at once)."""
  _quiet_orbax_failures()
  peers = watching = None
  try:
    if check is not None:
      check()
    peers = distributed(flags) if flags is not None else None
    if peers is not None:
      import jax  # noqa: PLC0415
      # CPU devices of several processes talk through gloo (no effect on TPU and GPU).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      timeout = peers.pop("heartbeat_timeout_seconds")
      join = peers.pop("initialization_timeout", None)
      joined = (peers_lib.joining(peers["coordinator_address"], peers["process_id"],
                                  peers["num_processes"], join) if join else lambda: None)
      try:
        # JAX aborts a process whose peer is silent for its timeout: ours comes
        # first. JAX's client beats every half of its timeout, so a peer killed
        # just before a beat is declared dead only half JAX's timeout later
        # (measured: 10.5 s for 20 s); at four times ours that is twice ours.
        jax.distributed.initialize(**peers, heartbeat_timeout_seconds=4 * timeout,
                                   **({"initialization_timeout": join + 60} if join else {}))
      except RuntimeError as error:
        reason = validation.reason(error, 300)
        raise ValueError(f"could not join the other processes ({reason})") from None
      finally:
        joined()
      from jax._src import distributed as jax_distributed  # noqa: PLC0415
      watching = peers_lib.watch(jax_distributed.global_state.client, jax.process_index(),
                                 jax.process_count(), timeout)
    _check_platform()
    work()
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except OSError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted: re-run the same command to resume", file=sys.stderr)
    return 130
  except Exception as error:  # noqa: BLE001
    from sae_jax import train  # noqa: PLC0415 (here only once a run has started JAX)
    if isinstance(error, train.NonFiniteError):
      print(f"error: {error}", file=sys.stderr)
      return 1
    if type(error).__module__.startswith("gcsfs"):  # its HttpError is no OSError
      print(f"error: a gs:// request failed ({error}): check the bucket and this machine's "
            f"credentials, then re-run to resume", file=sys.stderr)
      return 1
    if peers is None or type(error).__name__ != "JaxRuntimeError":
      raise
    # A collective with a process that died (gloo: "Connection closed by
    # peer"). Exit now: JAX's shutdown barrier would wait for the dead
    # process, then abort with a C++ stack trace.
    reason = validation.reason(error, 300)
    print(f"error: a collective with the other processes failed ({reason}): a process "
          f"stopped or lost its connection; re-launch every process with the same command to "
          f"resume from the last complete checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  finally:
    if watching is not None:
      watching()
  return 0


def _check_platform() -> None:
  """One line when JAX cannot start the platform JAX_PLATFORMS names (a
  missing plugin ends in a bare AssertionError inside JAX)."""
  import jax  # noqa: PLC0415
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as error:
    reason = validation.reason(error, 300, empty="no such backend is installed")
    raise ValueError(f"JAX cannot start a backend for JAX_PLATFORMS="
                     f"{os.environ.get('JAX_PLATFORMS', '')!r} ({reason}): install that "
                     f"platform's jax plugin (for CUDA, jax[cuda12]), or unset JAX_PLATFORMS to "
                     f"take what this machine has") from None


def _quiet_orbax_failures() -> None:
  """When a read or write fails inside orbax (a damaged checkpoint, a full
  disk), tensorstore's callbacks still post to orbax's event loop after it
  has closed, printing 'Event loop is closed' tracebacks as unraisable
  exceptions, and asyncio logs the futures and tasks nobody read. The
  failure itself reaches the main thread and is said in one line; these
  are not shown."""
  hook = sys.unraisablehook

  def unraisable(info):
    if not (isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == "Event loop is closed"):
      hook(info)

  sys.unraisablehook = unraisable
  import logging  # noqa: PLC0415

  class Unread(logging.Filter):
    def filter(self, record):
      return "exception was never retrieved" not in str(record.msg)  # a Future's or a Task's

  logging.getLogger("asyncio").addFilter(Unread())
