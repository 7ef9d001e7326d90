"""Activations made on the fly (`train.py --data pythia --stream`): the JAX
language model (`lm.py`) runs on the training devices, and its rows go through an on-device
shuffle buffer. Nothing is written to disk.

The text is cut into contexts as the export cuts it, and laid out as

    [evaluation contexts | downstream contexts | training contexts ...]

Training contexts come `round_contexts` at a time (a round), split evenly
over the devices. Each device runs the model on its share, keeps the rows in
its memory, and shuffles their order with a key folded from (stream key,
round, device). Position 0 and excluded token ids are never drawn. A round
serves floor(min over devices of rows / b) steps, b = batch / devices, each
device giving b of its rows to each step; the few rows left over are dropped.
Every process reads the whole text and keeps its own devices' contexts, so it
knows every device's row count without talking to the others.

A round's start (index, first step, position in the text) and the stream key
are saved with each checkpoint (`position`). A resumed run tokenizes from
there, recomputes that round and skips to its step, so it sees exactly the
batches the uninterrupted run saw.
"""

import itertools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import data
from sae_jax import contexts as contexts_lib
from sae_jax import export
from sae_jax import hf
from sae_jax import hooks
from sae_jax import lm
from sae_jax.train import AXIS  # the training step's batch axis
_KEY_SALT = 0x5354  # keeps the shuffle key apart from the SAE's own keys


def valid_rows(tokens_CxL: np.ndarray, excluded: np.ndarray) -> np.ndarray:
  """Which rows may be drawn: not position 0, not an excluded token."""
  valid = ~np.isin(tokens_CxL, excluded)
  valid[:, 0] = False
  return valid


def _rows_at(lm_params, lm_config: lm.Config, ids, hook_names: tuple):
  """[b, L, W]: the activations at each hook, side by side (a transcoder's
  (input, target) pair is W = 2·D)."""
  return jnp.concatenate(lm.hooks_at(lm_params, lm_config, ids, hook_names), axis=-1)


def device_functions(mesh: jax.sharding.Mesh, lm_config: lm.Config, hook_names: tuple, *,
                     contexts_per_device: int, context_length: int, batch_contexts: int,
                     excluded: np.ndarray, rows_per_step: int):
  """The shuffle buffer's two jitted functions over `mesh` (axis "data"):

    fill(lm_params, tokens [devices, R, L], key_data, round) -> (acts, order):
      each device runs the model on its R contexts, `batch_contexts` at a
      time, and keeps acts [R·L, W] (`_rows_at`) and a shuffled order of its rows, the
      drawable ones (not position 0, not `excluded`) first;
    take(acts, order, j) -> [devices, rows_per_step, D]: batch j of the round.
  """
  R, L, b = contexts_per_device, context_length, rows_per_step
  chunk = max(c for c in range(1, min(batch_contexts, R) + 1) if R % c == 0)

  def fill(lm_params, tokens_1xRxL, key_data, round_index):
    tokens_RxL = tokens_1xRxL[0]
    acts = lax.map(lambda ids: _rows_at(lm_params, lm_config, ids, hook_names),
                   tokens_RxL.reshape(R // chunk, chunk, L))
    acts_NxD = acts.reshape(R * L, -1)
    valid_RxL = (~jnp.isin(tokens_RxL, excluded)) & (jnp.arange(L) > 0)[None, :]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data),
                                                round_index), lax.axis_index(AXIS))
    perm_N = jax.random.permutation(key, R * L)
    # A uniform shuffle of the valid rows, then the rest.
    order_N = perm_N[jnp.argsort(~valid_RxL.reshape(-1)[perm_N], stable=True)]
    return acts_NxD[None], order_N[None]

  def take(acts_1xNxD, order_1xN, j):
    return acts_1xNxD[0][lax.dynamic_slice_in_dim(order_1xN[0], j * b, b)][None]

  fill = jax.jit(jax.shard_map(fill, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()),
                               out_specs=(P(AXIS), P(AXIS))))
  take = jax.jit(jax.shard_map(take, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                               out_specs=P(AXIS)))
  return fill, take


class Stream:
  """Training batches made by the language model on the mesh's devices.

  Args:
    config: model, hook, text, context length, batch_contexts (contexts per
      forward pass) and exclude_token_ids, as for the export.
    mesh: the training mesh (axis "data"); the batches are laid out for it.
    batch_size: tokens per step, over all devices.
    round_contexts: contexts shuffled together (over all devices).
    eval_tokens: rows held out for evaluation, from the first contexts.
    downstream_contexts: contexts after those, for the spliced-loss evaluation.
    seed: seeds the shuffle (a resumed run takes the saved key instead).
  """

  def __init__(self, config: export.ExportConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
               round_contexts: int, eval_tokens: int, downstream_contexts: int, seed: int):
    n = mesh.size
    if round_contexts % n:
      raise ValueError(f"--stream-contexts {round_contexts} must be divisible by the {n} devices")
    if batch_size % n:
      raise ValueError(f"--batch-size {batch_size} must be divisible by the {n} devices")
    per_device, b = round_contexts // n, batch_size // n
    if per_device * (config.context_length - 1) < b:
      raise ValueError(
          f"--stream-contexts {round_contexts} gives each of the {n} devices "
          f"{per_device * (config.context_length - 1)} rows a round, fewer than the {b} it "
          f"gives each step; use at least {-(-b // (config.context_length - 1)) * n}")
    self.config, self.mesh, self.b = config, mesh, b
    self.round_contexts, self.per_device = round_contexts, per_device
    self.tokenizer = hf.tokenizer(config.model, config.revision)
    self.lm_config, params = lm.load(config.model, config.revision)
    self.hooks = (config.hook,) + ((config.target_hook,) if config.target_hook else ())
    for hook in self.hooks:
      hooks.check_decoder(hook, config.model, self.lm_config.n_layers)
    self.d_model = self.lm_config.hidden_size
    self.width = self.d_model * len(self.hooks)  # a row's columns
    self.lm_params = jax.device_put(params, NamedSharding(mesh, P()))
    self.excluded = np.asarray(config.exclude_token_ids, np.int32)
    self.key = [int(k) for k in np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.key(seed), _KEY_SALT)))]

    # The reserved contexts at the start of the text.
    located = contexts_lib.located_contexts(config, self.tokenizer)
    self.eval_tokens = eval_tokens
    self.eval_contexts, after = self._contexts_for(located, eval_tokens, "the evaluation rows")
    downstream = [self._next(located, "the downstream contexts")
                  for _ in range(downstream_contexts)]
    self.downstream_contexts = np.stack([c for c, _ in downstream]) if downstream else \
        np.zeros((0, config.context_length), np.int32)
    self.train_start = downstream[-1][1] if downstream else after
    self._rounds: list = []  # recent rounds: for `position`
    self._fill, self._take = device_functions(
        mesh, self.lm_config, self.hooks, contexts_per_device=per_device,
        context_length=config.context_length, batch_contexts=config.batch_contexts,
        excluded=self.excluded, rows_per_step=b)

  def _next(self, located, what):
    item = next(located, None)
    if item is None:
      raise ValueError(f"the text ran out before {what}: use more text "
                       f"({self.config.dataset!r})")
    return item

  def _contexts_for(self, located, n: int, what: str, limit: typing.Optional[int] = None):
    """The next contexts until they hold n drawable rows (or `limit` contexts),
    and the position after them."""
    contexts, rows, after = [], 0, (0, 0)
    while rows < n and (limit is None or len(contexts) < limit):
      context, after = self._next(located, what)
      contexts.append(context)
      rows += int(valid_rows(context[None], self.excluded).sum())
    return np.stack(contexts), after

  # --- Rows on the host's view (evaluation, initialisation) ------------------

  def rows(self, contexts_CxL: np.ndarray) -> np.ndarray:
    """Float32 [rows, W]: the valid rows of these contexts, in order."""
    out = []
    for start in range(0, len(contexts_CxL), self.config.batch_contexts):
      ids = contexts_CxL[start:start + self.config.batch_contexts]
      acts = _rows_at(self.lm_params, self.lm_config, ids, self.hooks)
      out.append(np.asarray(acts.addressable_data(0))[valid_rows(ids, self.excluded)])
    return np.concatenate(out) if out else np.zeros((0, self.width), np.float32)

  def held_out(self) -> np.ndarray:
    """The evaluation rows [eval_tokens, D], from the first contexts."""
    return self.rows(self.eval_contexts)[:self.eval_tokens]

  def held_out_tokens(self) -> np.ndarray:
    """The token ids [eval_tokens] of `held_out`'s rows, in the same order."""
    ids_CxL = self.eval_contexts
    return ids_CxL[valid_rows(ids_CxL, self.excluded)][:self.eval_tokens]

  def sample(self, n: int) -> np.ndarray:
    """The first n rows of the training contexts, in text order, or all rows
    of the first round if it has fewer (for the initialisation)."""
    located = contexts_lib.located_contexts(self.config, self.tokenizer, self.train_start)
    contexts, _ = self._contexts_for(located, n, "the first round of training contexts",
                                     limit=self.round_contexts)
    return self.rows(contexts)[:n]

  # --- The shuffle buffer on the devices ---------------------------------------

  def _token_rounds(self, index: int, start: tuple):
    """(round index, [round_contexts, L] ids, start position, position after)."""
    located = contexts_lib.located_contexts(self.config, self.tokenizer, start)
    while True:
      got = list(itertools.islice(located, self.round_contexts))
      if len(got) < self.round_contexts:
        raise ValueError(
            f"the text ran out at round {index} of the stream ({len(got)} of "
            f"{self.round_contexts} contexts left): this run cannot go on, since a resume "
            f"keeps its --dataset and --steps; start it again in a new --out with more text "
            f"or fewer --steps")
      yield index, np.stack([c for c, _ in got]), start, got[-1][1]
      index, start = index + 1, got[-1][1]

  def _round_steps(self, index: int, tokens_CxL: np.ndarray) -> int:
    """The steps round `index` gives: its fewest drawable rows on a device, in
    steps."""
    counts = valid_rows(tokens_CxL, self.excluded).reshape(self.mesh.size, -1).sum(1)
    steps = int(counts.min()) // self.b
    if steps == 0:
      raise ValueError(f"round {index} of the stream gives a device only {counts.min()} rows "
                       f"(excluded tokens), fewer than its {self.b} per step: raise "
                       f"--stream-contexts")
    return steps

  def check_steps(self, steps: int) -> None:
    """Refuses, before any training, a run whose text ends before `steps`:
    the rounds from the start of the training text are tokenized (no model)
    and their steps counted, up to `steps`."""
    located = contexts_lib.located_contexts(self.config, self.tokenizer, self.train_start)
    have, index = 0, 0
    while have < steps:
      got = list(itertools.islice(located, self.round_contexts))
      if len(got) < self.round_contexts:
        raise ValueError(
            f"--steps {steps}: the text ({self.config.dataset!r}) gives {have} training steps "
            f"({index} rounds of --stream-contexts {self.round_contexts}); use more text or "
            f"at most --steps {have}")
      have += self._round_steps(index, np.stack([c for c, _ in got]))
      index += 1

  def _local(self, tokens: np.ndarray) -> jax.Array:
    """The round's [devices, R, L] ids as a global array; this process gives its devices' part."""
    n = self.mesh.size
    tokens = tokens.reshape(n, self.per_device, -1)
    mine = [i for i, d in enumerate(self.mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
      raise ValueError("--stream needs each process's devices next to each other in the mesh")
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.make_array_from_process_local_data(sharding, tokens[mine[0]:mine[-1] + 1],
                                                  tokens.shape)

  def batches(self, start_step: int, position: typing.Optional[dict]
              ) -> typing.Iterator[jax.Array]:
    """Batches from step `start_step` on: global arrays [devices, b, D] on the mesh.

    Args:
      start_step: the first batch is the one for this step.
      position: `position(start_step)` as saved with the checkpoint; None
        at step 0.
    """
    if position is None:
      if start_step:
        raise ValueError(f"resuming a --stream run at step {start_step} needs the stream "
                         f"position saved with its checkpoint, and there is none")
      position = {"round": 0, "step": 0, "record": self.train_start[0],
                  "offset": self.train_start[1], "key": self.key, "devices": self.mesh.size}
    if position.get("devices") != self.mesh.size:
      raise ValueError(f"this --stream run was saved on {position.get('devices')} devices and "
                       f"is resuming on {self.mesh.size}: each device shuffles its own share of "
                       f"a round, so the batches depend on the device count; resume it on "
                       f"{position.get('devices')} devices")
    if start_step < position["step"]:
      raise ValueError(f"stream position {position} does not hold step {start_step}")
    key = jnp.asarray(np.asarray(position["key"], np.uint32))
    first, skip = position["step"], start_step - position["step"]
    rounds = self._token_rounds(position["round"], (position["record"], position["offset"]))
    for index, tokens, start, after in data.prefetched(rounds, 1):
      steps = self._round_steps(index, tokens)
      if skip >= steps:
        raise ValueError(f"stream position {position} does not hold step {start_step}: "
                         f"its round has {steps} steps")
      self._rounds = self._rounds[-2:] + [{"round": index, "step": first, "steps": steps,
                                           "start": start, "after": after, "key": position["key"]}]
      acts, order = self._fill(self.lm_params, self._local(tokens), key, jnp.int32(index))
      for j in range(skip, steps):
        yield self._take(acts, order, jnp.int32(j))
      first, skip = first + steps, 0

  def position(self, step: int) -> typing.Optional[dict]:
    """Where the stream is at `step` (a JSON-able dict to save with a checkpoint)."""
    for r in reversed(self._rounds):
      if r["step"] <= step < r["step"] + r["steps"]:
        index, first, (record, offset) = r["round"], r["step"], r["start"]
      elif step == r["step"] + r["steps"]:  # the next round starts here
        index, first, (record, offset) = r["round"] + 1, step, r["after"]
      else:
        continue
      return {"round": index, "step": first, "record": record, "offset": offset,
              "key": r["key"], "devices": self.mesh.size}
    return None
