"""The --stream data source: positions in the text, the on-device shuffle
buffer against the model's rows computed directly, and exact resumption;
on each family the JAX model runs, at a hook inside a block, the rows it
serves are those the torch export writes."""

import dataclasses
import pathlib

import numpy as np
import pytest

from sae_jax import contexts as contexts_lib
from sae_jax import export
from sae_jax import lm as lm_jax
from sae_jax import stream as stream_lib
from sae_jax import train
from tests import tiny_lm

B, ROUND = 32, 16  # 8 rows per device per step; 4 contexts (60 rows) per device per round


@pytest.fixture(scope="module")
def tokenizer(lm):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(lm["model"])


def test_contexts_resume_from_their_positions(lm, tokenizer):
  config = tiny_lm.export_config(lm, dataset=lm["texts"]["txt"])
  located = list(contexts_lib.located_contexts(config, tokenizer))
  # Directly: every document's tokens and end-of-text, joined, cut into contexts.
  joined = []
  for path in config.dataset:
    for line in pathlib.Path(path).read_text().splitlines():
      joined += tokenizer(line, add_special_tokens=False)["input_ids"] + [0]
  L = config.context_length
  assert len(located) == len(joined) // L > 50
  for i, (context, _) in enumerate(located):
    assert context.tolist() == joined[i * L:(i + 1) * L]
  positions = [after for _, after in located]
  assert positions == sorted(positions) and len(set(positions)) == len(positions)
  for i in (0, 1, 17, len(located) - 2):
    rest = list(contexts_lib.located_contexts(config, tokenizer, positions[i]))
    assert len(rest) == len(located) - i - 1
    for (a, pa), (b, pb) in zip(rest, located[i + 1:]):
      assert np.array_equal(a, b) and pa == pb


def make_stream(lm, **kwargs):
  config = tiny_lm.export_config(lm, **kwargs)
  return stream_lib.Stream(config, train.make_mesh(), batch_size=B, round_contexts=ROUND,
                           eval_tokens=40, downstream_contexts=2, seed=0)


def reference_rows(s: stream_lib.Stream, contexts_CxL):
  """The model's rows at drawable positions, computed directly: [C, L, D] and mask."""
  config, params = lm_jax.load(s.config.model)
  acts = np.asarray(lm_jax.hook_at(params, config, contexts_CxL, s.config.hook))
  valid = ~np.isin(contexts_CxL, s.excluded)
  valid[:, 0] = False
  return acts, valid


@pytest.mark.parametrize("excluded", [(), (0,)])
def test_each_round_serves_its_own_rows_shuffled_once_each(lm, tokenizer, excluded):
  s = make_stream(lm, exclude_token_ids=excluded)
  L = s.config.context_length
  everything = [c for c, _ in contexts_lib.located_contexts(s.config, tokenizer)]
  n_eval = len(s.eval_contexts)
  assert np.array_equal(np.stack(everything[:n_eval]), s.eval_contexts)
  assert np.array_equal(np.stack(everything[n_eval:n_eval + 2]), s.downstream_contexts)
  train_contexts = np.stack(everything[n_eval + 2:])
  held_out = s.held_out()
  acts, valid = reference_rows(s, s.eval_contexts)
  np.testing.assert_allclose(held_out, acts[valid][:40], rtol=1e-5, atol=1e-5)

  batches = s.batches(0, None)
  step = 0
  for r in range(3):
    contexts = train_contexts[r * ROUND:(r + 1) * ROUND].reshape(4, ROUND // 4, L)
    counts = [int(valid_d.sum()) for valid_d in reference_rows(s, contexts.reshape(-1, L))[1]
              .reshape(4, -1)]
    steps = min(counts) // (B // 4)
    served = np.stack([np.asarray(next(batches)) for _ in range(steps)])  # [steps, 4, b, D]
    assert s.position(step) == s.position(step + steps - 1) != s.position(step + steps)
    step += steps
    for d in range(4):
      acts_d, valid_d = reference_rows(s, contexts[d])
      rows = served[:, d].reshape(-1, acts_d.shape[-1])
      flat = acts_d.reshape(-1, acts_d.shape[-1])
      distance = np.linalg.norm(rows[:, None] - flat[None], axis=-1)
      nearest = distance.argmin(1)
      assert np.all(distance[np.arange(len(rows)), nearest] < 1e-4)
      assert valid_d.reshape(-1)[nearest].all()  # never position 0 or an excluded token
      assert len(set(nearest.tolist())) == len(rows)  # each row at most once
      assert not np.all(np.diff(nearest) > 0)  # shuffled, not in text order
  batches.close()


def test_resuming_at_a_position_gives_the_same_batches(lm):
  # A sixth of the tokens are excluded, so rounds differ in length (the harder case).
  excluded = tuple(range(2, 12))
  s = make_stream(lm, exclude_token_ids=excluded)
  straight = s.batches(0, None)
  first, positions = [], []
  for step in range(20):
    first.append(np.asarray(next(straight)))
    positions.append(s.position(step))  # as a checkpoint after this batch's step would save
  starts = sorted({p["step"] for p in positions})
  assert len(set(np.diff(starts))) > 1  # rounds of different lengths
  # A fresh stream (a restarted process) from a saved position: mid-round and at a round's start.
  for step in (3, starts[1], starts[2] + 1, starts[3]):
    position = positions[step]
    resumed = make_stream(lm, exclude_token_ids=excluded).batches(step, position)
    for want in first[step:]:
      np.testing.assert_array_equal(np.asarray(next(resumed)), want)
    resumed.close()
  straight.close()
  with pytest.raises(ValueError, match="needs the stream position saved with its checkpoint"):
    next(s.batches(5, None))
  with pytest.raises(ValueError, match="saved on 8 devices and is resuming on 4"):
    next(s.batches(10, dict(positions[10], devices=8)))


# Each family's module with a hook inside or before a block (resid_post is
# the tests' above). Not Qwen2 (llama.py, as Llama and Mistral): transformers
# 5 loads its tokenizer as Qwen2Tokenizer by the model type, not the
# word-level one saved with it, and that reads the test text as nothing.
FAMILY_HOOKS = [("gpt_neox", "blocks.1.hook_attn_out"), ("gpt2", "blocks.1.hook_mlp_out"),
                ("llama", "blocks.1.hook_resid_pre"), ("mistral", "blocks.0.hook_mlp_out"),
                ("gemma2", "blocks.1.hook_attn_out"),
                # A transcoder's pairs: the MLP's input and its output, side by side.
                ("llama", ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"))]


@pytest.mark.parametrize("family, hook", FAMILY_HOOKS)
def test_each_family_streams_the_rows_the_torch_export_writes(lm, tmp_path, family, hook):
  model = str(tiny_lm.build(tmp_path, layers=2) if family == "gpt_neox"
              else tiny_lm.build_causal(tmp_path, family))
  hook, target = (hook, None) if isinstance(hook, str) else hook
  s = make_stream({**lm, "model": model}, hook=hook, target_hook=target)
  assert s.width == (2 if target else 1) * s.d_model
  torch_model = export.HookedModel(dataclasses.replace(s.config, backend="torch"))

  def torch_rows(contexts_CxL):
    valid = stream_lib.valid_rows(contexts_CxL, s.excluded)
    return torch_model(contexts_CxL)[valid].reshape(-1, s.width), valid

  want, _ = torch_rows(s.eval_contexts)
  np.testing.assert_allclose(s.held_out(), want[:40], rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The first round: each served row is one of the torch rows of its
  # device's contexts, at a drawable position, once.
  batches = s.batches(0, None)
  served = np.stack([np.asarray(next(batches)) for _ in range(3)])  # [steps, 4, b, D]
  batches.close()
  L = s.config.context_length
  first = np.stack([c for c, _ in contexts_lib.located_contexts(s.config, s.tokenizer,
                                                                 s.train_start)][:ROUND])
  for d, contexts in enumerate(first.reshape(4, ROUND // 4, L)):
    flat = torch_model(contexts).reshape(-1, s.width)
    valid = stream_lib.valid_rows(contexts, s.excluded).reshape(-1)
    rows = served[:, d].reshape(-1, s.width)
    distance = np.linalg.norm(rows[:, None] - flat[None], axis=-1)
    nearest = distance.argmin(1)
    assert np.all(distance[np.arange(len(rows)), nearest] < 1e-4 * np.abs(flat).max())
    assert valid[nearest].all() and len(set(nearest.tolist())) == len(rows)


@pytest.mark.parametrize("kwargs, message", [
    (dict(round_contexts=6), r"--stream-contexts 6 must be divisible by the 4 devices"),
    (dict(round_contexts=4, batch_size=128),
     r"--stream-contexts 4 gives each of the 4 devices 15 rows a round, fewer than the 32 .* "
     r"use at least 12"),
    (dict(batch_size=30), r"--batch-size 30 must be divisible by the 4 devices"),
])
def test_bad_stream_settings(lm, kwargs, message):
  args = dict(batch_size=B, round_contexts=ROUND, eval_tokens=40, downstream_contexts=2, seed=0)
  with pytest.raises(ValueError, match=message):
    stream_lib.Stream(tiny_lm.export_config(lm), train.make_mesh(), **{**args, **kwargs})


def test_text_running_out_is_refused_before_training(lm):
  """`check_steps` counts, from tokens alone, exactly the steps the stream
  then gives; a hub dataset, not counted ahead, still stops with a clear line."""
  s = make_stream(lm)
  given = 0
  with pytest.raises(ValueError, match=r"the text ran out at round \d+ of the stream .*: this "
                     r"run cannot go on, .* start it again in a new --out with more text or "
                     r"fewer --steps"):
    for _ in s.batches(0, None):
      given += 1
  assert given > 10
  s.check_steps(given)
  with pytest.raises(ValueError, match=rf"^--steps {given + 1}: the text .* gives {given} training "
                     rf"steps \(\d+ rounds of --stream-contexts {ROUND}\); use more text or at "
                     rf"most --steps {given}$"):
    s.check_steps(given + 1)
