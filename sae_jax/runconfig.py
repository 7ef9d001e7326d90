"""What a run is: `RunConfig`, its config.json form, and what a resume may change."""

import dataclasses
import os

from sae_jax import export as export_lib
from sae_jax import storage
from sae_jax import validation
from sae_jax.config import SyntheticConfig
from sae_jax.config import TrainConfig

# Fields a run may change when it resumes: train.step only changes how the
# same gradients are computed, and the cache's manifest guards its backend.
# inference and calibration_tokens only change what is done after training.
# out is where the run is, not what it is: a run found under another spelling
# of its path (or moved) resumes.
RESUMABLE_FIELDS = ("log_every", "ckpt_every", "keep_checkpoints", "wandb", "tensorboard",
                    "train.step", "export.backend", "inference", "calibration_tokens", "out",
                    "latent_shards")
# Fields added after runs were saved without them: what those runs meant.
ADDED_FIELDS = {"stream": False, "stream_contexts": 512, "train.sae.ridge": 0.01,
                "train.sae.sketch": None, "train.sae.pool_every": 1, "synthetic.parents": 0,
                "synthetic.children": 4, "synthetic.child_given_parent": 0.5,
                "train.layout": "auto", "train.matryoshka_groups": None,
                "train.matryoshka_weights": None, "synthetic.parent_rate": 1.0,
                "train.target_l0": None, "train.bandwidth": 0.001,
                "train.sparsity_penalty": 1.0, "train.sparsity_warmup_steps": None,
                "train.sae.transcoder": False, "export.target_hook": None, "latent_shards": 1}
# Fields that only change what is done after training: a finished run whose
# saved config differs in one of them is finished again.
END_FIELDS = ("inference", "calibration_tokens")
INFERENCE_RULES = ("auto", "per-latent", "topk", "global")  # inference.py
# The SAE's fields only Sampled-SAE reads.
POOL_FIELDS = ("l", "score", "sample_pool", "pool_every", "ridge", "sketch")
# The recipe's fields only JumpReLU reads, and those only the selection rules read.
JUMPRELU_FIELDS = ("target_l0", "bandwidth", "sparsity_penalty", "sparsity_warmup_steps")
SELECTION_FIELDS = ("auxk_weight", "auxk_latents", "threshold_beta", "threshold_start", "step",
                    "layout")


def unread(selection: str, score: str) -> tuple:
  """The SAE's fields a rule never reads: the pool's without a pool, the
  leverage score's with another score (`cli.ignored_flags` names them)."""
  if selection != "sampled":
    return POOL_FIELDS
  return () if score == "leverage" else ("ridge", "sketch")


def unread_recipe(selection: str) -> tuple:
  """The recipe's (TrainConfig's) fields a rule never reads."""
  return SELECTION_FIELDS if selection == "jumprelu" else JUMPRELU_FIELDS
# config.json's records beside the config: the data a run trains on, and
# the numerics it was checkpointed under (`outdir.check_data`).
FINGERPRINT = "data_fingerprint"
NUMERICS = "numerics"
RECORDS = (FINGERPRINT, NUMERICS)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A training run: what to train, on which data, and where the outputs go."""
  train: TrainConfig
  """The SAE and its recipe."""
  out: str
  """Output directory: config.json, metrics.jsonl, checkpoints/, summary.json, saelens/."""
  data: str = "pythia"
  """"pythia" (the cache in cache_dir, exported first if missing), "synthetic",
  a cache directory or a .npy file [N, D]."""
  cache_dir: str = "cache/pythia-160m"
  """Where --data pythia keeps its activation cache."""
  # A factory: ExportConfig() asks JAX for its backend, which must wait for
  # jax.distributed.initialize on several hosts.
  export: export_lib.ExportConfig = dataclasses.field(default_factory=export_lib.ExportConfig)
  """Model, hook and text for --data pythia (its token budget is set by the run)."""
  synthetic: SyntheticConfig = SyntheticConfig()
  """The generating process for --data synthetic."""
  eval_tokens: int = 65536
  """Held-out tokens for the final evaluation."""
  inference: str = "auto"
  """The saved SAE's rule (BatchTopK, Sampled-SAE; `inference.py`):
  "per-latent", a threshold per latent calibrated to fire it as often as
  training did; "topk", each token's k′ ≤ k largest codes, k′ the one that
  reconstructs the calibration tokens best; "auto", per-latent unless its
  calibration FVU is over 1.1 times the training rule's, then topk; or
  "global", the EMA of the batch's smallest selected activation for every
  latent."""
  calibration_tokens: int = 65536
  """Training tokens the per-latent thresholds are calibrated on (whole
  batches; fewer if the data hold fewer)."""
  downstream_contexts: int = 16
  """--data pythia: contexts after the exported ones for the spliced-loss evaluation."""
  stream: bool = False
  """--data pythia: make the activations on the fly with the JAX model on the
  training devices, through an on-device shuffle buffer (no cache)."""
  stream_contexts: int = 512
  """--stream: contexts whose rows are shuffled together (over all devices)."""
  latent_shards: int = 1
  """M, the devices every F-sized array is split over (`mesh.py`); the
  batch is split over the devices / M others."""
  log_every: int = 100
  """Steps between lines of metrics.jsonl."""
  ckpt_every: int = 1000
  """Steps between checkpoints (one is also saved at the end and on SIGTERM)."""
  keep_checkpoints: int = 3
  """Checkpoints kept."""
  wandb: bool = False
  """Also log metrics to Weights & Biases (needs the wandb package)."""
  tensorboard: bool = False
  """Also log metrics for TensorBoard (needs the tensorboardX package)."""

  def __post_init__(self):
    for name in ("log_every", "ckpt_every", "keep_checkpoints", "stream_contexts"):
      validation.check_int_field("RunConfig", name, getattr(self, name))
    # Two tokens at least: the FVU divides by their variance, and the pools'
    # Jaccard compares two batches.
    validation.check_int_field("RunConfig", "eval_tokens", self.eval_tokens, minimum=2)
    validation.check_choice_field("RunConfig", "inference", self.inference, INFERENCE_RULES)
    if self.train.sae.selection == "jumprelu" and self.inference != "auto":
      raise ValueError(f"RunConfig.inference {self.inference!r}: a JumpReLU SAE is saved with "
                       f"its learned thresholds; leave --inference at 'auto'")
    if self.train.sae.transcoder and self.inference == "topk":
      raise ValueError("RunConfig.inference 'topk': a transcoder is saved with a threshold per "
                       "latent (SAELens has no TopK transcoder); use --inference per-latent, "
                       "global or auto")
    validation.check_int_field("RunConfig", "calibration_tokens", self.calibration_tokens)
    if self.calibration_tokens < self.train.batch_size:
      raise ValueError(f"RunConfig.calibration_tokens ({self.calibration_tokens}) must be at "
                       f"least one batch ({self.train.batch_size} tokens): the training rule "
                       f"is calibrated on whole batches")
    validation.check_int_field("RunConfig", "downstream_contexts", self.downstream_contexts,
                               minimum=0)
    if not isinstance(self.stream, bool):
      raise ValueError(f"RunConfig.stream must be True or False; got {self.stream!r}")
    check_stream(self.stream, self.data, self.export.backend)
    check_latent_shards(self)
    if self.data not in ("pythia", "synthetic"):
      path = storage.path(self.data)
      if not (path.is_dir() or (path.suffix == ".npy" and path.is_file())):
        raise ValueError(f"--data must be 'pythia', 'synthetic', a cache directory or a .npy "
                         f"file; {self.data!r} is none of these")
    if self.data == "pythia" and self.train.sae.transcoder != (self.export.target_hook is not None):
      raise ValueError(f"--data pythia: a transcoder (SAEConfig.transcoder "
                       f"{self.train.sae.transcoder}) goes with --target-hook, an SAE without "
                       f"it; got --target-hook {self.export.target_hook!r}")
    if self.data == "synthetic" and self.train.sae.transcoder:
      raise ValueError("--data synthetic makes SAE data, not a transcoder's (input, target) "
                       "pairs: train a transcoder on a model's hooks (--target-hook) or on "
                       "pairs in a cache or an [N, 2, D] .npy")
    if self.data == "synthetic" and self.synthetic.d_model != self.train.sae.d_model:
      raise ValueError(f"d_model {self.train.sae.d_model} differs from the synthetic data's "
                       f"{self.synthetic.d_model}")

  def to_dict(self) -> dict:
    """config.json: every field the run uses. The export section is recorded
    for --data pythia only, the synthetic one for --data synthetic only."""
    d = dataclasses.asdict(self)
    d["train"] = self.train.to_dict()
    d["export"] = self.export.identity() | {"tokens": self.export.tokens,
                                            "device": self.export.device}
    return recorded(d)

  @classmethod
  def from_dict(cls, d: dict) -> "RunConfig":
    """The config a config.json holds (any version's: a section it leaves out
    did not apply to its run, and takes its defaults)."""
    d = {k: v for k, v in d.items() if k not in RECORDS}
    export = d.pop("export", None)
    synthetic = d.pop("synthetic", None)
    return cls(train=TrainConfig.from_dict(d.pop("train")),
               export=(export_lib.ExportConfig() if export is None
                       else export_lib.ExportConfig(**export)),
               synthetic=(SyntheticConfig() if synthetic is None
                          else SyntheticConfig(**synthetic)), **d)


def recorded(d: dict) -> dict:
  """`d` (a config's dict, nested or flat) without the sections its data do
  not read: "export" unless data is "pythia", "synthetic" unless it is
  "synthetic". config.json written before this rule held them all."""
  unused = tuple(section for section, data in (("export", "pythia"), ("synthetic", "synthetic"))
                 if d.get("data") != data)
  return {k: v for k, v in d.items() if k.split(".")[0] not in unused}


def flat(d: dict, prefix: str = "") -> dict:
  """{"a.b": v} from {"a": {"b": v}}."""
  return {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}


def differences(saved: dict, config: RunConfig) -> list:
  """What `config` changes of a saved config.json that a resume may not
  change, one "field: saved X, now Y" each."""
  old = {k: v for k, v in saved.items() if k not in RECORDS}
  before, after = recorded(ADDED_FIELDS | flat(old)), flat(config.to_dict())
  # Fields that do nothing both then and now: --tokens while --steps is set,
  # the SAE's and the recipe's fields neither rule reads, --cache-dir where
  # no cache is made.
  unused = ({"train.tokens"} if before.get("train.steps") is not None
            and before.get("train.steps") == after.get("train.steps") else set())
  rule = lambda d: unread(d.get("train.sae.selection"), d.get("train.sae.score"))
  unused |= {f"train.sae.{f}" for f in set(rule(before)) & set(rule(after))}
  recipe = lambda d: unread_recipe(d.get("train.sae.selection"))
  unused |= {f"train.{f}" for f in set(recipe(before)) & set(recipe(after))}
  if _one_path(before.get("data"), after.get("data")):
    unused.add("data")  # spelled otherwise; the data's fingerprint checks its content
  reads_cache = lambda d: d.get("data") == "pythia" and not d.get("stream")
  if not reads_cache(before) and not reads_cache(after):
    unused.add("cache_dir")  # synthetic, a .npy, a cache given as --data, or --stream
  return [f"{k}: saved {before.get(k)!r}, now {after.get(k)!r}"
          for k in sorted(set(before) | set(after))
          if k not in RESUMABLE_FIELDS and k not in unused and before.get(k) != after.get(k)]


def _one_path(saved, now) -> bool:
  """Whether two --data values are one local file or folder spelled two ways
  (acts.npy, ./acts.npy, its absolute path)."""
  if not all(isinstance(v, str) and v not in ("synthetic", "pythia") for v in (saved, now)):
    return False
  try:
    return os.path.samefile(saved, now)
  except OSError:  # either is missing here, or remote (gs://)
    return False


def check_latent_shards(config: RunConfig) -> None:
  """What --latent-shards splits: TopK, BatchTopK and Sampled-SAE SAEs (and
  transcoders), F into equal parts, batches from a cache, a .npy or
  synthetic data."""
  m, train = config.latent_shards, config.train
  validation.check_int_field("RunConfig", "latent_shards", m)
  if m == 1:
    return
  if train.sae.selection == "jumprelu" or train.matryoshka_groups is not None:
    rule = "JumpReLU" if train.sae.selection == "jumprelu" else "Matryoshka"
    raise ValueError(f"--latent-shards {m}: {rule} SAEs are not split over latent shards yet "
                     f"(TopK, BatchTopK and Sampled-SAE are); use --latent-shards 1")
  if train.sae.n_latents % m:
    raise ValueError(f"--latent-shards {m} must divide --dict-size {train.sae.n_latents}")
  if config.stream:
    raise ValueError(f"--latent-shards {m}: --stream makes its batches on a mesh without a "
                     f"latent axis; export a cache first (drop --stream), or use "
                     f"--latent-shards 1")
  if train.step != "fast":
    raise ValueError(f"--latent-shards {m} trains with its own step: --step {train.step} does "
                     f"not apply; leave it at fast")
  if train.layout != "auto" and train.sae.selection != "topk":
    raise ValueError(f"--latent-shards {m}: --layout {train.layout} applies to TopK's "
                     f"gradients only (BatchTopK's are dense codes within each shard, "
                     f"Sampled-SAE's its pool's); leave it at auto")


def check_stream(stream: bool, data_arg: str, backend: str) -> None:
  """--stream needs --data pythia and the JAX model."""
  if stream and data_arg != "pythia":
    raise ValueError(f"--stream makes activations with the language model: it needs "
                     f"--data pythia; got --data {data_arg!r}")
  if stream and backend != "jax":
    raise ValueError(f"--stream runs the model in JAX; got --backend {backend!r}")
