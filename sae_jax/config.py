"""Configs: what an SAE is and how it is trained (defaults from SPEC.md).

Frozen dataclasses, validated on construction, one docstring line per field.
They are what `config.json` holds; pure array functions never take them.

This module imports no JAX: the scripts' parsers read these defaults, and
`--help` or a refused flag answers before JAX starts. The few properties that
need a JAX module (Matryoshka's groups, the default learning rate) import it
when first called, once a run is under way.
"""

import dataclasses
import math
import typing

import numpy as np

from sae_jax import validation

SELECTIONS = ("sampled", "batchtopk", "topk", "jumprelu")
COMPUTE_DTYPES = ("float32", "bfloat16")
STEPS = ("fast", "dense")
LAYOUTS = ("auto", "entries", "codes")
# The recipe's warm-up and threshold start; shorter runs take 10% of their steps.
DEFAULT_WARMUP_STEPS = 1000
# JumpReLU's sparsity warm-up (dictionary_learning's); shorter runs take 20% of their steps.
DEFAULT_SPARSITY_WARMUP_STEPS = 2000
# The step counter is int32, and synthetic data keep the top indices for
# their initialisation, evaluation and calibration batches.
MAX_STEPS = 2**31 - 4


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """The SAE and its selection rule."""
  d_model: int
  """D, the width of the activations."""
  n_latents: int = 65536
  """F, the dictionary size."""
  k: int = 64
  """Latents per token (TopK), or on average over the batch (the others);
  JumpReLU: its target L0 unless TrainConfig.target_l0 is set."""
  selection: str = "sampled"
  """"sampled" (Sampled-SAE), "batchtopk", "topk" or "jumprelu" (`jumprelu.py`)."""
  l: float = 8.0
  """Sampled-SAE pool factor: the pool holds min(F, ceil(k·l)) latents."""
  score: str = "l2"
  """Sampled-SAE column score: "l2", "squared_l2", "entropy", "uniform" or "leverage"."""
  sample_pool: bool = False
  """Sampled-SAE: draw the pool ∝ score (key from the step) instead of taking the top scores."""
  ridge: float = 0.01
  """score="leverage": the ridge λ of the leverage scores (the authors' ridge_lambda)."""
  sketch: typing.Optional[int] = None
  """score="leverage": rows of the CountSketch of the tokens (the authors'
  sketching_size; drawn from the step's key); None for exact scores."""
  pool_every: int = 1
  """Sampled-SAE: choose the pool on every pool_every-th step and keep it in
  between (the authors' sampling_update_freq); 1 chooses it on every batch."""
  compute_dtype: str = "float32"
  """Dtype of the encoder matmul ("float32" or "bfloat16"); it accumulates in float32."""
  transcoder: bool = False
  """A transcoder (`transcoder.py`): it encodes one hook's activations, not
  centred by b_dec, and reconstructs another's; its rows are (input, target)
  pairs, [2, D] each."""

  def __post_init__(self):
    validation.check_int_field("SAEConfig", "d_model", self.d_model)
    validation.check_int_field("SAEConfig", "n_latents", self.n_latents)
    validation.check_k(self.k, self.n_latents, name="SAEConfig.k")
    validation.check_choice_field("SAEConfig", "selection", self.selection, SELECTIONS)
    try:
      validation.check_l(self.l)
    except ValueError as e:
      raise ValueError(f"SAEConfig.{e}") from None
    validation.check_choice_field("SAEConfig", "score", self.score, validation.SCORE_METHODS)
    if not isinstance(self.sample_pool, bool):
      raise ValueError(f"SAEConfig.sample_pool must be True or False; got {self.sample_pool!r}")
    if self.score == "uniform" and not self.sample_pool:
      raise ValueError(
          "SAEConfig.score='uniform' gives every latent the same score, so it needs "
          "sample_pool=True (a random pool); got sample_pool=False")
    validation.check_choice_field("SAEConfig", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    validation.check_leverage(self.ridge, self.sketch, prefix="SAEConfig.")
    validation.check_int_field("SAEConfig", "pool_every", self.pool_every)
    if not isinstance(self.transcoder, bool):
      raise ValueError(f"SAEConfig.transcoder must be True or False; got {self.transcoder!r}")

  @property
  def pool_size(self) -> int:
    """P = min(F, ceil(k·l)) (Sampled-SAE only)."""
    return validation.pool_size(self.k, self.l, self.n_latents)

  @property
  def pool_rule(self) -> dict:
    """The Sampled-SAE pool's plain arguments, for `model.new_pool` and
    `model.step_pool` (k, l, and `model.sampled_options`'s keywords)."""
    return dict(k=self.k, l=self.l, score=self.score, sample_pool=self.sample_pool,
                ridge=self.ridge, sketch=self.sketch)

  @property
  def centred(self) -> bool:
    """Whether the encoder reads x - b_dec (the SAEs trained by rule), not x
    (JumpReLU, as dictionary_learning's, and transcoders, whose b_dec is the
    target's)."""
    return self.selection != "jumprelu" and not self.transcoder

  @property
  def row_width(self) -> int:
    """Columns of a data row: D, or 2·D for a transcoder's (input, target) pair."""
    return 2 * self.d_model if self.transcoder else self.d_model

  @property
  def keeps_pool(self) -> bool:
    """Whether a Sampled-SAE pool is kept between batches (pool_every > 1)."""
    return self.selection == "sampled" and self.pool_every > 1


def default_b1(selection: str) -> float:
  """Adam's b1 unless given: 0.9, or 0 for JumpReLU (the paper's and
  dictionary_learning's)."""
  return 0.0 if selection == "jumprelu" else 0.9


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training recipe."""
  sae: SAEConfig
  """The SAE being trained."""
  batch_size: int = 4096
  """Tokens per step, over all devices together."""
  tokens: int = 100_000_000
  """Training tokens; the run takes tokens // batch_size steps unless `steps` is set."""
  steps: typing.Optional[int] = None
  """Training steps; overrides `tokens` when set."""
  lr: typing.Optional[float] = None
  """Peak learning rate; None means 2e-4 / sqrt(F / 2^14)."""
  b1: typing.Optional[float] = None
  """Adam beta1; None means 0.9, or 0 for JumpReLU (the paper's and
  dictionary_learning's)."""
  b2: float = 0.999
  """Adam beta2."""
  clip_norm: float = 1.0
  """Global gradient-norm clip (of the gradient of `loss`, summed over D as in
  dictionary_learning and SAELens)."""
  warmup_steps: typing.Optional[int] = None
  """Linear learning-rate warm-up from 0; None means min(1000, 10% of the steps)."""
  decay_fraction: float = 0.2
  """Linear decay to 0 over this last fraction of the steps."""
  dead_tokens: int = 10_000_000
  """A latent is dead after this many tokens without firing."""
  auxk_latents: typing.Optional[int] = None
  """Dead latents the AuxK loss reconstructs the residual from; None means D // 2."""
  auxk_weight: float = 1 / 32
  """Weight of the AuxK loss."""
  threshold_beta: float = 0.999
  """EMA decay of the inference threshold."""
  threshold_start: typing.Optional[int] = None
  """The threshold EMA updates on the steps after this one (0-based, as
  dictionary_learning's `step > threshold_start_step`; earlier selections are
  still settling); None means min(1000, 10% of the steps)."""
  max_bad_steps: int = 10
  """Training stops after this many consecutive steps with non-finite loss or gradients."""
  seed: int = 0
  """Seeds the initialisation and the sampled pools."""
  step: str = "fast"
  """"fast" (dense encoder forward, the rest on the selected entries) or "dense" (the autodiff reference)."""
  layout: str = "auto"
  """The fast step's TopK, BatchTopK and AuxK gradients: by their "entries"
  (gathers and scatters) or as dense "codes"; "auto" picks by backend and
  sizes (`layouts.layout`). The same gradients up to float rounding."""
  matryoshka_groups: typing.Optional[tuple] = None
  """Matryoshka: the groups' fractions of F in latent order, summing to 1
  (dictionary_learning's group_fractions); the loss reconstructs from each
  prefix of groups (`matryoshka.py`). None: the plain loss."""
  matryoshka_weights: typing.Optional[tuple] = None
  """Matryoshka: each prefix's weight in the loss; None means 1/G each
  (dictionary_learning's default)."""
  target_l0: typing.Optional[float] = None
  """JumpReLU: the L0 its sparsity penalty aims at; None means the SAE's k."""
  bandwidth: float = 0.001
  """JumpReLU: the straight-through estimators' bandwidth ε (scaled units)."""
  sparsity_penalty: float = 1.0
  """JumpReLU: c, the weight of the penalty c · (L0 / target - 1)²."""
  sparsity_warmup_steps: typing.Optional[int] = None
  """JumpReLU: the penalty's weight rises linearly from 0 over these steps;
  None means min(2000, 20% of the steps) (dictionary_learning: 2000)."""

  def __post_init__(self):
    if not isinstance(self.sae, SAEConfig):
      raise ValueError(f"TrainConfig.sae must be an SAEConfig; got {type(self.sae).__name__}")
    validation.check_int_field("TrainConfig", "batch_size", self.batch_size)
    validation.check_int_field("TrainConfig", "tokens", self.tokens)
    if self.steps is not None:
      validation.check_int_field("TrainConfig", "steps", self.steps)
    elif self.tokens < self.batch_size:
      raise ValueError(
          f"TrainConfig.tokens ({self.tokens}) must be at least one batch "
          f"(batch_size={self.batch_size})")
    if self.total_steps > MAX_STEPS:
      raise ValueError(
          f"TrainConfig: {self.total_steps} steps is more than the step counter holds "
          f"(int32: at most {MAX_STEPS} steps); give fewer --steps or --tokens")
    if self.lr is not None:
      validation.check_real_field("TrainConfig", "lr", self.lr, 0, math.inf, lo_open=True)
    if self.b1 is None:  # resolved here, so config.json records the value the run used
      object.__setattr__(self, "b1", default_b1(self.sae.selection))
    validation.check_real_field("TrainConfig", "b1", self.b1, 0, 1, hi_open=True)
    validation.check_real_field("TrainConfig", "b2", self.b2, 0, 1, hi_open=True)
    validation.check_real_field("TrainConfig", "clip_norm", self.clip_norm, 0, math.inf, lo_open=True)
    validation.check_real_field("TrainConfig", "decay_fraction", self.decay_fraction, 0, 1)
    decay_start = self.total_steps - round(self.decay_fraction * self.total_steps)
    # Not given: scaled to the run, so that a short first run is not refused.
    # Resolved here, so config.json records the value the run used.
    scaled = min(DEFAULT_WARMUP_STEPS, self.total_steps // 10)
    if self.warmup_steps is None:
      object.__setattr__(self, "warmup_steps", min(scaled, decay_start))
    if self.threshold_start is None:
      object.__setattr__(self, "threshold_start", scaled)
    validation.check_int_field("TrainConfig", "warmup_steps", self.warmup_steps, minimum=0)
    if self.warmup_steps > decay_start:
      raise ValueError(
          f"TrainConfig.warmup_steps ({self.warmup_steps}) must end before the decay "
          f"starts at step {decay_start} of {self.total_steps}: shorten the warm-up "
          f"or train longer")
    validation.check_int_field("TrainConfig", "dead_tokens", self.dead_tokens)
    if self.auxk_latents is not None:
      validation.check_int_field("TrainConfig", "auxk_latents", self.auxk_latents)
      if self.auxk_latents > self.sae.n_latents:
        raise ValueError(
            f"TrainConfig.auxk_latents must be at most n_latents={self.sae.n_latents}; "
            f"got {self.auxk_latents}")
    validation.check_real_field("TrainConfig", "auxk_weight", self.auxk_weight, 0, math.inf)
    validation.check_real_field("TrainConfig", "threshold_beta", self.threshold_beta, 0, 1, hi_open=True)
    validation.check_int_field("TrainConfig", "threshold_start", self.threshold_start, minimum=0)
    if self.threshold_start >= self.total_steps - 1 and self.sae.selection != "jumprelu":
      raise ValueError(
          f"TrainConfig.threshold_start ({self.threshold_start}) must be below the last "
          f"step ({self.total_steps - 1}; the EMA updates on the steps after it), or the "
          f"inference threshold is never learned")
    validation.check_int_field("TrainConfig", "max_bad_steps", self.max_bad_steps)
    validation.check_int_field("TrainConfig", "seed", self.seed, minimum=0,
                               maximum=validation.MAX_SEED)
    validation.check_choice_field("TrainConfig", "step", self.step, STEPS)
    validation.check_choice_field("TrainConfig", "layout", self.layout, LAYOUTS)
    for name in ("matryoshka_groups", "matryoshka_weights"):  # config.json holds lists
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.sae.selection == "jumprelu":
      self._check_jumprelu()
    if self.matryoshka_groups is not None:
      from sae_jax import matryoshka  # noqa: PLC0415 (JAX: see the module's docstring)
      matryoshka.check(self.matryoshka_groups, self.matryoshka_weights, self.sae.n_latents)
    elif self.matryoshka_weights is not None:
      raise ValueError(f"TrainConfig.matryoshka_weights ({list(self.matryoshka_weights)}) "
                       f"weigh Matryoshka's groups: give matryoshka_groups too")

  def _check_jumprelu(self) -> None:
    """The penalty's fields, its defaults resolved (config.json records them)."""
    owner = "TrainConfig"
    if self.matryoshka_groups is not None:
      raise ValueError(f"TrainConfig.matryoshka_groups ({list(self.matryoshka_groups)}) nest a "
                       f"BatchTopK or Sampled-SAE loss; JumpReLU has none (selection 'jumprelu')")
    if self.target_l0 is None:
      object.__setattr__(self, "target_l0", float(self.sae.k))
    validation.check_real_field(owner, "target_l0", self.target_l0, 0, self.sae.n_latents,
                                lo_open=True)
    validation.check_real_field(owner, "bandwidth", self.bandwidth, 0, math.inf, lo_open=True)
    validation.check_real_field(owner, "sparsity_penalty", self.sparsity_penalty, 0, math.inf)
    if self.sparsity_warmup_steps is None:
      object.__setattr__(self, "sparsity_warmup_steps",
                         min(DEFAULT_SPARSITY_WARMUP_STEPS, self.total_steps // 5))
    validation.check_int_field(owner, "sparsity_warmup_steps", self.sparsity_warmup_steps,
                               minimum=0, maximum=self.total_steps - 1)

  @property
  def total_steps(self) -> int:
    return self.steps if self.steps is not None else self.tokens // self.batch_size

  @property
  def learning_rate(self) -> float:
    from sae_jax import optimizer  # noqa: PLC0415 (JAX: see the module's docstring)
    return self.lr if self.lr is not None else optimizer.default_learning_rate(self.sae.n_latents)

  @property
  def auxk_k(self) -> int:
    """Latents per token in the AuxK reconstruction."""
    if self.auxk_latents is not None:
      return self.auxk_latents
    return max(1, min(self.sae.d_model // 2, self.sae.n_latents))

  @property
  def dead_steps(self) -> int:
    """Steps without firing after which a latent counts as dead."""
    return -(-self.dead_tokens // self.batch_size)

  @property
  def nested(self) -> typing.Optional[tuple]:
    """Matryoshka's groups in latents and prefix weights (a
    `matryoshka.Nested`), or None."""
    if self.matryoshka_groups is None:
      return None
    from sae_jax import matryoshka  # noqa: PLC0415 (JAX: see the module's docstring)
    sizes = matryoshka.group_sizes(self.matryoshka_groups, self.sae.n_latents)
    return matryoshka.Nested(sizes, tuple(float(w) for w in self.matryoshka_weights) if
                             self.matryoshka_weights is not None else
                             matryoshka.default_weights(len(sizes)))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for name in ("matryoshka_groups", "matryoshka_weights"):  # as config.json holds them
      if d[name] is not None:
        d[name] = list(d[name])
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    """The inverse of `to_dict`; unknown keys are an error."""
    d = dict(d)
    sae = d.pop("sae", None)
    if not isinstance(sae, dict):
      raise ValueError(f"config needs an 'sae' section (a dict); got {sae!r}")
    for owner, fields, given in (("SAEConfig", SAEConfig, sae), ("TrainConfig", cls, d)):
      unknown = set(given) - {f.name for f in dataclasses.fields(fields)}
      if unknown:
        raise ValueError(f"{owner} has no field(s) {sorted(unknown)}")
    return cls(sae=SAEConfig(**sae), **d)


FREQUENT, RARE, PARENT, CHILD = 0, 1, 2, 3
CLASS_NAMES = {FREQUENT: "frequent", RARE: "rare", PARENT: "parent", CHILD: "child"}
NO_PARENT = -1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The generating process of synthetic activations (`synthetic.py`)."""
  d_model: int = 64
  """D, the width of the activations."""
  n_features: int = 512
  """Number of true dictionary directions (random unit vectors)."""
  active: float = 4.0
  """Expected number of features firing per token."""
  magnitude: float = 1.0
  """Mean coefficient of a frequent feature when it fires."""
  spread: float = 0.5
  """Coefficients are uniform in magnitude · (1 ± spread)."""
  noise: float = 0.01
  """Standard deviation of isotropic Gaussian noise per dimension."""
  rare_fraction: float = 0.0
  """Fraction of features that are rare and strong (0: no activation lottery)."""
  rare_rate: float = 0.05
  """A rare feature fires this many times as often as a frequent one."""
  rare_magnitude: float = 8.0
  """... with this many times the coefficient."""
  parents: int = 0
  """Features that have children (0: no hierarchy); they follow the rare ones."""
  children: int = 4
  """Children per parent; they follow the parents, grouped by parent."""
  child_given_parent: float = 0.5
  """When a parent fires, the probability that one of its children fires too."""
  parent_rate: float = 1.0
  """A parent fires this many times as often as a frequent feature (its
  children with it)."""
  seed: int = 0
  """Seeds the dictionary and every batch."""

  def __post_init__(self):
    owner = "SyntheticConfig"
    validation.check_int_field(owner, "d_model", self.d_model)
    validation.check_int_field(owner, "n_features", self.n_features)
    if isinstance(self.active, (int, float)) and self.active > self.n_features:
      raise ValueError(f"SyntheticConfig: {self.n_features} features (--synthetic-features) "
                       f"cannot have {self.active:g} active per token on average: give at "
                       f"least {math.ceil(self.active)} features")
    validation.check_real_field(owner, "active", self.active, 0, self.n_features)
    for name, hi in (("magnitude", math.inf), ("spread", 1), ("noise", math.inf),
                     ("rare_fraction", 1), ("rare_rate", math.inf),
                     ("rare_magnitude", math.inf)):
      validation.check_real_field(owner, name, getattr(self, name), 0, hi)
    validation.check_int_field(owner, "parents", self.parents, minimum=0)
    validation.check_int_field(owner, "children", self.children)
    validation.check_real_field(owner, "child_given_parent", self.child_given_parent, 0, 1)
    validation.check_real_field(owner, "parent_rate", self.parent_rate, 0, math.inf,
                                lo_open=True)
    if self.n_rare + self.parents * (1 + self.children) > self.n_features:
      raise ValueError(
          f"SyntheticConfig: {self.n_rare} rare features and {self.parents} parents with "
          f"{self.children} children each need {self.n_rare + self.parents * (1 + self.children)} "
          f"features; n_features is {self.n_features}")
    validation.check_int_field(owner, "seed", self.seed, minimum=0,
                               maximum=validation.MAX_SEED)
    if self.firing_rates().max() > 1:
      raise ValueError(
          f"SyntheticConfig: active={self.active} with rare_fraction={self.rare_fraction} "
          f"and rare_rate={self.rare_rate} needs a firing probability above 1")

  @property
  def n_rare(self) -> int:
    return round(self.rare_fraction * self.n_features)

  def feature_class(self) -> np.ndarray:
    """[n_features] int: RARE for the first n_rare features, then PARENT and
    CHILD for the hierarchy's, FREQUENT after."""
    i = np.arange(self.n_features)
    first_child = self.n_rare + self.parents
    return np.select([i < self.n_rare, i < first_child,
                      i < first_child + self.parents * self.children],
                     [RARE, PARENT, CHILD], FREQUENT)

  def parent_of(self) -> np.ndarray:
    """[n_features] int: each child's parent feature, NO_PARENT for the others."""
    i = np.arange(self.n_features)
    first_child = self.n_rare + self.parents
    return np.where(self.feature_class() == CHILD,
                    self.n_rare + (i - first_child) // self.children, NO_PARENT)

  def firing_rates(self) -> np.ndarray:
    """[n_features] probability that each feature fires in a token (a
    child's: its parent's rate times child_given_parent / children)."""
    kind = self.feature_class()
    relative = np.select([kind == RARE, kind == PARENT, kind == CHILD],
                         [self.rare_rate, self.parent_rate,
                          self.parent_rate * (self.child_given_parent / self.children)], 1.0)
    return relative * (self.active / relative.sum()) if relative.sum() else relative

  def magnitudes(self) -> np.ndarray:
    """[n_features] mean coefficient of each feature when it fires."""
    rare = self.feature_class() == RARE
    return self.magnitude * np.where(rare, self.rare_magnitude, 1.0)
