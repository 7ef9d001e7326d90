"""Latents split over a mesh axis (`--latent-shards`): each rule's selection
on [b, F / M] blocks equals the single-device one on the whole [B, F], bit
for bit, ties included; the step equals the replicated one up to rounding;
the memory a device needs falls with M; the flags that cannot apply are
refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import latent_select
from sae_jax import latent_step
from sae_jax import memory
from sae_jax import model
from sae_jax import mesh as mesh_lib
from sae_jax import scoring
from sae_jax import selection
from sae_jax import train
from sae_jax.config import SAEConfig
from sae_jax.config import SyntheticConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig
from tests import test_train
from tests.helpers import activations
from tests.helpers import cli

P = jax.sharding.PartitionSpec
B, F, K = 16, 24, 3
GRIDS = [(4, 1), (2, 2), (1, 4)]  # (data shards, latent shards)


def blocks(fn, a_BxF, grid):
  """fn on each device's [b, F / M] block of a_BxF, the [B, F] result put back."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(grid), latent_select.BOTH)
  spec = P(mesh_lib.DATA, mesh_lib.LATENT)
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
  return np.asarray(mapped(jnp.asarray(a_BxF)))


def entries_mask(a):
  """`latent_select.topk_entries` scattered back into this block's mask."""
  values, cols = latent_select.topk_entries(a, K)
  rows = jnp.broadcast_to(jnp.arange(a.shape[0])[:, None], cols.shape)
  return jnp.zeros(a.shape, bool).at[rows, cols].max(values > 0)


RULES = {
    "topk": (lambda a: latent_select.topk_mask(a, K), lambda a: selection.topk(a, K) > 0),
    "topk_entries": (entries_mask, lambda a: selection.topk(a, K) > 0),
    "batchtopk": (lambda a: latent_select.batchtopk_mask(a, K),
                  lambda a: selection.batch_topk(a, K) > 0),
}
POOLED = {  # (the pool rule, the single-device selection)
    "l2": dict(score="l2", sample_pool=False),
    "entropy_drawn": dict(score="entropy", sample_pool=True),
    "uniform_drawn_l1": dict(score="uniform", sample_pool=True),
}


def pool_rule(k, l, score, sample_pool, ridge=0.01, sketch=None):
  return dict(k=k, l=l, score=score, sample_pool=sample_pool, ridge=ridge, sketch=sketch)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("levels", [None, 3])  # continuous values, and many ties
def test_topk_and_batchtopk_masks_equal_one_device(grid, levels):
  a = activations((B, F), 5, levels=levels)
  for name, (split, whole) in RULES.items():
    np.testing.assert_array_equal(blocks(split, a, grid), np.asarray(whole(jnp.asarray(a))),
                                  err_msg=name)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", POOLED)
def test_sampled_masks_and_pools_equal_one_device(grid, name):
  a = activations((B, F), 7, levels=3)  # many equal scores: the pool's ties too
  key = jax.random.key(3)
  l = 1.0 if name.endswith("_l1") else 2.0
  rule = pool_rule(K, l, **POOLED[name])

  def split(a):
    pool_P = latent_select.sampled_pool(a, key, **rule)
    return latent_select.sampled_mask(a, K, pool_P)

  options = {k: v for k, v in rule.items() if k not in ("k", "l")}
  want = selection.sampled_select(jnp.asarray(a), K, l, **model.sampled_options(key, **options))
  np.testing.assert_array_equal(blocks(split, a, grid), np.asarray(want) > 0)


@pytest.mark.parametrize("sketch", [None, 8])
def test_leverage_scores_over_latent_shards_equal_one_device(sketch):
  """The Gram matrix is summed over the latent shards: the same scores up
  to rounding, and the same pool."""
  a = activations((B, F), 9)
  key = jax.random.key(4)
  want = scoring.column_scores(jnp.asarray(a), "leverage", sketch=sketch, key=key)

  def split(a):
    scores = scoring.column_scores(a, "leverage", axis_name=mesh_lib.DATA, sketch=sketch,
                                   key=key, latent_axis=mesh_lib.LATENT)
    return jnp.broadcast_to(scores[None, :], a.shape)

  for grid in GRIDS:
    got = blocks(split, a, grid)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=2e-6, atol=1e-7)


def test_a_tie_cut_inside_a_row_split_over_shards():
  """BatchTopK's budget ends among ties that one token holds in several
  latent shards: the lower global latents win."""
  a = np.zeros((B, F), np.float32)
  a[:, 0] = 5.0  # B entries above everything
  a[3, :] = np.where(np.arange(F) > 0, 1.0, 5.0)  # token 3 holds 23 ties, in every shard
  a[9, 2:] = 1.0  # and token 9 more
  split = lambda x: latent_select.batchtopk_mask(x, 2)
  want = np.asarray(selection.batch_topk(jnp.asarray(a), 2)) > 0
  assert want[3].sum() == 1 + B  # the budget (2·B) ends inside token 3's row
  for grid in GRIDS:
    np.testing.assert_array_equal(blocks(split, a, grid), want)


# --- The step ------------------------------------------------------------------

def transcoder(selection):
  c = test_train.config(selection)
  return dataclasses.replace(c, sae=dataclasses.replace(c.sae, transcoder=True))


STEP_RULES = test_train.RULES | test_train.LEVERAGE | {
    "batchtopk_transcoder": transcoder("batchtopk"),
    "sampled_transcoder": transcoder("sampled"),
    # TopK's entries (each shard's selected entries) in place of dense codes.
    "topk_entries": dataclasses.replace(test_train.config("topk"), layout="entries"),
    "topk_entries_transcoder": dataclasses.replace(transcoder("topk"), layout="entries"),
    # No latent dead on any step: the pooled step without AuxK's dense gradients.
    "sampled_alive": dataclasses.replace(test_train.config("sampled"), dead_tokens=10**6)}


def pairs(seed):
  x = test_train.batch(seed)
  return np.concatenate([x, 0.5 * x[:, ::-1] + 1], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("rule", STEP_RULES)
def test_steps_over_latent_shards_equal_the_replicated_step(rule):
  """Four steps with dead latents (AuxK runs) at M = 2 and 4 against
  the replicated step on 4 devices: the same selections, dead latents and
  L0, the same parameters up to rounding (their sums over latents are
  added in another order: 1e-6 relative here). With none dead, Sampled-SAE's
  two forms (pooled updates, or dense gradients without AuxK) both."""
  c = STEP_RULES[rule]
  rows = pairs if c.sae.transcoder else test_train.batch
  sample = pairs(100) if c.sae.transcoder else test_train.batch(100, 4 * test_train.B)
  state = (train.create_train_state(c, sample) if rule.endswith("_alive") else
           test_train.fresh_state(c, sample))
  want = train.replicate(state, 4)
  forms = ("general", "all_alive") if rule.endswith("_alive") else ("general",)
  got = {(m, form): train.replicate(state, 4, latent_shards=m) for m in (2, 4) for form in forms}
  for step in range(4):
    x = rows(20 + step)
    want, w = train.p_train_step(want, train.shard_batch(x, 4))
    for (m, form) in got:
      got[m, form], g = latent_step.p_train_step(got[m, form], train.shard_batch(x, 4 // m),
                                                 form)
      for name in ("l0", "dead_fraction", "most_silent_steps", "skipped_steps"):
        assert float(g[name]) == float(w[name]), (m, step, name)
      for name in ("loss", "fvu", "auxk_loss", "grad_norm", "threshold"):
        np.testing.assert_allclose(float(g[name]), float(w[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
  assert (float(w["auxk_loss"]) > 0) == (not rule.endswith("_alive"))
  want = train.unreplicate(want)
  for (m, form), state in got.items():
    # Each shard is on its devices, and the replicated leaves agree everywhere.
    assert state.params["W_enc"].sharding.spec == P(None, mesh_lib.LATENT)
    for leaf in jax.tree.leaves(state):
      if leaf.is_fully_replicated:
        copies = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert all(np.array_equal(x, copies[0]) for x in copies)
    state = train.unreplicate(state)
    np.testing.assert_array_equal(state.steps_since_fired_F, want.steps_since_fired_F)
    if want.pool_P is not None:
      np.testing.assert_array_equal(state.pool_P, want.pool_P)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want.opt_state)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    for name in want.params:
      np.testing.assert_allclose(state.params[name], want.params[name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"M={m} {form} {name}")


def test_a_latent_sharded_state_refuses_the_replicated_step():
  c = test_train.RULES["topk"]
  state = train.replicate(test_train.fresh_state(c), 4, latent_shards=2)
  with pytest.raises(ValueError, match="latent_step.p_train_step"):
    train.p_train_step(state, train.shard_batch(test_train.batch(0), 2))
  host = train.unreplicate(state)  # put back together whole
  assert host.params["W_enc"].shape == (c.sae.d_model, c.sae.n_latents)


# --- Memory and flags ----------------------------------------------------------

def test_memory_a_device_needs_falls_with_the_latent_shards(monkeypatch):
  wide = TrainConfig(SAEConfig(2304, 2**20, k=64), batch_size=4096, steps=10)
  need = {m: memory.memory_per_device([wide], 8, latent_shards=m) for m in (1, 2, 4, 8)}
  for m in (2, 4, 8):
    assert need[m]["state"] == pytest.approx(need[1]["state"] / m, rel=1e-3)
    assert need[m]["activations"] == need[1]["activations"]  # more tokens, fewer latents
  limit = need[1]["state"] + need[1]["activations"] - 1
  monkeypatch.setattr(memory, "device_memory", lambda: limit)
  with pytest.raises(ValueError, match="--latent-shards"):
    memory.check_memory(wide, 8)
  memory.check_memory(wide, 8, latent_shards=4)


def test_an_end_of_run_that_cannot_fit_one_device_is_refused_before_training(
    tmp_path, capsys, monkeypatch):
  """With --latent-shards 1 the end of a run calibrates and evaluates the
  whole SAE on one device, a whole batch's [B, F] activations at once
  (`memory.end_of_run`): a data-parallel run whose training fits on each of
  4 devices but whose end does not is refused before anything is trained,
  in one line that says why; split over latent shards, its end is split
  too, and the same run is accepted."""
  D, F, B = 16, 4096, 1024  # the D of tests.helpers.SMALL
  config = RunConfig(train=TrainConfig(SAEConfig(D, F, k=4), batch_size=B, steps=20),
                     data="synthetic", synthetic=SyntheticConfig(d_model=D),
                     out=str(tmp_path / "unused"))
  floor = sum(memory.end_of_run(config).values())
  assert floor == 4 * (2 * D * F + F + D) + 4 * B * F
  assert sum(memory.memory_per_device([config.train], 4).values()) < floor
  monkeypatch.setattr(memory, "device_memory", lambda: floor - 1)
  args = ["--data", "synthetic", "--steps", 20, "--dict-size", F, "--batch-size", B, "--k", 4,
          "--out", tmp_path / "run"]
  assert cli(*args) == 2
  err = capsys.readouterr().err
  assert "on one device at the end of the run" in err and "Traceback" not in err, err
  assert "--dict-size 4096 at D=16 with --batch-size 1024" in err and "--latent-shards" in err
  assert not (tmp_path / "run" / "checkpoints").exists()
  split = dataclasses.replace(config, latent_shards=4)
  assert memory.end_of_run(split) == {}  # nothing whole
  memory.check_end_of_run([split])
  pythia = dataclasses.replace(split, data="pythia")  # but the downstream loss splices it whole
  assert sum(memory.end_of_run(pythia).values()) == 4 * (2 * D * F + F + D) + 4 * 2048 * F


@pytest.mark.parametrize("flags, says", [
    (["--selection", "jumprelu"], "JumpReLU SAEs are not split"),
    (["--selection", "batchtopk", "--matryoshka-groups", "0.5", "0.5"], "Matryoshka SAEs"),
    (["--dict-size", "66", "--latent-shards", "4"], "must divide --dict-size 66"),
    (["--step", "dense"], "--step dense does not apply"),
    (["--latent-shards", "3", "--dict-size", "96"], "must divide the 4 devices of each process"),
    (["--batch-size", "63"], "the 2 data shards"),
])
def test_what_latent_shards_cannot_split_is_refused(tmp_path, capsys, flags, says):
  args = ["--data", "synthetic", "--steps", 20, "--latent-shards", 2, *flags,
          "--out", tmp_path / "run"]
  assert cli(*args) == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_layout_applies_to_topk_alone_over_latent_shards():
  """TrainConfig.layout (no flag: the Python API's) picks TopK's gradients
  in the split step; the other rules have one way, and refuse another."""
  def run_config(rule):
    train_config = dataclasses.replace(test_train.config(rule), layout="entries")
    return RunConfig(train=train_config, out="unused", data="synthetic", latent_shards=2,
                     synthetic=SyntheticConfig(d_model=test_train.D))

  assert run_config("topk").latent_shards == 2
  for rule in ("batchtopk", "sampled"):
    with pytest.raises(ValueError, match="applies to TopK's gradients only"):
      run_config(rule)


# --- The end of a run over the latent groups ---------------------------------

@pytest.mark.parametrize("rule", ["topk", "batchtopk", "sampled", "leverage", "kept_pool"])
def test_the_count_pass_over_latent_shards_equals_one_device(rule):
  """`latent_calibration.count` on 2 × 2 and 1 × 4 meshes: the counts n_j of
  the one-device count pass (`thresholds.calibrate`), and its squared error
  up to rounding; the SAE never put together on one device."""
  from sae_jax import latent_calibration  # noqa: PLC0415
  from sae_jax import synthetic  # noqa: PLC0415
  from sae_jax import thresholds  # noqa: PLC0415

  options = {"topk": dict(selection="topk"), "batchtopk": dict(selection="batchtopk"),
             "sampled": {}, "leverage": dict(score="leverage"), "kept_pool": dict(pool_every=2)}
  config = SAEConfig(16, 64, k=3, l=4.0, **options[rule])
  x = synthetic.SyntheticSource(SyntheticConfig(d_model=16, n_features=32)).sample(12, 4 * 32)
  sae = model.SAE(config)
  params = model.init_params(jax.random.key(0), sae, x)["params"]
  want = thresholds.calibrate(params, x, sae, batch_size=32, per_latent=False)
  assert 0 < want.counts_F.sum() == 4 * 32 * 3 or rule != "topk"
  for m in (2, 4):
    counts_F, sse, _ = latent_calibration.count(params, x, sae, batch_size=32,
                                                mesh=mesh_lib.make_mesh(4, m))
    np.testing.assert_array_equal(counts_F, want.counts_F)
    np.testing.assert_allclose(sse, want.training_sse, rtol=1e-5)


def _mesh_activations(params, x_NxBxD, sae, mesh):
  """relu(pre) [n, B, F] as the mesh computes it, each device its block."""
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  specs = mesh_lib.specs(params, mesh)
  local = lambda p, x: jax.lax.map(lambda x_bxD: latent_step._encoded(p, x_bxD, sae.config)[3], x)
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(None, mesh_lib.DATA)),
                         out_specs=P(None, mesh_lib.DATA, mesh_lib.LATENT))
  return np.asarray(jax.jit(mapped)(mesh_lib.place(params, mesh), x_NxBxD))


def _largest_reference(a_NxF, counts_F):
  """θ by NumPy: each latent's (n_j + 1)-th largest activation (`threshold_of`)."""
  from sae_jax import thresholds  # noqa: PLC0415

  ranked = -np.sort(-a_NxF, axis=0)
  value = ranked[np.minimum(counts_F, len(a_NxF) - 1), np.arange(a_NxF.shape[1])]
  theta = np.where(counts_F < len(a_NxF), thresholds.threshold_of(value), np.float32(0))
  return np.where(counts_F > 0, theta, thresholds.NEVER).astype(np.float32)


@pytest.mark.parametrize("rule", ["batchtopk", "sampled"])
def test_thresholds_over_latent_shards_are_exact_on_their_activations(rule, monkeypatch):
  """`latent_calibration.per_latent_thresholds` on 2 × 2 and 1 × 4 meshes:
  θ_j is, bit for bit, the (n_j + 1)-th largest of the activations as the
  mesh computes them (NumPy on those), from the split count pass's n_j,
  from made-up counts from 0 to every token, and on rows sorted by one
  latent, which crowds its largest into the first batches and sends it to
  the whole-column capture. Against one device, θ is within the rounding
  of a D-term sum: a device's matmul over its block rounds in its own order."""
  from sae_jax import latent_calibration  # noqa: PLC0415
  from sae_jax import synthetic  # noqa: PLC0415
  from sae_jax import thresholds  # noqa: PLC0415

  config = SAEConfig(16, 64, k=3, l=4.0, selection=rule)
  x = synthetic.SyntheticSource(SyntheticConfig(d_model=16, n_features=32)).sample(12, 8 * 32)
  sae = model.SAE(config)
  params = model.init_params(jax.random.key(0), sae, x)["params"]
  one_device = thresholds.calibrate(params, x, sae, batch_size=32)
  rng = np.random.default_rng(0)
  made_up = np.concatenate([[0, 1, 2, 255, 256], rng.integers(0, 257, 59)])
  pre = np.asarray(sae.apply({"params": params}, jnp.asarray(x), method=model.SAE.pre))
  crowded = x[np.argsort(-pre[:, 9], kind="stable")]  # latent 9's largest first
  lots = np.full(64, 20)  # widths of 12 or 14 a group, against 21 in the first
  calls = []
  capture = latent_calibration._captured
  monkeypatch.setattr(latent_calibration, "_captured",
                      lambda *args: (calls.append(len(args[4])), capture(*args))[1])
  for m in (2, 4):
    mesh = mesh_lib.make_mesh(4, m)
    for rows, counts in ((x, None), (x, made_up), (crowded, lots)):
      if counts is None:
        counts, _, _ = latent_calibration.count(params, rows, sae, batch_size=32, mesh=mesh)
        np.testing.assert_array_equal(counts, one_device.counts_F)
      calls.clear()
      got = latent_calibration.per_latent_thresholds(params, rows, sae, counts,
                                                     batch_size=32, mesh=mesh)
      if rows is crowded:  # a second capture, of the latents crowded into a group
        assert len(calls) == 2 and 0 < calls[1] < 64, calls
      a_NxF = _mesh_activations(params, jnp.asarray(thresholds.batches(rows, 32)), sae, mesh)
      want = _largest_reference(a_NxF.reshape(-1, 64), counts)
      np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    theta = latent_calibration.per_latent_thresholds(params, x, sae, one_device.counts_F,
                                                     batch_size=32, mesh=mesh)
    # A pre-activation is a sum of D products; summed in another order it
    # moves by at most about D float32 epsilons of the largest.
    bound = 16 * np.finfo(np.float32).eps * np.abs(pre).max()
    np.testing.assert_allclose(theta, one_device.threshold_F, rtol=0, atol=bound)


@pytest.mark.parametrize("rule", ["batchtopk", "sampled", "kept_pool"])
def test_the_calibration_over_latent_shards_is_one_devices(rule):
  """`latent_calibration.calibrate` with `inference.choose`'s errors on 2 × 2
  and 1 × 4 meshes: one device's counts, each top k′'s firings, and its
  errors up to rounding (θ up to a D-term sum's, as above); and the rule
  `inference.choose` makes of them is the same."""
  from sae_jax import inference  # noqa: PLC0415
  from sae_jax import latent_calibration  # noqa: PLC0415
  from sae_jax import synthetic  # noqa: PLC0415
  from sae_jax import thresholds  # noqa: PLC0415

  options = {"batchtopk": dict(selection="batchtopk"), "sampled": {},
             "kept_pool": dict(pool_every=2)}
  config = SAEConfig(16, 64, k=3, l=4.0, **options[rule])
  x = synthetic.SyntheticSource(SyntheticConfig(d_model=16, n_features=32)).sample(12, 8 * 32)
  sae = model.SAE(config)
  params = model.init_params(jax.random.key(0), sae, x)["params"]
  want = thresholds.calibrate(params, x, sae, batch_size=32, rule_errors=True)
  x_NxBxD = thresholds.batches(x, 32)
  rule = lambda c: inference.choose("auto", params, x_NxBxD, sae, c.threshold_F,
                                    c.training_sse, c.errors)
  for m in (2, 4):
    got = latent_calibration.calibrate(params, x, sae, batch_size=32,
                                       mesh=mesh_lib.make_mesh(4, m), rule_errors=True)
    assert got.tokens == want.tokens == 256
    np.testing.assert_array_equal(got.counts_F, want.counts_F)
    np.testing.assert_allclose(got.threshold_F, want.threshold_F, rtol=1e-5)
    np.testing.assert_allclose(got.training_sse, want.training_sse, rtol=1e-5)
    np.testing.assert_allclose(got.errors[0], want.errors[0], rtol=1e-5)
    np.testing.assert_allclose(got.errors[1], want.errors[1], rtol=1e-5)
    np.testing.assert_array_equal(got.errors[2], want.errors[2])
    mine, theirs = rule(got), rule(want)
    assert (mine.name, mine.k) == (theirs.name, theirs.k)
    # --inference global: the errors judge the one θ given, as inference._errors does.
    got = latent_calibration.calibrate(params, x, sae, batch_size=32, per_latent=False,
                                       mesh=mesh_lib.make_mesh(4, m), rule_errors=True,
                                       global_threshold=0.3)
    errors = inference._errors(params, jnp.asarray(x_NxBxD), jnp.full(64, 0.3, jnp.float32), sae)
    assert np.all(got.threshold_F == 0)
    np.testing.assert_array_equal(got.counts_F, want.counts_F)
    np.testing.assert_allclose(got.errors[0], errors[0], rtol=1e-5)
    np.testing.assert_allclose(got.errors[1], errors[1], rtol=1e-5)
    np.testing.assert_array_equal(got.errors[2], errors[2])


@pytest.mark.parametrize("selection, options, inference", [
    ("sampled", {}, "topk"), ("sampled", dict(pool_every=2), "thresholds"),
    ("sampled", dict(score="leverage"), "thresholds"), ("batchtopk", {}, "thresholds"),
    ("topk", {}, "topk")])
def test_both_modes_over_latent_shards_are_one_devices(selection, options, inference):
  """`latent_evaluate.both_modes` on 2 × 2 and 1 × 4 meshes against
  `evaluate.both_modes` on one device: the same codes in both modes (the
  same entries, their values up to a D-term sum's rounding), the
  reconstructions up to rounding, the same pools; a last batch of 16 rows
  splits over the data shards, one of 17 is refused."""
  from sae_jax import evaluate  # noqa: PLC0415
  from sae_jax import latent_evaluate  # noqa: PLC0415
  from sae_jax import synthetic  # noqa: PLC0415

  x = synthetic.SyntheticSource(SyntheticConfig(d_model=16, n_features=32)).sample(3, 81)
  config = SAEConfig(16, 64, k=3, l=4.0, selection=selection, **options)
  with pytest.raises(ValueError, match="must split over the mesh's 2 data shards; got batches "
                                       "of 32 and a last one of 17"):
    latent_evaluate.both_modes({}, 0.0, 1.0, x, model.SAE(config), model.SAE(config),
                               batch_size=32, mesh=mesh_lib.make_mesh(4, 2))
  x = x[:80]
  sae = model.SAE(config)
  params = model.init_params(jax.random.key(0), sae, x)["params"]
  if inference == "topk":
    inference_sae, threshold = model.SAE(dataclasses.replace(config, selection="topk", k=2)), 0.0
  else:
    inference_sae = sae
    threshold = np.random.default_rng(0).uniform(0.0, 0.3, 64).astype(np.float32)
  want = evaluate.both_modes(params, threshold, 1.7, x, sae, inference_sae, batch_size=32)
  for m in (2, 4):
    got = latent_evaluate.both_modes(params, threshold, 1.7, x, sae, inference_sae,
                                     batch_size=32, mesh=mesh_lib.make_mesh(4, m))
    np.testing.assert_array_equal(got.z_inference != 0, want.z_inference != 0)
    np.testing.assert_allclose(got.z_inference, want.z_inference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.xhat_inference, want.xhat_inference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.l0_batch, want.l0_batch)
    np.testing.assert_allclose(got.xhat_batch, want.xhat_batch, rtol=1e-5, atol=1e-5)
    assert len(got.pools) == len(want.pools) == (3 if selection == "sampled" else 0)
    for mine, theirs in zip(got.pools, want.pools):
      np.testing.assert_array_equal(np.sort(mine), np.sort(theirs))
