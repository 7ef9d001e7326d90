"""Configs: the recipe's defaults, round trips, and clear errors on bad values."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sae_jax import export
from sae_jax import outdir
from sae_jax import runconfig
from sae_jax import synthetic
from sae_jax.config import SAEConfig
from sae_jax.config import TrainConfig
from sae_jax.runconfig import RunConfig


def test_defaults_follow_the_recipe():
  c = TrainConfig(SAEConfig(d_model=768))
  assert (c.sae.n_latents, c.sae.k, c.batch_size, c.tokens) == (65536, 64, 4096, 100_000_000)
  assert c.total_steps == 100_000_000 // 4096
  assert c.learning_rate == pytest.approx(1e-4)  # 2e-4 / sqrt(2^16 / 2^14)
  assert (c.b1, c.b2, c.clip_norm, c.warmup_steps, c.decay_fraction) == (0.9, 0.999, 1.0, 1000, 0.2)
  assert (c.dead_tokens, c.auxk_k, c.auxk_weight) == (10_000_000, 384, 1 / 32)
  assert c.dead_steps == 2442  # ceil(1e7 / 4096)
  assert (c.threshold_beta, c.threshold_start) == (0.999, 1000)
  assert c.sae.pool_size == 512
  assert TrainConfig(SAEConfig(8, 16, k=2), steps=7, warmup_steps=0,
                     threshold_start=0).total_steps == 7


def test_short_runs_scale_the_warmup_and_threshold_start():
  """Not given, both are min(1000, 10% of the steps); given, they are checked."""
  for steps, want in ((80, 8), (5000, 500), (10_000, 1000), (50_000, 1000), (2, 0)):
    c = TrainConfig(SAEConfig(8, 16, k=2), steps=steps)
    assert (c.warmup_steps, c.threshold_start) == (want, want)
  assert TrainConfig(SAEConfig(8, 16, k=2), batch_size=64, tokens=64 * 300).warmup_steps == 30
  c = TrainConfig(SAEConfig(8, 16, k=2), steps=80, warmup_steps=3, threshold_start=50)
  assert (c.warmup_steps, c.threshold_start) == (3, 50)
  # The decay may leave less room than 10%: the warm-up ends where it starts.
  assert TrainConfig(SAEConfig(8, 16, k=2), steps=100, decay_fraction=0.95).warmup_steps == 5
  # The resolved values are what config.json records, and what a resume compares.
  c = TrainConfig(SAEConfig(8, 16, k=2), steps=80)
  assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  assert c.to_dict()["warmup_steps"] == 8
  with pytest.raises(ValueError, match=r"TrainConfig.warmup_steps \(1000\) must end before"):
    TrainConfig(SAEConfig(8, 16, k=2), steps=80, warmup_steps=1000)


def test_round_trip_through_json():
  c = TrainConfig(SAEConfig(16, 64, k=4, selection="batchtopk", score="entropy",
                            sample_pool=True), batch_size=128, steps=50, lr=3e-3,
                  warmup_steps=5, threshold_start=10, auxk_latents=8)
  assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  with pytest.raises(ValueError, match=r"TrainConfig has no field\(s\) \['colour'\]"):
    TrainConfig.from_dict(dict(c.to_dict(), colour="red"))
  with pytest.raises(ValueError, match=r"SAEConfig has no field\(s\) \['width'\]"):
    TrainConfig.from_dict(dict(c.to_dict(), sae={"width": 3}))


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=0), r"SAEConfig.d_model must be an integer >= 1; got 0"),
    (dict(d_model=8.0), r"SAEConfig.d_model must be an integer >= 1; got 8.0"),
    (dict(d_model=8, n_latents=-3), r"SAEConfig.n_latents must be an integer >= 1; got -3"),
    (dict(d_model=8, n_latents=16, k=17), r"SAEConfig.k must be an integer in \[1, 16\]"),
    (dict(d_model=8, n_latents=16, k=0), r"SAEConfig.k must be an integer in \[1, 16\]"),
    (dict(d_model=8, selection="gated"),
     r"SAEConfig.selection must be one of 'sampled', 'batchtopk', 'topk', 'jumprelu'; got 'gated'"),
    (dict(d_model=8, l=0.5), r"SAEConfig.l must be a finite number >= 1; got 0.5"),
    (dict(d_model=8, l=float("nan")), r"SAEConfig.l must be a finite number >= 1"),
    (dict(d_model=8, score="l1"), r"SAEConfig.score must be one of 'l2', .*; got 'l1'"),
    (dict(d_model=8, score="uniform"), r"score='uniform' .* needs sample_pool=True"),
    (dict(d_model=8, sample_pool=1), r"SAEConfig.sample_pool must be True or False; got 1"),
    (dict(d_model=8, compute_dtype="float16"),
     r"SAEConfig.compute_dtype must be one of 'float32', 'bfloat16'; got 'float16'"),
])
def test_bad_sae_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SAEConfig(**kwargs)


SAE = SAEConfig(8, 16, k=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sae={"d_model": 8}), r"TrainConfig.sae must be an SAEConfig; got dict"),
    (dict(batch_size=0), r"TrainConfig.batch_size must be an integer >= 1; got 0"),
    (dict(tokens=100, batch_size=128), r"TrainConfig.tokens \(100\) must be at least one batch"),
    (dict(steps=0), r"TrainConfig.steps must be an integer >= 1; got 0"),
    (dict(lr=0.0), r"TrainConfig.lr must be a number in \(0, inf\]; got 0.0"),
    (dict(b2=1.0), r"TrainConfig.b2 must be a number in \[0, 1\); got 1.0"),
    (dict(clip_norm=-1.0), r"TrainConfig.clip_norm must be a number in \(0, inf\]"),
    (dict(decay_fraction=1.5), r"TrainConfig.decay_fraction must be a number in \[0, 1\]"),
    (dict(steps=100, warmup_steps=90),
     r"TrainConfig.warmup_steps \(90\) must end before the decay starts at step 80 of 100"),
    (dict(dead_tokens=0), r"TrainConfig.dead_tokens must be an integer >= 1; got 0"),
    (dict(auxk_latents=17), r"TrainConfig.auxk_latents must be at most n_latents=16; got 17"),
    (dict(auxk_weight=-0.1), r"TrainConfig.auxk_weight must be a number in \[0, inf\]"),
    (dict(threshold_beta=1.0), r"TrainConfig.threshold_beta must be a number in \[0, 1\)"),
    (dict(steps=100, warmup_steps=10, threshold_start=99),
     r"TrainConfig.threshold_start \(99\) must be below the last step \(99; the EMA updates"),
    (dict(steps=1), r"TrainConfig.threshold_start \(0\) must be below the last step \(0;"),
    (dict(max_bad_steps=0), r"TrainConfig.max_bad_steps must be an integer >= 1; got 0"),
    (dict(seed=-1), r"TrainConfig.seed must be an integer in \[0, 4294967295\]; got -1"),
    (dict(step="sparse"), r"TrainConfig.step must be one of 'fast', 'dense'; got 'sparse'"),
    (dict(layout="dense"),
     r"TrainConfig.layout must be one of 'auto', 'entries', 'codes'; got 'dense'"),
])
def test_bad_train_config(kwargs, message):
  kwargs = {"sae": SAE, **kwargs}
  with pytest.raises(ValueError, match=message):
    TrainConfig(**kwargs)


JUMP = SAEConfig(8, 16, k=2, selection="jumprelu")


def test_jumprelu_defaults_are_resolved_for_it_alone():
  short, long = TrainConfig(JUMP, steps=100), TrainConfig(JUMP, steps=10**5)
  assert (short.target_l0, short.sparsity_warmup_steps) == (2.0, 20)  # k, 20% of the steps
  assert long.sparsity_warmup_steps == 2000 and (long.bandwidth, long.sparsity_penalty) == (
      0.001, 1.0)
  assert TrainConfig(JUMP, steps=1).sparsity_warmup_steps == 0  # no threshold EMA to start
  assert (short.b1, TrainConfig(JUMP, b1=0.5).b1) == (0.0, 0.5)  # Adam's b1: the paper's 0
  other = TrainConfig(SAE, steps=100)
  assert (other.target_l0, other.sparsity_warmup_steps, other.b1) == (None, None, 0.9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_l0=0.0), r"TrainConfig.target_l0 must be a number in \(0, 16\]; got 0.0"),
    (dict(bandwidth=0.0), r"TrainConfig.bandwidth must be a number in \(0, inf\]; got 0.0"),
    (dict(sparsity_penalty=-1.0), r"TrainConfig.sparsity_penalty must be a number in \[0, inf"),
    (dict(steps=100, sparsity_warmup_steps=100),
     r"TrainConfig.sparsity_warmup_steps must be an integer in \[0, 99\]; got 100"),
    (dict(matryoshka_groups=(0.5, 0.5)), r"JumpReLU has none \(selection 'jumprelu'\)"),
])
def test_bad_jumprelu_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**{"sae": JUMP, **kwargs})


def test_step_flag_reaches_the_config():
  from sae_jax import cli  # noqa: PLC0415
  parser = cli.parser("test")
  for flags, want in (([], "fast"), (["--step", "dense"], "dense")):
    args = parser.parse_args(["--data", "synthetic", *flags])
    assert cli.config_from(args).train.step == want
  with pytest.raises(SystemExit):
    parser.parse_args(["--step", "sparse"])


def test_help_shows_every_default():
  from sae_jax import cli  # noqa: PLC0415
  parser = cli.parser("test")
  text = " ".join(parser.format_help().split())  # argparse wraps at the terminal's width
  for flag, default in (("--k K", 64), ("--dict-size DICT_SIZE", 65536),
                        ("--batch-size BATCH_SIZE", 4096), ("--tokens TOKENS", 100_000_000),
                        ("--selection {sampled,batchtopk,topk,jumprelu}", "sampled"),
                        ("--seed SEED", 0), ("--parents PARENTS", 0)):
    help_of = text[text.rindex(flag) + len(flag):].split(" --")[0]  # past the usage line
    assert f"default: {default}" in help_of, flag


def test_help_and_a_bad_value_answer_before_jax_starts():
  """train.py --help, and a bad value, answer in a fraction of a second:
  nothing the parser or the checks import starts JAX (2 s here)."""
  code = ("import sys; sys.path.insert(0, 'tests'); import scripts; train = scripts.load('train')\n"
          "try: code = train.main(sys.argv[1:])\n"
          "except SystemExit as stop: code = stop.code\n"
          "print('exit', code, 'jax' in sys.modules)\n")
  root = pathlib.Path(__file__).resolve().parent.parent
  for flags, want, said in (
      (["--help"], "exit 0 False", ""),
      (["--data", "synthetic", "--k", "0"], "exit 2 False", "error: SAEConfig.k must be"),
      (["--stream", "--seed", "-1"], "exit 2 False", "error: TrainConfig.seed must be"),
      (["--data", "synthetic", "--k", "4", "--dict-size", "8", "--steps", "0"], "exit 2 False",
       "error: TrainConfig.steps must be")):
    done = subprocess.run([sys.executable, "-c", code, *flags], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == want, (flags, done.stdout[-300:], done.stderr[-300:])
    assert done.stderr.startswith(said), (flags, done.stderr[-300:])

DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("name", ["config_npy_0.1.json", "config_synthetic_0.1.json"])
def test_a_config_json_of_the_previous_version_resumes(tmp_path, name):
  """config.json written by sae_jax 0.1 before runs recorded only what they
  used (a .npy run's holds the export and synthetic sections): its run
  resumes, and the file is rewritten as this version records it, the data
  fingerprint kept. A changed field is still refused."""
  saved = json.loads((DATA / name).read_text())
  assert "export" in saved and "synthetic" in saved
  npy = tmp_path / "acts.npy"
  np.save(npy, np.zeros((100, 16), np.float32))
  out = tmp_path / "run"
  out.mkdir()
  saved |= {"out": str(out)} | ({"data": str(npy)} if saved["data"] == "DATA" else {})
  fingerprint = {"kind": "npy", "bytes": 1}
  (out / "config.json").write_text(json.dumps(saved | {runconfig.FINGERPRINT: fingerprint}))
  # Built from flags, the sections the run does not use hold other values.
  config = dataclasses.replace(RunConfig.from_dict(saved), export=export.ExportConfig(
      model="elsewhere", backend="jax"))
  if saved["data"] != "synthetic":
    config = dataclasses.replace(config, synthetic=synthetic.SyntheticConfig(d_model=8))
  assert outdir.check_resume(out, config)  # resumes, and would end as it did
  now = json.loads((out / "config.json").read_text())
  assert now.pop(runconfig.FINGERPRINT) == fingerprint
  assert now == config.to_dict()
  assert ("synthetic" in now) == (saved["data"] == "synthetic") and "export" not in now
  assert outdir.check_resume(out, config)  # unchanged now
  # An end-only field may change, and the run would end otherwise.
  assert not outdir.check_resume(out, dataclasses.replace(config, inference="global"))
  other = dataclasses.replace(config, eval_tokens=config.eval_tokens + 1)
  with pytest.raises(ValueError, match=r"eval_tokens: saved \d+, now \d+"):
    outdir.check_resume(out, other)


def test_config_json_records_the_sections_the_data_use(tmp_path):
  train = TrainConfig(SAEConfig(16, 64, k=4), batch_size=64, steps=10)
  npy = tmp_path / "acts.npy"
  np.save(npy, np.zeros((100, 16), np.float32))
  for data, sections in (("synthetic", {"synthetic"}), (str(npy), set()),
                         ("pythia", {"export"})):
    config = RunConfig(train=train, out="x", data=data,
                       synthetic=synthetic.SyntheticConfig(d_model=16))
    d = config.to_dict()
    assert {"export", "synthetic"} & set(d) == sections, data
    assert RunConfig.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_the_same_data_spelled_otherwise_resumes(tmp_path, monkeypatch):
  """--data acts.npy, ./acts.npy and its absolute path are one file (its
  fingerprint checks the content); another file is another run."""
  monkeypatch.chdir(tmp_path)
  train = TrainConfig(SAEConfig(16, 64, k=4), batch_size=64, steps=10)
  for name in ("acts.npy", "other.npy"):
    np.save(tmp_path / name, np.zeros((100, 16), np.float32))
  saved = RunConfig(train=train, out="x", data="acts.npy").to_dict()
  for same in ("./acts.npy", str(tmp_path / "acts.npy"), "../" + tmp_path.name + "/acts.npy"):
    assert runconfig.differences(saved, RunConfig(train=train, out="x", data=same)) == []
  assert runconfig.differences(saved, RunConfig(train=train, out="x", data="other.npy")) == [
      "data: saved 'acts.npy', now 'other.npy'"]


def test_a_resume_under_other_numerics_is_refused_or_reported(tmp_path, capsys):
  """JAX_ENABLE_X64 changes the synthetic data and the step: a run
  checkpointed under one setting refuses to resume under the other. Another
  device count or latent split only reorders the sums over devices: said,
  not refused.
  (tests/test_robustness.py resumes a real run under the other setting.)"""
  train = TrainConfig(SAEConfig(16, 64, k=4), batch_size=64, steps=10)
  config = RunConfig(train=train, out=str(tmp_path), data="synthetic",
                     synthetic=synthetic.SyntheticConfig(d_model=16))
  outdir.check_resume(tmp_path, config)
  outdir.check_numerics(tmp_path)  # none recorded yet (a run of the previous version)
  outdir.check_data(tmp_path, config, resuming=False)
  recorded = json.loads((tmp_path / "config.json").read_text())[runconfig.NUMERICS]
  assert recorded == {"x64": False, "devices": jax.device_count(), "latent_shards": 1}
  outdir.check_numerics(tmp_path)  # the same: silent
  assert capsys.readouterr().out == ""
  with jax.enable_x64(True):
    assert outdir.numerics()["x64"]
    with pytest.raises(ValueError, match=r"checkpointed with JAX_ENABLE_X64 unset, and this "
                                         r"process has JAX_ENABLE_X64=1.*refusing to resume"):
      outdir.check_numerics(tmp_path)
    outdir.check_data(tmp_path, config, resuming=False)  # a fresh start records it
  with pytest.raises(ValueError, match=r"checkpointed with JAX_ENABLE_X64=1"):
    outdir.check_numerics(tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  saved[runconfig.NUMERICS] = {"x64": False, "devices": 2}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  outdir.check_numerics(tmp_path)
  said = capsys.readouterr().out
  assert f"resuming on {jax.device_count()} devices a run checkpointed on 2" in said
  assert "--latent-shards" not in said  # recorded without: split over 1, as now
  outdir.check_numerics(tmp_path, latent_shards=2)
  assert "resuming with --latent-shards 2 a run checkpointed with 1" in capsys.readouterr().out
  outdir.check_data(tmp_path, config, resuming=True)
  assert outdir.check_resume(tmp_path, config)  # the records are not part of the config
  assert json.loads((tmp_path / "config.json").read_text())[runconfig.NUMERICS]["devices"] == (
      jax.device_count())  # the resume recorded its own


def test_flags_a_rule_ignores_are_named(capsys):
  """--l with TopK, --score with BatchTopK, --sketch with the l2 score: each
  does nothing, and train.py says so once before it starts."""
  from sae_jax import cli  # noqa: PLC0415
  from tests.helpers import train_script  # noqa: PLC0415
  parser = cli.parser("test")
  for flags, ignored in (
      (["--selection", "topk", "--l", "4", "--score", "entropy"], ["--l 4.0", "--score entropy"]),
      (["--selection", "batchtopk", "--pool-every", "5", "--sample-pool"],
       ["--sample-pool True", "--pool-every 5"]),
      (["--sketch", "16"], ["--sketch 16"]),
      (["--score", "leverage", "--sketch", "16", "--l", "2"], []),
      (["--selection", "topk", "--k", "8"], [])):
    assert cli.ignored_flags(parser, parser.parse_args(flags)) == ignored, flags
  # Said before the run refuses its bad --k: before any work.
  assert train_script.main(["--data", "synthetic", "--selection", "topk", "--l", "4",
                            "--k", "0"]) == 2
  out, err = capsys.readouterr()
  assert out.startswith("note: --l 4.0 does nothing with --selection topk\n")
  assert err.startswith("error: ")


def test_a_resume_ignores_fields_that_do_nothing(tmp_path):
  """--l with TopK, --sketch with the l2 score, --tokens with --steps: a
  change of a field the run never read does not block its resume."""
  for sae, change, refused in (
      (SAEConfig(16, 64, k=4, selection="topk"), dict(l=4.0, score="entropy"), None),
      (SAEConfig(16, 64, k=4, l=2.0), dict(sketch=8, ridge=0.5), None),
      (SAEConfig(16, 64, k=4, l=2.0, score="leverage"), dict(sketch=8), "train.sae.sketch"),
      (SAEConfig(16, 64, k=4, l=2.0), dict(l=4.0), "train.sae.l"),
      (SAEConfig(16, 64, k=4, selection="topk"), dict(selection="batchtopk"),
       "train.sae.selection")):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    config = RunConfig(train=TrainConfig(sae, batch_size=64, steps=10), out=str(out),
                       data="synthetic", synthetic=synthetic.SyntheticConfig(d_model=16))
    outdir.check_resume(out, config)
    other = dataclasses.replace(config, train=dataclasses.replace(
        config.train, sae=dataclasses.replace(sae, **change)))
    if refused is None:
      outdir.check_resume(out, other)
    else:
      with pytest.raises(ValueError, match=refused):
        outdir.check_resume(out, other)


def test_a_resume_ignores_a_cache_dir_its_data_never_read(tmp_path):
  """--cache-dir is read by --data pythia without --stream only."""
  train = TrainConfig(SAEConfig(16, 64, k=4), batch_size=64, steps=10)
  for i, (data, stream, refused) in enumerate((("synthetic", False, False),
                                               ("pythia", True, False),
                                               ("pythia", False, True))):
    out = tmp_path / f"run{i}"
    out.mkdir()
    config = RunConfig(train=train, out=str(out), data=data, stream=stream,
                       export=export.ExportConfig(backend="jax"),
                       synthetic=synthetic.SyntheticConfig(d_model=16))
    outdir.check_resume(out, config)
    moved = dataclasses.replace(config, cache_dir=str(tmp_path / "elsewhere"))
    if refused:
      with pytest.raises(ValueError, match=r"cache_dir: saved 'cache/pythia-160m', now"):
        outdir.check_resume(out, moved)
    else:
      assert outdir.check_resume(out, moved)


def test_a_resume_ignores_tokens_while_steps_are_set(tmp_path):
  train = TrainConfig(SAEConfig(16, 64, k=4), batch_size=64, steps=10)
  config = RunConfig(train=train, out=str(tmp_path), data="synthetic",
                     synthetic=synthetic.SyntheticConfig(d_model=16))
  outdir.check_resume(tmp_path, config)
  other_tokens = dataclasses.replace(config, train=dataclasses.replace(train, tokens=12345))
  assert outdir.check_resume(tmp_path, other_tokens)  # --tokens did nothing: resumes
  by_tokens = dataclasses.replace(config, train=dataclasses.replace(train, steps=None,
                                                                    tokens=640))
  with pytest.raises(ValueError, match=r"train.steps: saved 10, now None"):
    outdir.check_resume(tmp_path, by_tokens)
